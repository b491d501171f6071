"""The feature matrix: every user-visible feature, on every front end that offers it, for real.

Why this tier exists: every tool (/sentiment, /translate, /search, always-search) once failed in
the browser and over the API with ``ValueError: <Token var=<ContextVar name='parley_turn'>...> was
created in a different Context`` while every unit test passed, because the unit tests drove the
tool runner in one thread and the servers resume generators in worker threads. Here each cell
runs against a real ``parley serve`` subprocess (127.0.0.1, a free port, a throw-away PARLEY_HOME
whose models/ reuses the converted embedded model, two documents indexed with ``parley index
add``, a real LoRA adapter in adapters/) with the real embedded models (SmolLM2-135M-Instruct,
MiniLM), greedy decoding and at most 32 new tokens.

How each front end is driven:

* browser: headless Debian Chromium (Playwright) on the Chat tab; types into ``#parley-input``,
  clicks ``#parley-send``, the Settings accordion and 👍; reads the chat's text as shown.
* api: the real ``openai`` client against ``/v1`` (streamed and not); Parley's extras from the
  response's ``parley`` field (sources, tool_steps, turn_id).
* gradio-api: ``gradio_client.Client(url).predict/submit(..., api_name="/chat")``.
* terminal: ``parley chat --message``, piped stdin, and the interactive REPL on a pseudo-terminal
  (its /adapter command), all subprocesses with PARLEY_HOME set.
* slack: the Events API app of ``parley slack --http`` (``slack_http_app``) served by uvicorn on
  loopback, signed HTTP requests, its WebClient pointed at the local mock Slack Web API
  (tests/unit/mock_slack_api.py), over the real Assistant in-process (``build_runtime`` on the
  same PARLEY_HOME). Not through ``parley serve``'s ``/slack/events``: ``mount_slack`` builds its
  WebClient from SLACK_BOT_TOKEN alone, with no base-URL setting to aim it at a mock.
* discord: the real ``ParleyDiscord`` client, discord.py's HTTP layer pointed at the mock Discord
  REST server (tests/unit/mock_discord_api.py), real ``discord.Message`` objects handed to it (no
  gateway can run here), over the same in-process Assistant.

What each front end offers (✓ tested here, — not offered):

| feature           | browser | api | gradio-api | terminal | slack | discord |
|-------------------|---------|-----|------------|----------|-------|---------|
| plain-chat        | ✓       | ✓   | ✓          | ✓        | ✓     | ✓       |
| streaming         | ✓       | ✓   | ✓          | ✓        | ✓     | ✓       |
| sentiment-command | ✓       | ✓   | ✓          | ✓        | ✓     | ✓       |
| translate-command | ✓       | ✓   | ✓          | ✓        | ✓     | ✓       |
| search-command    | ✓       | ✓   | ✓          | ✓        | ✓     | ✓       |
| auto-routing      | ✓       | ✓   | ✓          | ✓        | ✓     | ✓       |
| always-search     | ✓       | ✓   | —          | —        | ✓     | ✓       |
| feedback          | ✓       | ✓   | —          | —        | ✓     | ✓       |
| adapter           | ✓       | ✓   | ✓          | ✓        | ✓     | ✓       |

Notes on the table: Slack and Discord have no adapter picker per message; they choose the
adapter (and always-search) per channel with the admin command ``config adapter NAME``, which is
what their cells test. Slack's slash commands are its native ones (/sentiment, /translate,
/search); Discord's are typed after the mention (its application commands need a gateway
interaction). The Gradio API returns only the reply text: tool steps and sources are checked in
the store there. The terminal reports tool steps on stderr and prints the sources.

Each cell's id is ``FEATURE[FRONTEND]`` (``-k "search-command[browser]"``, ``-k slack``); the
run ends with the matrix printed and saved to bench/results/feature_matrix.{json,md}
(tests/e2e/conftest.py). A cell is marked xfail (strict) only for a product bug, named in
``KNOWN_BUGS`` with where it is. The browser cells wait for the page's load events before typing;
test_message_sent_while_the_page_loads_stays is the bug that makes that wait necessary (xfail).
"""

from __future__ import annotations

import itertools
import re
import time
from typing import Any, Callable

import pytest

from tests.e2e.feature_matrix_helpers import (ADAPTER, FEATURES, FRONTENDS, MAX_TOKENS, NOT_OFFERED, OFFERED,
                                              PARIS_Q, RAG_Q, ROUTED_TRANSLATE, SEARCH_CMD, SENTIMENT_CMD,
                                              STREAM_Q, TRANSLATE_CMD, StoredTurn, wait_until)

