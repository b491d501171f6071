"""kill -9 of a real `parley serve` while it streams: nothing finished is lost (reliability case 14).

The store commits with synchronous=FULL, and a turn is stored in two steps (the message when it
arrives, the reply when it ends), so after a SIGKILL at any point every finished turn is there,
the turn that was generating keeps the person's message and is marked ``interrupted``, and the
database passes SQLite's integrity check and serves again.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from bot.store import Store
from tests.helpers import free_port


def start(home, model_dir):
    port = free_port()
    env = {**os.environ, "PARLEY_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve", "--model", str(model_dir), "--port", str(port),
                             "--max-new-tokens-cap", "400"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("parley serve exited at start")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("parley serve did not start")


@pytest.mark.parametrize("chunks_before_kill", [0, 3])
def test_kill9_while_streaming_loses_no_finished_turn(tiny_model_dir, tmp_path, chunks_before_kill):
    home = tmp_path / "home"
    proc, url = start(home, tiny_model_dir)
    finished = []
    try:
        for i in range(4):
            r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": f"message {i}"}], "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200
            finished.append(r.json()["parley"]["turn_id"])
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "the one in flight"}], "max_tokens": 400,
                "temperature": 1.0, "seed": 3, "stream": True}) as r:
            seen = 0
            for line in r.iter_lines():
                if '"content"' in line and '"role"' not in line:
                    seen += 1
                if seen >= chunks_before_kill and line.startswith("data:"):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()

    db = home / "parley.db"
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = Store(db)  # opening it marks turns left running by the dead process
    for turn_id in finished:
        turn = store.get_turn(turn_id)
        assert turn.finish_reason in ("stop", "length") and turn.messages[0]["content"].startswith("message ")
    in_flight = [t for c in store.list_conversations(50) for t in store.turns(c["id"])
                 if t.messages[0]["content"] == "the one in flight"]
    assert len(in_flight) == 1 and in_flight[0].finish_reason == "interrupted"

    proc, url = start(home, tiny_model_dir)  # and it serves again on the same home
    try:
        listed = httpx.get(url + "/v1/conversations", timeout=30).json()["data"]
        assert len(listed) == 5
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "after"}], "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200
    finally:
        proc.kill()
        proc.wait(10)
