"""The backend contract: one suite, run against every backend that can run here.

Backends (the ``subject`` fixture's params):
* ``transformers``: ``bot.engine.Engine`` on the tiny random Llama;
* ``llama.cpp``: ``LlamaCppEngine`` on the same tiny Llama written as a GGUF file in a fixture
  (``export_llama_gguf``), its adapters converted to GGUF LoRA;
* ``openai-llama.cpp-server``: ``OpenAIEngine`` against a real ``python -m llama_cpp.server`` on
  loopback serving that GGUF, one model alias per adapter;
* ``openai-parley``: ``OpenAIEngine`` against Parley's own API (the tiny Llama on transformers).

Every case runs on each. ``hold()`` stalls generation (local engines: the model lock; a server
process: SIGSTOP; Parley's API: its engine's model lock) so the cases about cancel, time caps and
queue limits do not depend on timing. The openai backend's error handling is tested against a
tiny fault server (500, 429, garbage, a stream that dies) at the end.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from bot.engine import BASE, GenerationParams
from bot.errors import BusyError, ModelLoadError, RequestError
from bot.events import Done, TextDelta, join_text
from tests.helpers import free_port, running_server

BACKENDS = ["transformers", "llama.cpp", "openai-llama.cpp-server", "openai-parley"]
GREEDY = GenerationParams(temperature=0, max_new_tokens=12)
LONG = GenerationParams(temperature=0, max_new_tokens=400)
PROMPT = "hello there"


def msgs(text):
    return [{"role": "user", "content": text}]


def needs_llama():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install builds it)")


# -- shared fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    from tests.unit.test_engine import make_adapter

    root = tmp_path_factory.mktemp("contract-adapters")
    return {"alpha": make_adapter(tiny_model_dir, root / "alpha", 1),
            "beta": make_adapter(tiny_model_dir, root / "beta", 2)}


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama as a float32 GGUF file, written with the gguf package."""
    from bot.backends.gguf_lora import export_llama_gguf

    return export_llama_gguf(tiny_model_dir, tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@dataclass
class Subject:
    name: str
    engine: Any
    hold: Callable[[], Any]
    break_mid_stream: Callable[[], Any]
    upstream: Any = None  # Parley's engine behind the API, for openai-parley
    extra: dict = field(default_factory=dict)


def _lock_hold(lock):
    @contextlib.contextmanager
    def hold():
        lock.acquire()
        try:
            yield
        finally:
            lock.release()
    return hold


class _FailingCalls:
    """Wraps a module; its ``name`` function raises (or returns ``bad``) on call number ``at``."""

    def __init__(self, real, name: str, at: int, bad: Any = None):
        self._real, self._name, self._at, self._bad, self.calls = real, name, at, bad, 0

    def __getattr__(self, attr):
        value = getattr(self._real, attr)
        if attr != self._name:
            return value

        def wrapped(*args, **kwargs):
            self.calls += 1
            if self.calls == self._at:
                if self._bad is None:
                    raise RuntimeError("injected failure")
                return self._bad
            return value(*args, **kwargs)
        return wrapped


def _transformers_subject(tiny_model_dir, tiny_adapters, home):
    from bot.engine import Engine
    from bot.models import load_model

    engine = Engine(load_model(str(tiny_model_dir), home, progress=False), max_batch_size=8, max_new_tokens_cap=480)
    for name, path in tiny_adapters.items():
        engine.load_adapter(name, str(path))

    @contextlib.contextmanager
    def break_mid_stream():
        real = engine._decode_step
        calls = []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected failure")
            return real(*args, **kwargs)
        engine._decode_step = failing
        try:
            yield
        finally:
            del engine._decode_step
    return Subject("transformers", engine, _lock_hold(engine._model_lock), break_mid_stream)


def _llamacpp_subject(tiny_gguf, hf_tokenizer, tiny_adapters, home):
    from bot.backends.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(tiny_gguf, hf_tokenizer, name="tiny", max_batch_size=8, max_new_tokens_cap=480,
                            n_threads=2, adapter_cache=home / "lora-cache", kv_type="f32")
    for name, path in tiny_adapters.items():
        engine.load_adapter(name, str(path))

    @contextlib.contextmanager
    def break_mid_stream():
        real = engine._lib
        engine._lib = _FailingCalls(real, "llama_decode", at=3, bad=-3)
        try:
            yield
        finally:
            engine._lib = real
    return Subject("llama.cpp", engine, _lock_hold(engine._model_lock), break_mid_stream)


class LlamaServer:
    """``python -m llama_cpp.server`` in a subprocess on loopback, one alias per model entry."""

    def __init__(self, models: list[dict], folder: Path):
        self.port = free_port()
        self.config = folder / "llama-server.json"
        # interrupt_requests=False: by default the server cuts a running reply short when another request
        # arrives (and ends it as if it were complete); Parley queues requests instead.
        self.config.write_text(json.dumps({"host": "127.0.0.1", "port": self.port, "interrupt_requests": False,
                                           "models": models}))
        self.log = folder / "llama-server.log"
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def start(self):
        import httpx

        self.proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--config_file", str(self.config)],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/models", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"llama_cpp.server did not start: {self.log.read_text()[-2000:]}")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)

    @contextlib.contextmanager
    def stopped(self):
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)


