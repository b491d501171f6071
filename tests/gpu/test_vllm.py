"""vLLM behind Parley's openai backend, with two LoRA adapters (needs CUDA and vLLM; skipped otherwise).

vLLM serves the converted embedded model with ``--enable-lora --lora-modules alpha=... beta=...``;
Parley lists them as adapters (vLLM gives each LoRA model card its base as ``parent``), keeps them
apart in concurrent requests, loads a third adapter at run time through ``/v1/load_lora_adapter``,
and serves the API on top. A last case prints vLLM alone vs vLLM behind Parley at 64 concurrent chats.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time

import pytest

from bot.engine import BASE, GenerationParams
from tests.helpers import free_port

pytest.importorskip("vllm", reason="vLLM is not installed")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def lora(model_dir, out, seed):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def vllm_server(embedded_home, tmp_path_factory):
    import httpx

    from bot.models import resolve_model

    model_dir = resolve_model("smollm2-135m", embedded_home, progress=False)
    root = tmp_path_factory.mktemp("vllm")
    adapters = {name: lora(model_dir, root / name, seed) for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3))}
    port = free_port()
    log = open(root / "vllm.log", "wb")
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                             "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
                             "--enable-lora", "--max-lora-rank", "8", "--max-loras", "4", "--lora-modules",
                             f"alpha={adapters['alpha']}", f"beta={adapters['beta']}", "--gpu-memory-utilization",
                             "0.3"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((root / "vllm.log").read_text()[-3000:])
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError("vLLM did not start")
    yield url, adapters, model_dir
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def engine(vllm_server):
    from transformers import AutoTokenizer

    from bot.backends.openai_remote import OpenAIEngine

    url, _, model_dir = vllm_server
    eng = OpenAIEngine(url, tokenizer=AutoTokenizer.from_pretrained(model_dir), max_batch_size=64)
    yield eng
    eng.close()


def test_vllm_lora_modules_are_parley_adapters_kept_apart(engine):
    assert engine.server_model == "smollm2" and {"alpha", "beta"} <= set(engine.adapters)
    params = GenerationParams(temperature=0, max_new_tokens=16)
    singles = {a: engine.generate(QUESTION, params, adapter=a)[0] for a in (BASE, "alpha", "beta")}
    assert len(set(singles.values())) == 3 and "Paris" in singles[BASE]
    plan = [BASE, "alpha", "beta"] * 4
    results = [None] * len(plan)

    def run(i):
        results[i] = engine.generate(QUESTION, params, adapter=plan[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(plan))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for adapter, reply in zip(plan, results):
        assert reply not in [singles[a] for a in singles if a != adapter]
    assert sum(r == singles[a] for a, r in zip(plan, results)) >= len(plan) * 2 // 3


def test_an_adapter_is_loaded_into_the_running_server(engine, vllm_server):
    _, adapters, _ = vllm_server
    engine.load_adapter("gamma", str(adapters["gamma"]))
    text, done = engine.generate(QUESTION, GenerationParams(temperature=0, max_new_tokens=8), adapter="gamma")
    assert done.finish_reason in ("stop", "length") and text
    engine.unload_adapter("gamma")
    assert "gamma" not in engine.adapters


def test_cancel_and_caps_through_vllm(engine):
    cancel = threading.Event()
    stream = engine.stream(QUESTION, GenerationParams(temperature=1.0, max_new_tokens=2000, seed=1), cancel=cancel)
    next(stream)
    cancel.set()
    assert list(stream)[-1].finish_reason == "cancelled"
    _, done = engine.generate(QUESTION, GenerationParams(temperature=0, max_new_tokens=3))
    assert done.usage.completion_tokens <= 3


def test_sixty_four_chats_vllm_alone_vs_behind_parley(engine, vllm_server):
    """Reported: aggregate tokens/s and median time to first token at 64 concurrent chats."""
    import httpx

    url, _, _ = vllm_server
    params = GenerationParams(temperature=0, max_new_tokens=128)

    def through_parley(i, out):
        out[i] = engine.generate([{"role": "user", "content": f"Tell me fact number {i} about space."}], params)[1]

    def direct(i, out):
        body = {"model": "smollm2", "messages": [{"role": "user", "content": f"Tell me fact number {i} about space."}],
                "max_tokens": 128, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        begin, first, tokens = time.perf_counter(), None, 0
        with httpx.stream("POST", url + "/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if '"content"' in line and first is None:
                    first = time.perf_counter() - begin
                if '"completion_tokens"' in line:
                    import json

                    tokens = json.loads(line[5:])["usage"]["completion_tokens"]
        out[i] = (first, tokens)

    def wave(fn):
        out = [None] * 64
        threads = [threading.Thread(target=fn, args=(i, out)) for i in range(64)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out, time.perf_counter() - started

    d, d_s = wave(direct)
    p, p_s = wave(through_parley)
    d_tps = sum(t for _, t in d) / d_s
    p_tps = sum(x.usage.completion_tokens for x in p) / p_s
    print(f"\nvLLM alone: {d_tps:.0f} tok/s, median TTFT {statistics.median(f for f, _ in d):.3f} s; "
          f"behind Parley: {p_tps:.0f} tok/s, median TTFT {statistics.median(x.usage.time_to_first_token_s for x in p):.3f} s")
    assert p_tps > 0.8 * d_tps