pytestmark = pytest.mark.timeout(300)

KNOWN_BUGS: dict[tuple[str, str], str] = {}
"""(feature, front end) -> the product bug that breaks it, and where (xfail strict)."""

CHECKS: dict[tuple[str, str], Callable[[Any], None]] = {}
DRIVERS = {"browser": "matrix_browser", "api": "matrix_api", "gradio-api": "matrix_gradio",
           "terminal": "matrix_terminal", "slack": "matrix_slack", "discord": "matrix_discord"}
"""Front end -> the fixture (tests/e2e/conftest.py) that drives it."""


def cell(feature: str, frontend: str):
    """Register the check of one matrix cell."""
    assert feature in FEATURES and frontend in FRONTENDS, (feature, frontend)

    def register(fn):
        CHECKS[(feature, frontend)] = fn
        return fn
    return register


# -- what every front end must show ---------------------------------------------------------------
def clean(turn: StoredTurn, where: str) -> None:
    assert turn.finish_reason in ("stop", "length"), \
        f"{where}: the turn ended with {turn.finish_reason!r} ({turn.error or ''}; reply {turn.reply[:200]!r})"


def not_failed(turn: StoredTurn, where: str) -> StoredTurn:
    """Fail at once, with the stored error, when the turn itself failed (before any other check)."""
    assert turn.finish_reason != "error", f"{where}: the turn failed: {turn.error!r} (reply {turn.reply[:200]!r})"
    return turn


def has_paris(text: str, where: str) -> None:
    assert "paris" in text.lower(), f"{where}: no 'Paris' in the reply to {PARIS_Q!r}: {text[:300]!r}"


def no_error(text: str, where: str) -> None:
    for bad in ("went wrong", "could not answer", "Traceback", "ValueError", "(error"):
        assert bad not in text, f"{where}: the reply shows an error: {text[:400]!r}"


def tool_ran(turn: StoredTurn, name: str, where: str, via: str | None = None) -> dict[str, Any]:
    call = turn.call(name)
    failed = f"; the turn failed: {turn.error!r}" if turn.finish_reason == "error" else ""
    assert call is not None, f"{where}: no {name} tool call stored (calls: {turn.tool_calls}){failed}"
    assert call.get("ok"), f"{where}: the {name} tool failed: {call.get('error') or call}"
    if via is not None:
        assert call.get("via") == via, f"{where}: {name} ran via {call.get('via')!r}, expected {via!r}"
    return call


def is_positive(text: str, where: str) -> None:
    assert re.search(r"(?im)^\W*positive\b", text), \
        f"{where}: /sentiment of a glowing sentence is not labelled positive: {text[:300]!r}"


def is_french(text: str, turn: StoredTurn, where: str, via: str) -> None:
    call = tool_ran(turn, "translate", where, via)
    assert "french" in str(call.get("summary", "")).lower(), f"{where}: translate did not target French: {call}"
    assert "bonjour" in text.lower(), f"{where}: the French for 'Good morning' has no 'bonjour': {text[:300]!r}"


def grows(snapshots: list[str], final: str, where: str) -> None:
    """At least two partial versions, each extending the last, before the final text."""
    partial = [s for s in snapshots if s.strip() and s.strip() != final.strip()]
    assert len(partial) >= 2, f"{where}: the reply did not arrive in pieces: {snapshots[:6]!r} ... {final[:100]!r}"


def sources_cite(sources: list[dict[str, Any]], where: str) -> None:
    assert sources, f"{where}: no sources returned"
    assert any("refund" in str(s.get("source", "")).lower() or "refund" in str(s.get("title", "")).lower()
               for s in sources), f"{where}: the refund policy is not among the sources: {sources}"


def differs(base: str, tuned: str, where: str) -> None:
    assert base.strip() and tuned.strip() != base.strip(), \
        f"{where}: the adapter's reply equals the base model's: {tuned[:200]!r}"


# ================================================================================================
# api: the openai client against /v1
# ================================================================================================
def _parley(obj) -> dict[str, Any]:
    extra = getattr(obj, "model_extra", None) or {}
    return extra.get("parley") or {}


def _api_chat(api, content: str, **kwargs):
    resp = api.client.chat.completions.create(model=kwargs.pop("model", "base"), temperature=0,
                                              max_tokens=MAX_TOKENS,
                                              messages=[{"role": "user", "content": content}], **kwargs)
    reply = resp.choices[0].message.content or ""
    extra = _parley(resp)
    assert extra.get("turn_id"), f"api: no parley.turn_id in the response: {resp}"
    turn = api.store.turn(extra["turn_id"])
    assert turn is not None, f"api: turn {extra['turn_id']} is not in the store"
    return reply, extra, not_failed(turn, "api")


