"""Settings precedence and validation, message normalization and trimming, the SQLite store."""

from __future__ import annotations

import pytest

from bot.chat import fit_to_context, normalize_messages, render_ids
from bot.config import Settings, load_settings, parse_adapter_specs
from bot.errors import ConfigError, ContextOverflowError, NotFoundError, RequestError
from bot.store import Store


def test_settings_precedence_flags_over_env_over_toml(tmp_path):
    toml = tmp_path / "parley.toml"
    toml.write_text('[model]\nmodel = "from-toml"\nmax_new_tokens = 11\n[server]\nport = 9001\n')
    env = {"PARLEY_MODEL": "from-env", "PARLEY_PORT": "9002"}
    s = load_settings({"model": "from-flag", "port": None}, env=env, config_file=toml)
    assert s.model == "from-flag"          # flag wins
    assert s.port == 9002                  # env beats the file
    assert s.max_new_tokens == 11          # the file beats the default


def test_settings_report_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        Settings(device="tpu", port=0, max_new_tokens=0, auth="nopassword")
    text = str(err.value)
    for needle in ("device", "port", "max_new_tokens", "auth"):
        assert needle in text


def test_unknown_toml_key_is_an_error_not_ignored(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text("modle = 'typo'\n")
    with pytest.raises(ConfigError, match="unknown setting 'modle'"):
        load_settings({}, env={}, config_file=toml)


def test_bad_env_value_names_its_origin():
    with pytest.raises(ConfigError, match="PARLEY_PORT"):
        load_settings({}, env={"PARLEY_PORT": "eighty"})


def test_adapter_specs():
    assert parse_adapter_specs(["a=/x", "/p/b"]) == {"a": "/x", "b": "/p/b"}
    with pytest.raises(ConfigError):
        Settings(adapters={"base": "/x"})


@pytest.mark.parametrize("raw, needle", [
    ([], "empty"),
    ("hello", "list"),
    ([{"role": "wizard", "content": "x"}], "role"),
    ([{"role": "user", "content": "   "}], "empty user message"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "last"),
    ([{"role": "user", "content": 5}], "string"),
    ([{"role": "user", "content": "a\x00b"}], "NUL"),
])
def test_normalize_refuses_bad_messages(raw, needle):
    with pytest.raises(RequestError, match=needle):
        normalize_messages(raw)


def test_normalize_flattens_typed_parts():
    msgs = normalize_messages([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert msgs == [{"role": "user", "content": "ab"}]


def test_trimming_drops_oldest_turns_and_keeps_system(tiny_tokenizer):
    system = {"role": "system", "content": "SYS"}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " + "x" * 40},
                  {"role": "assistant", "content": f"answer {i} " + "y" * 40}]
    messages = [system, *turns, {"role": "user", "content": "last"}]
    full = len(render_ids(tiny_tokenizer, messages))
    kept, ids = fit_to_context(tiny_tokenizer, messages, full - 50)
    assert kept[0] == system and kept[-1]["content"] == "last"
    assert kept[1]["role"] == "user"              # never an answer without its question
    assert len(ids) <= full - 50 and len(kept) < len(messages)
    assert ids == render_ids(tiny_tokenizer, kept)


def test_a_single_message_too_long_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(ContextOverflowError, match="shorten"):
        fit_to_context(tiny_tokenizer, [{"role": "user", "content": "z" * 500}], 100)


def test_store_turns_history_feedback_and_reopen(tmp_path):
    db = tmp_path / "parley.db"
    store = Store(db)
    cid = store.create_conversation(source="web")
    t1 = store.add_turn(cid, messages=[{"role": "user", "content": "hi"}], reply="hello", model="m")
    t2 = store.add_turn(cid, messages=[{"role": "user", "content": "2+2?"}], reply="5", model="m", adapter="a")
    store.add_feedback(t1, 1)
    store.add_feedback(t2, -1, correction="4")
    reopened = Store(db)  # a new process sees everything (server restart)
    assert reopened.history(cid) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]
    assert reopened.get_conversation(cid)["title"] == "hi"
    examples = {e["turn_id"]: e["messages"] for e in reopened.feedback_examples()}
    assert examples[t1][-1]["content"] == "hello"
    assert examples[t2][-1]["content"] == "4" and examples[t2][0]["content"] == "hi"
    with pytest.raises(RequestError):
        reopened.add_feedback(t1, 3)
    with pytest.raises(NotFoundError):
        reopened.add_feedback("nope", 1)
    reopened.truncate_after(cid, 1)
    assert [t.id for t in reopened.turns(cid)] == [t1]


def test_store_dedupe_and_thread_binding(tmp_path):
    store = Store(tmp_path / "p.db")
    assert store.mark_seen("slack:Ev1") and not store.mark_seen("slack:Ev1")
    a = store.conversation_for("slack:T:C:1.0", source="slack")
    assert store.conversation_for("slack:T:C:1.0", source="slack") == a
    store.set_setting("slack:T:C", "adapter", "support")
    assert store.get_settings("slack:T:C") == {"adapter": "support"}
