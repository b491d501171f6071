"""The API against bad input, cross-site requests and a full house (reliability cases 3, 7, 9, 16).

A real server on loopback over the tiny model. Every case here answered 500, stalled, or was
accepted from any web page before it was fixed.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from bot.api import create_app
from tests.helpers import build_test_runtime, running_server


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    runtime = build_test_runtime(tiny_model_dir, tmp_path_factory.mktemp("hard-home"), max_new_tokens_cap=16)
    with running_server(create_app(runtime)) as url:
        yield url, runtime
    runtime.engine.close()


def post(url, body, **kwargs):
    return httpx.post(url + "/v1/chat/completions", content=body if isinstance(body, (str, bytes)) else None,
                      json=None if isinstance(body, (str, bytes)) else body,
                      headers=kwargs.pop("headers", {"content-type": "application/json"}), timeout=60, **kwargs)


MSG = '"messages": [{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize("body, field", [
    ('{"model": "base"}', "messages"),
    ('{"messages": []}', "messages"),
    ('{%s, "top_k": NaN}' % MSG, "top_k"),
    ('{%s, "temperature": Infinity}' % MSG, "temperature"),
    ('{%s, "top_k": 1.5}' % MSG, "top_k"),
    ('{%s, "seed": "x"}' % MSG, "seed"),
    ('{%s, "seed": %d}' % (MSG, 2**70), "seed"),
    ('{%s, "seed": 1.5}' % MSG, "seed"),
    ('{%s, "stream_options": 5}' % MSG, "stream_options"),
    ('{%s, "stream": true, "stream_options": "yes"}' % MSG, "stream_options"),
    ('{%s, "adapter": []}' % MSG, "adapter"),
    ('{%s, "stop": [1, 2]}' % MSG, "stop"),
    ('{%s, "conversation_id": 7}' % MSG, "conversation_id"),
    ('{%s, "parley": {"collections": "a/../../b"}}' % MSG, None),
    ('{%s, "parley": {"collections": [1]}}' % MSG, "collections"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None)
def test_bad_fields_are_4xx_naming_the_field_and_store_nothing(server, body, field):
    url, runtime = server
    before = len(runtime.store.list_conversations(1000))
    r = post(url, body)
    if field is None:  # accepted as a (non-existent) collection name: searched safely, never a path
        assert r.status_code in (200, 400), r.text
    else:
        assert 400 <= r.status_code < 500, r.text
        assert field in r.json()["error"]["message"]
        assert len(runtime.store.list_conversations(1000)) == before  # no orphan conversation


def test_training_input_is_bounded(server):
    url, _ = server
    for body, word in [({"max_steps": 10**9}, "max_steps"), ({"name": 5}, "name"), ({"max_steps": True}, "max_steps")]:
        r = httpx.post(url + "/v1/train", json=body, timeout=30)
        assert r.status_code == 400 and word in r.json()["error"]["message"], r.text


def test_a_web_page_cannot_post_to_a_local_server(server):
    """No preflight is sent for text/plain or form bodies: such a POST from any page would run."""
    url, runtime = server
    before = len(runtime.store.list_conversations(1000))
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": kind} if kind else {}
        r = httpx.post(url + "/v1/chat/completions", content='{%s}' % MSG, headers=headers, timeout=30)
        assert r.status_code == 415, (kind, r.text)
        assert "application/json" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/train", content="{}", headers={"content-type": "text/plain"}, timeout=30)
    assert r.status_code == 415
    assert len(runtime.store.list_conversations(1000)) == before


def test_dns_rebinding_host_is_refused(server):
    url, _ = server
    r = httpx.get(url + "/v1/models", headers={"host": "evil.example:7860"}, timeout=30)
    assert r.status_code == 400 and "Host" in r.json()["error"]["message"]
    assert httpx.get(url + "/", headers={"host": "evil.example"}, timeout=30).status_code == 400
    assert httpx.get(url + "/v1/models", headers={"host": "localhost:1234"}, timeout=30).status_code == 200


def test_oversized_body_is_413(server):
    url, _ = server
    r = post(url, '{"messages": [{"role": "user", "content": "%s"}]}' % ("x" * 1_100_000))
    assert r.status_code == 413


def test_queue_full_answers_fast_while_every_slot_waits(tiny_model_dir, tmp_path):
    """With the batch full and 40 requests waiting, the next one gets 503 at once and /health
    answers: waiting requests must not hold the threads everything else needs."""
    runtime = build_test_runtime(tiny_model_dir, tmp_path, max_batch_size=1, queue_size=40, max_new_tokens_cap=400)
    runtime.engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.05))  # ~20 s a reply
    stop = threading.Event()

    def occupy():
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=120,
                              json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400,
                                    "stream": True, "temperature": 1.0}) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        return
        except httpx.HTTPError:
            pass

    with running_server(create_app(runtime)) as url:
        threads = [threading.Thread(target=occupy, daemon=True) for _ in range(41)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while runtime.engine.health()["queue_depth"] < 40 and time.time() < deadline:
            time.sleep(0.1)
        assert runtime.engine.health()["queue_depth"] >= 40
        started = time.perf_counter()
        r = post(url, {"messages": [{"role": "user", "content": "one more"}], "max_tokens": 4})
        refused_s = time.perf_counter() - started
        started = time.perf_counter()
        health = httpx.get(url + "/health", timeout=30)
        health_s = time.perf_counter() - started
        stop.set()
        runtime.engine.close()
    assert r.status_code == 503 and r.headers.get("retry-after")
    # The goal is well under 2 s; before the fix both waited for a generation to finish (~20 s).
    assert refused_s < 5 and health_s < 5, (refused_s, health_s)
    assert health.status_code == 200


def test_health_reports_the_engine_worker(tiny_model_dir, tmp_path):
    runtime = build_test_runtime(tiny_model_dir, tmp_path)
    with running_server(create_app(runtime)) as url:
        body = httpx.get(url + "/health", timeout=30).json()
        assert body["status"] == "ok" and body["engine"]["worker_alive"] is True
        runtime.engine.close()  # the worker stops: every request would fail, so /health must say so
        deadline = time.time() + 10
        while runtime.engine.health()["worker_alive"] and time.time() < deadline:
            time.sleep(0.1)
        r = httpx.get(url + "/health", timeout=30)
    assert r.status_code == 503 and r.json()["status"] == "unavailable"


def test_a_non_streaming_client_that_hangs_up_stops_its_generation(tiny_model_dir, tmp_path):
    runtime = build_test_runtime(tiny_model_dir, tmp_path, max_new_tokens_cap=400)
    runtime.engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.05))  # ~20 s a reply
    with running_server(create_app(runtime)) as url:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/chat/completions", timeout=2, json={
                "messages": [{"role": "user", "content": "a long one"}], "max_tokens": 400, "temperature": 1.0})
        deadline, turn = time.time() + 15, None
        while time.time() < deadline:
            turns = [t for c in runtime.store.list_conversations(10) for t in runtime.store.turns(c["id"])]
            if turns and turns[0].finish_reason != "running":
                turn = turns[0]
                break
            time.sleep(0.2)
        runtime.engine.close()
    assert turn is not None and turn.finish_reason == "cancelled"  # not run to 400 tokens for nobody
    assert turn.usage["completion_tokens"] < 200
