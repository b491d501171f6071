"""The llama.cpp backend: a GGUF file served through llama-cpp-python's C API, batched.

Same contract as the transformers ``Engine`` (it shares ``BatchEngine``: queue, cancel, caps,
stop strings, detokenization, adapter versions, health); only the worker differs.

How concurrency works, as ``llama-server`` does it: one llama.cpp context with a unified KV cache
holds every running chat as its own sequence id (one per row, ``n_seq_max = max_batch_size``).
Each worker step builds one ``llama_batch`` with the next token of every decoding row plus a chunk
of the prompt of rows still prefilling (at most ``n_batch`` tokens in all), runs ``llama_decode``
once, and samples each row from its own logits. A new chat joins between steps; a long prompt is
fed in chunks, so running chats keep streaming while it is read. A finished row's cells are freed
with ``llama_memory_seq_rm``. A request is admitted when its prompt plus ``max_new_tokens`` fit
the cells not yet promised to running rows, so a decode never runs out of cache part way.

Adapters: llama.cpp applies LoRA adapters to a whole context, not per sequence, so rows are grouped
by adapter and each group gets its own ``llama_decode`` per step (the KV cache is shared; a row
always decodes with the adapter its cache was built with). Switching the context's adapter costs a
scheduler re-reservation (several ms here), so each step starts with the adapter already set. A
PEFT folder is converted once to a GGUF LoRA file (``bot.backends.gguf_lora``), cached beside the
adapter.

Determinism: a reply does not depend on what else runs only up to float rounding. llama.cpp picks
matmul kernels by shape (batch size, cells in the cache), and on a quantized model every layer
rounds its activations to 8 bits, so a last-bit difference can become a different token at a
near-tie. Measured on the embedded SmolLM2: identical prompts decoded 8 at a time equal the lone
reply; replies with random LoRA adapters under concurrency equal the lone reply in about 2 of 3
cases (see tests/integration/test_backends_embedded.py). The transformers backend is bit-exact.
On float32 weights with ``kv_type="f32"`` (the tests' tiny model) replies are exact here too.

Prompts are rendered and tokenized by the Hugging Face tokenizer of the same model (built from the
GGUF's own vocabulary and chat template, cached under PARLEY_HOME/models), so the prompt ids, the
chat template, tool support detection and detokenization are exactly those of the transformers
backend. Sampling (greedy, temperature, top-k, top-p, repetition penalty, seeds) is done here in
numpy with the transformers backend's rules.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from bot.engine import BatchEngine, _Request
from bot.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_KV_CELLS = 16384
"""KV cells (tokens of cache) shared by all running chats when not given: for SmolLM2-135M,
16384 cells of f16 keys and values take 377 MB. A single chat may still use the whole context
window; the cells are what running chats may hold together."""


_KV_TYPES = {"f16": 1, "f32": 0}  # ggml_type of the KV cache: f16 (llama.cpp's default) or exact f32


def available() -> bool:
    """True when llama-cpp-python imports (it is compiled at install time; see the README)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # an ImportError, or a broken build whose shared library does not load
        return False
    return True


def cpu_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _import_llama():
    try:
        import llama_cpp
    except Exception as exc:
        raise ModelLoadError(f"the llama.cpp backend needs llama-cpp-python, which did not import ({exc}): "
                             f"run `make install` (it compiles llama-cpp-python==0.3.36, about 6-10 minutes "
                             f"on 2 cores) or pick --backend transformers") from None
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        # llama.cpp logs every load detail to stderr; send it to Python logging instead (errors
        # as errors, the rest at debug level). The callback must outlive every llama.cpp call.
        @llama_cpp.llama_log_callback
        def forward(level: int, text: bytes, user_data) -> None:
            message = text.decode("utf-8", "replace").rstrip()
            if message:
                # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continuation
                _llama_log.log({4: logging.ERROR, 3: logging.INFO}.get(level, logging.DEBUG), "%s", message)

        _LOG_CALLBACK = forward
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    return llama_cpp


_LOG_CALLBACK = None
_llama_log = logging.getLogger("llama.cpp")


