"""Shared integration pieces: splitting, neutralizing, throttled streaming, settings, reactions.

Also home of ``ScriptedAssistant``: a stand-in that yields the Assistant's event types with a
chosen text (the tiny model's output is random, and some tests need a 10,000-character answer).
It stores its turns in the real Store exactly like the Assistant does.
"""

from __future__ import annotations


import time

import pytest

from bot.errors import ConfigError, NotFoundError
from bot.events import Done, TextDelta, ToolStarted, ToolFinished
from bot.integrations.common import (ReplyPages, Throttle, apply_settings_file, close_open_fence, open_fence,
                                     parse_config_command, reaction_rating, record_reaction, redact,
                                     resolve_settings, run_config_command, slack_escape, split_message,
                                     stream_reply, turn_options)
from bot.store import Store


class _Engine:
    model_name = "scripted"
    adapters = {"support": "/adapters/support"}

    def require_adapter(self, name: str) -> None:
        if name != "base" and name not in self.adapters:
            raise NotFoundError(f"adapter {name!r} is not loaded")


class ScriptedAssistant:
    """Yields ``text`` in ``chunk``-sized TextDeltas (``delay`` s apart) and stores the turn."""

    def __init__(self, store: Store, text: str = "Hello there.", *, chunk: int = 50, delay: float = 0.0,
                 sources: tuple = (), tool: str | None = None):
        self.store, self.text, self.chunk, self.delay = store, text, chunk, delay
        self.sources, self.tool = sources, tool
        self.engine = _Engine()
        self.calls: list[tuple[list, object]] = []

    def respond(self, conversation, options=None, *, cancel=None):
        self.calls.append((list(conversation), options))
        return self._events(conversation, options)

    def _events(self, conversation, options):
        if self.tool:
            yield ToolStarted("c1", self.tool, {})
            yield ToolFinished("c1", self.tool, True, "ok")
        for i in range(0, len(self.text), self.chunk):
            if self.delay:
                time.sleep(self.delay)
            yield TextDelta(self.text[i:i + self.chunk])
        turn_id = None
        if options is not None and options.conversation_id:
            turn_id = self.store.add_turn(options.conversation_id, messages=[conversation[-1]], reply=self.text,
                                          model="scripted", adapter=options.adapter)
        yield Done(finish_reason="stop", turn_id=turn_id, sources=self.sources)


def balanced(piece: str) -> bool:
    return open_fence(piece) is None


CODE_REPLY = ("Here is the script.\n\n```python\n" + "\n".join(f"print('line {i}')  # step {i}" for i in range(150))
              + "\n```\n\nAnd some prose after it. " + "words " * 300)


def test_split_keeps_every_piece_under_the_limit_and_fences_balanced():
    pieces = split_message(CODE_REPLY, 2000)
    assert len(pieces) >= 3
    assert all(len(p) <= 2000 for p in pieces)
    assert all(balanced(p) for p in pieces)
    # Nothing is lost: removing the added fences gives back the words and code lines.
    assert all(f"print('line {i}')" in "".join(pieces) for i in range(150))
    assert pieces[1].startswith("```python\n")


def test_split_hard_cut_without_spaces_and_short_text_untouched():
    assert split_message("short", 100) == ["short"]
    pieces = split_message("x" * 1000, 300)
    assert all(len(p) <= 300 for p in pieces) and "".join(pieces) == "x" * 1000
    escaped = slack_escape("&" * 500)
    assert all(p.endswith(";") for p in split_message(escaped, 300)[:-1])  # never cuts &amp; in two


def test_split_is_stable_as_text_grows():
    # A message filled while streaming never changes when more text arrives.
    for end in range(2500, len(CODE_REPLY), 700):
        early = split_message(CODE_REPLY[:end], 2000)[:-1]
        assert split_message(CODE_REPLY, 2000)[:len(early)] == early


def test_open_fence_and_close():
    assert open_fence("a\n```js\nx") == "```js"
    assert open_fence("a\n```js\nx\n```") is None
    assert open_fence("inline ```code``` here") is None
    assert close_open_fence("```\nx").endswith("\n```")


def test_reply_pages_post_then_edit_only_changes():
    pages = ReplyPages(100, cursor="|")
    ops = pages.plan("hello", final=False)
    assert ops == [(0, "hello|")]
    pages.record(*ops[0])
    assert pages.plan("hello", final=False) == []
    ops = pages.plan("hello " + "w" * 150, final=True)
    assert [i for i, _ in ops] == [0, 1] and all(len(c) <= 100 for _, c in ops)


class _Sink:
    def __init__(self):
        self.ops: list[tuple[str, str, str]] = []

    def post(self, text):
        self.ops.append(("post", str(len(self.ops)), text))
        return str(len(self.ops) - 1)

    def edit(self, mid, text):
        self.ops.append(("edit", mid, text))


