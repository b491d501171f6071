"""Slack adapter against a local mock Web API, with signed requests dispatched to the bolt App."""

from __future__ import annotations

import json
import time
from urllib.parse import urlencode

import pytest

pytest.importorskip("slack_bolt")

from slack_bolt import BoltRequest  # noqa: E402
from slack_sdk.signature import SignatureVerifier  # noqa: E402

from bot.errors import ConfigError  # noqa: E402
from bot.integrations import slack  # noqa: E402
from bot.integrations.common import open_fence, slack_escape  # noqa: E402
from bot.store import Store  # noqa: E402
from tests.unit.mock_slack_api import BOT_ID, BOT_USER_ID, TEAM_ID, MockSlackApi  # noqa: E402
from tests.unit.test_integrations_common import ScriptedAssistant  # noqa: E402

SECRET = "test-signing-secret"


@pytest.fixture
def api():
    server = MockSlackApi().start()
    yield server
    server.stop()


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "parley.db")


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir, tmp_path_factory):
    from bot.engine import Engine
    from bot.models import load_model

    engine = Engine(load_model(str(tiny_model_dir), tmp_path_factory.mktemp("home"), device="cpu"))
    yield engine
    engine.close()


def make_app(api, assistant, store, **kwargs):
    kwargs.setdefault("interval", 0.0)
    return slack.build_slack_app(assistant, store, client=slack.make_client("xoxb-test", base_url=api.url),
                                 signing_secret=SECRET, process_before_response=True, **kwargs)


def signed(body: str, *, timestamp: int | None = None, secret: str = SECRET, content_type="application/json",
           extra: dict | None = None) -> dict:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    sig = SignatureVerifier(secret).generate_signature(timestamp=ts, body=body)
    return {"content-type": [content_type], "x-slack-signature": [sig], "x-slack-request-timestamp": [ts],
            **{k: [v] for k, v in (extra or {}).items()}}


def event_body(event: dict, event_id: str = "Ev1") -> str:
    return json.dumps({"token": "legacy", "team_id": TEAM_ID, "api_app_id": "A1", "type": "event_callback",
                       "event_id": event_id, "event_time": int(time.time()), "event": event})


def mention(text="<@UBOT> hello", ts="100.000001", thread_ts=None, user="U1", channel="C1"):
    event = {"type": "app_mention", "user": user, "text": text, "ts": ts, "channel": channel,
             "event_ts": ts}
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def dispatch(app, body: str, **kwargs):
    return app.dispatch(BoltRequest(body=body, headers=signed(body, **kwargs)))


def final_texts(api) -> dict[str, str]:
    """ts -> the text each posted message ends with (its last update)."""
    out: dict[str, str] = {}
    for call in api.of("chat.postMessage"):
        if call.result.get("ok"):
            out[call.result["ts"]] = call.args["text"]
    for call in api.of("chat.update"):
        out[call.args["ts"]] = call.args["text"]
    return out


def test_mention_real_tiny_model_end_to_end(api, store, tiny_engine):
    from bot.assistant import Assistant

    from bot.engine import GenerationParams

    assistant = Assistant(tiny_engine, store=store)
    app = make_app(api, assistant, store, interval=0.2, params=GenerationParams(max_new_tokens=24))
    resp = dispatch(app, event_body(mention()))
    assert resp.status == 200
    posts = api.of("chat.postMessage")
    assert len(posts) >= 1 and posts[0].args["thread_ts"] == "100.000001"
    assert posts[0].args["unfurl_links"] is False
    conversation = store.list_conversations(source="slack")[0]
    assert conversation["external_key"] == f"slack:{TEAM_ID}:C1:100.000001"
    turn = store.turns(conversation["id"])[0]
    assert turn.messages == [{"role": "user", "content": "hello"}]
    assert turn.external_id == "slack:C1:1700000000.000001"
    final = "".join(final_texts(api).values())
    assert slack_escape(turn.reply.strip())[:200] in final or "(no answer)" in final


def test_reply_is_posted_then_updated_in_the_thread(api, store):
    fake = ScriptedAssistant(store, "one two three four five six seven", chunk=4, delay=0.02)
    app = make_app(api, fake, store, interval=0.05)
    dispatch(app, event_body(mention(ts="5.5", thread_ts="5.0")))
    assert len(api.of("chat.postMessage")) == 1
    assert api.of("chat.postMessage")[0].args["thread_ts"] == "5.0"
    updates = api.of("chat.update")
    assert updates and updates[-1].args["text"] == "one two three four five six seven"
    assert all(u.args["ts"] == "1700000000.000001" for u in updates)
    assert len(updates) < 9  # throttled: fewer edits than deltas