class LlamaCppEngine(BatchEngine):
    """A GGUF model behind the batching scheduler, decoded by llama.cpp."""

    backend = "llama.cpp"

    def __init__(self, gguf_path: str | Path, tokenizer, *, name: str | None = None, max_batch_size: int = 16,
                 max_new_tokens_cap: int = 2048, max_time_s: float = 120.0, context_window: int = 0,
                 queue_size: int = 64, n_threads: int | None = None, kv_cells: int | None = None,
                 n_batch: int = 512, adapter_cache: str | Path | None = None, kv_type: str = "f16"):
        lib = self._lib = _import_llama()
        self.gguf_path = Path(gguf_path)
        if not self.gguf_path.is_file():
            raise ModelLoadError(f"GGUF file {self.gguf_path} does not exist: check the --model path")
        self.adapter_cache = Path(adapter_cache) if adapter_cache else None
        self.n_threads = n_threads or cpu_threads()
        self.n_batch = n_batch
        self._current_adapter: str | None = None  # the adapter version the context has set now
        self._base_info = None  # read from the GGUF header when the first adapter is converted
        self._handles: dict[str, Any] = {}  # internal adapter version -> llama_adapter_lora pointer
        self._ctx = self._model = self._batch = None
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        model = lib.llama_model_load_from_file(str(self.gguf_path).encode(), mparams)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load {self.gguf_path}: is it a complete GGUF model file?")
        self._model = model
        self._vocab = lib.llama_model_get_vocab(model)
        self.n_vocab = lib.llama_vocab_n_tokens(self._vocab)
        self.tokenizer = tokenizer
        try:
            self._check_tokenizer(tokenizer)
        except ModelLoadError:
            lib.llama_model_free(model)
            self._model = None
            raise
        n_train = int(lib.llama_model_n_ctx_train(model)) or 2048
        window = min(context_window, n_train) if context_window else n_train
        n_seq = max(1, min(max_batch_size, 256))  # llama.cpp's LLAMA_MAX_SEQ
        cells = kv_cells or max(window, min(window * n_seq, DEFAULT_KV_CELLS))
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = max(cells, window)
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        cparams.kv_unified = True  # chats share the cells; each holds only what it uses
        if kv_type not in _KV_TYPES:
            raise ModelLoadError(f"kv_type={kv_type!r}: use one of {', '.join(_KV_TYPES)}")
        cparams.type_k = cparams.type_v = _KV_TYPES[kv_type]
        if kv_type == "f32":  # exact attention (flash attention works in f16): tests compare logits
            cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.no_perf = True
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            lib.llama_model_free(model)
            self._model = None
            raise ModelLoadError(f"llama.cpp could not create a context for {self.gguf_path} with {cells} KV "
                                 f"cells: lower --max-batch-size or --context-window")
        self._ctx = ctx
        self._mem = lib.llama_get_memory(ctx)
        self.kv_cells = int(lib.llama_n_ctx(ctx))
        self._batch = lib.llama_batch_init(n_batch, 0, 1)
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(n_batch,))
        self._positions = np.ctypeslib.as_array(self._batch.pos, shape=(n_batch,))
        self._n_seq_ids = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n_batch,))
        self._wants_logits = np.ctypeslib.as_array(self._batch.logits, shape=(n_batch,))
        self._n_seq_ids[:] = 1
        self._free_slots = list(range(n_seq - 1, -1, -1))
        self._kv_reserved = 0
        self._no_adapters = (lib.llama_adapter_lora_p_ctypes * 1)()
        self._rng = np.random.default_rng()
        super().__init__(tokenizer, name=name or self.gguf_path.name, context_window=window,
                         max_batch_size=n_seq, max_new_tokens_cap=max_new_tokens_cap, max_time_s=max_time_s,
                         queue_size=queue_size)
        # Stop the worker and free the context before the interpreter tears threads down: a worker
        # killed inside llama_decode at exit aborts the process ("terminate called ...").
        atexit.register(_close_at_exit, weakref.ref(self))

    def _check_tokenizer(self, tokenizer) -> None:
        """The Hugging Face tokenizer must speak the GGUF's vocabulary (the same ids)."""
        size = len(tokenizer)
        eos = tokenizer.eos_token_id
        if size > self.n_vocab or eos is None or not 0 <= eos < self.n_vocab:
            raise ModelLoadError(f"the tokenizer ({size} tokens, end token {eos}) does not match {self.gguf_path} "
                                 f"({self.n_vocab} tokens): give the tokenizer of the same model")

    # -- public API additions --------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        out = super().health()
        out.update({"kv_cells": self.kv_cells, "kv_reserved": self._kv_reserved, "n_threads": self.n_threads})
        return out

    def close(self) -> None:
        if self._model is None:
            return
        super().close()
        with self._model_lock:
            lib = self._lib
            for internal in list(self._handles):
                self._discard(internal)
            if self._batch is not None:
                lib.llama_batch_free(self._batch)
                self._batch = None
            if self._ctx is not None:
                lib.llama_free(self._ctx)
                self._ctx = None
            if self._model is not None:
                lib.llama_model_free(self._model)
                self._model = None

    # -- adapters ----------------------------------------------------------------------------------
    def _prepare_adapter(self, name: str, folder) -> str:
        from bot.backends.gguf_lora import convert_peft_lora, read_base_info

        if self._base_info is None:
            self._base_info = read_base_info(self.gguf_path)
        return str(convert_peft_lora(folder, self.gguf_path, cache_dir=self.adapter_cache, info=self._base_info))

    def _install(self, internal: str, weights: str) -> None:
        handle = self._lib.llama_adapter_lora_init(self._model, str(weights).encode())
        if not handle:
            raise ModelLoadError(f"llama.cpp refused the LoRA file {weights} (its shapes or architecture do not "
                                 f"match {self.gguf_path.name}; the log above says which)")
        self._handles[internal] = handle
        self._installed.add(internal)

    def _discard(self, internal: str) -> None:
        self._installed.discard(internal)
        handle = self._handles.pop(internal, None)
        if handle is None:
            return
        try:
            # The context may still point at it from the last step: detach before freeing.
            if self._ctx is not None:
                self._lib.llama_set_adapters_lora(self._ctx, self._no_adapters, 0, None)
                self._current_adapter = None
            self._lib.llama_adapter_lora_free(handle)
        except Exception:
            log.exception("could not free adapter version %s", internal)

    # -- worker side -----------------------------------------------------------------------------
    def _new_rng(self, seed: int):
        return np.random.default_rng(seed)

    def _eos_ids(self) -> set[int]:
        ids = {int(self.tokenizer.eos_token_id)}
        for token in (self._lib.llama_vocab_eos(self._vocab), self._lib.llama_vocab_eot(self._vocab)):
            if 0 <= token < self.n_vocab:
                ids.add(int(token))
        return ids

    def _run(self) -> None:
        active: list[_Request] = []
        while not self._closed.is_set():
            try:
                active = self._step(active)
            except Exception as exc:  # a bug outside the guarded parts: fail the batch, keep serving
                self._failed("worker", exc, active)
                for request in active:
                    self._drop(request)
                active = []
            self._active_rows = len(active)
            self._heartbeat = time.monotonic()
        for request in active:
            self._finish(request, "cancelled", error="the engine was shut down")
            self._drop(request)

    def _need(self, request: _Request) -> int:
        return len(request.prompt_ids) + request.params.max_new_tokens

    def _reserve(self, request: _Request) -> bool:
        """Promise a request its cells when they are free (``_take`` asks, under the queue lock)."""
        if self._kv_reserved + self._need(request) > self.kv_cells:
            return False
        self._kv_reserved += self._need(request)
        return True

    def _step(self, active: list[_Request]) -> list[_Request]:
        """One round: admit what fits, drop stopped rows, one decode per adapter group."""
        self._free_retired()
        room = min(len(self._free_slots), self.max_batch_size - len(active))
        for request in self._take(room, wait=not active, admit=self._reserve):
            if request.cancel.is_set():
                self._kv_reserved -= self._need(request)
                self._finish(request, "cancelled")
                continue
            if request.prompt_ids and not (0 <= min(request.prompt_ids) and max(request.prompt_ids) < self.n_vocab):
                self._kv_reserved -= self._need(request)
                self._finish(request, "error", error=f"the prompt has token ids outside the model's "
                                                     f"{self.n_vocab}-token vocabulary")
                continue
            request.slot = self._free_slots.pop()
            request.fed = request.position = 0
            active.append(request)
        for request in active:
            if not request.finished:
                self._should_stop(request)
        active = self._sweep(active)
        for internal, rows in self._groups(active):
            try:
                self._decode_group(internal, rows)
            except Exception as exc:  # this group's rows only; their cache cells are freed below
                self._failed("decode", exc, rows)
        return self._sweep(active)

    def _groups(self, active: list[_Request]) -> list[tuple[str | None, list[_Request]]]:
        """Rows that share a llama_decode this step (one group per adapter), starting with the
        adapter the context already has set: switching costs a scheduler re-reservation."""
        by_adapter: dict[str | None, list[_Request]] = {}
        for request in active:
            by_adapter.setdefault(request.peft_name, []).append(request)
        order = sorted(by_adapter, key=lambda name: (name != self._current_adapter, name or ""))
        return [(name, by_adapter[name]) for name in order]

    def _sweep(self, active: list[_Request]) -> list[_Request]:
        still = []
        for request in active:
            if request.finished:
                self._drop(request)
            else:
                still.append(request)
        return still

    def _drop(self, request: _Request) -> None:
        """Free a row's sequence id, its cache cells and its reservation (worker thread)."""
        if request.slot < 0:
            return
        with self._model_lock:
            if self._mem is not None and self._ctx is not None:
                self._lib.llama_memory_seq_rm(self._mem, request.slot, -1, -1)
        self._free_slots.append(request.slot)
        self._kv_reserved -= self._need(request)
        request.slot = -1

    def _decode_group(self, internal: str | None, rows: list[_Request]) -> None:
        """One llama_decode for rows that share an adapter; sample and stream what it yields."""
        lib, b = self._lib, self._batch
        n = 0
        outputs: list[tuple[_Request, int]] = []  # (row, its index in the batch's logits)
        for r in rows:  # decoding rows first: one token each, never starved by long prompts
            if r.fed == len(r.prompt_ids) and r.generated:
                self._put(n, r.generated[-1], r.position, r.slot, True)
                outputs.append((r, n))
                r.position += 1
                n += 1
        for r in rows:
            if r.fed < len(r.prompt_ids) and n < self.n_batch:
                take = min(len(r.prompt_ids) - r.fed, self.n_batch - n)
                chunk = r.prompt_ids[r.fed:r.fed + take]
                self._tokens[n:n + take] = chunk
                self._positions[n:n + take] = np.arange(r.fed, r.fed + take)
                self._wants_logits[n:n + take] = 0
                for k in range(n, n + take):
                    b.seq_id[k][0] = r.slot
                r.fed += take
                r.position = r.fed
                n += take
                if r.fed == len(r.prompt_ids):
                    self._wants_logits[n - 1] = 1
                    outputs.append((r, n - 1))
        if n == 0:
            return
        b.n_tokens = n
        picked: list[tuple[_Request, int]] = []
        with self._model_lock:
            handle = self._handles.get(internal) if internal else None
            if internal and handle is None:
                raise RuntimeError(f"adapter version {internal} is not installed")
            if handle is not None:
                rc = lib.llama_set_adapters_lora(self._ctx, (lib.llama_adapter_lora_p_ctypes * 1)(handle), 1,
                                                 (ctypes.c_float * 1)(1.0))
            else:
                rc = lib.llama_set_adapters_lora(self._ctx, self._no_adapters, 0, None)
            if rc != 0:
                raise RuntimeError(f"llama_set_adapters_lora returned {rc}")
            self._current_adapter = internal
            self._steps += 1
            rc = lib.llama_decode(self._ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}" + (" (no free KV cells)" if rc == 1 else ""))
            for r, i in outputs:
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,))
                picked.append((r, self._sample(logits, r)))
        for r, token in picked:
            try:
                self._accept(r, token)
            except Exception as exc:  # detokenizing one reply failed: that reply only
                self._failed("detokenize", exc, [r])

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        self._tokens[i] = token
        self._positions[i] = pos
        self._batch.seq_id[i][0] = seq
        self._wants_logits[i] = 1 if logits else 0

    def _sample(self, logits: np.ndarray, request: _Request) -> int:
        """The next token from one row's logits [vocab] (a view into llama.cpp's buffer), with the
        transformers backend's rules: repetition penalty, then greedy or temperature/top-k/top-p."""
        p = request.params
        if p.greedy and p.repetition_penalty == 1.0:
            return int(logits.argmax())
        row = np.array(logits, dtype=np.float32)
        if p.repetition_penalty != 1.0:
            seen = np.fromiter(set(request.prompt_ids) | set(request.generated), dtype=np.int64)
            scores = row[seen]
            row[seen] = np.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
        if p.greedy:
            return int(row.argmax())
        row /= p.temperature
        if p.top_k:
            k = min(p.top_k, row.size)
            kth = np.partition(row, -k)[-k]
            row[row < kth] = -np.inf
        if p.top_p < 1.0:
            order = np.argsort(-row, kind="stable")
            probs = _softmax(row[order])
            drop = np.cumsum(probs) - probs > p.top_p  # keep the first token always
            row[order[drop]] = -np.inf
        probs = _softmax(row)
        rng = request.generator if request.generator is not None else self._rng
        return int(rng.choice(probs.size, p=probs))


def _close_at_exit(ref) -> None:
    engine = ref()
    if engine is not None:
        engine.close()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()
