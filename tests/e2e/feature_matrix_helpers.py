"""Drivers for the feature matrix (tests/e2e/test_feature_matrix.py): one per front end.

Every driver talks to Parley the way its users do: a real ``parley serve`` subprocess (browser,
API, Gradio API), real ``parley chat`` subprocesses (terminal), and for Slack and Discord the real
bolt / discord.py code paths over the real Assistant against local mock platform servers. Checks
read what the user sees (page text, API fields, terminal output, platform messages) and confirm
it with what the server stored (``parley.db`` read with sqlite3).

The matrix itself (which feature each front end offers) is ``OFFERED`` below; conftest.py prints
and saves the results in that shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

# -- the matrix ------------------------------------------------------------------------------------
FEATURES = ("plain-chat", "streaming", "sentiment-command", "translate-command", "search-command",
            "auto-routing", "always-search", "feedback", "adapter")
FRONTENDS = ("browser", "api", "gradio-api", "terminal", "slack", "discord")

NOT_OFFERED: dict[tuple[str, str], str] = {
    ("always-search", "gradio-api"): "api_chat (ui/app.py) has no always-search parameter",
    ("always-search", "terminal"): "`parley chat` has no flag or command for it",
    ("feedback", "gradio-api"): "the like event is not exposed (api_name=False)",
    ("feedback", "terminal"): "`parley chat` has no way to rate a reply",
}
"""(feature, front end) cells the front end does not offer, with why (shown as — in the matrix)."""

OFFERED: dict[str, tuple[str, ...]] = {
    feature: tuple(f for f in FRONTENDS if (feature, f) not in NOT_OFFERED) for feature in FEATURES}

SOURCE_OF = {"browser": "web", "gradio-api": "web", "api": "api", "terminal": "cli", "slack": "slack",
             "discord": "discord"}
"""The ``conversations.source`` each front end stores its turns under."""

MAX_TOKENS = 32
PARIS_Q = "What is the capital of France?"
STREAM_Q = "Write three short sentences about the sea."
SENTIMENT_CMD = "/sentiment I absolutely loved it, a wonderful day!"
TRANSLATE_CMD = "/translate to French Good morning"
SEARCH_CMD = "/search refund"
ROUTED_TRANSLATE = "Translate 'good morning' into French"
RAG_Q = "My widget broke, can I send it back?"
"""Not routed to search on its own (router scores below threshold): only always-search searches."""
DOCS = {
    "refund-policy.md": "# Refund policy of Acme Widgets\n\nCustomers may return any widget within 45 days of "
                        "delivery for a full refund. Opened software licences cannot be refunded.\n",
    "shipping.md": "# Shipping\n\nStandard shipping takes 3 to 7 business days. Express shipping costs 12 "
                   "euros.\n",
}
ADAPTER = "matrix-lora"

_unique = itertools.count(int(time.time() * 1000) % 10_000_000 * 100)


def unique() -> int:
    """A number no other message of this run uses (platform ids, timestamps, event ids)."""
    return next(_unique)


def wait_until(what: str, probe: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1,
               detail: Callable[[], str] | None = None):
    """Poll ``probe`` until it returns something truthy; AssertionError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"; {detail()}" if detail else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


# -- the home, the adapter and the documents -----------------------------------------------------
def parley_command() -> list[str]:
    exe = shutil.which("parley")
    return [exe] if exe else [sys.executable, "-m", "bot.cli"]


def child_env(home: Path) -> dict[str, str]:
    return {**os.environ, "PARLEY_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
            "TERM": "dumb"}