@cell("plain-chat", "api")
def _(api):
    reply, extra, turn = _api_chat(api, PARIS_Q)
    has_paris(reply, "api")
    assert turn.source == "api" and turn.reply == reply
    clean(turn, "api")


@cell("streaming", "api")
def _(api):
    stream = api.client.chat.completions.create(model="base", temperature=0, max_tokens=MAX_TOKENS, stream=True,
                                                messages=[{"role": "user", "content": STREAM_Q}])
    pieces, arrivals, finish, extra = [], [], None, {}
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        extra = _parley(chunk) or extra
    text = "".join(pieces)
    assert len(pieces) >= 3, f"api: the stream came in {len(pieces)} pieces: {pieces}"
    assert arrivals[-1] - arrivals[0] > 0.05, "api: every delta arrived at once (not streamed)"
    assert finish in ("stop", "length"), f"api: the stream ended with finish_reason={finish!r}"
    assert not extra.get("error"), f"api: the stream reported an error: {extra}"
    turn = api.store.turn(extra.get("turn_id") or "")
    assert turn is not None and turn.reply == text, "api: the streamed reply is not the stored one"
    clean(turn, "api")


@cell("sentiment-command", "api")
def _(api):
    reply, extra, turn = _api_chat(api, SENTIMENT_CMD)
    is_positive(reply, "api")
    assert [s["name"] for s in extra["tool_steps"]] == ["sentiment", "sentiment"], extra["tool_steps"]
    assert extra["tool_steps"][-1]["ok"], extra["tool_steps"]
    tool_ran(turn, "sentiment", "api", "slash")


@cell("translate-command", "api")
def _(api):
    reply, extra, turn = _api_chat(api, TRANSLATE_CMD)
    is_french(reply, turn, "api", "slash")
    finished = [s for s in extra["tool_steps"] if s["type"] == "tool_finished"]
    assert finished and finished[0]["ok"] and " by " in finished[0]["summary"], \
        f"api: the translate step does not name its backend: {extra['tool_steps']}"


@cell("search-command", "api")
def _(api):
    reply, extra, turn = _api_chat(api, SEARCH_CMD)
    sources_cite(extra.get("sources") or [], "api")
    tool_ran(turn, "search", "api", "slash")
    no_error(reply, "api")
    assert reply.strip(), "api: /search gave sources but no answer"


@cell("auto-routing", "api")
def _(api):
    reply, extra, turn = _api_chat(api, ROUTED_TRANSLATE)
    started = [s for s in extra["tool_steps"] if s["type"] == "tool_started"]
    assert started and started[0]["name"] == "translate", \
        f"api: {ROUTED_TRANSLATE!r} was not routed to translate: steps={extra['tool_steps']} reply={reply!r}"
    is_french(reply, turn, "api", "router")


@cell("always-search", "api")
def _(api):
    _, plain, _ = _api_chat(api, RAG_Q)
    assert not plain.get("sources"), (f"api: {RAG_Q!r} is searched even without always_search (routed: "
                                      f"{plain.get('tool_steps')}); pick a question the router leaves alone")
    reply, extra, turn = _api_chat(api, RAG_Q, extra_body={"parley": {"always_search": True}})
    sources_cite(extra.get("sources") or [], "api")
    tool_ran(turn, "search", "api", "always_search")
    no_error(reply, "api")


@cell("feedback", "api")
def _(api):
    import httpx

    reply, extra, turn = _api_chat(api, PARIS_Q)
    resp = api.client.post("/feedback", body={"turn_id": extra["turn_id"], "rating": 1, "comment": "matrix"},
                           cast_to=httpx.Response)
    assert resp.status_code == 200, f"api: POST /v1/feedback answered {resp.status_code}: {resp.text}"
    rows = api.store.feedback(extra["turn_id"])
    assert [r["rating"] for r in rows] == [1], f"api: feedback stored for the turn: {rows}"


@cell("adapter", "api")
def _(api):
    listed = [m.id for m in api.client.models.list().data]
    assert ADAPTER in listed, f"api: /v1/models does not list the adapter: {listed}"
    base, _, _ = _api_chat(api, PARIS_Q)
    tuned, _, turn = _api_chat(api, PARIS_Q, model=ADAPTER)
    assert turn.adapter == ADAPTER, f"api: the turn was stored with adapter={turn.adapter!r}"
    differs(base, tuned, "api")
    clean(turn, "api")