def test_bad_signature_and_stale_timestamp_are_401_over_http(api, store):
    from starlette.testclient import TestClient

    web = slack.slack_http_app(ScriptedAssistant(store), store, signing_secret=SECRET,
                               client=slack.make_client("xoxb-test", base_url=api.url))
    body = event_body(mention(text="<@UBOT> hi there"), "EvHttp")

    def post(raw: str, headers: dict):
        flat = {k: v[0] for k, v in headers.items()}
        return client.post("/slack/events", content=raw.encode(), headers=flat)

    with TestClient(web) as client:
        assert post(body.replace("hi there", "hi therE"), signed(body)).status_code == 401  # one byte changed
        assert post(body, signed(body, secret="wrong")).status_code == 401
        assert post(body, signed(body, timestamp=int(time.time()) - 301)).status_code == 401
        assert post(body, {"content-type": ["application/json"]}).status_code == 401
        reserialized = json.dumps(json.loads(body), indent=1)  # same JSON, other bytes
        assert post(reserialized, signed(body)).status_code == 401
        assert post(body, signed(body)).status_code == 200
        api.wait_for("chat.postMessage")
    assert len(api.of("chat.postMessage")) == 1


def test_same_event_twice_is_answered_once(api, store):
    fake = ScriptedAssistant(store, "only once")
    app = make_app(api, fake, store)
    body = event_body(mention(), "EvDup")
    assert dispatch(app, body).status == 200
    for retry in (1, 2, 3):
        resp = dispatch(app, body, extra={"x-slack-retry-num": str(retry), "x-slack-retry-reason": "http_timeout"})
        assert resp.status == 200
    # The DM copy of the same message (message.im) is not answered again either.
    dm = {"type": "message", "channel_type": "im", "user": "U1", "text": "hello", "ts": "100.000001",
          "channel": "C1"}
    dispatch(app, event_body(dm, "EvOther"))
    assert len(api.of("chat.postMessage")) == 1 and len(fake.calls) == 1


def test_dm_is_answered_in_a_thread(api, store):
    fake = ScriptedAssistant(store, "hi!")
    app = make_app(api, fake, store)
    dm = {"type": "message", "channel_type": "im", "user": "U1", "text": "hello", "ts": "7.1", "channel": "D1"}
    dispatch(app, event_body(dm, "EvDm"))
    assert api.of("chat.postMessage")[0].args == {**api.of("chat.postMessage")[0].args, "channel": "D1",
                                                  "thread_ts": "7.1"}


def test_self_and_bot_messages_are_ignored(api, store):
    fake = ScriptedAssistant(store)
    app = make_app(api, fake, store)
    own = {"type": "message", "channel_type": "im", "user": BOT_USER_ID, "bot_id": BOT_ID, "text": "x",
           "ts": "1.1", "channel": "D1"}
    other_bot = {"type": "message", "channel_type": "im", "user": "U9", "bot_id": "B9", "subtype": "bot_message",
                 "text": "<@UBOT> hi", "ts": "1.2", "channel": "D1"}
    edited = {"type": "message", "channel_type": "im", "subtype": "message_changed", "ts": "1.3", "channel": "D1"}
    for i, event in enumerate((own, other_bot, edited, mention(user=BOT_USER_ID, ts="1.4"))):
        assert dispatch(app, event_body(event, f"EvSelf{i}")).status == 200
    assert fake.calls == [] and api.of("chat.postMessage") == []


def test_mass_mentions_and_links_in_model_output_are_neutralized(api, store):
    fake = ScriptedAssistant(store, "Hey <!channel> <!here> <!everyone> <@U999> <!subteam^S1|@eng> "
                                    "<https://evil.example|click> @everyone")
    app = make_app(api, fake, store)
    dispatch(app, event_body(mention()))
    final = list(final_texts(api).values())[-1]
    for raw in ("<!channel>", "<!here>", "<!everyone>", "<@U999>", "<!subteam^", "<https://"):
        assert raw not in final
    assert "&lt;!channel&gt;" in final


