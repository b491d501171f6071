"""Conversations, turns, feedback and per-channel settings in SQLite (PARLEY_HOME/parley.db).

One ``Store`` per process; it is safe to share between threads (one connection per thread, WAL
mode so readers never block the writer). Every finished turn is committed before the caller is
told it is done, with ``synchronous=FULL``: the commit is on disk when ``add_turn`` returns, so
a killed process or a power cut never loses it (NORMAL in WAL mode may lose the last commits on
power loss; a turn is worth the fsync).

Conversations belong to an owner (bot/owners.py). Methods that read or change a conversation
take ``owner=``; when it is given and the conversation is someone else's, the answer is the same
NotFoundError as for a conversation that does not exist: no data, and no hint that it exists.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bot.errors import NotFoundError, RequestError
from bot.owners import LOCAL

_HOST = socket.gethostname()
_WRITER = f"{_HOST}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


MAX_CORRECTION_CHARS = 8000
"""Longest better reply a person may write (a correction is training data, not a document)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT 'web',       -- web, api, cli, slack, discord
    owner TEXT NOT NULL DEFAULT 'local',      -- bot/owners.py: user:NAME, browser:ID, local, slack...
    external_key TEXT,                        -- e.g. slack:T1:C1:thread_ts; unique when set
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS conversations_external ON conversations(external_key)
    WHERE external_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS turns (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    messages TEXT NOT NULL,        -- JSON: the new input messages of this turn (user/system)
    reply TEXT NOT NULL,
    model TEXT NOT NULL,
    adapter TEXT NOT NULL DEFAULT 'base',
    params TEXT NOT NULL DEFAULT '{}',
    tool_calls TEXT NOT NULL DEFAULT '[]',
    finish_reason TEXT NOT NULL,
    usage TEXT NOT NULL DEFAULT '{}',
    external_id TEXT,              -- e.g. the Slack ts / Discord message id of the reply
    prompt TEXT,                   -- JSON: every message the model was given (system, sources, history)
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_conversation ON turns(conversation_id, seq);
CREATE INDEX IF NOT EXISTS turns_external ON turns(external_id);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    turn_id TEXT NOT NULL REFERENCES turns(id) ON DELETE CASCADE,
    rating INTEGER NOT NULL,       -- +1 good, -1 bad
    comment TEXT NOT NULL DEFAULT '',
    correction TEXT,               -- a better reply, when the person wrote one
    source TEXT NOT NULL DEFAULT 'web',
    user TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_turn ON feedback(turn_id);
CREATE TABLE IF NOT EXISTS settings (
    scope TEXT NOT NULL,           -- e.g. slack:T1:C1, discord:G1:C1, conversation:<id>
    key TEXT NOT NULL,
    value TEXT NOT NULL,           -- JSON
    updated_at REAL NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE TABLE IF NOT EXISTS seen_events (
    key TEXT PRIMARY KEY,          -- dedupe of retried platform events (slack event_id...)
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Turn:
    id: str
    conversation_id: str
    seq: int
    messages: list[dict[str, Any]]
    reply: str
    model: str
    adapter: str
    params: dict[str, Any]
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    usage: dict[str, Any]
    external_id: str | None
    created_at: float
    prompt: list[dict[str, Any]] | None = None
    """Every message the model was given, when the turn recorded it (older turns did not)."""


class Store:
    """The conversation store. ``Store(path)`` creates the file and schema when missing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        with self._conn() as conn:
            conn.executescript(SCHEMA)
            # Databases made before conversations had owners: add the column (they were the
            # single local user's), then the index that lists a person's conversations.
            columns = {r["name"] for r in conn.execute("PRAGMA table_info(conversations)")}
            if "owner" not in columns:
                conn.execute("ALTER TABLE conversations ADD COLUMN owner TEXT NOT NULL DEFAULT 'local'")
            if "prompt" not in {r["name"] for r in conn.execute("PRAGMA table_info(turns)")}:
                conn.execute("ALTER TABLE turns ADD COLUMN prompt TEXT")
            conn.execute("CREATE INDEX IF NOT EXISTS conversations_owner ON conversations(owner, updated_at)")
        self._mark_interrupted()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    def _write(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(sql, args)
                conn.execute("COMMIT")
                return cur
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    # -- conversations -------------------------------------------------------------------------
    def create_conversation(self, *, owner: str = LOCAL, title: str = "", source: str = "web",
                            external_key: str | None = None) -> str:
        cid = uuid.uuid4().hex
        now = time.time()
        self._write("INSERT INTO conversations (id, title, source, owner, external_key, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)", (cid, title[:200], source, owner, external_key, now, now))
        return cid

    def conversation_for(self, external_key: str, *, source: str, title: str = "") -> str:
        """The conversation bound to a platform thread, created on first use (race-safe).

        Platform threads are owned by the platform (``slack``, ``discord``): the platform's own
        channel permissions decide who reads them.
        """
        row = self._conn().execute("SELECT id FROM conversations WHERE external_key = ?",
                                   (external_key,)).fetchone()
        if row:
            return row["id"]
        try:
            return self.create_conversation(owner=source, title=title, source=source, external_key=external_key)
        except sqlite3.IntegrityError:  # another thread created it first
            row = self._conn().execute("SELECT id FROM conversations WHERE external_key = ?",
                                       (external_key,)).fetchone()
            return row["id"]

    def get_conversation(self, conversation_id: str, owner: str | None = None) -> dict[str, Any]:
        """The conversation row; NotFoundError when it does not exist or is not ``owner``'s."""
        row = self._conn().execute("SELECT * FROM conversations WHERE id = ?", (str(conversation_id),)).fetchone()
        if row is None or (owner is not None and row["owner"] != owner):
            raise NotFoundError(f"conversation {str(conversation_id)[:64]!r} does not exist (or is not yours)")
        return dict(row)

    def list_conversations(self, limit: int = 50, source: str | None = None,
                           owner: str | None = None) -> list[dict[str, Any]]:
        """Newest first; only ``owner``'s when given (front ends always give it)."""
        where, args = [], []
        if source:
            where.append("source = ?")
            args.append(source)
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        sql = "SELECT * FROM conversations" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY updated_at DESC LIMIT ?"
        return [dict(r) for r in self._conn().execute(sql, (*args, limit))]

    def delete_conversation(self, conversation_id: str, owner: str | None = None) -> None:
        """Delete a conversation with its turns and their feedback (owner-checked when given)."""
        self.get_conversation(conversation_id, owner)
        self._write("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # -- turns ---------------------------------------------------------------------------------
    def add_turn(self, conversation_id: str, *, messages: list[dict[str, Any]], reply: str, model: str,
                 adapter: str = "base", params: dict[str, Any] | None = None,
                 tool_calls: list[dict[str, Any]] | None = None, finish_reason: str = "stop",
                 usage: dict[str, Any] | None = None, external_id: str | None = None,
                 turn_id: str | None = None) -> str:
        """Append a finished turn; returns its id (feedback attaches to it)."""
        turn_id = turn_id or uuid.uuid4().hex
        now = time.time()
        with self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                    raise NotFoundError(f"conversation {conversation_id!r} does not exist")
                seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM turns WHERE conversation_id = ?",
                                   (conversation_id,)).fetchone()[0]
                conn.execute(
                    "INSERT INTO turns (id, conversation_id, seq, messages, reply, model, adapter, params,"
                    " tool_calls, finish_reason, usage, external_id, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (turn_id, conversation_id, seq, json.dumps(messages), reply, model, adapter,
                     json.dumps(params or {}), json.dumps(tool_calls or [], default=str), finish_reason,
                     json.dumps(usage or {}), external_id, now))
                title_row = conn.execute("SELECT title FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
                if not title_row["title"]:
                    first_user = next((m["content"] for m in messages if m.get("role") == "user"), "")
                    conn.execute("UPDATE conversations SET title = ? WHERE id = ?",
                                 (" ".join(str(first_user).split())[:80], conversation_id))
                conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return turn_id

    # -- a turn in two steps: begun when the message arrives, finished with the reply ----------
    def begin_turn(self, conversation_id: str, *, messages: list[dict[str, Any]], model: str, adapter: str = "base",
                   params: dict[str, Any] | None = None) -> str:
        """Store the person's message now, as a turn with finish reason ``running``.

        Why two steps: a process killed while it generates (kill -9, out of memory, power cut)
        must not lose the message the person sent. ``finish_turn`` fills in the reply; a turn
        still ``running`` when its process is gone is marked ``interrupted`` when the store is
        next opened (``_mark_interrupted``).
        """
        return self.add_turn(conversation_id, messages=messages, reply="", model=model, adapter=adapter,
                             params=params, finish_reason="running", usage={"writer": _WRITER})

    def finish_turn(self, turn_id: str, *, reply: str, finish_reason: str, tool_calls: list[dict[str, Any]] | None = None,
                    usage: dict[str, Any] | None = None, prompt: list[dict[str, Any]] | None = None) -> None:
        """Fill in the reply. ``prompt``: every message the model was given (the system prompt, the
        retrieved sources, the history): training data from this turn uses exactly that context."""
        self._write("UPDATE turns SET reply = ?, finish_reason = ?, tool_calls = ?, usage = ?, prompt = ? WHERE id = ?",
                    (reply, finish_reason, json.dumps(tool_calls or [], default=str), json.dumps(usage or {}),
                     json.dumps(prompt, default=str) if prompt is not None else None, turn_id))

    def _mark_interrupted(self) -> None:
        """Turns left ``running`` by a process of this host that is gone become ``interrupted``.

        Only this host's dead writers: another live process on the same PARLEY_HOME (or another
        host sharing the file) may still be generating its turns.
        """
        rows = self._conn().execute("SELECT id, usage FROM turns WHERE finish_reason = 'running'").fetchall()
        for row in rows:
            writer = json.loads(row["usage"] or "{}").get("writer", "")
            host, _, pid = writer.rpartition(":")
            if host == _HOST and pid.isdigit() and not _alive(int(pid)):
                self._write("UPDATE turns SET finish_reason = 'interrupted' WHERE id = ? AND finish_reason = 'running'",
                            (row["id"],))

    def set_turn_external_id(self, turn_id: str, external_id: str) -> None:
        self._write("UPDATE turns SET external_id = ? WHERE id = ?", (external_id, turn_id))

    def turns(self, conversation_id: str, owner: str | None = None) -> list[Turn]:
        if owner is not None:
            self.get_conversation(conversation_id, owner)
        rows = self._conn().execute("SELECT * FROM turns WHERE conversation_id = ? ORDER BY seq",
                                    (conversation_id,)).fetchall()
        return [_turn(r) for r in rows]

    def get_turn(self, turn_id: str) -> Turn:
        row = self._conn().execute("SELECT * FROM turns WHERE id = ?", (str(turn_id),)).fetchone()
        if row is None:
            raise NotFoundError(f"turn {str(turn_id)[:64]!r} does not exist (or is not yours)")
        return _turn(row)

    def turn_by_external_id(self, external_id: str) -> Turn | None:
        row = self._conn().execute("SELECT * FROM turns WHERE external_id = ?", (external_id,)).fetchone()
        return _turn(row) if row else None

    def history(self, conversation_id: str, owner: str | None = None) -> list[dict[str, Any]]:
        """The conversation as chat messages (inputs and replies in order), for the next turn."""
        out: list[dict[str, Any]] = []
        for turn in self.turns(conversation_id, owner):
            if turn.finish_reason == "running":  # another request of this conversation, still generating
                continue
            out.extend({"role": m["role"], "content": m["content"]} for m in turn.messages)
            out.append({"role": "assistant", "content": turn.reply})
        return out

    def truncate_after(self, conversation_id: str, seq: int, owner: str | None = None) -> None:
        """Forget turns after ``seq`` (retry and edit in the UI branch from an earlier turn)."""
        if owner is not None:
            self.get_conversation(conversation_id, owner)
        self._write("DELETE FROM turns WHERE conversation_id = ? AND seq > ?", (conversation_id, seq))

    # -- feedback ------------------------------------------------------------------------------
    def add_feedback(self, turn_id: str, rating: int, *, comment: str = "", correction: str | None = None,
                     source: str = "web", user: str = "", owner: str | None = None) -> int:
        """Rate a turn. With ``owner``, only that owner's turns can be rated (others: 404), and the
        rating is recorded as theirs (``user``)."""
        if rating not in (-1, 1) or isinstance(rating, bool):
            raise RequestError(f"rating must be 1 (good) or -1 (bad), not {rating!r}")
        if correction is not None and len(correction) > MAX_CORRECTION_CHARS:
            raise RequestError(f"the correction is {len(correction)} characters; the limit is "
                               f"{MAX_CORRECTION_CHARS}: send a shorter better reply")
        turn = self.get_turn(turn_id)  # a clear 404 instead of a foreign-key failure
        if owner is not None:
            try:
                self.get_conversation(turn.conversation_id, owner)
            except NotFoundError:
                raise NotFoundError(f"turn {str(turn_id)[:64]!r} does not exist (or is not yours)") from None
            user = user or owner
        cur = self._write("INSERT INTO feedback (turn_id, rating, comment, correction, source, user, created_at)"
                          " VALUES (?, ?, ?, ?, ?, ?, ?)",
                          (turn_id, rating, comment, correction, source, user, time.time()))
        return int(cur.lastrowid)

    def feedback(self, turn_id: str | None = None) -> list[dict[str, Any]]:
        if turn_id:
            rows = self._conn().execute("SELECT * FROM feedback WHERE turn_id = ? ORDER BY id", (turn_id,))
        else:
            rows = self._conn().execute("SELECT * FROM feedback ORDER BY id")
        return [dict(r) for r in rows]

    def feedback_examples(self, min_rating: int = 1) -> Iterator[dict[str, Any]]:
        """Turns people rated, as OpenAI ``messages`` rows for fine-tuning.

        A turn yields its conversation up to and including the reply when its net rating is good:
        each person's latest vote counts once, and the votes are summed (so one 👍 does not
        outvote many 👎). A turn with a correction yields the newest correction instead, whatever
        the votes. Bad turns without a correction are skipped.
        """
        rows = self._conn().execute(
            "WITH latest AS (SELECT id, turn_id, rating, ROW_NUMBER() OVER ("
            "  PARTITION BY turn_id, CASE WHEN user = '' THEN 'id:' || id ELSE user END ORDER BY id DESC) AS k"
            "  FROM feedback)"
            " SELECT turn_id, SUM(rating) AS rating,"
            "  (SELECT correction FROM feedback c WHERE c.turn_id = latest.turn_id AND c.correction IS NOT NULL"
            "   AND c.correction != '' ORDER BY c.id DESC LIMIT 1) AS correction"
            " FROM latest WHERE k = 1 GROUP BY turn_id ORDER BY MIN(id)").fetchall()
        for row in rows:
            turn = self.get_turn(row["turn_id"])
            reply = row["correction"] or (turn.reply if row["rating"] >= min_rating else None)
            if not reply:
                continue
            yield {"messages": [*self.context_of(turn), {"role": "assistant", "content": reply}],
                   "turn_id": turn.id, "adapter": turn.adapter}

    def context_of(self, turn: Turn) -> list[dict[str, Any]]:
        """The messages that produced ``turn``'s reply: what the model was given when the turn
        recorded it (system prompt, retrieved sources, history), else rebuilt from the history.

        Why it matters: a 👍 on an answer built from retrieved passages, trained without those
        passages, teaches the model to invent the answer."""
        if turn.prompt:
            return [{"role": m["role"], "content": m.get("content") or ""} for m in turn.prompt
                    if m.get("role") in ("system", "user", "assistant", "tool")]
        messages: list[dict[str, Any]] = []
        for earlier in self.turns(turn.conversation_id):
            if earlier.seq >= turn.seq:
                break
            messages.extend({"role": m["role"], "content": m["content"]} for m in earlier.messages)
            messages.append({"role": "assistant", "content": earlier.reply})
        messages.extend({"role": m["role"], "content": m["content"]} for m in turn.messages)
        return messages

    def preference_pairs(self):
        """Preference pairs for DPO from votes and corrections (see bot/preferences.py)."""
        from bot.preferences import Preferences

        return Preferences(self).pairs()

    # -- settings (per channel / workspace / conversation) -------------------------------------
    def set_setting(self, scope: str, key: str, value: Any) -> None:
        self._write("INSERT INTO settings (scope, key, value, updated_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT(scope, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                    (scope, key, json.dumps(value), time.time()))

    def get_settings(self, scope: str) -> dict[str, Any]:
        rows = self._conn().execute("SELECT key, value FROM settings WHERE scope = ?", (scope,))
        return {r["key"]: json.loads(r["value"]) for r in rows}

    def delete_setting(self, scope: str, key: str) -> None:
        self._write("DELETE FROM settings WHERE scope = ? AND key = ?", (scope, key))

    # -- dedupe ----------------------------------------------------------------------------------
    def mark_seen(self, key: str) -> bool:
        """Record a platform event id; True the first time, False for a retry of the same event."""
        try:
            self._write("INSERT INTO seen_events (key, created_at) VALUES (?, ?)", (key, time.time()))
            return True
        except sqlite3.IntegrityError:
            return False


def _turn(row: sqlite3.Row) -> Turn:
    return Turn(id=row["id"], conversation_id=row["conversation_id"], seq=row["seq"],
                messages=json.loads(row["messages"]), reply=row["reply"], model=row["model"],
                adapter=row["adapter"], params=json.loads(row["params"]),
                tool_calls=json.loads(row["tool_calls"]), finish_reason=row["finish_reason"],
                usage=json.loads(row["usage"]), external_id=row["external_id"],
                created_at=row["created_at"], prompt=json.loads(row["prompt"]) if row["prompt"] else None)
