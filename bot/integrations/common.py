"""What Slack and Discord share: splitting, neutralizing, throttled streaming, settings, feedback.

Nothing here imports a platform SDK. The platform modules give ``stream_reply`` a ``MessageSink``
(post a message, edit a message) and it turns the assistant's events into as few API calls as a
live, growing reply needs.

Streaming rule: the first piece of text is posted at once; after that the visible message is
edited at most once per ``interval`` seconds (Slack and Discord both allow about one write per
second per channel). A reply longer than the platform limit continues in new messages; the split
is greedy from the start of the text, so a message that has been filled never changes again.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

from bot.errors import ConfigError, RequestError
from bot.tool_names import TOOL_NAMES
from bot.events import Done, Event, TextDelta, ToolStarted

log = logging.getLogger(__name__)

FENCE = "```"
CLOSE_FENCE = "\n```"
SLACK_LIMIT = 3000
"""Characters per Slack message: Slack truncates `text` at 40,000 and a block section at 3,000."""
DISCORD_LIMIT = 2000
"""Characters per Discord message; discord.py does not check, the API answers 400 (50035)."""
CURSOR = " ▍"
"""Shown at the end of a message while it is still growing."""
KNOWN_TOOLS = TOOL_NAMES


# -- splitting without breaking code fences ------------------------------------------------------
def open_fence(text: str) -> str | None:
    """The opener (e.g. "```python") of the code fence still open at the end of ``text``, or None."""
    opener: str | None = None
    for line in text.split("\n"):
        if line.count(FENCE) % 2 == 0:  # none, or opened and closed on the same line
            continue
        if opener is not None:
            opener = None
            continue
        stripped = line.strip()
        lang = stripped[3:].strip() if stripped.startswith(FENCE) else ""
        opener = FENCE + lang if lang and re.fullmatch(r"[\w+#.-]{1,20}", lang) else FENCE
    return opener


def close_open_fence(text: str) -> str:
    """``text`` with a closing fence added when one is open (for showing a partial reply)."""
    return text + CLOSE_FENCE if open_fence(text) else text


def _best_cut(text: str, window: int) -> tuple[int, int]:
    """Where to cut ``text`` within ``window`` chars: (end of head, start of tail)."""
    low = window // 2  # never make a piece shorter than half the window to find a nicer cut
    for sep in ("\n\n", "\n", " "):
        at = text.rfind(sep, low, window)
        if at > 0:
            return at, at + len(sep)
    cut = window
    amp = text.rfind("&", max(0, cut - 6), cut)  # do not split an escape like &amp; in two
    if amp > 0 and ";" not in text[amp:cut]:
        cut = amp
    return cut, cut


def split_message(text: str, limit: int) -> list[str]:
    """Split ``text`` into pieces of at most ``limit`` characters, every piece fence-balanced.

    Cuts prefer a blank line, then a line break, then a space. A code block open at a cut is
    closed at the end of its piece and reopened (with its language) at the start of the next.
    Greedy from the start: a piece depends only on the text before its end, so a growing reply
    never rewrites a message it has already filled.
    """
    if limit < 64:
        raise ValueError("limit must leave room for text and fences (>= 64)")
    pieces: list[str] = []
    rest = text
    while len(rest) > limit:
        end, start = _best_cut(rest, limit - len(CLOSE_FENCE))
        head, tail = rest[:end], rest[start:]
        opener = open_fence(head)
        if opener:
            head += CLOSE_FENCE
            tail = opener + "\n" + tail
        pieces.append(head)
        rest = tail
    pieces.append(rest)
    return pieces


# -- neutralizing model output -------------------------------------------------------------------
def slack_escape(text: str) -> str:
    """Escape ``& < >`` as Slack asks, so ``<!channel>``, ``<!here>``, ``<@U…>``, ``<!subteam^…>``
    and ``<https://…|label>`` in model output are shown as text: no pings, no disguised links."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_MASS_MENTION = re.compile(r"@(everyone|here|channel)\b")


def break_mass_mentions(text: str) -> str:
    """Put a zero-width space after the @ of @everyone/@here/@channel (belt and braces: the
    platforms are also told not to ping)."""
    return _MASS_MENTION.sub("@\u200b\\1", text)


_SECRETS = re.compile(
    r"(xox[abposr]-[\w-]+|xapp-[\w-]+|[\w-]{23,28}\.[\w-]{6,7}\.[\w-]{27,})")


def redact(text: str) -> str:
    """Hide anything shaped like a Slack or Discord token."""
    return _SECRETS.sub("[redacted]", text)