# ================================================================================================
# gradio-api: gradio_client against api_name="/chat"
# ================================================================================================
def _gradio_chat(g, message: str, adapter: str = "base"):
    since = time.time()
    reply, cid = g.client.predict(message=message, temperature=0.0, max_tokens=MAX_TOKENS, adapter_name=adapter,
                                  api_name="/chat")
    turn = g.store.wait_turn(message, since=since, source="web", timeout=30)
    assert turn.conversation_id == cid, f"gradio-api: the stored turn is in {turn.conversation_id}, reply said {cid}"
    return reply, not_failed(turn, "gradio-api")


@cell("plain-chat", "gradio-api")
def _(g):
    reply, turn = _gradio_chat(g, PARIS_Q)
    has_paris(reply, "gradio-api")
    clean(turn, "gradio-api")


@cell("streaming", "gradio-api")
def _(g):
    since = time.time()
    job = g.client.submit(message=STREAM_Q, temperature=0.0, max_tokens=MAX_TOKENS, api_name="/chat")
    seen = [out[0] for out in job]
    final = job.outputs()[-1][0] if job.outputs() else ""
    turn = g.store.wait_turn(STREAM_Q, since=since, source="web", timeout=30)
    assert final.strip() == turn.reply.strip(), f"gradio-api: final {final!r} != stored {turn.reply!r}"
    grows(list(dict.fromkeys(seen + [o[0] for o in job.outputs()])), final, "gradio-api")
    clean(turn, "gradio-api")


@cell("sentiment-command", "gradio-api")
def _(g):
    reply, turn = _gradio_chat(g, SENTIMENT_CMD)
    is_positive(reply, "gradio-api")
    tool_ran(turn, "sentiment", "gradio-api", "slash")


@cell("translate-command", "gradio-api")
def _(g):
    reply, turn = _gradio_chat(g, TRANSLATE_CMD)
    is_french(reply, turn, "gradio-api", "slash")


@cell("search-command", "gradio-api")
def _(g):
    reply, turn = _gradio_chat(g, SEARCH_CMD)
    call = tool_ran(turn, "search", "gradio-api", "slash")
    sources_cite(call.get("sources") or [], "gradio-api (stored search call)")
    no_error(reply, "gradio-api")
    assert reply.strip(), "gradio-api: /search gave no answer"


@cell("auto-routing", "gradio-api")
def _(g):
    reply, turn = _gradio_chat(g, ROUTED_TRANSLATE)
    is_french(reply, turn, "gradio-api", "router")


@cell("adapter", "gradio-api")
def _(g):
    base, _ = _gradio_chat(g, PARIS_Q)
    tuned, turn = _gradio_chat(g, PARIS_Q, adapter=ADAPTER)
    assert turn.adapter == ADAPTER, f"gradio-api: stored adapter={turn.adapter!r}"
    differs(base, tuned, "gradio-api")


# ================================================================================================
# terminal: parley chat --message, piped stdin, and the REPL on a pty
# ================================================================================================
def _cli_turn(t, text: str, since: float) -> StoredTurn:
    return not_failed(t.store.wait_turn(text, since=since, source="cli", timeout=10), "terminal")


@cell("plain-chat", "terminal")
def _(t):
    run = t.once("message")  # parley chat --message "What is the capital of France?"
    assert run.returncode == 0, f"terminal: exit {run.returncode}; stderr: {run.stderr[-800:]}"
    has_paris(run.stdout, "terminal")
    clean(_cli_turn(t, PARIS_Q, run.started_at), "terminal")


@cell("streaming", "terminal")
def _(t):
    run = t.once("piped")  # the question piped on stdin
    since = run.started_at
    assert run.returncode == 0, f"terminal: exit {run.returncode}; stderr: {run.stderr[-800:]}"
    texts = [c for _, c in run.chunks if c.strip()]
    assert len(texts) >= 3, f"terminal: stdout came in {len(texts)} pieces, not streamed: {run.chunks}"
    assert run.chunks[-1][0] - run.chunks[0][0] > 0.05, "terminal: all output arrived at once"
    turn = _cli_turn(t, STREAM_Q, since)
    assert turn.reply.strip() and turn.reply.strip() in run.stdout, \
        f"terminal: printed {run.stdout!r}, stored {turn.reply!r}"
    clean(turn, "terminal")