def test_slash_command_is_acked_at_once_and_answered_after(api, store):
    fake = ScriptedAssistant(store, "Bonjour", delay=1.5)
    app = make_app(api, fake, store)
    form = urlencode({"token": "legacy", "team_id": TEAM_ID, "channel_id": "C1", "user_id": "U1",
                      "command": "/translate", "text": "hello to French", "trigger_id": "Tr1",
                      "response_url": api.url + "response", "api_app_id": "A1"})
    started = time.monotonic()
    resp = dispatch(app, form, content_type="application/x-www-form-urlencoded")
    assert resp.status == 200 and time.monotonic() - started < 1.0  # Slack's limit is 3 s
    assert api.of("chat.postMessage") == []
    api.wait_for("chat.postMessage", timeout=10)
    deadline = time.monotonic() + 10
    while not any("Bonjour" in t for t in final_texts(api).values()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.calls[0][0][-1]["content"] == "/translate hello to French"
    assert any("Bonjour" in t for t in final_texts(api).values())
    time.sleep(0.1)  # let the lazy listener store the turn before the fixtures close


def test_slash_command_falls_back_to_response_url_when_not_in_channel(api, store):
    fake = ScriptedAssistant(store, "answer")
    app = make_app(api, fake, store)
    api.fail_next("chat.postMessage", error="not_in_channel")
    form = urlencode({"team_id": TEAM_ID, "channel_id": "C2", "user_id": "U1", "command": "/ask",
                      "text": "question", "trigger_id": "Tr2", "response_url": api.url + "response"})
    dispatch(app, form, content_type="application/x-www-form-urlencoded")
    api.wait_for("response", timeout=10)
    assert "answer" in api.of("response")[-1].args["text"]


def test_rate_limited_post_is_retried_after_retry_after(api, store):
    fake = ScriptedAssistant(store, "patience")
    app = make_app(api, fake, store)
    api.fail_next("chat.postMessage", status=429, headers={"Retry-After": "1"})
    dispatch(app, event_body(mention()))
    posts = api.of("chat.postMessage")
    assert len(posts) == 2 and posts[1].at - posts[0].at >= 1.0
    assert list(final_texts(api).values())[-1] == "patience"


def test_ten_thousand_characters_split_into_valid_messages(api, store):
    text = ("Intro paragraph. " * 40 + "\n\n```python\n" + "\n".join(f"x_{i} = {i} * 2" for i in range(500))
            + "\n```\n\n" + "Closing words. " * 200)[:10_000]
    assert len(text) == 10_000
    fake = ScriptedAssistant(store, text, chunk=200)
    app = make_app(api, fake, store)
    dispatch(app, event_body(mention()))
    finals = list(final_texts(api).values())
    assert len(finals) >= 4
    assert all(len(t) <= slack.SLACK_LIMIT for t in finals)
    assert all(open_fence(t) is None for t in finals)
    assert all(t.startswith("```python") or t.startswith("Intro") or not t.startswith("x_") for t in finals)
    joined = "".join(finals)
    assert all(f"x_{i} = {i} * 2" in joined for i in range(0, 400, 37))
    assert all(c.args.get("thread_ts") == "100.000001" for c in api.of("chat.postMessage"))


def test_reaction_becomes_feedback_on_the_turn(api, store):
    fake = ScriptedAssistant(store, "rate me")
    app = make_app(api, fake, store)
    dispatch(app, event_body(mention()))
    reply_ts = "1700000000.000001"
    reaction = {"type": "reaction_added", "user": "U2", "reaction": "+1::skin-tone-2",
                "item": {"type": "message", "channel": "C1", "ts": reply_ts}, "event_ts": "9.9"}
    dispatch(app, event_body(reaction, "EvR1"))
    dispatch(app, event_body(reaction, "EvR1"))  # a retry of the same event
    dispatch(app, event_body({**reaction, "reaction": "thumbsdown"}, "EvR2"))
    turn = store.turn_by_external_id(f"slack:C1:{reply_ts}")
    assert [(f["rating"], f["source"], f["user"]) for f in store.feedback(turn.id)] == [(1, "slack", "U2"),
                                                                                        (-1, "slack", "U2")]


def test_thread_history_comes_from_the_store(api, store):
    fake = ScriptedAssistant(store, "first answer")
    app = make_app(api, fake, store)
    dispatch(app, event_body(mention(text="<@UBOT> first", ts="50.1"), "EvT1"))
    fake.text = "second answer"
    dispatch(app, event_body(mention(text="<@UBOT> and then?", ts="50.2", thread_ts="50.1"), "EvT2"))
    second = fake.calls[1][0]
    assert second == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "first answer"},
                      {"role": "user", "content": "and then?"}]
    assert not [c for c in api.calls if c.method.startswith("conversations.")]  # never re-fetched
    assert len(store.list_conversations(source="slack")) == 1