def user_error(error: str | None) -> str:
    """One short line for the user; the details are in the log."""
    first = redact((error or "unknown error").strip().splitlines()[0] if error else "unknown error")
    if len(first) > 200:
        first = first[:197] + "..."
    return f"Sorry, I could not answer that: {first}"


# -- sources ---------------------------------------------------------------------------------------
def format_sources(sources: Iterable[dict[str, Any]], *, limit: int = 5) -> str:
    """One compact line: ``Sources: [1] Title p. 3 · [2] other.md``.

    Chat platforms get this one-line form rather than the tools' multi-line listing with quotes:
    a thread reply should stay short, and the passages are a click away in the browser chat.
    """
    sources = list(sources)
    if not sources:
        return ""
    parts = []
    for i, src in enumerate(sources[:limit], start=1):
        name = str(src.get("title") or Path(str(src.get("source") or "?")).name)[:60]
        page = src.get("page")
        parts.append(f"[{src.get('n', i)}] {name}" + (f" p. {page}" if page not in (None, "") else ""))
    more = f" (+{len(sources) - limit} more)" if len(sources) > limit else ""
    return "Sources: " + " · ".join(parts) + more


# -- throttled streaming ---------------------------------------------------------------------------
class Throttle:
    """At most one write per ``interval`` seconds; the first write is never delayed."""

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self.last: float | None = None

    def wait_time(self) -> float:
        if self.last is None:
            return 0.0
        return max(0.0, self.interval - (self.clock() - self.last))

    def ready(self) -> bool:
        return self.wait_time() <= 0

    def mark(self) -> None:
        self.last = self.clock()


class ReplyPages:
    """Plans the messages of one growing reply: which to post, which to edit, with what.

    ``plan(text, final=False)`` shows the partial reply with a cursor and a temporarily closed
    code fence; ``final=True`` shows it as it stays. Only messages whose content changed are
    returned, as ``(index, content)``; index == number of messages sent so far means "post".
    """

    def __init__(self, limit: int, *, cursor: str = CURSOR):
        self.cursor = cursor
        # Reserve room for the cursor and a temporary closing fence, the same for every call, so
        # pieces split while streaming are the pieces of the final reply.
        self.split_limit = limit - len(cursor) - len(CLOSE_FENCE)
        self.sent: list[str] = []

    def plan(self, text: str, *, final: bool) -> list[tuple[int, str]]:
        pieces = split_message(text, self.split_limit)
        if not final:
            pieces[-1] = close_open_fence(pieces[-1]) + self.cursor
        return [(i, p) for i, p in enumerate(pieces) if i >= len(self.sent) or self.sent[i] != p]

    def record(self, index: int, content: str) -> None:
        if index == len(self.sent):
            self.sent.append(content)
        else:
            self.sent[index] = content


class MessageSink(Protocol):
    """Where a reply goes: one platform channel or thread."""

    def post(self, text: str) -> str:
        """Send a new message; return its id (Slack ts, Discord message id)."""

    def edit(self, message_id: str, text: str) -> None:
        """Replace a message's text."""


@dataclass
class ReplyResult:
    """What one streamed reply did."""

    text: str
    done: Done
    message_ids: list[str] = field(default_factory=list)
    first_post_s: float | None = None
    """Seconds from the start of streaming to the first message (the reply visible)."""


def final_text(text: str, done: Done, *, italic: str = "_") -> str:
    """The reply as it stays: the text, a compact sources line, or a short error."""
    out = close_open_fence(text.strip())  # e.g. cut off by max_new_tokens inside a code block
    if done.finish_reason == "error" and not out:
        return user_error(done.error)
    if done.finish_reason == "error":
        out += f"\n\n{italic}(the answer was cut short by an error){italic}"
    elif done.finish_reason == "cancelled":
        out += f"\n\n{italic}(stopped){italic}"
    if not out:
        out = f"{italic}(no answer){italic}"
    sources = format_sources(done.sources)
    if sources:
        out += f"\n\n{sources}"
    return out