def _llama_server_subject(tiny_gguf, hf_tokenizer, tiny_adapters, home):
    from bot.backends.gguf_lora import convert_peft_lora
    from bot.backends.openai_remote import OpenAIEngine

    common = {"model": str(tiny_gguf), "n_ctx": 512, "n_threads": 2, "verbose": False}
    models = [{**common, "model_alias": "base"}]
    for name, path in tiny_adapters.items():
        models.append({**common, "model_alias": name, "lora_path": str(convert_peft_lora(path, tiny_gguf))})
    server = LlamaServer(models, home).start()
    engine = OpenAIEngine(server.url, model="base", tokenizer=hf_tokenizer, max_batch_size=8, max_new_tokens_cap=480,
                          context_window=512, backoff_s=0.05)

    @contextlib.contextmanager
    def break_mid_stream():
        """The real server process dies (SIGKILL) after the first chunk; it is started again after."""
        real = engine._emit
        fired = []

        def emit(request, *, final):
            out = real(request, final=final)
            if request.chunks >= 2 and not fired:
                fired.append(1)
                server.kill()
            return out
        engine._emit = emit
        try:
            yield
        finally:
            del engine._emit
            server.start()
    subject = Subject("openai-llama.cpp-server", engine, server.stopped, break_mid_stream)
    subject.extra["server"] = server
    return subject


def _parley_subject(tiny_model_dir, hf_tokenizer, tiny_adapters, home):
    from bot.api import create_app
    from bot.backends.openai_remote import OpenAIEngine
    from bot.config import Settings
    from bot.runtime import build_runtime

    runtime = build_runtime(Settings(home=home, model=str(tiny_model_dir), backend="transformers",
                                     adapters={k: str(v) for k, v in tiny_adapters.items()},
                                     max_new_tokens_cap=480, system_prompt="Be brief."),
                            progress=False, with_tools=False, auto_adapters=False)
    stack = contextlib.ExitStack()
    url = stack.enter_context(running_server(create_app(runtime, with_ui=False)))
    # Parley's /v1/models does not say its context window (vLLM's says max_model_len): give it.
    engine = OpenAIEngine(url + "/v1", tokenizer=hf_tokenizer, max_batch_size=8, max_new_tokens_cap=480,
                          context_window=512, backoff_s=0.05)
    upstream = runtime.engine

    @contextlib.contextmanager
    def break_mid_stream():
        real = upstream._decode_step
        calls = []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected failure")
            return real(*args, **kwargs)
        upstream._decode_step = failing
        try:
            yield
        finally:
            del upstream._decode_step
    subject = Subject("openai-parley", engine, _lock_hold(upstream._model_lock), break_mid_stream, upstream=upstream)
    subject.extra["stack"] = stack
    subject.extra["runtime"] = runtime
    return subject