def test_stream_reply_throttles_edits_and_shows_tool_status():
    clock = [0.0]
    events = [ToolStarted("c", "search", {})] + [TextDelta("word ") for _ in range(30)] + \
        [Done(finish_reason="stop", sources=({"n": 1, "title": "Handbook", "page": 3},))]

    def timed():
        for e in events:
            clock[0] += 0.1
            yield e

    sink = _Sink()
    result = stream_reply(timed(), sink, limit=3000, interval=1.0, clock=lambda: clock[0])
    assert sink.ops[0] == ("post", "0", "_search…_ ▍")
    assert len([o for o in sink.ops if o[0] == "edit"]) <= 5  # 3 s of deltas at most one edit per second
    assert sink.ops[-1][2].endswith("Sources: [1] Handbook p. 3")
    assert result.message_ids == ["0"]


def test_final_text_closes_a_fence_left_open():
    from bot.integrations.common import final_text

    assert final_text("```py\nx = 1", Done(finish_reason="length")) == "```py\nx = 1\n```"


def test_stream_reply_error_is_one_short_line():
    sink = _Sink()
    stream_reply(iter([Done(finish_reason="error", error="boom xoxb-123-456-abc\ntraceback...")]), sink, limit=3000)
    text = sink.ops[-1][2]
    assert "xoxb" not in text and "traceback" not in text and text.startswith("Sorry")


def test_redact_tokens():
    assert "xapp-1-A" not in redact("token xapp-1-A111-222-abc")
    assert "[redacted]" in redact("MTA4NjQ2NjA2NzI0MzI2NjE3.GhIjKl.abcdefghijklmnopqrstuvwxyz012")


def test_reaction_rating_variants():
    assert reaction_rating("+1") == 1 and reaction_rating("thumbsup") == 1 and reaction_rating("+1::skin-tone-3") == 1
    assert reaction_rating("-1") == -1 and reaction_rating("thumbsdown") == -1
    assert reaction_rating("👍") == 1 and reaction_rating("👍🏽") == 1 and reaction_rating("👎") == -1
    assert reaction_rating("tada") is None


def test_record_reaction_on_a_reply(tmp_path):
    store = Store(tmp_path / "p.db")
    cid = store.conversation_for("slack:T:C:1", source="slack")
    turn = store.add_turn(cid, messages=[{"role": "user", "content": "hi"}], reply="hello", model="m")
    store.set_turn_external_id(turn, "slack:C:2")
    assert record_reaction(store, "slack:C:2", "+1", source="slack", user="U1") is not None
    assert record_reaction(store, "slack:C:unknown", "+1", source="slack", user="U1") is None
    assert record_reaction(store, "slack:C:2", "eyes", source="slack", user="U1") is None
    assert [(f["rating"], f["source"], f["user"]) for f in store.feedback(turn)] == [(1, "slack", "U1")]


def test_settings_file_channel_overrides_workspace(tmp_path):
    store = Store(tmp_path / "p.db")
    path = tmp_path / "channels.toml"
    path.write_text('[slack.T1]\nadapter = "support"\ntools = ["search"]\n'
                    '[slack."T1/C1"]\ntools = []\nsystem_prompt = "Be brief."\n'
                    '[discord."9"]\nalways_search = true\n', encoding="utf-8")
    assert apply_settings_file(store, path, "slack") == 4
    merged = resolve_settings(store, ["slack:T1", "slack:T1:C1"])
    assert merged == {"adapter": "support", "tools": [], "system_prompt": "Be brief."}
    options = turn_options(merged, source="slack", conversation_id="c")
    assert options.adapter == "support" and options.tools == () and options.system_prompt == "Be brief."
    path.write_text('[slack.T1]\nadapter = "a b"\ntools = ["nope"]\ncolour = 1\n', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        apply_settings_file(store, path, "slack")
    assert "adapter" in str(err.value) and "nope" in str(err.value) and "colour" in str(err.value)


def test_config_commands(tmp_path):
    store = Store(tmp_path / "p.db")
    assert parse_config_command("what is config?") is None
    cmd = parse_config_command("config workspace adapter support")
    assert cmd.wide and cmd.action == "set" and cmd.key == "adapter" and cmd.value == "support"
    check = _Engine().require_adapter
    assert "set" in run_config_command(store, cmd, "slack:T1", check_adapter=check)
    assert store.get_settings("slack:T1") == {"adapter": "support"}
    bad = parse_config_command("config adapter missing")
    assert run_config_command(store, bad, "slack:T1:C1", check_adapter=check).startswith("Not changed")
    assert "adapter='support'" in run_config_command(store, parse_config_command("config workspace"), "slack:T1")
    run_config_command(store, parse_config_command("config workspace reset adapter"), "slack:T1")
    assert store.get_settings("slack:T1") == {}


def test_scripted_assistant_stores_turns(tmp_path):
    store = Store(tmp_path / "p.db")
    cid = store.conversation_for("k", source="slack")
    fake = ScriptedAssistant(store, "abc", chunk=1)
    events = list(fake.respond([{"role": "user", "content": "q"}], turn_options({}, source="slack",
                                                                                 conversation_id=cid)))
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["a", "b", "c"]
    assert store.history(cid)[-1] == {"role": "assistant", "content": "abc"}


def test_throttle():
    now = [0.0]
    t = Throttle(1.0, clock=lambda: now[0])
    assert t.ready()
    t.mark()
    now[0] = 0.5
    assert not t.ready() and abs(t.wait_time() - 0.5) < 1e-9
    now[0] = 1.0
    assert t.ready()