def stream_reply(events: Iterator[Event], sink: MessageSink, *, limit: int,
                 render: Callable[[str], str] = lambda s: s, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, cursor: str = CURSOR) -> ReplyResult:
    """Drive a sink from an assistant event stream (synchronous; Slack runs it in a worker thread).

    ``render`` turns model text into platform text (escaping); it is applied to the whole text so
    splitting measures what is really sent. The event stream is closed on any failure, which
    cancels generation within one step.
    """
    pages = ReplyPages(limit, cursor=cursor)
    throttle = Throttle(interval, clock)
    started = clock()
    ids: list[str] = []
    first_post: list[float] = []
    text = ""
    status = ""
    done: Done | None = None

    def flush(shown: str, final: bool) -> None:
        for index, content in pages.plan(shown, final=final):
            if index < len(ids):
                sink.edit(ids[index], content)
            else:
                ids.append(sink.post(content))
                if not first_post:
                    first_post.append(clock() - started)
            pages.record(index, content)
        throttle.mark()

    try:
        for event in events:
            if isinstance(event, TextDelta):
                text += event.text
                if text.strip() and throttle.ready():
                    flush(render(text), final=False)
            elif isinstance(event, ToolStarted) and not text.strip():
                status = f"_{event.name}…_"
                if throttle.ready():
                    flush(status, final=False)
            elif isinstance(event, Done):
                done = event
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    if done is None:
        done = Done(finish_reason="error", error="the reply stream ended early")
    flush(render(final_text(text, done)), final=True)
    return ReplyResult(text=text, done=done, message_ids=ids,
                       first_post_s=first_post[0] if first_post else None)


class KeyedLocks:
    """One lock per conversation, so two messages in one thread are answered in order (the second
    sees the first's turn in its history)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def get(self, key: str) -> threading.Lock:
        with self._guard:
            if len(self._locks) > 10_000:  # forget idle ones now and then
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            return self._locks.setdefault(key, threading.Lock())


# -- per-channel settings --------------------------------------------------------------------------
SETTING_KEYS = ("adapter", "tools", "system_prompt", "always_search", "index")
"""What a workspace/server or channel may set. Channel scope overrides workspace scope."""


def parse_setting(key: str, value: Any, *, where: str = "") -> Any:
    """Validate one setting value (a TOML value or the text of an admin command)."""
    origin = f" ({where})" if where else ""
    if key not in SETTING_KEYS:
        raise ConfigError(f"unknown channel setting {key!r}{origin}: use one of {', '.join(SETTING_KEYS)}")
    if key == "tools":
        if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
            return None
        if isinstance(value, str):
            value = [] if value.strip().lower() == "none" else [v.strip() for v in re.split(r"[,\s]+", value) if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"tools{origin}: give a list of tool names, 'all' or 'none'")
        unknown = [v for v in value if v not in KNOWN_TOOLS]
        if unknown:
            raise ConfigError(f"tools{origin}: unknown {', '.join(unknown)}; known: {', '.join(KNOWN_TOOLS)}")
        return list(value)
    if key == "always_search":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("on", "true", "yes", "1"):
            return True
        if text in ("off", "false", "no", "0"):
            return False
        raise ConfigError(f"always_search{origin}: use on or off")
    if not isinstance(value, str):
        raise ConfigError(f"{key}{origin}: expected text, got {type(value).__name__}")
    value = value.strip()
    if key in ("adapter", "index") and not re.fullmatch(r"[\w.-]{1,64}", value):
        raise ConfigError(f"{key}{origin}: {value!r} is not a valid name (letters, digits, - _ .)")
    if key == "system_prompt" and len(value) > 4000:
        raise ConfigError(f"system_prompt{origin}: at most 4,000 characters")
    return value


def resolve_settings(store, scopes: Iterable[str]) -> dict[str, Any]:
    """Merge settings from the broadest scope to the narrowest (later scopes win)."""
    merged: dict[str, Any] = {}
    for scope in scopes:
        merged.update(store.get_settings(scope))
    return merged


def apply_settings_file(store, path: str | Path, platform: str) -> int:
    """Copy a TOML file's per-workspace/per-channel settings into the store; returns how many.

    Format (``platform`` is ``slack`` or ``discord``; other tables are ignored)::

        [slack.T0123]              # a workspace (Discord: a server id)
        adapter = "support"
        [slack."T0123/C0456"]      # a channel in it
        tools = ["search"]
        system_prompt = "Answer from the handbook."

    All problems are reported together.
    """
    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"channel settings file {path} does not exist: check --channels") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"channel settings file {path} is not valid TOML: {exc}") from None
    table = data.get(platform, {})
    problems: list[str] = []
    updates: list[tuple[str, str, Any]] = []
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{platform}] must be a table of scopes")
    for name, values in table.items():
        parts = [p for p in str(name).split("/") if p]
        if not 1 <= len(parts) <= 2 or not isinstance(values, dict):
            problems.append(f"{path}: [{platform}.{name!r}] must be WORKSPACE or WORKSPACE/CHANNEL with settings")
            continue
        scope = ":".join([platform, *parts])
        for key, value in values.items():
            try:
                updates.append((scope, key, parse_setting(key, value, where=f"{path} [{platform}.{name}]")))
            except ConfigError as exc:
                problems.append(str(exc))
    if problems:
        raise ConfigError("invalid channel settings:\n  - " + "\n  - ".join(problems))
    for scope, key, value in updates:
        store.set_setting(scope, key, value)
    return len(updates)


@dataclass(frozen=True)
class ConfigCommand:
    """``config [workspace|server] [show | reset KEY | KEY VALUE]`` typed after the bot's mention."""

    wide: bool
    action: str  # show, set, reset
    key: str = ""
    value: str = ""