def _repl(t, text: str):
    repl = t.repl()
    repl.send("/reset")
    since = time.time()
    out = repl.send(text)
    return out, _cli_turn(t, text, since)


@cell("sentiment-command", "terminal")
def _(t):
    out, turn = _repl(t, SENTIMENT_CMD)
    is_positive(out, "terminal")
    assert "· sentiment" in out, f"terminal: the tool step is not shown: {out!r}"
    tool_ran(turn, "sentiment", "terminal", "slash")


@cell("translate-command", "terminal")
def _(t):
    out, turn = _repl(t, TRANSLATE_CMD)
    is_french(out, turn, "terminal", "slash")
    assert re.search(r"· translate: .*French by ", out), f"terminal: the backend is not named: {out!r}"


@cell("search-command", "terminal")
def _(t):
    out, turn = _repl(t, SEARCH_CMD)
    call = tool_ran(turn, "search", "terminal", "slash")
    sources_cite(call.get("sources") or [], "terminal (stored search call)")
    assert re.search(r"\[1\].*(?i:refund)", out), f"terminal: the sources are not printed: {out!r}"
    no_error(out, "terminal")


@cell("auto-routing", "terminal")
def _(t):
    out, turn = _repl(t, ROUTED_TRANSLATE)
    assert "· translate(" in out, f"terminal: no translate step shown for {ROUTED_TRANSLATE!r}: {out!r}"
    is_french(out, turn, "terminal", "router")


@cell("adapter", "terminal")
def _(t):
    repl = t.repl()
    listed = repl.send("/adapters")
    assert ADAPTER in listed, f"terminal: /adapters does not list it: {listed!r}"
    try:
        base, base_turn = _repl(t, PARIS_Q)
        repl.send(f"/adapter {ADAPTER}")
        assert repl.adapter == ADAPTER, f"terminal: the prompt did not switch to {ADAPTER}: {repl.adapter}"
        tuned, turn = _repl(t, PARIS_Q)
    finally:
        repl.send("/adapter base")
    assert base_turn.adapter == "base" and turn.adapter == ADAPTER, (base_turn.adapter, turn.adapter)
    differs(base_turn.reply, turn.reply, "terminal")
    assert turn.reply.strip()[:20] in tuned, f"terminal: printed {tuned!r}, stored {turn.reply!r}"


# ================================================================================================
# browser: Chromium on the Chat tab
# ================================================================================================
@cell("plain-chat", "browser")
def _(b):
    b.set_temperature(0)
    turn, shown = b.ask(PARIS_Q)
    has_paris(shown, "browser")
    assert turn.params.get("temperature") == 0, f"browser: temperature {turn.params} (the Settings slider)"
    clean(turn, "browser")


@cell("streaming", "browser")
def _(b):
    b.set_temperature(0)
    turn, shown = b.ask(STREAM_Q)
    grows(b.snapshots(), shown, "browser")
    no_error(shown, "browser")
    clean(turn, "browser")


@cell("sentiment-command", "browser")
def _(b):
    turn, shown = b.ask(SENTIMENT_CMD, expect=lambda s: "🔧 sentiment" in s and "ositive" in s)
    is_positive(shown, "browser")
    tool_ran(turn, "sentiment", "browser", "slash")


@cell("translate-command", "browser")
def _(b):
    turn, shown = b.ask(TRANSLATE_CMD, expect=lambda s: "🔧 translate" in s and "onjour" in s.lower())
    is_french(shown, turn, "browser", "slash")
    b.page.get_by_text("🔧 translate").first.click()  # the step opens to show what ran
    wait_until("the translate step to name its backend", lambda: " by " in b.bot_text(), 10,
               detail=lambda: b.bot_text()[:300])


@cell("search-command", "browser")
def _(b):
    b.set_temperature(0)
    turn, shown = b.ask(SEARCH_CMD, expect=lambda s: "📚 Sources" in s)
    assert "🔧 search" in shown, f"browser: no search step shown: {shown[:300]!r}"
    assert re.search(r"(?i)refund policy", shown), f"browser: the sources do not show the document: {shown[:500]!r}"
    tool_ran(turn, "search", "browser", "slash")
    no_error(shown, "browser")


@cell("auto-routing", "browser")
def _(b):
    turn, shown = b.ask(ROUTED_TRANSLATE, expect=lambda s: "🔧 translate" in s and "onjour" in s.lower())
    is_french(shown, turn, "browser", "router")


