"""Soak: 500 turns through a real `parley serve` across 20 conversations, with dropped streams.

After a warm-up, resident memory grows by less than 10%, and no threads or file descriptors leak
(reliability standing test). The server is a subprocess so /proc shows only its own resources.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import httpx

from tests.unit.test_kill9 import start


def resources(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return {"rss_kb": rss_kb, "threads": len(os.listdir(f"/proc/{pid}/task")),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def turn(url: str, i: int, conversations: list[str | None], lock: threading.Lock) -> None:
    slot = i % len(conversations)
    body = {"messages": [{"role": "user", "content": f"turn {i}: tell me something"}], "max_tokens": 6,
            "temperature": 1.0, "seed": i}
    with lock:
        if conversations[slot]:
            body["conversation_id"] = conversations[slot]
    if i % 7 == 3:  # a client that drops its stream after the first chunk
        body["stream"] = True
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for _line in r.iter_lines():
                break
        return
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    if conversations[slot] is None:
        listed = httpx.get(url + "/v1/conversations?limit=1", timeout=30).json()["data"]
        with lock:
            conversations[slot] = conversations[slot] or listed[0]["id"]


def run_turns(url: str, start_i: int, n: int, conversations, lock, workers: int = 4) -> None:
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(start_i + k, start_i + n, workers):
                turn(url, i, conversations, lock)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_500_turns_leak_nothing(tiny_model_dir, tmp_path):
    proc, url = start(tmp_path / "home", tiny_model_dir)
    conversations: list[str | None] = [None] * 20
    lock = threading.Lock()
    try:
        run_turns(url, 0, 100, conversations, lock)  # warm-up: caches, thread pools, allocator
        before = resources(proc.pid)
        run_turns(url, 100, 400, conversations, lock)
        after = resources(proc.pid)
        health = httpx.get(url + "/health", timeout=30).json()
    finally:
        proc.kill()
        proc.wait(10)
    print(f"soak: before {before}, after {after}")
    assert after["rss_kb"] < before["rss_kb"] * 1.10, (before, after)
    assert after["threads"] <= before["threads"] + 4, (before, after)
    assert after["fds"] <= before["fds"] + 8, (before, after)
    assert health["status"] == "ok" and health["engine"]["queue_depth"] == 0