@pytest.fixture(scope="module", params=BACKENDS)
def subject(request, tiny_model_dir, tiny_adapters, tmp_path_factory):
    home = tmp_path_factory.mktemp(f"contract-{request.param}")
    if request.param == "transformers":
        s = _transformers_subject(tiny_model_dir, tiny_adapters, home)
    elif request.param == "llama.cpp":
        needs_llama()
        s = _llamacpp_subject(request.getfixturevalue("tiny_gguf"), request.getfixturevalue("hf_tokenizer"),
                              tiny_adapters, home)
    elif request.param == "openai-llama.cpp-server":
        needs_llama()
        pytest.importorskip("sse_starlette", reason="llama_cpp.server needs the [server] extras")
        s = _llama_server_subject(request.getfixturevalue("tiny_gguf"), request.getfixturevalue("hf_tokenizer"),
                                  tiny_adapters, home)
    else:
        s = _parley_subject(tiny_model_dir, request.getfixturevalue("hf_tokenizer"), tiny_adapters, home)
    yield s
    s.engine.close()
    if "server" in s.extra:
        s.extra["server"].kill()
    if "stack" in s.extra:
        s.extra["stack"].close()
        s.extra["runtime"].engine.close()


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# -- the contract ------------------------------------------------------------------------------------
def test_stream_yields_deltas_then_one_done_with_usage(subject):
    events = list(subject.engine.stream(msgs(PROMPT), GREEDY))
    assert isinstance(events[-1], Done) and all(isinstance(e, TextDelta) for e in events[:-1])
    done = events[-1]
    assert done.finish_reason in ("stop", "length"), done
    assert done.usage.prompt_tokens > 0 and 1 <= done.usage.completion_tokens <= 12
    assert done.usage.time_to_first_token_s is not None and done.usage.time_to_first_token_s > 0
    assert done.usage.total_time_s >= done.usage.time_to_first_token_s
    health = subject.engine.health()
    assert health["ok"] and health["backend"] == subject.name.split("-")[0]
    assert {"queue_depth", "queue_size", "active_rows", "max_batch_size", "adapters", "errors",
            "last_error", "last_step_age_s", "worker_alive"} <= set(health)
    assert {"alpha", "beta"} <= set(subject.engine.adapters) and subject.engine.model_name


def test_greedy_is_deterministic_and_matches_the_non_streaming_call(subject):
    a = join_text(subject.engine.stream(msgs(PROMPT), GREEDY))[0]
    b, done = subject.engine.generate(msgs(PROMPT), GREEDY)
    assert a == b and done.finish_reason in ("stop", "length")


def test_cancel_stops_within_one_step(subject):
    engine = subject.engine
    cancel = threading.Event()
    stream = engine.stream(msgs(PROMPT), LONG, cancel=cancel)
    first = next(stream)
    assert isinstance(first, TextDelta), first
    with subject.hold():  # generation is stalled at a step boundary
        steps_at_cancel = engine.health()["steps"]
        cancel.set()
    done = [e for e in stream if isinstance(e, Done)][-1]
    assert done.finish_reason == "cancelled"
    # Only the step already under way when the flag was set may run.
    assert engine.health()["steps"] - steps_at_cancel <= 1
    assert done.usage.completion_tokens < LONG.max_new_tokens
    if subject.upstream is not None:  # Parley behind the API stops generating too (the stream was closed)
        wait_for(lambda: subject.upstream.health()["active_rows"] == 0, what="the upstream engine to stop")


def test_closing_the_stream_cancels(subject):
    stream = subject.engine.stream(msgs(PROMPT), LONG)
    next(stream)
    stream.close()
    wait_for(lambda: subject.engine.health()["active_rows"] == 0, what="the request to end")
    text, done = subject.engine.generate(msgs(PROMPT), GREEDY)  # still serving
    assert done.finish_reason in ("stop", "length")


def test_stop_strings_end_the_reply_before_them(subject):
    params = GenerationParams(temperature=0, max_new_tokens=24)
    # The tiny base model answers with newlines only; an adapter makes it say varied things.
    for adapter in ("alpha", "beta", BASE):
        text, _ = subject.engine.generate(msgs(PROMPT), params, adapter=adapter)
        # A short piece from the middle of the greedy reply, printable and not seen earlier in it.
        stop = next((text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].isprintable()
                     and "\ufffd" not in text[i:i + 2] and text.find(text[i:i + 2]) == i), None)
        if stop is not None:
            break
    else:
        pytest.skip(f"no greedy reply has a usable stop string (last: {text!r})")
    cut, done = subject.engine.generate(msgs(PROMPT), GenerationParams(temperature=0, max_new_tokens=24, stop=(stop,)),
                                        adapter=adapter)
    assert done.finish_reason == "stop"
    assert cut == text[:text.index(stop)] and stop not in cut


