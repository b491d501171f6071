"""The intent router with the real MiniLM on the held-out part of the labelled routing set."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest

from bot.router import IntentRouter, default_examples, load_examples

DATA = Path(__file__).resolve().parents[1] / "data" / "routing.jsonl"


@pytest.fixture(scope="module")
def router():
    r = IntentRouter(default_examples())  # the train split only
    r.warm()
    return r


def test_held_out_accuracy_per_class(router):
    test = load_examples(DATA, "test")
    per = collections.defaultdict(lambda: [0, 0])
    misses = []
    for row in test:
        got = router.route(row["text"]).tool or "none"
        per[row["tool"]][0] += got == row["tool"]
        per[row["tool"]][1] += 1
        if got != row["tool"]:
            misses.append(f"{row['tool']}->{got}: {row['text']}")
    accuracy = sum(a for a, _ in per.values()) / len(test)
    # Measured 0.957 (search 1.00, translate 1.00, sentiment 0.95, none 0.90); the bar leaves room
    # for small numeric differences across CPUs, not for a broken router.
    assert accuracy >= 0.9, misses
    for tool, (correct, n) in per.items():
        assert correct / n >= 0.8, (tool, misses)


def test_routing_is_fast_enough_to_run_on_every_message(router):
    texts = [r["text"] for r in load_examples(DATA, "test")][:30]
    times = []
    for text in texts:
        started = time.perf_counter()
        router.route(text)
        times.append(time.perf_counter() - started)
    times.sort()
    # The target is < 20 ms on an idle CPU (see bench/tools.py); this shared test machine can be
    # several times slower, so the test only catches gross regressions (e.g. re-embedding examples).
    assert times[len(times) // 2] < 0.5