def test_admin_config_command_sets_channel_settings(api, store):
    fake = ScriptedAssistant(store, "ok")
    app = make_app(api, fake, store)
    dispatch(app, event_body(mention(text="<@UBOT> config adapter support", user="U1"), "EvC1"))
    assert "Only workspace admins" in api.of("chat.postMessage")[-1].args["text"]
    api.admins.add("U1")
    dispatch(app, event_body(mention(text="<@UBOT> config adapter support", ts="2.1"), "EvC2"))
    dispatch(app, event_body(mention(text="<@UBOT> config workspace tools search", ts="2.2"), "EvC3"))
    dispatch(app, event_body(mention(text="<@UBOT> config adapter nope", ts="2.3"), "EvC4"))
    assert api.of("chat.postMessage")[-1].args["text"].startswith("Not changed")
    assert store.get_settings(f"slack:{TEAM_ID}:C1") == {"adapter": "support"}
    dispatch(app, event_body(mention(text="<@UBOT> question", ts="2.4"), "EvC5"))
    options = fake.calls[-1][1]
    assert options.adapter == "support" and options.tools == ("search",) and options.source == "slack"


def test_errors_reach_the_user_as_one_short_line(api, store):
    class Broken(ScriptedAssistant):
        def _events(self, conversation, options):
            raise RuntimeError("secret xoxb-1-2-3 in a traceback")
            yield

    app = make_app(api, Broken(store), store)
    dispatch(app, event_body(mention()))
    text = api.of("chat.postMessage")[-1].args["text"]
    assert text.startswith("Sorry") and "xoxb" not in text and "\n" not in text


def test_missing_tokens_and_scopes_are_clear_errors(api, monkeypatch):
    import argparse

    for name in ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"):
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace(http=False, command=None, channels_config=None)
    with pytest.raises(ConfigError, match="SLACK_BOT_TOKEN is not set"):
        slack.run_slack(args)
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test")
    with pytest.raises(ConfigError, match="SLACK_APP_TOKEN is not set"):
        slack.run_slack(args)
    monkeypatch.setenv("SLACK_APP_TOKEN", "xoxb-wrong-kind")
    with pytest.raises(ConfigError, match="xapp-"):
        slack.run_slack(args)
    with pytest.raises(ConfigError, match="SLACK_SIGNING_SECRET"):
        slack.run_slack(argparse.Namespace(http=True, command=None, channels_config=None))
    narrow = MockSlackApi(scopes="chat:write").start()
    try:
        with pytest.raises(ConfigError, match="app_mentions:read"):
            slack.check_token(slack.make_client("xoxb-test", base_url=narrow.url))
    finally:
        narrow.stop()


def test_add_parser_and_mount(api, store):
    import argparse

    from fastapi import FastAPI
    from starlette.testclient import TestClient

    parser = argparse.ArgumentParser()
    slack.add_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["slack", "--http", "--port", "3100", "--command", "ask=/parley-ask"])
    assert args.func is slack.run_slack and args.http and args.port == 3100
    assert slack._command_map(args.command)["/parley-ask"] == "ask"
    web = FastAPI()
    slack.mount_slack(web, ScriptedAssistant(store), store, signing_secret=SECRET,
                      client=slack.make_client("xoxb-test", base_url=api.url))
    body = json.dumps({"type": "url_verification", "challenge": "abc", "token": "t"})
    with TestClient(web) as client:
        headers = {k: v[0] for k, v in signed(body).items()}
        resp = client.post("/slack/events", content=body.encode(), headers=headers)
        assert resp.status_code == 200 and resp.json()["challenge"] == "abc"
        assert client.post("/slack/events", content=b"x" * 1_000_001).status_code == 413
    # A chunked body declares no length: on a real server it is capped while read. The client
    # sends 2 MB of chunks and never ends the body; a server that buffers the whole body first
    # (request.body()) would wait for the end forever, this one answers 413 after ~1 MB.
    import socket
    from urllib.parse import urlparse

    from tests.helpers import running_server

    web.add_api_route("/health", lambda: {"ok": True})
    with running_server(web) as url:
        where = urlparse(url)
        with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
            sock.sendall(b"POST /slack/events HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: application/json\r\n\r\n")
            chunk = b"x" * 65536
            try:
                for _ in range(32):
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the server already answered and closed
                pass
            answer = sock.recv(200)
    assert answer.startswith(b"HTTP/1.1 413"), answer