def make_lora_adapter(model_dir: Path, out: Path) -> Path:
    """A real LoRA adapter for the model in ``model_dir`` whose (random) weights change its output.

    ``init_lora_weights=False`` gives B a random init too (the default zero B would be a no-op).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(str(out))
    return out


class Home:
    """A throw-away PARLEY_HOME: models/ reuses the converted embedded model, a LoRA adapter in
    adapters/, and the two documents being indexed with `parley index add` (in the background, so
    a server can start meanwhile: ``ready()`` waits for it)."""

    def __init__(self, path: Path, embedded_home: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        (path / "models").symlink_to((embedded_home / "models").resolve(), target_is_directory=True)
        docs = path / "docs"
        docs.mkdir()
        for name, text in DOCS.items():
            (docs / name).write_text(text, encoding="utf-8")
        self._log = open(path / "index.log", "w")
        self._index = subprocess.Popen([*parley_command(), "index", "add", str(docs)], env=child_env(path),
                                       stdout=self._log, stderr=subprocess.STDOUT)
        try:  # while the index builds
            make_lora_adapter(path / "models" / "smollm2-135m", path / "adapters" / ADAPTER)
        except BaseException:
            self.close()
            raise

    def ready(self, timeout: float = 300.0) -> Path:
        """The home, once the documents are indexed; RuntimeError with the output otherwise."""
        try:
            code = self._index.wait(timeout)
        except subprocess.TimeoutExpired:
            self._index.kill()
            code = "timeout"
        self._log.flush()
        if code != 0:
            output = (self.path / "index.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"`parley index add` failed ({code}):\n{output}")
        return self.path

    def close(self) -> None:
        if self._index.poll() is None:
            self._index.kill()
            self._index.wait(5)
        self._log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running `parley serve`."""

    url: str
    home: Path
    process: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