def test_max_new_tokens_and_the_server_cap(subject):
    _, done = subject.engine.generate(msgs(PROMPT), GenerationParams(temperature=0, max_new_tokens=3))
    assert done.usage.completion_tokens <= 3
    assert done.finish_reason == ("length" if done.usage.completion_tokens == 3 else "stop")
    assert subject.engine.clamp(GenerationParams(max_new_tokens=10**6)).max_new_tokens == 480


def test_time_cap_ends_the_reply_with_length(subject):
    engine = subject.engine
    engine.max_time_s, old = 0.3, engine.max_time_s
    try:
        with subject.hold():
            stream = engine.stream(msgs(PROMPT), LONG)
            time.sleep(0.5)
        text, done = join_text(stream)
    finally:
        engine.max_time_s = old
    assert done.finish_reason == "length"
    assert done.usage.completion_tokens < LONG.max_new_tokens
    assert done.usage.total_time_s >= 0.3


def test_adapters_change_the_reply_and_stay_apart_in_concurrent_requests(subject):
    engine = subject.engine
    singles = {a: engine.generate(msgs(PROMPT), GREEDY, adapter=a)[0] for a in (BASE, "alpha", "beta")}
    assert len(set(singles.values())) == 3, singles  # each adapter really changes the answer
    plan = [BASE, "alpha", "beta"] * 3
    results: list[Any] = [None] * len(plan)

    def run(i):
        results[i] = engine.generate(msgs(PROMPT), GREEDY, adapter=plan[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(plan))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [singles[a] for a in plan]


def test_unknown_adapter_and_oversized_prompt_fail_before_streaming(subject):
    from bot.errors import NotFoundError

    with pytest.raises(NotFoundError):
        subject.engine.stream(msgs(PROMPT), GREEDY, adapter="ghost")
    with pytest.raises(RequestError):  # longer than the whole context window, whatever the tokenizer
        subject.engine.stream(msgs(" ".join(f"w{i}" for i in range(subject.engine.context_window))),
                              GenerationParams(max_new_tokens=400))


def test_queue_full_is_refused_at_once(subject):
    engine = subject.engine
    saved = engine.max_batch_size, engine.queue_size
    engine.max_batch_size, engine.queue_size = 1, 1
    flags = [threading.Event(), threading.Event()]
    try:
        with subject.hold():
            running = engine.stream(msgs(PROMPT), LONG, cancel=flags[0])  # running (stalled)
            wait_for(lambda: engine.health()["queue_depth"] == 0, what="the first request to start")
            waiting = engine.stream(msgs(PROMPT), LONG, cancel=flags[1])  # waiting: the queue is now full
            started = time.perf_counter()
            with pytest.raises(BusyError):
                engine.stream(msgs(PROMPT), LONG)
            assert time.perf_counter() - started < 0.5  # refused at once, not after a wait
            for flag in flags:
                flag.set()
        assert [list(s)[-1].finish_reason for s in (running, waiting)] == ["cancelled", "cancelled"]
    finally:
        engine.max_batch_size, engine.queue_size = saved
    wait_for(lambda: engine.health()["active_rows"] == 0 and engine.health()["queue_depth"] == 0,
             what="the queue to drain")
    assert engine.generate(msgs(PROMPT), GREEDY)[1].finish_reason in ("stop", "length")


def test_a_failure_mid_stream_ends_that_reply_with_an_error_and_serving_goes_on(subject):
    with subject.break_mid_stream():
        events = list(subject.engine.stream(msgs(PROMPT), LONG))
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "error" and done.error, done
    assert done.status >= 500
    text, after = subject.engine.generate(msgs(PROMPT), GREEDY)
    assert after.finish_reason in ("stop", "length"), after


# -- the llama.cpp backend agrees with the reference ---------------------------------------------------
def test_llamacpp_greedy_equals_transformers_on_the_same_float32_weights(tiny_model_dir, tiny_gguf, hf_tokenizer,
                                                                        tiny_adapters, tmp_path):
    needs_llama()
    from bot.backends.llamacpp import LlamaCppEngine
    from bot.engine import Engine
    from bot.models import load_model

    reference = Engine(load_model(str(tiny_model_dir), tmp_path, progress=False))
    fast = LlamaCppEngine(tiny_gguf, hf_tokenizer, name="tiny", n_threads=2, kv_type="f32")
    try:
        for name, path in tiny_adapters.items():
            reference.load_adapter(name, str(path))
            fast.load_adapter(name, str(path))
        prompts = ["hello there", "what is two plus two", "x", "the quick brown fox jumps"]
        params = GenerationParams(temperature=0, max_new_tokens=16)
        for adapter in (BASE, "alpha", "beta"):
            for p in prompts:
                assert fast.generate(msgs(p), params, adapter=adapter)[0] == \
                    reference.generate(msgs(p), params, adapter=adapter)[0], (adapter, p)
    finally:
        reference.close()
        fast.close()


def test_llamacpp_seeded_sampling_is_reproducible_and_follows_the_seed(tiny_gguf, hf_tokenizer):
    needs_llama()
    from bot.backends.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(tiny_gguf, hf_tokenizer, name="tiny", n_threads=2)
    try:
        params = GenerationParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_new_tokens=10)
        a = engine.generate(msgs(PROMPT), params)[0]
        assert a == engine.generate(msgs(PROMPT), params)[0]
        others = {engine.generate(msgs(PROMPT), GenerationParams(temperature=1.0, seed=s, max_new_tokens=10))[0]
                  for s in range(4)}
        assert len(others) > 1
    finally:
        engine.close()


