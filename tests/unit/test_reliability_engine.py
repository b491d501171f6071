"""Engine reliability: worker failures fail only their rows, adapters change safely under running
streams, abandoned requests free their queue slots at once, and health() tells the truth."""

from __future__ import annotations

import gc
import shutil
import sys
import threading
import time

import pytest
import torch

import bot.engine
from bot.engine import Engine, GenerationParams
from bot.errors import BusyError, GenerationError, NotFoundError, RequestError
from bot.events import Done, TextDelta
from bot.models import load_model

GREEDY = GenerationParams(temperature=0, max_new_tokens=24)
LONG = GenerationParams(temperature=0, max_new_tokens=400)
OOM = getattr(torch, "OutOfMemoryError", RuntimeError)


def msgs(text):
    return [{"role": "user", "content": text}]


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
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability-adapters")
    alpha = make_adapter(tiny_model_dir, root / "alpha", 1)
    beta = make_adapter(tiny_model_dir, root / "beta", 2)
    broken = root / "broken"  # valid files, one tensor of the wrong shape: fails half way through loading
    shutil.copytree(alpha, broken)
    from safetensors.torch import load_file, save_file

    weights = load_file(broken / "adapter_model.safetensors")
    first = sorted(weights)[0]
    weights[first] = torch.zeros(7, 7)
    save_file(weights, broken / "adapter_model.safetensors")
    return {"alpha": str(alpha), "beta": str(beta), "broken": str(broken)}


def slow_engine(tiny_model_dir, tmp_path, delay=0.02, **kwargs):
    """An engine whose forward passes take ``delay`` seconds, so streams overlap for sure."""
    loaded = load_model(str(tiny_model_dir), tmp_path, progress=False)
    loaded.model.register_forward_pre_hook(lambda module, args: time.sleep(delay))
    return Engine(loaded, **kwargs)


class Stream:
    """Reads one engine stream in a thread; records text, the Done event and when text started."""

    def __init__(self, events):
        self.events = events
        self.text = ""
        self.done: Done | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for event in self.events:
            if isinstance(event, TextDelta):
                self.text += event.text
                self.started.set()
            elif isinstance(event, Done):
                self.done = event
        self.started.set()

    def result(self, timeout=60):
        self.thread.join(timeout)
        assert self.done is not None, "the stream never ended"
        return self.text, self.done


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def ok(done):
    return done.finish_reason in ("stop", "length") and done.error is None


