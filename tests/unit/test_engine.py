"""The engine on a tiny random Llama: streaming, batching equality, adapters, cancel, caps."""

from __future__ import annotations

import os
import pickle
import threading
import time

import pytest
import torch

from bot.engine import Engine, GenerationParams
from bot.errors import ModelLoadError, NotFoundError, RequestError
from bot.events import Done, TextDelta, join_text
from bot.models import load_model

GREEDY = GenerationParams(temperature=0, max_new_tokens=12)
PROMPTS = ["hello there", "what is two plus two", "tell me a story about a cat", "x",
           "the quick brown fox jumps", "a b c d e f g", "zzz", "why is the sky blue?"]


def make_adapter(model_dir, out_dir, seed):
    """A LoRA adapter with random, non-zero weights (so it visibly changes outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules="all-linear",
                                                 init_lora_weights=False))
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    eng = Engine(load_model(str(tiny_model_dir), home, progress=False), max_batch_size=8, max_new_tokens_cap=64)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def adapter_engine(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    eng = Engine(load_model(str(tiny_model_dir), root, progress=False), max_batch_size=8)
    eng.load_adapter("alpha", str(make_adapter(tiny_model_dir, root / "alpha", 1)))
    eng.load_adapter("beta", str(make_adapter(tiny_model_dir, root / "beta", 2)))
    yield eng
    eng.close()


def msgs(text):
    return [{"role": "user", "content": text}]


def test_stream_yields_deltas_then_one_done_with_usage(engine):
    events = list(engine.stream(msgs("hi"), GREEDY))
    assert isinstance(events[-1], Done) and all(isinstance(e, TextDelta) for e in events[:-1])
    done = events[-1]
    assert done.finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens >= 1
    assert done.usage.time_to_first_token_s is not None


def test_max_new_tokens_gives_length(engine):
    text, done = engine.generate(msgs("hi"), GenerationParams(temperature=0, max_new_tokens=3))
    # The tiny random model rarely emits its end token within 3 steps; when it does, 'stop' is right.
    assert done.usage.completion_tokens <= 3
    assert done.finish_reason == ("length" if done.usage.completion_tokens == 3 else "stop")


def test_server_side_cap_clamps_max_new_tokens(engine):
    assert engine.clamp(GenerationParams(max_new_tokens=10**6)).max_new_tokens == 64


def test_concurrent_greedy_equals_single(engine):
    singles = [engine.generate(msgs(p), GREEDY)[0] for p in PROMPTS]
    results = [None] * len(PROMPTS)

    def run(i):
        results[i] = engine.generate(msgs(PROMPTS[i]), GREEDY)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == singles


def test_seeded_sampling_is_reproducible(engine):
    params = GenerationParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_new_tokens=10)
    assert engine.generate(msgs("hi"), params)[0] == engine.generate(msgs("hi"), params)[0]


def test_cancel_stops_within_a_step(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir), tmp_path, progress=False)
    forward_passes = []

    def slow_and_count(module, args):
        time.sleep(0.05)  # 50 ms per step, so the test sees each step
        forward_passes.append(time.perf_counter())

    loaded.model.register_forward_pre_hook(slow_and_count)
    eng = Engine(loaded)
    try:
        cancel = threading.Event()
        stream = eng.stream(msgs("go"), GenerationParams(temperature=1.0, max_new_tokens=64, seed=1), cancel=cancel)
        next(stream)
        time.sleep(0.12)
        cancel.set()
        passes_at_cancel = len(forward_passes)
        done = list(stream)[-1]
        assert done.finish_reason == "cancelled"
        # Only the step already in flight when the flag was set may run.
        assert len(forward_passes) - passes_at_cancel <= 1
        assert done.usage.completion_tokens < 64
    finally:
        eng.close()


def test_closing_the_stream_cancels_generation(engine):
    stream = engine.stream(msgs("go"), GenerationParams(temperature=1.0, max_new_tokens=64, seed=2))
    next(stream)
    stream.close()  # what a dropped HTTP connection does
    # The engine is free again and serves the next request normally.
    assert engine.generate(msgs("hi"), GREEDY)[1].finish_reason in ("stop", "length")


def test_generation_time_cap_ends_with_length(tiny_model_dir, tmp_path):
    eng = Engine(load_model(str(tiny_model_dir), tmp_path, progress=False), max_time_s=0.0001)
    try:
        _, done = eng.generate(msgs("hi"), GenerationParams(temperature=1.0, max_new_tokens=60, seed=3))
        assert done.finish_reason == "length"
    finally:
        eng.close()


def test_stop_string_never_leaks(engine):
    text, _ = engine.generate(msgs("hi"), GenerationParams(temperature=1.0, seed=5, max_new_tokens=40))
    if len(text) < 4:
        pytest.skip("the tiny model stopped too early to pick a stop string")
    stop = text[2:4]
    cut, done = engine.generate(msgs("hi"), GenerationParams(temperature=1.0, seed=5, max_new_tokens=40, stop=(stop,)))
    assert stop not in cut and text.startswith(cut) and done.finish_reason == "stop"


def test_bad_params_and_unknown_adapter_are_clear_errors(engine):
    with pytest.raises(RequestError, match="temperature"):
        GenerationParams(temperature=-1)
    with pytest.raises(NotFoundError, match="not loaded"):
        engine.stream(msgs("hi"), GREEDY, adapter="ghost")


def test_adapters_change_output_and_never_bleed_in_a_batch(adapter_engine):
    eng = adapter_engine
    plan = [(p, a) for p in PROMPTS[:4] for a in ("base", "alpha", "beta")]
    singles = {(p, a): eng.generate(msgs(p), GREEDY, adapter=a)[0] for p, a in plan}
    assert singles[(PROMPTS[0], "alpha")] != singles[(PROMPTS[0], "base")] or \
        singles[(PROMPTS[0], "beta")] != singles[(PROMPTS[0], "base")]
    results = {}

    def run(key):
        results[key] = eng.generate(msgs(key[0]), GREEDY, adapter=key[1])[0]

    threads = [threading.Thread(target=run, args=(key,)) for key in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == singles


def test_pickled_adapter_is_refused_and_never_unpickled(tiny_model_dir, tmp_path, engine):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = make_adapter(tiny_model_dir, tmp_path / "evil", 3)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelLoadError, match="pickle"):
        engine.load_adapter("evil", str(folder))
    assert not marker.exists()
    assert "evil" not in engine.adapters


def test_missing_model_error_says_what_was_tried(tmp_path):
    with pytest.raises(ModelLoadError, match="tried"):
        load_model("no-such-model", tmp_path, progress=False)
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path), tmp_path, progress=False)


def test_greedy_output_matches_transformers_generate(engine):
    """Same tokens as plain generate(), and incremental detokenization loses no byte."""
    tok = engine.tokenizer
    for prompt in PROMPTS[:4]:
        messages = msgs(prompt)
        text, done = engine.generate(messages, GenerationParams(temperature=0, max_new_tokens=20))
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        with torch.inference_mode():
            out = engine.model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=0)
        expected = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text == expected


def test_a_crash_inside_generation_fails_that_turn_only(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir), tmp_path, progress=False)
    calls = {"n": 0}

    def explode_on_third_pass(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated out of memory")

    handle = loaded.model.register_forward_pre_hook(explode_on_third_pass)
    eng = Engine(loaded)
    try:
        text, done = eng.generate(msgs("hi"), GenerationParams(temperature=1.0, seed=1, max_new_tokens=20))
        assert done.finish_reason == "error" and "RuntimeError" in done.error
        assert "simulated" not in done.error  # details go to the log, not to the user
        handle.remove()
        _, ok = eng.generate(msgs("hi"), GREEDY)  # the worker survived and serves the next turn
        assert ok.finish_reason in ("stop", "length")
    finally:
        eng.close()