@cell("always-search", "browser")
def _(b):
    b.set_temperature(0)
    b.always_search(True)
    turn, shown = b.ask(RAG_Q, expect=lambda s: "📚 Sources" in s)
    assert re.search(r"(?i)refund policy", shown), f"browser: the sources do not show the document: {shown[:500]!r}"
    tool_ran(turn, "search", "browser", "always_search")
    no_error(shown, "browser")


@cell("feedback", "browser")
def _(b):
    b.set_temperature(0)
    turn, _ = b.ask(PARIS_Q)
    b.like_last()
    rows = wait_until("the 👍 to be stored", lambda: b.store.feedback(turn.id), 15)
    assert [(r["rating"], r["source"]) for r in rows] == [(1, "web")], f"browser: feedback stored: {rows}"


@cell("adapter", "browser")
def _(b):
    b.set_temperature(0)
    base, _ = b.ask(PARIS_Q)
    offered = b.choose_adapter(ADAPTER)
    assert ADAPTER in offered, f"browser: the Adapter dropdown offers {offered}"
    tuned, shown = b.ask(PARIS_Q)
    assert tuned.adapter == ADAPTER and base.adapter == "base", (base.adapter, tuned.adapter)
    differs(base.reply, tuned.reply, "browser")


# ================================================================================================
# slack: signed Events API requests; the mock Web API records what the bot posts
# ================================================================================================
_channels = itertools.count(1)


def _channel() -> str:
    return f"CMATRIX{next(_channels)}"


def _slack_mention(s, text: str, channel: str) -> tuple[StoredTurn, str, str]:
    since = time.time()
    ts = s.mention(text, channel=channel)
    turn = not_failed(s.wait_reply(text, since=since), "slack")
    final = s.final_texts(channel)[-1]
    return turn, final, ts


def _slack_config(s, channel: str, setting: str) -> None:
    s.api.admins.add("U1")
    s.mention(f"config {setting}", channel=channel)
    s.wait_post(channel, "set for")


@cell("plain-chat", "slack")
def _(s):
    turn, final, _ = _slack_mention(s, PARIS_Q, _channel())
    has_paris(final, "slack")
    clean(turn, "slack")


@cell("streaming", "slack")
def _(s):
    channel = _channel()
    turn, final, _ = _slack_mention(s, STREAM_Q, channel)
    posts, updates = s.posts(channel), s.updates(channel)
    assert len(posts) == 1, f"slack: {len(posts)} messages for one short reply"
    shown = [posts[0].args["text"], *[u.args["text"] for u in updates]]
    grows(shown, final, "slack")
    assert "▍" not in final and final.strip(), f"slack: the last edit still looks unfinished: {final!r}"
    clean(turn, "slack")


def _slack_command(s, name: str, text: str):
    channel = _channel()
    since = time.time()
    s.command(name, text, channel=channel)
    turn = not_failed(s.wait_reply(f"{name} {text}", since=since), "slack")
    return turn, s.final_texts(channel)[-1]


@cell("sentiment-command", "slack")
def _(s):
    turn, final = _slack_command(s, "/sentiment", SENTIMENT_CMD.split(" ", 1)[1])
    is_positive(final, "slack")
    tool_ran(turn, "sentiment", "slack", "slash")


@cell("translate-command", "slack")
def _(s):
    turn, final = _slack_command(s, "/translate", TRANSLATE_CMD.split(" ", 1)[1])
    is_french(final, turn, "slack", "slash")


@cell("search-command", "slack")
def _(s):
    turn, final = _slack_command(s, "/search", SEARCH_CMD.split(" ", 1)[1])
    assert re.search(r"Sources: \[1\] .*(?i:refund)", final), f"slack: no sources line: {final!r}"
    tool_ran(turn, "search", "slack", "slash")
    no_error(final, "slack")


@cell("auto-routing", "slack")
def _(s):
    channel = _channel()
    turn, final, _ = _slack_mention(s, ROUTED_TRANSLATE, channel)
    first = s.posts(channel)[0].args["text"]
    assert "translate…" in first, f"slack: the tool step was not shown while it ran: {first!r}"
    is_french(final, turn, "slack", "router")


@cell("always-search", "slack")
def _(s):
    channel = _channel()
    _slack_config(s, channel, "always_search on")
    turn, final, _ = _slack_mention(s, RAG_Q, channel)
    assert re.search(r"Sources: \[1\] .*(?i:refund)", final), f"slack: no sources line: {final!r}"
    tool_ran(turn, "search", "slack", "always_search")


