"""Discord adapter: discord.py's HTTP layer against a local mock REST server, real Message objects."""

from __future__ import annotations

import asyncio
import types

import pytest

discord = pytest.importorskip("discord")

from bot.errors import ConfigError  # noqa: E402
from bot.integrations.common import open_fence  # noqa: E402
from bot.integrations.discord import ParleyDiscord, add_parser, run_discord  # noqa: E402
from bot.store import Store  # noqa: E402
from tests.unit.mock_discord_api import (BOT_ID, CHANNEL_ID, GUILD_ID, OWNER_ID, add_guild,  # noqa: E402
                                         discord_api, make_message)
from tests.unit.test_integrations_common import ScriptedAssistant  # noqa: E402


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "parley.db")


def run(scenario, assistant, store, *, mock_kwargs=None, **client_kwargs):
    """Start the mock, log a client in (no gateway), run ``scenario(client, mock)``, clean up."""
    async def main():
        async with discord_api(**(mock_kwargs or {})) as mock:
            client = ParleyDiscord(assistant, store, interval=client_kwargs.pop("interval", 0.0), **client_kwargs)
            try:
                await client.login("x")
                return await scenario(client, mock)
            finally:
                await client.close()

    return asyncio.run(main())


def test_mention_real_tiny_model_reply_streamed_and_stored(store, tiny_model_dir, tmp_path):
    from bot.assistant import Assistant
    from bot.engine import Engine, GenerationParams
    from bot.models import load_model

    engine = Engine(load_model(str(tiny_model_dir), tmp_path, device="cpu"))
    try:
        assistant = Assistant(engine, store=store)

        async def scenario(client, mock):
            await client.handle_message(make_message(client, mock, f"<@{BOT_ID}> hello there"))
            await client.handle_message(make_message(client, mock, f"<@{BOT_ID}> a second question"))
            return mock

        mock = run(scenario, assistant, store, interval=0.1, params=GenerationParams(max_new_tokens=24))
    finally:
        engine.close()
    sent = mock.sent()
    assert len(sent) >= 1
    first = sent[0].json
    assert first["message_reference"]["message_id"]  # a reply to the question
    assert first["allowed_mentions"] == {"parse": [], "replied_user": False}
    assert any(c.path.endswith("/typing") for c in mock.calls)
    turns = {t.messages[0]["content"]: t for c in store.list_conversations(source="discord")
             for t in store.turns(c["id"])}
    assert set(turns) == {"hello there", "a second question"}
    assert turns["hello there"].external_id == f"discord:{sent[0].result['id']}"
    # Each turn has its own cancel flag: the first turn ending must not cancel the second.
    assert all(t.finish_reason in ("stop", "length") for t in turns.values())


def test_streamed_edits_and_allowed_mentions_none(store):
    fake = ScriptedAssistant(store, "one two three four five six seven @everyone <@&123>", chunk=5, delay=0.02)

    async def scenario(client, mock):
        await client.handle_message(make_message(client, mock, f"<@{BOT_ID}> hi"))
        return mock

    mock = run(scenario, fake, store, interval=0.05)
    assert len(mock.sent()) == 1
    edits = mock.edits()
    assert edits and len(edits) < 11  # throttled
    assert mock.final_texts() == ["one two three four five six seven @everyone <@&123>"]
    for call in mock.sent():
        assert call.json["allowed_mentions"]["parse"] == []
        assert call.json["flags"] & 4  # embeds suppressed: no link previews fetched
    for call in edits:
        assert call.json.get("allowed_mentions", {"parse": []})["parse"] == []


def test_five_thousand_chars_with_code_split_into_valid_messages(store):
    text = ("Here is how:\n\n```python\n" + "\n".join(f"result_{i} = compute({i})  # step" for i in range(100))
            + "\n```\n\nThat is all. " + "More words here. " * 120)[:5000]
    fake = ScriptedAssistant(store, text, chunk=120)

    async def scenario(client, mock):
        await client.handle_message(make_message(client, mock, f"<@{BOT_ID}> code please"))
        return mock

    mock = run(scenario, fake, store)
    finals = mock.final_texts()
    assert len(finals) >= 3
    assert all(len(t) <= 2000 for t in finals)
    assert all(open_fence(t) is None for t in finals)
    assert len(text) == 5000
    assert all(f"result_{i} = compute({i})" in "".join(finals) for i in range(100))
    for call in mock.sent() + mock.edits():
        assert len(call.json["content"]) <= 2000


def test_bots_self_and_unaddressed_messages_are_ignored(store):
    fake = ScriptedAssistant(store)

    async def scenario(client, mock):
        await client.handle_message(make_message(client, mock, f"<@{BOT_ID}> hi", bot=True, author_id=6000))
        await client.handle_message(make_message(client, mock, "hi", author_id=BOT_ID, guild=False))
        await client.handle_message(make_message(client, mock, "no mention here", mention_bot=False))
        return mock

    mock = run(scenario, fake, store)
    assert fake.calls == [] and mock.sent() == []


def test_dm_answered_and_duplicate_message_id_answered_once(store):
    fake = ScriptedAssistant(store, "hello")

    async def scenario(client, mock):
        msg = make_message(client, mock, "hi in a DM", guild=False, mention_bot=False, message_id="42")
        await client.handle_message(msg)
        again = make_message(client, mock, "hi in a DM", guild=False, mention_bot=False, message_id="42")
        await client.handle_message(again)  # e.g. replayed after a gateway RESUME
        return mock

    mock = run(scenario, fake, store)
    assert len(fake.calls) == 1 and len(mock.sent()) == 1