@contextlib.contextmanager
def parley_serve(home: Home, timeout: float = 180.0):
    """`parley serve` on a free loopback port with PARLEY_HOME=home; yields a Server once it is
    healthy and the documents are indexed; always stops it."""
    import httpx

    port = free_port()
    home_dir = home.path
    log = home_dir / "serve.log"
    out = open(log, "w")
    process = subprocess.Popen([*parley_command(), "serve", "--host", "127.0.0.1", "--port", str(port),
                                "--max-new-tokens", str(MAX_TOKENS)], env=child_env(home_dir), stdout=out,
                               stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", home_dir, process, log)
    try:
        home.ready()
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"`parley serve` exited with {process.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"`parley serve` was not ready in {timeout:.0f}s:\n{server.log_tail()}")
            time.sleep(0.25)
        yield server
    finally:
        process.terminate()
        try:
            # uvicorn's graceful shutdown waits for open streams (gradio_client's heartbeat keeps one
            # open ~10 s after close()); this home is thrown away, so do not wait for it.
            process.wait(3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        out.close()


# -- what the server stored ------------------------------------------------------------------------
@dataclass
class StoredTurn:
    id: str
    conversation_id: str
    source: str
    user_text: str
    reply: str
    adapter: str
    params: dict[str, Any]
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    external_id: str | None
    created_at: float
    error: str | None = None
    """The turn's stored error (usage.error), when it failed."""

    def tools(self, via: str | None = None) -> list[str]:
        return [c.get("name") for c in self.tool_calls if via is None or c.get("via") == via]

    def call(self, name: str) -> dict[str, Any] | None:
        return next((c for c in self.tool_calls if c.get("name") == name), None)


RUNNING = ("running", "")
"""Finish reasons of a turn still being generated (bot/store.py stores the message when it starts)."""


class StoreReader:
    """Reads PARLEY_HOME/parley.db with sqlite3, as an operator would (the server owns writes)."""

    def __init__(self, path: Path):
        self.path = path

    def _rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        if not self.path.exists():
            return []
        conn = sqlite3.connect(self.path, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def turns(self, *, since: float = 0.0, source: str | None = None) -> list[StoredTurn]:
        sql = ("SELECT t.*, c.source AS source FROM turns t JOIN conversations c ON c.id = t.conversation_id "
               "WHERE t.created_at >= ?")
        args: list[Any] = [since]
        if source:
            sql += " AND c.source = ?"
            args.append(source)
        out = []
        for r in self._rows(sql + " ORDER BY t.created_at", tuple(args)):
            messages = json.loads(r["messages"] or "[]")
            user = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
            usage = json.loads(r["usage"] or "{}")
            out.append(StoredTurn(id=r["id"], conversation_id=r["conversation_id"], source=r["source"],
                                  user_text=str(user), reply=r["reply"], adapter=r["adapter"],
                                  params=json.loads(r["params"] or "{}"),
                                  tool_calls=json.loads(r["tool_calls"] or "[]"),
                                  finish_reason=r["finish_reason"], external_id=r["external_id"],
                                  created_at=r["created_at"], error=usage.get("error")))
        return out

    def turn(self, turn_id: str) -> StoredTurn | None:
        return next((t for t in self.turns() if t.id == turn_id), None)

    def wait_turn(self, user_text: str, *, since: float, source: str | None = None, timeout: float = 90.0,
                  external_id: bool = False) -> StoredTurn:
        """The finished turn for ``user_text`` stored after ``since`` (optionally once its external id
        is set). A turn is stored as ``running`` when it starts; that row does not count yet."""
        def probe():
            for t in reversed(self.turns(since=since, source=source)):
                if t.user_text.strip() == user_text.strip() and t.finish_reason not in RUNNING \
                        and (t.external_id or not external_id):
                    return t
            return None

        def seen() -> str:
            return f"turns since then: {[(t.source, t.finish_reason, t.user_text[:40]) for t in self.turns(since=since)]}"

        return wait_until(f"a finished {source or ''} turn for {user_text!r}", probe, timeout, detail=seen)

    def feedback(self, turn_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._rows("SELECT * FROM feedback WHERE turn_id = ? ORDER BY id", (turn_id,))]


# -- terminal ---------------------------------------------------------------------------------------
@dataclass
class CliRun:
    stdout: str
    stderr: str
    returncode: int
    chunks: list[tuple[float, str]] = field(default_factory=list)
    """(seconds since start, text) of each read from stdout, for streaming checks."""
    started_at: float = 0.0
    """time.time() when it started (its turn is stored after that)."""


CLI_RUNS: dict[str, tuple[list[str], str | None]] = {
    "message": (["chat", "--message", PARIS_Q, "--temperature", "0", "--max-new-tokens", str(MAX_TOKENS)], None),
    "piped": (["chat", "--temperature", "0", "--max-new-tokens", str(MAX_TOKENS)], STREAM_Q),
}
"""The one-shot `parley chat` runs of the terminal cells: name -> (arguments, stdin)."""


def run_cli(home: Path, args: list[str], *, stdin: str | None = None, timeout: float = 180.0) -> CliRun:
    """Run `parley chat ...` to the end, recording when each piece of stdout arrived."""
    started_at = time.time()
    proc = subprocess.Popen([*parley_command(), *args], env=child_env(home), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    if stdin is not None:
        proc.stdin.write(stdin.encode())
    proc.stdin.close()
    started = time.monotonic()
    chunks: list[tuple[float, str]] = []
    raw = b""
    fd = proc.stdout.fileno()
    try:
        while True:
            if time.monotonic() - started > timeout:
                raise AssertionError(f"`parley {' '.join(args)}` did not finish in {timeout:.0f}s; "
                                     f"output so far: {raw.decode(errors='replace')[-500:]!r}")
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            data = os.read(fd, 65536)
            if not data:
                break
            raw += data
            chunks.append((time.monotonic() - started, data.decode(errors="replace")))
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    reader.join(10)
    return CliRun(raw.decode(errors="replace"), b"".join(err).decode(errors="replace"), proc.returncode, chunks,
                  started_at)


class Repl:
    """An interactive `parley chat` on a pseudo-terminal, as a person types into it."""

    PROMPT = re.compile(r"(?m)^([\w.-]+)> $")

    def __init__(self, home: Path, args: Iterable[str] = ()):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become `parley chat`
            os.execvpe(parley_command()[0], [*parley_command(), "chat", *args], child_env(home))
        self.buffer = ""
        self.adapter = "base"

    def read_until_prompt(self, timeout: float = 120.0) -> str:
        """Everything up to the next `NAME> ` prompt (which is consumed)."""
        deadline = time.monotonic() + timeout
        while True:
            match = self.PROMPT.search(self.buffer.replace("\r", ""))
            if match:
                text = self.buffer.replace("\r", "")
                out, self.buffer = text[:match.start()], text[match.end():]
                self.adapter = match.group(1)
                return out
            if time.monotonic() > deadline:
                raise AssertionError(f"no `parley chat` prompt within {timeout:.0f}s; it printed: "
                                     f"{self.buffer[-800:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # the child exited
                    data = b""
                if not data:
                    raise AssertionError(f"`parley chat` exited; it printed: {self.buffer[-800:]!r}")
                self.buffer += data.decode(errors="replace")

    def send(self, line: str, timeout: float = 120.0) -> str:
        """Type one line, return what was printed before the next prompt (without the echo)."""
        os.write(self.fd, line.encode() + b"\n")
        out = self.read_until_prompt(timeout)
        echo = line.strip()
        return out.split(echo, 1)[1] if echo and echo in out else out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.fd, b"/quit\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        with contextlib.suppress(OSError):
            os.close(self.fd)


# -- browser ----------------------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]

_BOT_TEXT_JS = """() => {
  const chat = document.querySelector('#parley-chatbot') || document;
  return [...chat.querySelectorAll('.message.bot')].map(e => e.innerText).join('\\n');
}"""

# Records the text of the last bot message group on every DOM change (to see a reply grow).
_WATCH_JS = """() => {
  window.__parleySnaps = [];
  const snap = () => {
    const chat = document.querySelector('#parley-chatbot') || document;
    const bots = chat.querySelectorAll('.message.bot');
    const last = bots.length ? bots[bots.length - 1].innerText : '';
    const snaps = window.__parleySnaps;
    if (!snaps.length || snaps[snaps.length - 1] !== last) snaps.push(last);
  };
  window.__parleyObserver = new MutationObserver(snap);
  window.__parleyObserver.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


class BrowserChat:
    """The Chat tab, driven by clicks and typing; reads what a person sees."""

    def __init__(self, page, server: Server):
        self.page, self.server = page, server
        self.store = StoreReader(server.home / "parley.db")

    def open(self, *, wait_loaded: bool = True) -> "BrowserChat":
        """Load the page; by default also wait for its page-load events (which fill in the
        collections list last): a message sent before they finish can vanish, see
        test_message_sent_while_the_page_loads_stays."""
        self.page.goto(self.server.url + "/")
        self.page.locator("#parley-input textarea").wait_for()
        if wait_loaded and self.page.locator("#parley-collections").count():
            self.page.locator("#parley-collections input[type=checkbox]").first.wait_for(state="attached",
                                                                                        timeout=60_000)
        return self

    def _settings(self):
        """Open the Settings accordion of the Chat tab (once)."""
        temperature = self.page.get_by_label("Temperature (0 = greedy)").and_(self.page.locator("input[type=number]"))
        if not temperature.first.is_visible():
            self.page.get_by_role("button", name=re.compile(r"^\s*Settings")).first.click()
            temperature.first.wait_for()
        return temperature.first

    def set_temperature(self, value: float) -> None:
        box = self._settings()
        box.fill(str(value))
        box.press("Enter")

    def choose_adapter(self, name: str) -> list[str]:
        """Pick ``name`` in the Adapter dropdown; returns the choices that were offered."""
        self._settings()
        dropdown = self.page.get_by_label("Adapter", exact=True)
        dropdown.first.click()
        options = self.page.get_by_role("option")
        options.first.wait_for()
        offered = [o.inner_text().strip() for o in options.all()]
        self.page.get_by_role("option", name=name, exact=True).click()
        wait_until(f"the Adapter dropdown to show {name}", lambda: dropdown.first.input_value() == name, 10)
        return offered

    def always_search(self, on: bool = True) -> None:
        self._settings()
        box = self.page.get_by_label("Always search my documents")
        box.set_checked(on)

    def send(self, text: str) -> float:
        """Type ``text`` and click Send; returns the time the turn started (for store lookups)."""
        started = time.time()
        self.page.evaluate(_WATCH_JS)
        self.page.locator("#parley-input textarea").fill(text)
        self.page.locator("#parley-send").click()
        return started

    def _chatbot(self):
        """The Chat tab's chatbot (other tabs may hold chatbots of their own)."""
        scoped = self.page.locator("#parley-chatbot")
        return scoped if scoped.count() else self.page

    def bot_text(self) -> str:
        """The text of the bot's messages, read in one go (they are re-rendered as the reply grows)."""
        return self.page.evaluate(_BOT_TEXT_JS)

    def snapshots(self) -> list[str]:
        return self.page.evaluate("() => window.__parleySnaps || []")

    def ask(self, text: str, *, expect: Callable[[str], bool] | None = None, timeout: float = 90.0):
        """Send ``text``; wait until the turn is stored and the page shows its final state.

        Returns (stored turn, the bot messages' text as shown).
        """
        since = self.send(text)
        turn = self.store.wait_turn(text, since=since, source="web", timeout=timeout)
        if turn.finish_reason == "error":
            time.sleep(0.5)  # let the page render it, for the message and the screenshot
            raise AssertionError(f"browser: the turn failed: {turn.error!r}; the page shows {self.bot_text()[-300:]!r}")
        tail = letters(turn.reply)[-24:]  # how the stored reply ends, as rendered markdown still shows it
        final = expect or (lambda shown: tail in letters(shown))
        shown = wait_until("the page to show the finished reply", lambda: (lambda s: s if final(s) else None)(
            self.bot_text()), 20, detail=lambda: f"page shows {self.bot_text()[-300:]!r}; "
                                                 f"stored reply {turn.reply[:200]!r}")
        return turn, shown

    def like_last(self) -> None:
        self._chatbot().get_by_role("button", name="Like", exact=True).last.click()


def letters(text: str) -> str:
    """Only the letters of ``text``, lower-cased: compares a reply with its rendered markdown."""
    return "".join(ch for ch in text.lower() if ch.isalpha())


# -- Slack ------------------------------------------------------------------------------------------
SLACK_SECRET = "matrix-signing-secret"


class SlackDriver:
    """`parley slack --http`'s Events API app (slack_http_app) served by uvicorn on loopback, its
    WebClient pointed at the local mock Slack Web API; requests are signed like Slack signs them."""

    def __init__(self, runtime, mock_api, url: str, *, team: str, bot_user: str):
        self.runtime, self.api, self.url = runtime, mock_api, url
        self.team, self.bot_user = team, bot_user
        self.store = StoreReader(Path(runtime.settings.db_path))

    def _post(self, body: str, content_type: str) -> int:
        import httpx
        from slack_sdk.signature import SignatureVerifier

        ts = str(int(time.time()))
        signature = SignatureVerifier(SLACK_SECRET).generate_signature(timestamp=ts, body=body)
        resp = httpx.post(self.url + "/slack/events", content=body.encode(), timeout=30,
                          headers={"content-type": content_type, "x-slack-signature": signature,
                                   "x-slack-request-timestamp": ts})
        return resp.status_code

    def event(self, event: dict[str, Any]) -> None:
        body = json.dumps({"token": "legacy", "team_id": self.team, "api_app_id": "A1", "type": "event_callback",
                           "event_id": f"Ev{unique()}", "event_time": int(time.time()), "event": event})
        status = self._post(body, "application/json")
        if status != 200:
            raise AssertionError(f"Slack Events API answered {status}")

    def mention(self, text: str, *, channel: str, user: str = "U1") -> str:
        """@-mention the bot in ``channel``; returns the message ts (the thread)."""
        ts = f"{int(time.time())}.{unique() % 1_000_000:06d}"
        self.event({"type": "app_mention", "user": user, "text": f"<@{self.bot_user}> {text}", "ts": ts,
                    "channel": channel, "event_ts": ts})
        return ts

    def command(self, name: str, text: str, *, channel: str, user: str = "U1") -> None:
        from urllib.parse import urlencode

        form = urlencode({"token": "legacy", "team_id": self.team, "channel_id": channel, "user_id": user,
                          "command": name, "text": text, "trigger_id": f"Tr{unique()}",
                          "response_url": self.api.url + "response", "api_app_id": "A1"})
        status = self._post(form, "application/x-www-form-urlencoded")
        if status != 200:
            raise AssertionError(f"Slack slash command {name} answered {status}")

    def react(self, channel: str, ts: str, reaction: str = "+1", user: str = "U2") -> None:
        self.event({"type": "reaction_added", "user": user, "reaction": reaction,
                    "item": {"type": "message", "channel": channel, "ts": ts}, "event_ts": str(time.time())})

    def posts(self, channel: str) -> list:
        return [c for c in self.api.of("chat.postMessage") if c.args.get("channel") == channel and c.result.get("ok")]

    def updates(self, channel: str) -> list:
        return [c for c in self.api.of("chat.update") if c.args.get("channel") == channel]

    def final_texts(self, channel: str) -> list[str]:
        """What each message the bot posted in ``channel`` says in the end (after its last edit)."""
        out: dict[str, str] = {}
        for call in self.posts(channel):
            out[call.result["ts"]] = call.args.get("text", "")
        for call in self.updates(channel):
            if call.args.get("ts") in out:
                out[call.args["ts"]] = call.args.get("text", "")
        return list(out.values())

    def wait_reply(self, user_text: str, *, since: float, timeout: float = 90.0) -> StoredTurn:
        """The stored turn, once the reply has been fully posted (its external id is the last write)."""
        return self.store.wait_turn(user_text, since=since, source="slack", timeout=timeout, external_id=True)

    def wait_post(self, channel: str, needle: str, timeout: float = 30.0) -> str:
        return wait_until(f"a Slack message in {channel} containing {needle!r}",
                          lambda: next((t for t in self.final_texts(channel) if needle in t), None), timeout,
                          detail=lambda: f"messages: {self.final_texts(channel)}")


@contextlib.contextmanager
def slack_driver(runtime):
    """Serve the Slack Events API app over ``runtime``'s assistant; the mock Web API behind it."""
    import uvicorn

    from bot.engine import GenerationParams
    from bot.integrations import slack
    from tests.unit.mock_slack_api import BOT_USER_ID, TEAM_ID, MockSlackApi

    api = MockSlackApi().start()
    try:
        web = slack.slack_http_app(runtime.assistant, runtime.store, signing_secret=SLACK_SECRET,
                                   client=slack.make_client("xoxb-matrix", base_url=api.url), interval=0.2,
                                   params=GenerationParams(max_new_tokens=MAX_TOKENS, temperature=0.0))
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(web, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, name="slack-events", daemon=True)
        thread.start()
        wait_until("the Slack events server", lambda: server.started, 30, 0.05)
        try:
            yield SlackDriver(runtime, api, f"http://127.0.0.1:{port}", team=TEAM_ID, bot_user=BOT_USER_ID)
        finally:
            server.should_exit = True
            thread.join(10)
    finally:
        api.stop()


# -- Discord ----------------------------------------------------------------------------------------
class DiscordDriver:
    """The real ParleyDiscord client over the runtime's assistant, discord.py's HTTP layer pointed at
    the mock Discord REST server, messages delivered as real ``discord.Message`` objects."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.store = StoreReader(Path(runtime.settings.db_path))

    def run(self, scenario: Callable[[Any, Any, "DiscordDriver"], Any]) -> Any:
        """Log a client in against a fresh mock and run ``async scenario(client, mock, driver)``.

        In its own thread with its own event loop, away from Playwright's.
        """
        from bot.engine import GenerationParams
        from bot.integrations.discord import ParleyDiscord
        from tests.unit.mock_discord_api import discord_api

        async def main():
            async with discord_api() as mock:
                mock._ids = itertools.count(unique() * 10)  # message ids unique across the run's mocks
                client = ParleyDiscord(self.runtime.assistant, self.runtime.store, interval=0.2, sync_commands=False,
                                       params=GenerationParams(max_new_tokens=MAX_TOKENS, temperature=0.0))
                try:
                    await client.login("matrix")
                    return await scenario(client, mock, self)
                finally:
                    await client.close()

        result: dict[str, Any] = {}

        def target():
            try:
                result["value"] = asyncio.run(main())
            except BaseException as exc:  # re-raised in the test's thread
                result["error"] = exc

        thread = threading.Thread(target=target, name="discord-scenario")
        thread.start()
        thread.join(300)
        if thread.is_alive():
            raise AssertionError("the Discord scenario did not finish in 300 s")
        if "error" in result:
            raise result["error"]
        return result.get("value")

    @staticmethod
    def message(client, mock, text: str, *, author_id: int = 5000, reference: str | None = None):
        from tests.unit.mock_discord_api import BOT_ID, make_message

        return make_message(client, mock, f"<@{BOT_ID}> {text}", author_id=author_id, reference=reference,
                            message_id=str(unique() * 10 + 7))

    @staticmethod
    def replies(mock, since_index: int = 0) -> list[str]:
        return mock.final_texts()[since_index:]