CONFIG_HELP = ("Usage: `config` (show), `config KEY VALUE`, `config reset KEY`; add `workspace`/`server` "
               "after `config` for the whole workspace. Keys: " + ", ".join(SETTING_KEYS) + ".")


def parse_config_command(text: str) -> ConfigCommand | None:
    """Parse an admin command; None when the text is not one (then it is a normal question)."""
    words = text.strip().split(None, 1)
    if not words or words[0].lower() not in ("config", "!config", "/config"):
        return None
    rest = words[1].strip() if len(words) > 1 else ""
    wide = False
    first, _, tail = rest.partition(" ")
    if first.lower() in ("workspace", "server", "guild"):
        wide, rest = True, tail.strip()
        first, _, tail = rest.partition(" ")
    if not rest or first.lower() == "show":
        return ConfigCommand(wide=wide, action="show")
    if first.lower() in ("reset", "unset"):
        return ConfigCommand(wide=wide, action="reset", key=tail.strip())
    return ConfigCommand(wide=wide, action="set", key=first, value=tail.strip())


def run_config_command(store, command: ConfigCommand, scope: str, *,
                       check_adapter: Callable[[str], None] | None = None) -> str:
    """Apply a parsed config command to ``scope``; returns the reply text (errors included)."""
    try:
        if command.action == "show":
            values = store.get_settings(scope)
            if not values:
                return f"No settings for `{scope}` (defaults apply). {CONFIG_HELP}"
            return f"Settings for `{scope}`: " + ", ".join(f"{k}={v!r}" for k, v in sorted(values.items()))
        if command.key not in SETTING_KEYS:
            raise ConfigError(f"unknown setting {command.key!r}. {CONFIG_HELP}")
        if command.action == "reset":
            store.delete_setting(scope, command.key)
            return f"`{command.key}` reset for `{scope}`."
        value = parse_setting(command.key, command.value, where="config command")
        if command.key == "adapter" and check_adapter is not None:
            check_adapter(value)
        if command.key == "tools" and value is None:
            store.delete_setting(scope, "tools")
        else:
            store.set_setting(scope, command.key, value)
        return f"`{command.key}` set for `{scope}`."
    except (ConfigError, RequestError) as exc:
        return f"Not changed: {exc}"


def turn_options(settings: dict[str, Any], *, source: str, conversation_id: str | None,
                 params=None):
    """TurnOptions for a platform turn from the merged channel settings."""
    from bot.assistant import TurnOptions
    from bot.engine import GenerationParams

    tools = settings.get("tools")
    return TurnOptions(params=params or GenerationParams(), adapter=settings.get("adapter") or "base",
                       system_prompt=settings.get("system_prompt") or None,
                       tools=None if tools is None else tuple(tools),
                       always_search=bool(settings.get("always_search", False)),
                       collections=(settings.get("index") or "default",), conversation_id=conversation_id,
                       new_messages=1, source=source)


# -- feedback from reactions -----------------------------------------------------------------------
_UP = {"+1", "thumbsup", "👍"}
_DOWN = {"-1", "thumbsdown", "👎"}
_SKIN_TONES = re.compile("[\U0001F3FB-\U0001F3FF\uFE0F]")


def reaction_rating(name: str) -> int | None:
    """+1 / -1 for a thumbs reaction (any skin tone), None for anything else."""
    base = _SKIN_TONES.sub("", name.split("::")[0]).strip(":")
    if base in _UP:
        return 1
    if base in _DOWN:
        return -1
    return None


def record_reaction(store, external_id: str, reaction: str, *, source: str, user: str) -> int | None:
    """Store a thumbs reaction on a bot reply as feedback on its turn; returns the feedback id."""
    rating = reaction_rating(reaction)
    if rating is None:
        return None
    turn = store.turn_by_external_id(external_id)
    if turn is None:  # not one of our replies (or from before the store existed)
        return None
    return store.add_feedback(turn.id, rating, source=source, user=user)
