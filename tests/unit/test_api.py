"""The HTTP API and the Gradio chat on a real loopback server over the tiny model."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from bot.api import create_app
from tests.helpers import build_test_runtime, running_server


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("api-home")
    runtime = build_test_runtime(tiny_model_dir, home, api_key="sekret", max_request_bytes=20_000,
                                 max_new_tokens_cap=32)
    with running_server(create_app(runtime)) as url:
        yield url, runtime
    runtime.engine.close()


AUTH = {"Authorization": "Bearer sekret"}


def chat(url, body, **kw):
    return httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60, **kw)


def test_health_and_models(server):
    url, runtime = server
    assert httpx.get(url + "/health").json()["status"] == "ok"
    models = httpx.get(url + "/v1/models", headers=AUTH).json()
    assert models["data"][0]["id"] == runtime.engine.model_name


def test_api_key_is_required(server):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_non_streaming_completion_is_stored_and_rateable(server):
    url, runtime = server
    r = chat(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] <= 6
    turn_id = body["parley"]["turn_id"]
    turn = runtime.store.get_turn(turn_id)
    assert turn.reply == body["choices"][0]["message"]["content"]
    fb = httpx.post(url + "/v1/feedback", json={"turn_id": turn_id, "rating": 1}, headers=AUTH)
    assert fb.status_code == 200
    assert runtime.store.feedback(turn_id)[0]["rating"] == 1


def test_streaming_reads_with_the_openai_client(server):
    from openai import OpenAI

    url, _ = server
    client = OpenAI(base_url=url + "/v1", api_key="sekret")
    stream = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens >= 1
    plain = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=6, temperature=0)
    assert plain.choices[0].message.content == text


def test_sse_wire_format_ends_with_done(server):
    url, _ = server
    with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["choices"][0]["delta"]["role"] == "assistant"


@pytest.mark.parametrize("body, status, needle", [
    ({"messages": []}, 400, "empty"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "empty user message"),
    ({"messages": "hi"}, 400, "list"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "ghost-adapter"}, 404, "not loaded"),
    ({"messages": [{"role": "user", "content": "hi"}], "bogus": 1}, 400, "unknown field"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n must be 1"),
    ({"messages": [{"role": "user", "content": "z" * 600}], "max_tokens": 8}, 400, "context window"),
])
def test_bad_requests_get_clear_4xx_and_the_server_stays_up(server, body, status, needle):
    url, _ = server
    r = chat(url, body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert chat(url, {"messages": [{"role": "user", "content": "ok"}], "max_tokens": 2}).status_code == 200


def test_invalid_json_and_oversized_bodies(server):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    big = json.dumps({"messages": [{"role": "user", "content": "a" * 50_000}]})
    r = httpx.post(url + "/v1/chat/completions", content=big, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413


def test_max_tokens_is_clamped_server_side(server):
    url, _ = server
    r = chat(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6, "temperature": 1, "seed": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 32


def test_dropped_stream_cancels_generation(server):
    url, runtime = server
    before = {c["id"] for c in runtime.store.list_conversations(500, source="api")}
    with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"messages": [{"role": "user", "content": "go on"}], "max_tokens": 32,
                            "temperature": 1.0, "seed": 4, "stream": True}) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"role"' not in line:
                break  # the client goes away after the first text
    deadline = time.time() + 20
    turn = None
    while time.time() < deadline:
        new = [c for c in runtime.store.list_conversations(500, source="api") if c["id"] not in before]
        turns = runtime.store.turns(new[0]["id"]) if new else []
        if turns and turns[0].finish_reason != "running":  # stored at once, finished when generation stops
            turn = turns[0]
            break
        time.sleep(0.1)
    assert turn is not None, "the cancelled turn was not stored"
    assert turn.finish_reason == "cancelled"


def test_gradio_chat_through_gradio_client(server):
    from gradio_client import Client

    url, runtime = server
    # The API key covers the browser app too: its owner logs in with the key (one key guards every route).
    with pytest.raises(Exception, match="credentials"):
        Client(url + "/", verbose=False)
    client = Client(url + "/", verbose=False, auth=("admin", "sekret"))
    reply, conversation_id = client.predict("hello", None, 0.0, 8, "base", api_name="/chat")
    assert runtime.store.get_conversation(conversation_id)["owner"] == "user:admin"
    turns = runtime.store.turns(conversation_id)
    assert len(turns) == 1 and turns[0].reply == reply
    # Streaming: a submitted job yields growing partial replies.
    job = client.submit("hello again", conversation_id, 0.0, 8, "base", api_name="/chat")
    outputs = job.result(), job.outputs()
    assert outputs[0][1] == conversation_id and len(runtime.store.turns(conversation_id)) == 2
    # Cancel: a long job cancelled early leaves a stored, cancelled (or short) turn and no hung worker.
    job = client.submit("tell me more", conversation_id, 1.0, 32, "base", api_name="/chat")
    time.sleep(0.05)
    job.cancel()
    reply, _ = client.predict("still there?", conversation_id, 0.0, 4, "base", api_name="/chat")
    assert isinstance(reply, str)


def test_concurrent_api_requests_are_served_together(server):
    url, _ = server
    results = []

    def one():
        results.append(chat(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                                  "temperature": 0}).json()["choices"][0]["message"]["content"])

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and len(set(results)) == 1