def test_reply_chain_and_thread_are_one_conversation(store):
    fake = ScriptedAssistant(store, "first answer")

    async def scenario(client, mock):
        await client.handle_message(make_message(client, mock, f"<@{BOT_ID}> first"))
        answer_id = mock.sent()[0].result["id"]
        fake.text = "second answer"
        await client.handle_message(make_message(client, mock, f"<@{BOT_ID}> and then?", reference=answer_id))
        add_guild(client, thread_id=3100)
        await client.handle_message(make_message(client, mock, f"<@{BOT_ID}> in thread", channel_id=3100))
        await client.handle_message(make_message(client, mock, f"<@{BOT_ID}> again", channel_id=3100))
        return mock

    run(scenario, fake, store)
    assert fake.calls[1][0] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "first answer"},
                                {"role": "user", "content": "and then?"}]
    assert fake.calls[3][0][0] == {"role": "user", "content": "in thread"} and len(fake.calls[3][0]) == 3
    assert len(store.list_conversations(source="discord")) == 2


def test_reaction_becomes_feedback(store):
    fake = ScriptedAssistant(store, "rate me")

    async def scenario(client, mock):
        await client.handle_message(make_message(client, mock, f"<@{BOT_ID}> q"))
        reply_id = int(mock.sent()[0].result["id"])
        for user_id, emoji in ((5000, "👍🏽"), (5001, "👎"), (BOT_ID, "👍"), (5002, "🎉")):
            payload = types.SimpleNamespace(message_id=reply_id, user_id=user_id,
                                            emoji=discord.PartialEmoji(name=emoji))
            await client.on_raw_reaction_add(payload)
        return reply_id

    reply_id = run(scenario, fake, store)
    turn = store.turn_by_external_id(f"discord:{reply_id}")
    assert [(f["rating"], f["user"], f["source"]) for f in store.feedback(turn.id)] == [
        (1, "5000", "discord"), (-1, "5001", "discord")]


def test_missing_message_content_intent_is_a_clear_error(store):
    async def main():
        async with discord_api(app_flags=0):
            client = ParleyDiscord(ScriptedAssistant(store), store, sync_commands=False)
            try:
                await client.login("x")
            finally:
                await client.close()

    with pytest.raises(ConfigError, match="MESSAGE CONTENT INTENT"):
        asyncio.run(main())


def test_gateway_close_4014_becomes_the_same_clear_error(store, monkeypatch):
    def fake_run(self, token, **kwargs):
        raise discord.PrivilegedIntentsRequired(None)

    monkeypatch.setattr(ParleyDiscord, "run", fake_run)
    monkeypatch.setenv("DISCORD_TOKEN", "x")
    args = types.SimpleNamespace(build_assistant=lambda: ScriptedAssistant(store), channels_config=None,
                                 edit_interval=1.0, no_sync_commands=True,
                                 settings=types.SimpleNamespace(max_new_tokens=32, db_path=store.path))
    with pytest.raises(ConfigError, match="Developer Portal|developers/applications"):
        run_discord(args)
    monkeypatch.delenv("DISCORD_TOKEN")
    with pytest.raises(ConfigError, match="DISCORD_TOKEN is not set"):
        run_discord(args)


def test_rate_limited_user_is_informed(store):
    fake = ScriptedAssistant(store, "never seen")

    async def scenario(client, mock):
        mock.fail_next("POST", f"/channels/{CHANNEL_ID}/messages", 429,
                       {"message": "You are being rate limited.", "retry_after": 120.0, "global": False})
        await client.handle_message(make_message(client, mock, f"<@{BOT_ID}> q"))
        return mock

    mock = run(scenario, fake, store)
    assert "rate limiting" in mock.final_texts()[-1]


def test_config_needs_manage_server_and_applies(store):
    fake = ScriptedAssistant(store, "ok")

    async def scenario(client, mock):
        await client.handle_message(make_message(client, mock, f"<@{BOT_ID}> config adapter support"))
        await client.handle_message(make_message(client, mock, f"<@{BOT_ID}> config adapter support",
                                                 author_id=OWNER_ID))
        await client.handle_message(make_message(client, mock, f"<@{BOT_ID}> config server tools none",
                                                 author_id=OWNER_ID))
        await client.handle_message(make_message(client, mock, f"<@{BOT_ID}> question"))
        return mock

    mock = run(scenario, fake, store)
    texts = mock.final_texts()
    assert "Manage Server" in texts[0] and "set" in texts[1]
    assert store.get_settings(f"discord:{GUILD_ID}:{CHANNEL_ID}") == {"adapter": "support"}
    options = fake.calls[-1][1]
    assert options.adapter == "support" and options.tools == () and options.source == "discord"


def test_application_commands_registered_and_synced(store):
    async def scenario(client, mock):
        synced = [c for c in mock.calls if c.method == "PUT" and c.path.endswith("/commands")]
        return sorted(cmd["name"] for cmd in synced[0].json)

    names = run(scenario, ScriptedAssistant(store), store, sync_commands=True)
    assert names == ["ask", "search", "sentiment", "translate"]


def test_add_parser():
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["discord", "--channels", "c.toml", "--no-sync-commands"])
    assert args.func is run_discord and args.channels_config == "c.toml" and args.no_sync_commands
