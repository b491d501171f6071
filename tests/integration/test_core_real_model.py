"""The real embedded SmolLM2: the terminal chat, the API with the openai client, batching, adapters."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from bot.api import create_app
from tests.helpers import build_test_runtime, running_server

QUESTION = "What is the capital of France?"


def run_cli(home, *args, stdin=None):
    env = {**os.environ, "PARLEY_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=300)


def test_chat_message_answers_paris(embedded_home):
    result = run_cli(embedded_home, "chat", "--message", QUESTION, "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_reads_piped_stdin(embedded_home):
    result = run_cli(embedded_home, "chat", "--temperature", "0", "--max-new-tokens", "24", stdin=QUESTION)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_errors_exit_non_zero_with_a_fix(embedded_home, tmp_path):
    result = run_cli(embedded_home, "chat", "--message", "hi", "--model", str(tmp_path / "missing.gguf"))
    assert result.returncode == 2 and "error:" in result.stderr and "does not exist" in result.stderr
    result = run_cli(embedded_home, "chat", "--message", "hi", "--use-adapter", "ghost")
    assert result.returncode == 2 and "not loaded" in result.stderr


@pytest.fixture(scope="module")
def real_runtime(embedded_home, tmp_path_factory):
    from bot.models import resolve_model
    from tests.unit.test_engine import make_adapter

    model_dir = resolve_model("smollm2-135m", embedded_home, progress=False)
    adapters = tmp_path_factory.mktemp("real-adapters")
    # The transformers backend: the tests below check its bit-exact batching (a reply is the same
    # alone or in a batch, with adapters too). The llama.cpp backend, which `auto` picks for this
    # model, has its own (tests/integration/test_backends_embedded.py); the CLI tests above use it.
    runtime = build_test_runtime("smollm2-135m", embedded_home, backend="transformers", adapters={
        "alpha": str(make_adapter(model_dir, adapters / "alpha", 11)),
        "beta": str(make_adapter(model_dir, adapters / "beta", 12)),
    })
    yield runtime
    runtime.engine.close()


def test_openai_client_streams_from_the_real_model(real_runtime):
    from openai import OpenAI

    with running_server(create_app(real_runtime, with_ui=False)) as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        stream = client.chat.completions.create(model="base", messages=[{"role": "user", "content": QUESTION}],
                                                temperature=0, max_tokens=24, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in text


def test_eight_concurrent_greedy_requests_equal_the_single_answer(real_runtime):
    from bot.engine import GenerationParams

    engine = real_runtime.engine
    params = GenerationParams(temperature=0, max_new_tokens=24)
    messages = [{"role": "user", "content": QUESTION}]
    single = engine.generate(messages, params)[0]
    results = [None] * 8

    def run(i):
        results[i] = engine.generate(messages, params)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [single] * 8
    assert "Paris" in single


def test_different_adapters_in_concurrent_requests_stay_separate(real_runtime):
    from bot.engine import GenerationParams

    engine = real_runtime.engine
    params = GenerationParams(temperature=0, max_new_tokens=12)
    messages = [{"role": "user", "content": "Name a fruit."}]
    singles = {a: engine.generate(messages, params, adapter=a)[0] for a in ("base", "alpha", "beta")}
    assert len(set(singles.values())) == 3  # each adapter really changes the answer
    plan = ["base", "alpha", "beta"] * 3
    results = [None] * len(plan)

    def run(i):
        results[i] = engine.generate(messages, params, adapter=plan[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(plan))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [singles[a] for a in plan]