@cell("feedback", "slack")
def _(s):
    channel = _channel()
    turn, _, _ = _slack_mention(s, PARIS_Q, channel)
    reply_ts = turn.external_id.rsplit(":", 1)[1]
    s.react(channel, reply_ts, "+1")
    rows = wait_until("the 👍 reaction to be stored", lambda: s.store.feedback(turn.id), 15)
    assert [(r["rating"], r["source"]) for r in rows] == [(1, "slack")], f"slack: feedback stored: {rows}"


@cell("adapter", "slack")
def _(s):
    base, _, _ = _slack_mention(s, PARIS_Q, _channel())
    channel = _channel()
    _slack_config(s, channel, f"adapter {ADAPTER}")
    tuned, final, _ = _slack_mention(s, PARIS_Q, channel)
    assert tuned.adapter == ADAPTER, f"slack: stored adapter={tuned.adapter!r}"
    differs(base.reply, tuned.reply, "slack")


# ================================================================================================
# discord: real discord.Message objects handed to ParleyDiscord; the mock REST server records
# ================================================================================================
def _discord_ask(d, text: str, *, setting: str | None = None, react: bool = False):
    """Mention the bot with ``text`` (after ``config SETTING`` as the server owner when given)."""
    from tests.unit.mock_discord_api import OWNER_ID

    async def scenario(client, mock, driver):
        import discord

        since = time.time()
        if setting:
            await client.handle_message(driver.message(client, mock, f"config {setting}", author_id=OWNER_ID))
            assert "set for" in mock.final_texts()[-1], f"discord: config refused: {mock.final_texts()[-1]!r}"
        start = len(mock.sent())
        try:
            await client.handle_message(driver.message(client, mock, text))
        finally:
            if setting:
                await client.handle_message(driver.message(client, mock, f"config reset {setting.split()[0]}",
                                                           author_id=OWNER_ID))
        sent = mock.sent()[start:start + 1]
        assert sent, "discord: the bot sent nothing"
        turn = not_failed(driver.store.wait_turn(text, since=since, source="discord", timeout=10, external_id=True),
                          "discord")
        reply_id = sent[0].result["id"]
        final = mock.messages[reply_id]["content"]
        edits = [c.json.get("content", "") for c in mock.edits() if c.path.endswith(f"/messages/{reply_id}")]
        if react:
            payload = type("Reaction", (), {"message_id": int(reply_id), "user_id": 5001,
                                            "emoji": discord.PartialEmoji(name="👍")})()
            await client.on_raw_reaction_add(payload)
        return turn, final, [sent[0].json.get("content", ""), *edits]

    return d.run(scenario)


@cell("plain-chat", "discord")
def _(d):
    turn, final, _ = _discord_ask(d, PARIS_Q)
    has_paris(final, "discord")
    clean(turn, "discord")


@cell("streaming", "discord")
def _(d):
    turn, final, shown = _discord_ask(d, STREAM_Q)
    grows(shown, final, "discord")
    assert "▍" not in final and final.strip(), f"discord: the last edit still looks unfinished: {final!r}"
    clean(turn, "discord")


@cell("sentiment-command", "discord")
def _(d):
    turn, final, _ = _discord_ask(d, SENTIMENT_CMD)
    is_positive(final, "discord")
    tool_ran(turn, "sentiment", "discord", "slash")


@cell("translate-command", "discord")
def _(d):
    turn, final, _ = _discord_ask(d, TRANSLATE_CMD)
    is_french(final, turn, "discord", "slash")


@cell("search-command", "discord")
def _(d):
    turn, final, _ = _discord_ask(d, SEARCH_CMD)
    assert re.search(r"Sources: \[1\] .*(?i:refund)", final), f"discord: no sources line: {final!r}"
    tool_ran(turn, "search", "discord", "slash")
    no_error(final, "discord")


@cell("auto-routing", "discord")
def _(d):
    turn, final, shown = _discord_ask(d, ROUTED_TRANSLATE)
    assert "translate…" in shown[0], f"discord: the tool step was not shown while it ran: {shown[0]!r}"
    is_french(final, turn, "discord", "router")


@cell("always-search", "discord")
def _(d):
    turn, final, _ = _discord_ask(d, RAG_Q, setting="always_search on")
    assert re.search(r"Sources: \[1\] .*(?i:refund)", final), f"discord: no sources line: {final!r}"
    tool_ran(turn, "search", "discord", "always_search")


@cell("feedback", "discord")
def _(d):
    turn, _, _ = _discord_ask(d, PARIS_Q, react=True)
    rows = wait_until("the 👍 reaction to be stored", lambda: d.store.feedback(turn.id), 15)
    assert [(r["rating"], r["source"]) for r in rows] == [(1, "discord")], f"discord: feedback stored: {rows}"