def test_llamacpp_long_prompts_are_fed_in_chunks_while_others_keep_streaming(tiny_gguf, hf_tokenizer):
    needs_llama()
    from bot.backends.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(tiny_gguf, hf_tokenizer, name="tiny", n_threads=2, n_batch=32)
    try:
        long_prompt = msgs("word " * 60)  # ~300 byte tokens: ten chunks of 32
        single = engine.generate(long_prompt, GREEDY)[0]
        results = {}
        threads = [threading.Thread(target=lambda: results.__setitem__("long", engine.generate(long_prompt, GREEDY)[0])),
                   threading.Thread(target=lambda: results.__setitem__("short", engine.generate(msgs(PROMPT), GREEDY)[0]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results["long"] == single
        assert results["short"] == engine.generate(msgs(PROMPT), GREEDY)[0]
    finally:
        engine.close()


def test_llamacpp_requests_wait_for_kv_cells_instead_of_failing(tiny_gguf, hf_tokenizer):
    needs_llama()
    from bot.backends.llamacpp import LlamaCppEngine

    # 512 cells: each request below reserves ~110 prompt + 200 reply cells, so one runs at a time.
    engine = LlamaCppEngine(tiny_gguf, hf_tokenizer, name="tiny", n_threads=2, kv_cells=512, max_batch_size=8)
    try:
        params = GenerationParams(temperature=0, max_new_tokens=200)
        single = engine.generate(msgs(PROMPT), params)[0]
        results: list[Any] = [None] * 5

        def run(i):
            results[i] = engine.generate(msgs(PROMPT), params)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r[0] for r in results] == [single] * 5
        wait_for(lambda: engine.health()["kv_reserved"] == 0, what="the cells to be given back")
    finally:
        engine.close()


def test_llamacpp_reloading_an_adapter_switches_new_requests_and_unload_removes_it(tiny_gguf, hf_tokenizer,
                                                                                  tiny_adapters, tmp_path):
    needs_llama()
    from bot.backends.llamacpp import LlamaCppEngine
    from bot.errors import NotFoundError

    engine = LlamaCppEngine(tiny_gguf, hf_tokenizer, name="tiny", n_threads=2)
    try:
        engine.load_adapter("x", str(tiny_adapters["alpha"]))
        alpha = engine.generate(msgs(PROMPT), GREEDY, adapter="x")[0]
        engine.load_adapter("x", str(tiny_adapters["beta"]))
        assert engine.generate(msgs(PROMPT), GREEDY, adapter="x")[0] != alpha
        engine.unload_adapter("x")
        with pytest.raises(NotFoundError):
            engine.generate(msgs(PROMPT), GREEDY, adapter="x")
        assert engine.health()["retiring_adapters"] == 0
        with pytest.raises(ModelLoadError, match="no adapter_config.json"):
            engine.load_adapter("y", str(tmp_path))  # not an adapter folder: the same error as Engine's
    finally:
        engine.close()


# -- choosing the backend ----------------------------------------------------------------------------
def test_backend_settings_are_validated_and_reach_the_flags(tmp_path):
    from bot.cli import build_parser, settings_from_args
    from bot.config import Settings
    from bot.errors import ConfigError

    with pytest.raises(ConfigError, match="backend='vllm'"):
        Settings(home=tmp_path, backend="vllm")
    with pytest.raises(ConfigError, match="needs base_url"):
        Settings(home=tmp_path, backend="openai")
    with pytest.raises(ConfigError, match="http:// or https://"):
        Settings(home=tmp_path, backend="openai", base_url="localhost:8000")
    args = build_parser().parse_args(["--home", str(tmp_path), "serve", "--backend", "openai", "--base-url",
                                      "http://127.0.0.1:9/v1", "--backend-api-key", "k"])
    args.home = tmp_path
    settings = settings_from_args(args)
    assert (settings.backend, settings.base_url, settings.backend_api_key) == ("openai", "http://127.0.0.1:9/v1", "k")


def test_auto_picks_llamacpp_for_gguf_on_a_cpu_and_transformers_otherwise(tiny_model_dir, tiny_gguf, tmp_path,
                                                                          monkeypatch):
    import bot.backends as backends
    from bot.config import Settings

    assert backends.resolve_backend(Settings(home=tmp_path, model=str(tiny_model_dir))) == "transformers"
    assert backends.resolve_backend(Settings(home=tmp_path, model=str(tiny_gguf), backend="transformers")) \
        == "transformers"
    monkeypatch.setattr(backends, "AUTO_PREFERS_LLAMACPP", True)
    expected = "llama.cpp" if backends.llamacpp.available() else "transformers"
    assert backends.resolve_backend(Settings(home=tmp_path, model=str(tiny_gguf), device="cpu")) == expected
    assert backends.resolve_backend(Settings(home=tmp_path, model=str(tiny_gguf), device="cuda")) == "transformers"


def test_build_runtime_serves_a_gguf_with_llamacpp(tiny_gguf, tiny_model_dir, tiny_adapters, tmp_path):
    needs_llama()
    import shutil

    from bot.config import Settings
    from bot.runtime import build_runtime

    # A GGUF file's tokenizer is built from the file itself; the tiny one is also saved beside it
    # here, under the name Parley caches it with, as a conversion would have left it.
    from bot.models import COMPLETE_MARKER, _slug

    cached = tmp_path / "models" / f"{_slug(tiny_gguf)}-tokenizer"
    shutil.copytree(tiny_model_dir, cached)
    (cached / COMPLETE_MARKER).write_text("{}")
    runtime = build_runtime(Settings(home=tmp_path, model=str(tiny_gguf), backend="llama.cpp",
                                     adapters={"alpha": str(tiny_adapters["alpha"])}),
                            progress=False, with_tools=False)
    try:
        assert runtime.engine.backend == "llama.cpp" and runtime.engine.adapters == {"alpha": str(tiny_adapters["alpha"])}
        text, done = runtime.engine.generate(msgs(PROMPT), GREEDY, adapter="alpha")
        assert done.finish_reason in ("stop", "length")
        from bot.assistant import TurnOptions

        events = list(runtime.assistant.respond(msgs(PROMPT), TurnOptions(params=GREEDY, adapter="alpha")))
        assert isinstance(events[-1], Done) and events[-1].finish_reason in ("stop", "length")
        with_system = [{"role": "system", "content": runtime.settings.system_prompt}, *msgs(PROMPT)]
        expected = runtime.engine.generate(with_system, GREEDY, adapter="alpha")[0]
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == expected
    finally:
        runtime.engine.close()


# -- the openai backend against a fault server ----------------------------------------------------------
class FaultServer:
    """A tiny OpenAI-shaped HTTP server whose chat answers follow a script, one entry per request:
    an int (that HTTP status with an OpenAI error body), "ok" (a good two-chunk stream), "garbage"
    (a chunk that is not JSON), "html" (a web page), "die" (two chunks, then the connection drops),
    "error-chunk" (an error object inside the stream), "slow" (headers, then nothing for 30 s)."""

    def __init__(self, *, runtime_lora: bool = False):
        self.script: list[Any] = []
        self.seen: list[dict] = []
        self.runtime_lora = runtime_lora  # answers vLLM's /v1/load_lora_adapter (else 404)
        self.loras: dict[str, str] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body, ctype="application/json", headers=None):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                cards = [{"id": "fake", "object": "model", "owned_by": "test"}]
                cards += [{"id": name, "object": "model", "parent": "fake"} for name in server.loras]
                self._send(200, {"object": "list", "data": cards})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path.endswith(("/load_lora_adapter", "/unload_lora_adapter")):
                    if not server.runtime_lora:
                        self._send(404, {"detail": "Not Found"})
                    elif self.path.endswith("/load_lora_adapter"):
                        server.loras[body["lora_name"]] = body["lora_path"]
                        self._send(200, b"Success", ctype="text/plain")
                    else:
                        server.loras.pop(body["lora_name"], None)
                        self._send(200, b"Success", ctype="text/plain")
                    return
                server.seen.append(body)
                step = server.script.pop(0) if server.script else "ok"
                if isinstance(step, int):
                    headers = {"Retry-After": "0"} if step in (429, 503) else None
                    self._send(step, {"error": {"message": f"scripted {step}", "type": "server_error"}}, headers=headers)
                    return
                if step == "html":
                    self._send(200, b"<html>hello</html>", ctype="text/html")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()

                def chunk(text):
                    payload = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                    self.wfile.flush()
                if step == "garbage":
                    self.wfile.write(b"data: {this is not json\n\n")
                elif step == "error-chunk":
                    chunk("Hel")
                    self.wfile.write(b'data: {"error": {"message": "out of memory"}}\n\n')
                elif step == "slow":
                    time.sleep(30)
                else:
                    chunk("Hel")
                    chunk("lo")
                    if step == "die":
                        self.wfile.flush()
                        self.connection.shutdown(2)
                        return
                    end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
                    self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
                self.wfile.flush()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fault(hf_tokenizer):
    from bot.backends.openai_remote import OpenAIEngine

    server = FaultServer()
    engine = OpenAIEngine(server.url, tokenizer=hf_tokenizer, backoff_s=0.01, retries=2, read_timeout_s=5)
    yield server, engine
    engine.close()
    server.close()


def test_openai_a_good_stream(fault):
    server, engine = fault
    text, done = engine.generate(msgs(PROMPT), GREEDY)
    assert text == "Hello" and done.finish_reason == "stop" and done.usage.completion_tokens == 2
    body = server.seen[-1]
    assert body["model"] == "fake" and body["stream"] is True and body["max_tokens"] == 12
    assert body["temperature"] == 0 and body["messages"][-1] == {"role": "user", "content": PROMPT}


def test_openai_server_error_500_becomes_a_clear_502(fault):
    server, engine = fault
    server.script = [500]
    text, done = engine.generate(msgs(PROMPT), GREEDY)
    assert done.finish_reason == "error" and done.status == 502
    assert "HTTP 500" in done.error and "scripted 500" in done.error and server.url in done.error
    assert engine.health()["errors"] == 1 and engine.health()["last_error"]["type"] == "UpstreamError"


def test_openai_429_is_retried_with_backoff(fault):
    server, engine = fault
    server.script = [429, 503]
    text, done = engine.generate(msgs(PROMPT), GREEDY)
    assert text == "Hello" and done.finish_reason == "stop"
    assert len(server.seen) == 3


def test_openai_429_that_persists_is_busy_503(fault):
    server, engine = fault
    server.script = [429, 429, 429]
    text, done = engine.generate(msgs(PROMPT), GREEDY)
    assert done.finish_reason == "error" and done.status == 503 and "busy" in done.error
    assert len(server.seen) == 3  # retries=2: three tries in all


def test_openai_client_errors_stay_4xx_and_auth_errors_say_what_to_fix(fault):
    server, engine = fault
    server.script = [400, 401]
    _, done = engine.generate(msgs(PROMPT), GREEDY)
    assert done.status == 400 and "refused the request" in done.error
    _, done = engine.generate(msgs(PROMPT), GREEDY)
    assert done.status == 502 and "--backend-api-key" in done.error


@pytest.mark.parametrize("step,words", [("garbage", "not JSON"), ("html", "did not stream"),
                                        ("error-chunk", "out of memory")])
def test_openai_garbage_is_a_clear_error(fault, step, words):
    server, engine = fault
    server.script = [step]
    _, done = engine.generate(msgs(PROMPT), GREEDY)
    assert done.finish_reason == "error" and done.status == 502 and words in done.error


def test_openai_a_stream_that_dies_mid_reply_keeps_the_text_and_ends_with_an_error(fault):
    server, engine = fault
    server.script = ["die"]
    events = list(engine.stream(msgs(PROMPT), GREEDY))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello"
    assert events[-1].finish_reason == "error" and "mid-reply" in events[-1].error
    assert engine.generate(msgs(PROMPT), GREEDY)[0] == "Hello"  # the next request is served


def test_openai_a_silent_server_is_cut_at_the_time_cap_and_cancel_is_prompt(fault):
    server, engine = fault
    engine.max_time_s = 0.5
    server.script = ["slow"]
    started = time.perf_counter()
    _, done = engine.generate(msgs(PROMPT), GREEDY)
    assert done.finish_reason == "length" and time.perf_counter() - started < 3
    engine.max_time_s = 60
    server.script = ["slow"]
    cancel = threading.Event()
    stream = engine.stream(msgs(PROMPT), GREEDY, cancel=cancel)
    threading.Timer(0.3, cancel.set).start()
    started = time.perf_counter()
    done = list(stream)[-1]
    assert done.finish_reason == "cancelled" and time.perf_counter() - started < 2


def test_openai_unreachable_server_fails_at_start_with_a_fix(hf_tokenizer):
    from bot.backends.openai_remote import OpenAIEngine

    with pytest.raises(ModelLoadError, match="could not reach the model server"):
        OpenAIEngine(f"http://127.0.0.1:{free_port()}/v1", tokenizer=hf_tokenizer, retries=1, backoff_s=0.01)


def test_openai_adapters_map_to_server_model_names(fault):
    server, engine = fault
    engine.load_adapter("support", "server:fake")
    assert engine.adapters == {"support": "server:fake"}
    engine.generate(msgs(PROMPT), GREEDY, adapter="support")
    assert server.seen[-1]["model"] == "fake"
    with pytest.raises(RequestError, match="does not serve 'nope'"):
        engine.load_adapter("other", "server:nope")


def test_openai_a_trained_adapter_is_loaded_into_a_server_that_allows_it(hf_tokenizer, tiny_adapters):
    """vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING: load_adapter (what a finished training job calls)
    hands the folder to /v1/load_lora_adapter and requests name it; a reload unloads first."""
    from bot.backends.openai_remote import OpenAIEngine

    server = FaultServer(runtime_lora=True)
    engine = OpenAIEngine(server.url, tokenizer=hf_tokenizer, backoff_s=0.01)
    try:
        engine.load_adapter("support", str(tiny_adapters["alpha"]))
        assert server.loras == {"support": str(tiny_adapters["alpha"])}
        engine.generate(msgs(PROMPT), GREEDY, adapter="support")
        assert server.seen[-1]["model"] == "support"
        engine.load_adapter("support", str(tiny_adapters["beta"]))  # re-trained: replaced at the server
        assert server.loras == {"support": str(tiny_adapters["beta"])}
        engine.unload_adapter("support")
        assert server.loras == {} and "support" not in engine.adapters
    finally:
        engine.close()
        server.close()
    server = FaultServer(runtime_lora=False)
    engine = OpenAIEngine(server.url, tokenizer=hf_tokenizer, backoff_s=0.01)
    try:
        with pytest.raises(RequestError, match="cannot load adapters at run time"):
            engine.load_adapter("support", str(tiny_adapters["alpha"]))
        assert "support" not in engine.adapters
    finally:
        engine.close()
        server.close()


def test_openai_errors_reach_api_clients_as_http_statuses(fault, tmp_path):
    """Parley's API over the openai backend: a busy upstream answers 503 with Retry-After."""
    import httpx

    from bot.api import create_app
    from bot.assistant import Assistant
    from bot.config import Settings
    from bot.jobs import TrainingJobs
    from bot.runtime import Runtime
    from bot.store import Store

    server, engine = fault
    settings = Settings(home=tmp_path)
    runtime = Runtime(settings=settings, engine=engine, store=Store(settings.db_path),
                      assistant=Assistant(engine, store=Store(settings.db_path)),
                      jobs=TrainingJobs(engine, tmp_path, "fake"), load_seconds=0.0)
    with running_server(create_app(runtime, with_ui=False)) as url:
        server.script = [429, 429, 429]
        r = httpx.post(url + "/v1/chat/completions", json={"messages": msgs(PROMPT), "max_tokens": 4}, timeout=30)
        assert r.status_code == 503 and r.headers.get("retry-after") and "busy" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", json={"messages": msgs(PROMPT), "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello"