# -- 2. a failure outside the forward pass fails only its rows; the worker keeps serving -------------
def fail_once(monkeypatch, name, when=lambda *a, **k: True, exc=None):
    """Make bot.engine.<name> raise once (when ``when(args)`` holds), then behave normally."""
    real = getattr(bot.engine, name)
    state = {"fired": 0}

    def wrapper(*args, **kwargs):
        if not state["fired"] and when(*args, **kwargs):
            state["fired"] += 1
            raise exc or OOM("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(bot.engine, name, wrapper)
    return state


def test_merge_failure_fails_only_the_new_row(tiny_model_dir, tmp_path, monkeypatch):
    eng = slow_engine(tiny_model_dir, tmp_path)
    try:
        alone = eng.generate(msgs("keep going"), GenerationParams(temperature=0, max_new_tokens=60))[0]
        # Growing a running batch by a row fails (cache is not None: there is a batch to grow).
        state = fail_once(monkeypatch, "_merge", when=lambda cache, *a: cache is not None)
        running = Stream(eng.stream(msgs("keep going"), GenerationParams(temperature=0, max_new_tokens=60)))
        running.started.wait(10)
        text, victim = Stream(eng.stream(msgs("hi"), GREEDY)).result()
        assert state["fired"] == 1
        assert victim.finish_reason == "error" and "OutOfMemoryError" in victim.error
        assert "simulated" not in victim.error and victim.status == 500
        text, done = running.result()
        assert ok(done) and text == alone  # the running row never noticed
        later = eng.generate(msgs("and now?"), GREEDY)[1]
        assert ok(later)
        health = eng.health()
        assert health["ok"] and health["worker_alive"] and health["errors"] == 1
        assert health["last_error"]["where"] == "merge" and health["last_error"]["type"] == OOM.__name__
    finally:
        eng.close()


def test_select_failure_fails_the_batch_and_the_worker_keeps_serving(tiny_model_dir, tmp_path, monkeypatch):
    eng = slow_engine(tiny_model_dir, tmp_path)
    try:
        state = fail_once(monkeypatch, "_select")
        a = Stream(eng.stream(msgs("one"), GenerationParams(temperature=0, max_new_tokens=80)))
        a.started.wait(10)
        # A short request joins; when it ends, the batch shrinks through _select, which fails.
        short = Stream(eng.stream(msgs("two"), GenerationParams(temperature=0, max_new_tokens=2)))
        short.result()
        _, done_a = a.result()
        assert state["fired"] == 1 and done_a.finish_reason == "error"
        for _ in range(3):
            assert ok(eng.generate(msgs("still there?"), GREEDY)[1])
        assert eng.health()["ok"] and eng.health()["last_error"]["where"] == "select"
    finally:
        eng.close()


def test_mask_extension_failure_fails_the_batch_and_the_worker_keeps_serving(tiny_model_dir, tmp_path, monkeypatch):
    """The torch.cat that grows the attention mask after a step (bot/engine.py's own call only)."""
    eng = slow_engine(tiny_model_dir, tmp_path, delay=0.005)
    real_cat = torch.cat
    fired = []

    def cat(tensors, *args, **kwargs):
        dim = kwargs.get("dim", args[0] if args else 0)
        caller = sys._getframe(1).f_code.co_filename
        if not fired and caller == bot.engine.__file__ and dim == 1 and tensors[0].dtype == torch.long \
                and tensors[-1].shape[-1] == 1:
            fired.append(caller)
            raise OOM("CUDA out of memory (simulated)")
        return real_cat(tensors, *args, **kwargs)

    try:
        monkeypatch.setattr(torch, "cat", cat)
        _, first = eng.generate(msgs("hello"), GenerationParams(temperature=0, max_new_tokens=30))
        assert fired and first.finish_reason == "error"
        monkeypatch.setattr(torch, "cat", real_cat)
        assert ok(eng.generate(msgs("hello"), GREEDY)[1])
        assert eng.health()["ok"] and eng.health()["errors"] == 1
    finally:
        monkeypatch.setattr(torch, "cat", real_cat)
        eng.close()


def test_health_reports_a_dead_worker(tiny_model_dir, tmp_path, monkeypatch):
    eng = Engine(load_model(str(tiny_model_dir), tmp_path, progress=False))
    try:
        health = eng.health()
        assert set(health) >= {"ok", "worker_alive", "closed", "queue_depth", "queue_size", "active_rows",
                               "max_batch_size", "adapters", "errors", "last_error", "last_step_age_s"}
        assert health["ok"] and health["queue_depth"] == 0 and health["active_rows"] == 0
        assert health["last_error"] is None and health["last_step_age_s"] < 5
        monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's death is expected

        def die(*args):
            raise SystemExit  # not an Exception: nothing should catch it, the thread really ends

        monkeypatch.setattr(eng, "_step", die)
        wait_for(lambda: not eng._worker.is_alive(), what="the worker to stop")
        health = eng.health()
        assert not health["ok"] and not health["worker_alive"]
        with pytest.raises(GenerationError, match="stopped"):
            eng.stream(msgs("hi"), GREEDY)
    finally:
        eng.close()
    assert eng.health()["closed"] and not eng.health()["ok"]


# -- 4. unloading and reloading adapters under running streams --------------------------------------
@pytest.fixture
def adapter_engine(tiny_model_dir, tmp_path, adapter_dirs):
    eng = slow_engine(tiny_model_dir, tmp_path, delay=0.01, max_batch_size=8)
    eng.load_adapter("alpha", adapter_dirs["alpha"])
    yield eng
    eng.close()


PARAMS = GenerationParams(temperature=0, max_new_tokens=40)


def leftover_versions(eng):
    config = getattr(eng.model, "peft_config", {})
    return len(config)


def test_unload_while_a_row_uses_it_lets_that_row_finish(adapter_engine):
    eng = adapter_engine
    alpha_alone = eng.generate(msgs("story"), PARAMS, adapter="alpha")[0]
    base_alone = eng.generate(msgs("story"), PARAMS)[0]
    assert alpha_alone != base_alone
    with_alpha = Stream(eng.stream(msgs("story"), PARAMS, adapter="alpha"))
    with_base = Stream(eng.stream(msgs("story"), PARAMS))
    with_alpha.started.wait(10)
    with_base.started.wait(10)
    eng.unload_adapter("alpha")
    assert "alpha" not in eng.adapters
    with pytest.raises(NotFoundError):
        eng.stream(msgs("story"), PARAMS, adapter="alpha")
    text_a, done_a = with_alpha.result()
    text_b, done_b = with_base.result()
    assert ok(done_a) and ok(done_b)
    assert text_a == alpha_alone and text_b == base_alone
    assert "alpha" not in eng.health()["adapters"]
    wait_for(lambda: leftover_versions(eng) == 0 and eng.health()["retiring_adapters"] == 0,
             what="the unloaded adapter's weights to be freed")
    assert eng.generate(msgs("story"), PARAMS)[0] == base_alone


def test_reload_while_a_row_uses_it_switches_new_requests_only(adapter_engine, adapter_dirs):
    eng = adapter_engine
    old_alpha = eng.generate(msgs("story"), PARAMS, adapter="alpha")[0]
    base_alone = eng.generate(msgs("story"), PARAMS)[0]
    running = Stream(eng.stream(msgs("story"), PARAMS, adapter="alpha"))
    with_base = Stream(eng.stream(msgs("story"), PARAMS))
    running.started.wait(10)
    eng.load_adapter("alpha", adapter_dirs["beta"])  # the same name, new weights
    assert eng.adapters["alpha"] == adapter_dirs["beta"]
    new_alpha = Stream(eng.stream(msgs("story"), PARAMS, adapter="alpha"))
    text, done = running.result()
    assert ok(done) and text == old_alpha  # finished on the weights it started with
    assert with_base.result()[0] == base_alone
    new_text, new_done = new_alpha.result()
    eng.load_adapter("beta", adapter_dirs["beta"])
    assert ok(new_done) and new_text == eng.generate(msgs("story"), PARAMS, adapter="beta")[0] != old_alpha
    wait_for(lambda: leftover_versions(eng) == 2, what="the old alpha weights to be freed")


def test_failed_reload_keeps_the_old_adapter_loaded_and_listed(adapter_engine, adapter_dirs):
    eng = adapter_engine
    before = eng.generate(msgs("story"), PARAMS, adapter="alpha")[0]
    versions = leftover_versions(eng)
    running = Stream(eng.stream(msgs("story"), PARAMS, adapter="alpha"))
    with_base = Stream(eng.stream(msgs("story"), PARAMS))
    running.started.wait(10)
    with pytest.raises(RequestError, match="could not load adapter 'alpha'"):
        eng.load_adapter("alpha", adapter_dirs["broken"])
    assert eng.adapters["alpha"] == adapter_dirs["alpha"]
    assert ok(running.result()[1]) and running.text == before
    assert ok(with_base.result()[1])
    assert eng.generate(msgs("story"), PARAMS, adapter="alpha")[0] == before
    assert leftover_versions(eng) == versions  # nothing half-loaded stays behind


def test_failed_first_load_leaves_the_base_model_untouched(tiny_model_dir, tmp_path, adapter_dirs):
    eng = Engine(load_model(str(tiny_model_dir), tmp_path, progress=False))
    try:
        base = eng.generate(msgs("story"), PARAMS)[0]
        with pytest.raises(RequestError):
            eng.load_adapter("alpha", adapter_dirs["broken"])
        assert eng.adapters == {} and eng.generate(msgs("story"), PARAMS)[0] == base
        eng.load_adapter("alpha", adapter_dirs["alpha"])
        assert eng.generate(msgs("story"), PARAMS, adapter="alpha")[0] != base
        assert eng.generate(msgs("story"), PARAMS)[0] == base
    finally:
        eng.close()


# -- 5. abandoned requests leave the queue at once; admission never waits ---------------------------
def test_cancelled_and_dropped_requests_free_their_queue_slots_at_once(tiny_model_dir, tmp_path):
    eng = slow_engine(tiny_model_dir, tmp_path, delay=0.03, max_batch_size=1, queue_size=2)
    try:
        running_cancel = threading.Event()
        running = Stream(eng.stream(msgs("long"), LONG, cancel=running_cancel))
        running.started.wait(10)
        cancel_b = threading.Event()
        waiting_b = Stream(eng.stream(msgs("b"), GREEDY, cancel=cancel_b))  # read by a client...
        dropped_c = eng.stream(msgs("c"), GREEDY)                              # ...and one never read
        started = time.perf_counter()
        with pytest.raises(BusyError):
            eng.stream(msgs("d"), GREEDY)
        assert time.perf_counter() - started < 0.5  # refused at once, not after a wait
        # Client b goes away (a dropped connection sets its flag); c's generator is dropped.
        cancel_b.set()
        del dropped_c
        gc.collect()
        # b hears at once that it was cancelled, while the long request still holds the batch.
        waiting_b.thread.join(2.0)
        assert waiting_b.done is not None and waiting_b.done.finish_reason == "cancelled"
        assert running.done is None
        d = Stream(eng.stream(msgs("d"), GREEDY))  # both slots are free again
        e = Stream(eng.stream(msgs("e"), GREEDY))
        assert running.done is None and eng.health()["queue_depth"] == 2
        running_cancel.set()
        assert running.result()[1].finish_reason == "cancelled"
        assert ok(d.result()[1]) and ok(e.result()[1])
        assert eng.health()["queue_depth"] == 0
    finally:
        eng.close()


def test_admission_never_waits_for_a_forward_pass_or_an_adapter_load(tiny_model_dir, tmp_path, adapter_dirs,
                                                                     monkeypatch):
    loaded = load_model(str(tiny_model_dir), tmp_path, progress=False)
    slow = threading.Event()
    loaded.model.register_forward_pre_hook(lambda module, args: time.sleep(1.0) if slow.is_set() else None)
    eng = Engine(loaded, max_batch_size=1, queue_size=1)
    try:
        slow.set()  # every forward pass now holds the model lock for a second
        first = Stream(eng.stream(msgs("a"), GenerationParams(temperature=0, max_new_tokens=3)))
        time.sleep(0.2)
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            try:
                queued = eng.stream(msgs("b"), GREEDY)
            except BusyError:
                pass
            timings.append(time.perf_counter() - started)
        assert max(timings) < 0.5, timings
        # The same while an adapter load holds the model lock.
        real_install = Engine._install

        def slow_install(self, internal, folder):
            time.sleep(1.0)
            return real_install(self, internal, folder)

        monkeypatch.setattr(Engine, "_install", slow_install)
        loader = threading.Thread(target=eng.load_adapter, args=("alpha", adapter_dirs["alpha"]))
        loader.start()
        time.sleep(0.2)
        started = time.perf_counter()
        with pytest.raises(BusyError):
            eng.stream(msgs("c"), GREEDY)
        assert time.perf_counter() - started < 0.5
        slow.clear()
        loader.join(30)
        first.result()
        assert ok(Stream(queued).result()[1])
    finally:
        slow.clear()
        eng.close()