@cell("adapter", "discord")
def _(d):
    base, _, _ = _discord_ask(d, PARIS_Q)
    tuned, _, _ = _discord_ask(d, PARIS_Q, setting=f"adapter {ADAPTER}")
    assert tuned.adapter == ADAPTER, f"discord: stored adapter={tuned.adapter!r}"
    differs(base.reply, tuned.reply, "discord")


# ================================================================================================
# the matrix: one test per offered cell, grouped by front end (each front end's fixtures start once)
# ================================================================================================
def _cells():
    for frontend in ("api", "gradio-api", "terminal", "browser", "slack", "discord"):
        for feature in FEATURES:
            if frontend not in OFFERED[feature]:
                continue
            marks = [pytest.mark.feature_matrix(feature=feature, frontend=frontend)]
            if (feature, frontend) in KNOWN_BUGS:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[(feature, frontend)]))
            yield pytest.param(feature, frontend, id=f"{feature}[{frontend}]", marks=marks)


@pytest.fixture
def driver(request):
    """The front end's driver (started in the setup phase: a server that fails to start is a setup
    error of every cell that needs it, named by the cell)."""
    return request.getfixturevalue(DRIVERS[request.param])


@pytest.mark.parametrize(("feature", "driver"), list(_cells()), indirect=["driver"])
def test_feature(feature: str, driver, request):
    frontend = request.node.callspec.params["driver"]
    check = CHECKS.get((feature, frontend))
    assert check is not None, f"{feature}[{frontend}] is offered but has no check in this module"
    check(driver)


def test_message_sent_while_the_page_loads_stays(_chromium, matrix_server):
    """A person who sends at once, while the page's load events are still queued on a busy server.

    The load events after the first (ensure_browser_id) are held back by the browser until the
    reply is shown, then let through. Send disabled until the page is ready is a fix too.
    """
    from tests.e2e.feature_matrix_helpers import BrowserChat

    context = _chromium.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    held, joins, sending = [], [0], [False]

    def hold_load_events(route):
        joins[0] += 1
        if not sending[0] and joins[0] > 1:
            held.append(route)
        else:
            route.continue_()

    def pump(seconds: float, until=lambda: False) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if until():
                return True
            page.wait_for_timeout(100)  # lets Playwright run the route handler meanwhile
        return until()

    try:
        page.route("**/gradio_api/queue/join*", hold_load_events)
        chat = BrowserChat(page, matrix_server).open(wait_loaded=False)
        last = [0, time.monotonic()]

        def settled() -> bool:  # load events held, and no new one for 2 s (the .then chain has queued)
            if joins[0] != last[0]:
                last[:] = [joins[0], time.monotonic()]
            return bool(held) and time.monotonic() - last[1] > 2

        assert pump(30, settled), "no page-load event after the first one was seen"
        if page.locator("#parley-send").is_disabled():  # the page waits for its load events: fixed
            for route in held:
                route.continue_()
            return
        sending[0] = True
        since = chat.send(SENTIMENT_CMD)
        assert pump(90, lambda: "ositive" in chat.bot_text()), f"no reply shown: {chat.bot_text()!r}"
        first = chat.store.wait_turn(SENTIMENT_CMD, since=since, source="web", timeout=10)
        for route in held:
            route.continue_()
        pump(8)  # the load events finish now
        page.unroute("**/gradio_api/queue/join*")
        shown = chat.bot_text()
        assert "ositive" in shown, f"the reply vanished when the page-load events finished: {shown!r}"
        second, _ = chat.ask(PARIS_Q)
        assert second.conversation_id == first.conversation_id, "the next message started a new conversation"
    finally:
        context.close()


def test_matrix_table_matches_docstring():
    """The table above is the matrix the tests run (no cell silently dropped or added)."""
    rows = {}
    for line in __doc__.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(FRONTENDS) + 1 and cells[0] in FEATURES:
            rows[cells[0]] = {f: mark == "✓" for f, mark in zip(FRONTENDS, cells[1:])}
    assert set(rows) == set(FEATURES)
    for feature in FEATURES:
        assert {f for f, offered in rows[feature].items() if offered} == set(OFFERED[feature]), feature
        for frontend in FRONTENDS:
            offered = frontend in OFFERED[feature]
            assert offered == ((feature, frontend) in CHECKS), f"{feature}[{frontend}]"
            assert offered != ((feature, frontend) in NOT_OFFERED)
