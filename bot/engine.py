"""One streaming interface over a loaded causal LM, with continuous batching and LoRA per request.

Every caller (CLI, API, UI, Slack, Discord, tools) goes through ``Engine.stream``, which yields
``TextDelta`` events and ends with one ``Done`` (finish reason + usage).

``BatchEngine`` is the part every local backend shares: the queue and its admission (queue full is
a ``BusyError`` at once), cancellation, the caps on tokens and time, stop strings, incremental
detokenization, adapter versions and ``health()``. ``Engine`` below is the transformers backend and
the reference; ``bot.backends.llamacpp.LlamaCppEngine`` is the llama.cpp one. A subclass supplies
the worker loop (``_run``) and how adapter weights are installed and freed (``_install``,
``_discard``); everything a caller sees is defined here once.

How concurrency works: a single worker thread owns the model. New requests are prefilled one at a
time (batch 1, so their prompt never sees padding), and their key/value cache is then merged into
one running batch that decodes a token for every active conversation per forward pass. Rows are
left-padded to a common length and masked, with their own position ids, so a row's attention and
logits are those it would have alone. Requests join and leave the batch between steps, so a new
chat does not wait for others to finish.

Cancellation: every request has a ``threading.Event``; the worker checks it before each decoding
step, so a Stop button, a closed tab or a dropped HTTP stream ends generation within one step. A
request still waiting in the queue leaves it as soon as its consumer sees the flag (within a
quarter second), when its stream is closed or garbage-collected, or when the next request is
admitted, so abandoned requests never hold queue slots.

Failures: anything that goes wrong in the worker fails the rows it touched (a prompt that cannot
be prefilled or merged fails that request; a failed decode step or batch reshuffle fails the
running batch) and the worker goes on serving. ``Engine.health()`` reports its real state.

Adapters: a request is bound to the adapter version current when it was submitted. Loading a
name again installs the new weights under a fresh internal name and switches new requests to it;
rows already running finish on the old weights, which are freed when the last of them ends.
Unloading works the same way. A load that fails changes nothing.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from bot.chat import Message, fit_to_context, render_ids
from bot.errors import BusyError, GenerationError, NotFoundError, RequestError
from bot.events import Done, Event, TextDelta, Usage
from bot.models import LoadedModel, validate_adapter_dir

if TYPE_CHECKING:  # torch is imported where the transformers backend runs, not at start-up
    import torch

log = logging.getLogger(__name__)

BASE = "base"
_PEFT_BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings of one request. ``temperature=0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens!r} must be a whole number >= 1")
        if not 0 <= self.temperature <= 5:
            problems.append(f"temperature={self.temperature!r} must be between 0 and 5")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k!r} must be >= 0 (0 turns it off)")
        if not 0 < self.repetition_penalty <= 10:
            problems.append(f"repetition_penalty={self.repetition_penalty!r} must be in (0, 10]")
        if len(self.stop) > 8 or any(not isinstance(s, str) or not s or len(s) > 200 for s in self.stop):
            problems.append("stop must be at most 8 non-empty strings of up to 200 characters")
        if problems:
            raise RequestError("invalid generation parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class _Request:
    id: str
    prompt_ids: list[int]
    params: GenerationParams
    adapter: str
    cancel: threading.Event
    out: "queue.Queue[Event]"
    deadline: float
    submitted: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    text: str = ""  # decoded reply so far
    emitted: int = 0  # characters of ``text`` already sent
    prefix_offset: int = 0  # incremental detokenization window (see BatchEngine._flush)
    read_offset: int = 0
    first_token_at: float | None = None
    generator: Any = None  # the request's own random generator when it has a seed
    position: int = 0  # position id of the next token
    slot: int = -1  # a backend's handle for the row (llama.cpp: its sequence id)
    fed: int = 0  # prompt tokens already in the row's cache (backends that prefill in chunks)
    peft_name: str | None = None  # the internal adapter version this request runs on (None: base)
    finished: bool = False


class BatchEngine:
    """The scheduler every local backend shares. Thread-safe; one per process is plenty.

    Subclasses set their model up, then call ``super().__init__``, which starts the worker thread
    running ``self._run``. They implement ``_run`` (admit requests with ``_take``, decode, feed
    sampled tokens to ``_accept``, end failed rows with ``_failed``), ``_install``/``_discard``
    (adapter weights under an internal version name) and ``_eos_ids``.
    """

    backend = "base"

    def __init__(self, tokenizer, *, name: str, context_window: int, max_batch_size: int = 16,
                 max_new_tokens_cap: int = 2048, max_time_s: float = 120.0, queue_size: int = 64):
        self.tokenizer = tokenizer
        self._name = name
        self.max_batch_size = max_batch_size
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_time_s = max_time_s
        self.context_window = context_window
        self.adapters: dict[str, str] = {}  # public name -> folder, what callers list and pick from
        self.queue_size = queue_size
        self.eos_ids = self._eos_ids()
        # Lock order: _model_lock before _lock. _lock guards the queue, the adapter maps and the
        # counters below, and is only ever held for a few dictionary operations, so submitting a
        # request never waits for a forward pass or an adapter load.
        self._model_lock = threading.Lock()  # held for each forward pass and for adapter changes
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._pending: collections.deque[_Request] = collections.deque()
        self._live: dict[str, str] = {}        # public adapter name -> internal adapter version name
        self._users: dict[str, int] = {}       # internal name -> requests bound to it (queued or running)
        self._retired: set[str] = set()        # internal names no longer public, freed when unused
        self._doomed: list[str] = []           # retired and unused: the worker deletes them
        self._installed: set[str] = set()      # internal names present in the model
        self._versions = itertools.count(1)
        self._active_rows = 0
        self._steps = 0  # forward passes since start (health(); tests count them around a cancel)
        self._errors = 0
        self._last_error: dict[str, Any] | None = None
        self._heartbeat = time.monotonic()
        self._closed = threading.Event()
        self._worker = threading.Thread(target=self._run, name=f"parley-{self.backend}", daemon=True)
        self._worker.start()

    # -- public API ------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._name

    def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter under ``name``; takes effect for the next request that names it.

        Loading happens between decoding steps (under the model lock), so running requests are
        not disturbed. Re-loading an existing name replaces it (the chat switches at once after a
        fine-tuning run): the new weights are installed beside the old ones, new requests use
        them, and rows still generating with the old ones finish on them. When loading fails,
        the old adapter stays loaded and listed.
        """
        if name == BASE or not name:
            raise RequestError(f"adapter name {name!r} is reserved: pick another name")
        folder = validate_adapter_dir(path)
        try:  # slow work (a conversion) happens here, outside the lock
            weights = self._prepare_adapter(name, folder)
        except Exception as exc:
            raise RequestError(f"could not load adapter {name!r} from {folder}: {exc}") from exc
        with self._model_lock:
            internal = f"parley_{next(self._versions)}"
            try:
                self._install(internal, weights)
            except Exception as exc:
                self._discard(internal)
                raise RequestError(f"could not load adapter {name!r} from {folder}: {exc}") from exc
            with self._lock:
                old = self._live.get(name)
                self._live[name] = internal
                self._users.setdefault(internal, 0)
                self.adapters[name] = str(folder)
                unused = self._retire(old) if old else None
            if unused:
                self._discard(unused)

    def _prepare_adapter(self, name: str, folder) -> str:
        """What ``_install`` loads for an adapter folder; backends that convert it do so here."""
        return str(folder)

    def require_adapter(self, name: str) -> None:
        """Raise NotFoundError (HTTP 404) unless ``name`` is ``base`` or a loaded adapter."""
        if name != BASE and name not in self.adapters:
            known = ", ".join([BASE, *self.adapters])
            raise NotFoundError(f"adapter {name!r} is not loaded (loaded: {known}); start with "
                                f"--adapter {name}=PATH or pick one of those")

    def unload_adapter(self, name: str) -> None:
        """Stop offering ``name`` at once; rows already generating with it finish first, and its
        weights are freed when the last of them ends. Nobody else's request is affected."""
        with self._model_lock:
            with self._lock:
                if name not in self._live:
                    raise NotFoundError(f"adapter {name!r} is not loaded")
                internal = self._live.pop(name)
                self.adapters.pop(name, None)
                unused = self._retire(internal)
            if unused:
                self._discard(unused)

    def health(self) -> dict[str, Any]:
        """The engine's real state, for /health and monitoring.

        ``ok`` is False when the worker thread is gone or the engine was closed (then every
        request fails). ``last_step_age_s`` is how long ago the worker last went round its loop:
        it does so at least every 0.1 s when idle and once per decoding step when busy, so a
        large value means a stuck forward pass. ``last_error`` names where the most recent
        worker failure happened and its exception type (details are in the log).
        """
        alive = self._worker.is_alive()
        with self._lock:
            depth = sum(1 for r in self._pending if not r.cancel.is_set())
            retiring = len(self._retired)
            last_error = dict(self._last_error) if self._last_error else None
            errors = self._errors
            adapters = sorted(self.adapters)
        return {"ok": alive and not self._closed.is_set(), "backend": self.backend, "worker_alive": alive,
                "closed": self._closed.is_set(), "queue_depth": depth, "queue_size": self.queue_size,
                "active_rows": self._active_rows, "max_batch_size": self.max_batch_size,
                "adapters": adapters, "retiring_adapters": retiring, "errors": errors,
                "last_error": last_error, "last_step_age_s": round(time.monotonic() - self._heartbeat, 3),
                "steps": self._steps}

    def prompt_ids(self, messages: list[Message], max_new_tokens: int, tools: list[dict] | None = None) -> list[int]:
        """Render and trim a conversation so the prompt plus the reply fit the context window."""
        budget = self.context_window - max_new_tokens
        if budget < 16:
            raise RequestError(f"max_tokens={max_new_tokens} leaves no room for the prompt in the "
                               f"{self.context_window}-token context window: ask for fewer tokens")
        _, ids = fit_to_context(self.tokenizer, messages, budget, tools=tools)
        return ids

    def clamp(self, params: GenerationParams) -> GenerationParams:
        """Apply the server-side cap on reply length."""
        if params.max_new_tokens > self.max_new_tokens_cap:
            return replace(params, max_new_tokens=self.max_new_tokens_cap)
        return params

    def stream(self, messages: list[Message] | None = None, params: GenerationParams | None = None, *,
               prompt_ids: Sequence[int] | None = None, adapter: str = BASE,
               cancel: threading.Event | None = None, tools: list[dict] | None = None) -> Iterator[Event]:
        """Generate a reply to ``messages`` (or raw ``prompt_ids``), streaming events.

        Closing the generator early (the consumer went away) cancels the request.
        Raises RequestError before streaming for an unknown adapter or a prompt that cannot fit.
        """
        params = self.clamp(params or GenerationParams())
        adapter = adapter or BASE
        self.require_adapter(adapter)
        if prompt_ids is None:
            if messages is None:
                raise RequestError("give messages or prompt_ids")
            ids = self.prompt_ids(messages, params.max_new_tokens, tools)
        else:
            ids = list(prompt_ids)
            if len(ids) + params.max_new_tokens > self.context_window:
                raise RequestError(f"the prompt is {len(ids)} tokens; with max_tokens={params.max_new_tokens} "
                                   f"it exceeds the {self.context_window}-token context window")
        if self._closed.is_set() or not self._worker.is_alive():
            raise GenerationError("the engine has stopped; restart Parley")
        request = _Request(id=uuid.uuid4().hex, prompt_ids=ids, params=params, adapter=adapter,
                           cancel=cancel or threading.Event(), out=queue.Queue(),
                           deadline=time.perf_counter() + self.max_time_s)
        if params.seed is not None:
            request.generator = self._new_rng(params.seed)
        self._submit(request)
        events = self._events(request)
        # A stream dropped without being read to the end (or at all) gives its slot back.
        weakref.finalize(events, self._abandon, request)
        return events

    def _submit(self, request: _Request) -> None:
        """Queue a request or refuse it at once; never waits for the worker."""
        with self._lock:
            gone = self._purge_cancelled()
            problem: Exception | None = None
            if request.adapter != BASE and request.adapter not in self._live:
                problem = NotFoundError(f"adapter {request.adapter!r} is not loaded (loaded: "
                                        f"{', '.join([BASE, *self._live])}); pick one of those")
            elif len(self._pending) >= self.queue_size:
                problem = BusyError("the server is busy (queue full): try again in a moment")
            else:
                request.peft_name = self._live.get(request.adapter) if request.adapter != BASE else None
                if request.peft_name:
                    self._users[request.peft_name] += 1
                self._pending.append(request)
                self._wakeup.notify()
        for old in gone:
            self._finish(old, "cancelled")
        if problem is not None:
            raise problem

    def generate(self, messages: list[Message], params: GenerationParams | None = None, **kwargs) -> tuple[str, Done]:
        """Non-streaming convenience: the whole reply and its ``Done`` event."""
        from bot.events import join_text

        return join_text(self.stream(messages, params, **kwargs))

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._wakeup.notify_all()
        self._worker.join(timeout=10)
        with self._lock:
            left = list(self._pending)
            self._pending.clear()
        for request in left:
            self._finish(request, "cancelled", error="the engine was shut down")

    # -- consumer side ---------------------------------------------------------------------------
    def _events(self, request: _Request) -> Iterator[Event]:
        try:
            while True:
                try:
                    event = request.out.get(timeout=0.25)
                except queue.Empty:
                    if request.cancel.is_set():
                        self._withdraw(request)  # still queued: leave the queue now
                    elif not self._worker.is_alive():
                        self._withdraw(request)
                        yield Done(finish_reason="error", error="the generation worker stopped", status=500)
                        return
                    continue
                yield event
                if isinstance(event, Done):
                    return
        finally:
            # Reached on normal end and when the consumer closes us early (GeneratorExit).
            self._abandon(request)

    def _abandon(self, request: _Request) -> None:
        request.cancel.set()
        self._withdraw(request)

    def _withdraw(self, request: _Request) -> None:
        """Take a request out of the queue if it is still there, and end it as cancelled."""
        with self._lock:
            try:
                self._pending.remove(request)
            except ValueError:
                return  # already running (the worker sees the flag within a step) or finished
        self._finish(request, "cancelled")

    def _purge_cancelled(self) -> list[_Request]:
        """Drop cancelled requests from the queue (caller holds _lock; caller finishes them)."""
        if not any(r.cancel.is_set() for r in self._pending):
            return []
        gone = [r for r in self._pending if r.cancel.is_set()]
        self._pending = collections.deque(r for r in self._pending if not r.cancel.is_set())
        return gone

    def _take(self, room: int, *, wait: bool, admit=None) -> list[_Request]:
        """Up to ``room`` queued requests, oldest first; waits up to 0.1 s for one only when ``wait``.

        ``admit(request)``, when given, is asked about the oldest one before it is taken; False
        leaves it (and those behind it, so order is kept) queued for a later round.
        """
        with self._lock:
            if wait and not self._pending:
                self._wakeup.wait(timeout=0.1)
            gone = self._purge_cancelled()
            new = []
            while len(new) < room and self._pending and (admit is None or admit(self._pending[0])):
                new.append(self._pending.popleft())
        for request in gone:
            self._finish(request, "cancelled")
        return new

    # -- worker side -----------------------------------------------------------------------------
    def _new_rng(self, seed: int) -> Any:
        """A random generator of the backend's kind for a seeded request."""
        raise NotImplementedError

    def _eos_ids(self) -> set[int]:
        raise NotImplementedError

    def _run(self) -> None:
        """The worker loop: until ``_closed`` is set, admit, decode, stream; keep ``_heartbeat``,
        ``_active_rows`` and ``_steps`` current; end the rows still running when it stops."""
        raise NotImplementedError

    def _install(self, internal: str, weights: str) -> None:
        """Load adapter weights under an internal name (caller holds the model lock)."""
        raise NotImplementedError

    def _discard(self, internal: str) -> None:
        """Free an adapter version, also one that failed half way through loading (caller holds
        the model lock); never raises."""
        raise NotImplementedError

    def _failed(self, where: str, exc: Exception, requests: list[_Request]) -> None:
        """Log a worker failure, remember it for health(), and end the affected requests."""
        log.error("engine: %s failed for %d request(s)", where, len(requests), exc_info=exc)
        with self._lock:
            self._errors += 1
            self._last_error = {"where": where, "type": type(exc).__name__, "at": time.time(),
                                "requests": len(requests)}
        for request in requests:
            self._finish(request, "error", error=f"generation failed: {type(exc).__name__}")

    # -- adapter versions --------------------------------------------------------------------------
    def _retire(self, internal: str) -> str | None:
        """``internal`` is no longer public; returns it when nothing uses it (caller holds _lock)."""
        if self._users.get(internal, 0) == 0:
            self._users.pop(internal, None)
            return internal
        self._retired.add(internal)
        return None

    def _release(self, request: _Request) -> None:
        name, request.peft_name = request.peft_name, None
        if not name:
            return
        with self._lock:
            self._users[name] -= 1
            if self._users[name] == 0 and name in self._retired:
                self._retired.discard(name)
                del self._users[name]
                self._doomed.append(name)

    def _free_retired(self) -> None:
        """Delete adapter versions whose last row has finished (between steps, in the worker)."""
        if not self._doomed:
            return
        with self._lock:
            doomed, self._doomed = self._doomed, []
        with self._model_lock:
            for internal in doomed:
                self._discard(internal)

    def _should_stop(self, request: _Request) -> bool:
        if request.cancel.is_set():
            self._finish(request, "cancelled")
            return True
        if time.perf_counter() > request.deadline:
            self._flush(request, final=True)
            self._finish(request, "length")
            return True
        return False

    def _accept(self, request: _Request, token: int) -> bool:
        """Record a sampled token, stream new text; False when the request is finished."""
        now = time.perf_counter()
        if request.first_token_at is None:
            request.first_token_at = now
        if token in self.eos_ids:
            self._flush(request, final=True)
            self._finish(request, "stop")
            return False
        request.generated.append(token)
        if self._flush(request, final=False):
            self._finish(request, "stop")
            return False
        if len(request.generated) >= request.params.max_new_tokens:
            self._flush(request, final=True)
            self._finish(request, "length")
            return False
        return True

    def _flush(self, request: _Request, *, final: bool) -> bool:
        """Send the text decoded since the last flush. True when a stop string was reached.

        Text that might be the start of a multi-byte character or of a stop string is held back
        until the next token decides it, so a stop string never leaks to the client.
        """
        # Decode only a small window of recent tokens: a token's text can depend on its neighbours
        # (byte pieces, leading spaces), so decode [prefix:read] and [prefix:] and keep the
        # difference, as text-generation-inference does. This keeps each step O(1) in reply length.
        ids = request.generated
        before = self.tokenizer.decode(ids[request.prefix_offset:request.read_offset], skip_special_tokens=True)
        after = self.tokenizer.decode(ids[request.prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            request.text += after[len(before):]
            request.prefix_offset, request.read_offset = request.read_offset, len(ids)
        safe, stopped = stop_boundary(request.text, request.emitted, request.params.stop, final=final)
        if safe > request.emitted:
            request.out.put(TextDelta(request.text[request.emitted:safe]))
            request.emitted = safe
        return stopped

    def _finish(self, request: _Request, reason: str, error: str | None = None) -> None:
        """End a request with its one Done event (idempotent) and release its adapter version."""
        if request.finished:
            return
        request.finished = True
        self._release(request)
        now = time.perf_counter()
        usage = Usage(prompt_tokens=len(request.prompt_ids), completion_tokens=len(request.generated),
                      time_to_first_token_s=(request.first_token_at - request.submitted) if request.first_token_at else None,
                      total_time_s=now - request.submitted)
        request.out.put(Done(finish_reason=reason, usage=usage, error=error,  # type: ignore[arg-type]
                             status=500 if reason == "error" else 200))


class Engine(BatchEngine):
    """The transformers backend (the reference, and what training uses): a loaded model behind
    the batching scheduler. Thread-safe; one per process is plenty."""

    backend = "transformers"

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 16, max_new_tokens_cap: int = 2048,
                 max_time_s: float = 120.0, context_window: int = 0, queue_size: int = 64):
        import torch
        self.loaded = loaded
        self.model = loaded.model
        self.device = torch.device(loaded.device)
        model_limit = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        super().__init__(loaded.tokenizer, name=loaded.name,
                         context_window=min(context_window, model_limit) if context_window else model_limit,
                         max_batch_size=max_batch_size, max_new_tokens_cap=max_new_tokens_cap,
                         max_time_s=max_time_s, queue_size=queue_size)

    def _new_rng(self, seed: int):
        import torch
        return torch.Generator(device="cpu").manual_seed(seed)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return ids

    def _run(self) -> None:
        import torch
        active: list[_Request] = []
        cache = None  # DynamicCache of the running batch: per layer [B, kv_heads, T, head_dim]
        mask = None   # [B, T] 1 for real tokens, 0 for left padding
        with torch.inference_mode():
            while not self._closed.is_set():
                try:
                    active, cache, mask = self._step(active, cache, mask)
                except Exception as exc:  # a bug outside the guarded parts: fail the batch, keep serving
                    self._failed("worker", exc, active)
                    active, cache, mask = [], None, None
                self._active_rows = len(active)
                self._heartbeat = time.monotonic()
        for request in active:
            self._finish(request, "cancelled", error="the engine was shut down")

    def _step(self, active: list[_Request], cache, mask):
        """One round of the worker: admit and prefill new requests, then one decoding step.

        Every failure fails only the rows it touched: a new request whose prefill or merge into
        the batch fails is answered with an error alone (the batch is left as it was); a failed
        decoding step or batch reshuffle fails the running rows (their shared cache can no longer
        be trusted). Returns the new (active, cache, mask).
        """
        self._free_retired()
        # Admit new requests: block only when idle, so running chats keep decoding.
        for request in self._take(self.max_batch_size - len(active), wait=not active):
            if request.cancel.is_set():
                self._finish(request, "cancelled")
                continue
            try:
                with self._model_lock:
                    row_cache, first = self._prefill(request)
            except Exception as exc:  # one bad prompt must not take down the batch
                self._failed("prefill", exc, [request])
                continue
            try:
                if not self._accept(request, first):
                    continue  # finished after one token
            except Exception as exc:
                self._failed("detokenize", exc, [request])
                continue
            try:
                cache, mask = _merge(cache, mask, row_cache, len(request.prompt_ids))
            except Exception as exc:  # e.g. out of memory while growing the batch: this row only
                self._failed("merge", exc, [request])
                continue
            active.append(request)
        if not active:
            return [], None, None
        # Drop finished or cancelled rows before spending a forward pass on them.
        keep = [i for i, r in enumerate(active) if not self._should_stop(r)]
        if len(keep) < len(active):
            if not keep:
                return [], None, None
            try:
                cache, mask = _select(cache, mask, keep)
            except Exception as exc:
                self._failed("select", exc, active)
                return [], None, None
            active = [active[i] for i in keep]
        try:
            with self._model_lock:
                next_ids = self._decode_step(active, cache, mask)
            mask = _extend_mask(mask)
        except Exception as exc:
            self._failed("decode", exc, active)
            return [], None, None
        still = []
        for i, (request, token) in enumerate(zip(active, next_ids)):
            try:
                if self._accept(request, token):
                    still.append(i)
            except Exception as exc:  # detokenizing one reply failed: that reply only
                self._failed("detokenize", exc, [request])
        if len(still) < len(active):
            if not still:
                return [], None, None
            try:
                cache, mask = _select(cache, mask, still)
            except Exception as exc:
                self._failed("select", exc, active)
                return [], None, None
            active = [active[i] for i in still]
        return active, cache, mask

    def _install(self, internal: str, folder: str) -> None:
        """Load adapter weights under an internal name (caller holds the model lock)."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=internal)
        else:
            self.model.load_adapter(folder, adapter_name=internal)
        self.model.eval()
        self._installed.add(internal)

    def _discard(self, internal: str) -> None:
        """Remove an adapter version from the model, also one that failed half way through
        loading (caller holds the model lock)."""
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._installed.discard(internal)
        try:
            if isinstance(self.model, PeftModel) and internal in self.model.peft_config:
                self.model.delete_adapter(internal)
            for module in self.model.modules():  # layers a failed first load injected
                if isinstance(module, BaseTunerLayer) and internal in getattr(module, "lora_A", {}):
                    module.delete_adapter(internal)
            stale = getattr(self.model, "peft_config", None)  # a failed first load leaves one on the base
            if not isinstance(self.model, PeftModel) and isinstance(stale, dict):
                stale.pop(internal, None)
                if not stale:
                    del self.model.peft_config
            if isinstance(self.model, PeftModel) and not self.model.peft_config:
                # peft cannot run a model without adapters (its active adapter is gone): unwrap
                # back to the plain base model; the next load wraps it again.
                self.model = self.model.unload()
        except Exception:
            log.exception("could not free adapter version %s", internal)

    def _adapter_kwargs(self, requests: list[_Request]) -> dict[str, Any]:
        if not self._installed:
            return {}
        return {"adapter_names": [r.peft_name or _PEFT_BASE for r in requests]}

    def _prefill(self, request: _Request):
        import torch
        ids = torch.tensor([request.prompt_ids], device=self.device)
        self._steps += 1
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **self._adapter_kwargs([request]))
        request.position = len(request.prompt_ids)
        token = self._sample(out.logits[:, -1, :].float(), [request])[0]
        return out.cache, token

    def _decode_step(self, active: list[_Request], cache, mask) -> list[int]:
        import torch
        last = torch.tensor([[r.generated[-1]] for r in active], device=self.device)
        positions = torch.tensor([[r.position] for r in active], device=self.device)
        # Without padding (one row, or rows of equal length) the causal mask is implied; skipping
        # it saves building a 4-D mask every step.
        attention = None if bool(mask.all()) else torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        self._steps += 1
        out = self.model(input_ids=last, attention_mask=attention, position_ids=positions,
                         cache=cache, use_cache=True, **self._adapter_kwargs(active))
        for r in active:
            r.position += 1
        return self._sample(out.logits[:, -1, :].float(), active)

    def _sample(self, logits: torch.Tensor, requests: list[_Request]) -> list[int]:
        """Pick the next token per row. logits: [B, vocab] float32."""
        import torch
        tokens = logits.argmax(dim=-1).tolist()
        for i, request in enumerate(requests):
            p = request.params
            if p.greedy and p.repetition_penalty == 1.0:
                continue
            row = logits[i].clone()
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(request.prompt_ids) | set(request.generated)), device=row.device)
                scores = row[seen]
                row[seen] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
            if p.greedy:
                tokens[i] = int(row.argmax())
                continue
            row = row / p.temperature
            if p.top_k:
                kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
                row[row < kth] = float("-inf")
            if p.top_p < 1.0:
                sorted_logits, order = torch.sort(row, descending=True)
                cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
                drop = cumulative - torch.softmax(sorted_logits, dim=-1) > p.top_p  # keep the first token always
                row[order[drop]] = float("-inf")
            probs = torch.softmax(row, dim=-1).cpu()
            tokens[i] = int(torch.multinomial(probs, 1, generator=request.generator))
        return tokens


def stop_boundary(text: str, emitted: int, stops: Sequence[str], *, final: bool) -> tuple[int, bool]:
    """How much of ``text`` may be sent, and whether a stop string was reached.

    ``emitted`` characters were sent already. A stop string found in the text ends the reply just
    before it (True). Otherwise, unless ``final``, a tail that could be the start of a stop string
    is held back until more text decides it, so a stop string never leaks to the client.
    """
    stop_at = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in stops) if i >= 0), default=-1)
    if stop_at >= 0:
        return stop_at, True
    safe = len(text)
    if not final:
        for s in stops:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
    return safe, False


def _merge(cache, mask, row_cache, row_len: int):
    """Add a prefilled row to the running batch, left-padding whichever side is shorter.

    All new tensors are built before any is stored, so a failure (out of memory) leaves the
    running batch exactly as it was.
    """
    import torch
    row_mask = torch.ones((1, row_len), dtype=torch.long, device=row_cache.layers[0].keys.device)
    if cache is None:
        return row_cache, row_mask
    total = mask.shape[1]
    pad_batch, pad_row = max(0, row_len - total), max(0, total - row_len)
    merged = []
    for layer, new in zip(cache.layers, row_cache.layers):
        pair = []
        for attr in ("keys", "values"):
            old_t, new_t = getattr(layer, attr), getattr(new, attr)
            if pad_batch:
                old_t = torch.nn.functional.pad(old_t, (0, 0, pad_batch, 0))
            if pad_row:
                new_t = torch.nn.functional.pad(new_t, (0, 0, pad_row, 0))
            pair.append(torch.cat([old_t, new_t], dim=0))
        merged.append(pair)
    if pad_batch:
        mask = torch.nn.functional.pad(mask, (pad_batch, 0))
    if pad_row:
        row_mask = torch.nn.functional.pad(row_mask, (pad_row, 0))
    mask = torch.cat([mask, row_mask], dim=0)
    for layer, (keys, values) in zip(cache.layers, merged):
        layer.keys, layer.values = keys, values
    return cache, mask


def _select(cache, mask, keep: list[int]):
    """Keep only the rows in ``keep``; drop left columns that are padding in every kept row.

    Like ``_merge``, nothing is stored until every new tensor exists.
    """
    import torch
    index = torch.tensor(keep)
    mask = mask.index_select(0, index)
    lead = int((mask.cumsum(dim=1) == 0).sum(dim=1).min())  # padding columns shared by all rows
    mask = mask[:, lead:]
    kept = [(layer.keys.index_select(0, index.to(layer.keys.device))[:, :, lead:, :],
             layer.values.index_select(0, index.to(layer.values.device))[:, :, lead:, :])
            for layer in cache.layers]
    for layer, (keys, values) in zip(cache.layers, kept):
        layer.keys, layer.values = keys, values
    return cache, mask


def _extend_mask(mask):
    """The attention mask after a decoding step: one more real token per row. [B, T] -> [B, T+1]"""
    import torch
    return torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
