"""One streaming interface over a loaded causal LM, with continuous batching and LoRA per request.

Every caller (CLI, API, UI, Slack, Discord, tools) goes through ``Engine.stream``, which yields
``TextDelta`` events and ends with one ``Done`` (finish reason + usage).

How concurrency works: a single worker thread owns the model. New requests are prefilled one at a
time (batch 1, so their prompt never sees padding), and their key/value cache is then merged into
one running batch that decodes a token for every active conversation per forward pass. Rows are
left-padded to a common length and masked, with their own position ids, so a row's attention and
logits are those it would have alone. Requests join and leave the batch between steps, so a new
chat does not wait for others to finish.

Cancellation: every request has a ``threading.Event``; the worker checks it before each decoding
step, so a Stop button, a closed tab or a dropped HTTP stream ends generation within one step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch

from bot.chat import Message, fit_to_context, render_ids
from bot.errors import BusyError, GenerationError, NotFoundError, RequestError
from bot.events import Done, Event, TextDelta, Usage
from bot.models import LoadedModel, validate_adapter_dir

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
    prefix_offset: int = 0  # incremental detokenization window (see Engine._flush)
    read_offset: int = 0
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    position: int = 0  # position id of the next token


class Engine:
    """A loaded model behind a batching scheduler. Thread-safe; one per process is plenty."""

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 16, max_new_tokens_cap: int = 2048,
                 max_time_s: float = 120.0, context_window: int = 0, queue_size: int = 64):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(loaded.device)
        self.max_batch_size = max_batch_size
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_time_s = max_time_s
        model_limit = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        self.context_window = min(context_window, model_limit) if context_window else model_limit
        self.adapters: dict[str, str] = {}
        self.eos_ids = self._eos_ids()
        self._pending: "queue.Queue[_Request]" = queue.Queue(maxsize=queue_size)
        self._model_lock = threading.Lock()  # held for each forward pass and for adapter changes
        self._closed = threading.Event()
        self._worker = threading.Thread(target=self._run, name="parley-engine", daemon=True)
        self._worker.start()

    # -- public API ------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.loaded.name

    def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter under ``name``; takes effect for the next request that names it.

        Loading happens between decoding steps (under the model lock), so running requests are
        not disturbed. Re-loading an existing name replaces it (the chat switches at once after a
        fine-tuning run).
        """
        from peft import PeftModel

        if name == BASE or not name:
            raise RequestError(f"adapter name {name!r} is reserved: pick another name")
        folder = validate_adapter_dir(path)
        with self._model_lock:
            try:
                if not isinstance(self.model, PeftModel):
                    self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name)
                else:
                    if name in self.model.peft_config:
                        self.model.delete_adapter(name)
                    self.model.load_adapter(str(folder), adapter_name=name)
                self.model.eval()
            except Exception as exc:
                raise RequestError(f"could not load adapter {name!r} from {folder}: {exc}") from exc
            self.adapters[name] = str(folder)

    def require_adapter(self, name: str) -> None:
        """Raise NotFoundError (HTTP 404) unless ``name`` is ``base`` or a loaded adapter."""
        if name != BASE and name not in self.adapters:
            known = ", ".join([BASE, *self.adapters])
            raise NotFoundError(f"adapter {name!r} is not loaded (loaded: {known}); start with "
                                f"--adapter {name}=PATH or pick one of those")

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise NotFoundError(f"adapter {name!r} is not loaded")
        with self._model_lock:
            self.model.delete_adapter(name)
            del self.adapters[name]

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
            request.generator = torch.Generator(device="cpu").manual_seed(params.seed)
        try:
            self._pending.put_nowait(request)
        except queue.Full:
            raise BusyError("the server is busy (queue full): try again in a moment") from None
        return self._events(request)

    def generate(self, messages: list[Message], params: GenerationParams | None = None, **kwargs) -> tuple[str, Done]:
        """Non-streaming convenience: the whole reply and its ``Done`` event."""
        from bot.events import join_text

        return join_text(self.stream(messages, params, **kwargs))

    def close(self) -> None:
        self._closed.set()
        self._worker.join(timeout=10)

    # -- consumer side ---------------------------------------------------------------------------
    def _events(self, request: _Request) -> Iterator[Event]:
        try:
            while True:
                try:
                    event = request.out.get(timeout=1.0)
                except queue.Empty:
                    if not self._worker.is_alive():
                        yield Done(finish_reason="error", error="the generation worker stopped")
                        return
                    continue
                yield event
                if isinstance(event, Done):
                    return
        finally:
            # Reached on normal end and when the consumer closes us early (GeneratorExit).
            request.cancel.set()

    # -- worker side -----------------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return ids

    def _run(self) -> None:
        active: list[_Request] = []
        cache = None  # DynamicCache of the running batch: per layer [B, kv_heads, T, head_dim]
        mask = None   # [B, T] 1 for real tokens, 0 for left padding
        with torch.inference_mode():
            while not self._closed.is_set():
                # Admit new requests: block only when idle, so running chats keep decoding.
                new: list[_Request] = []
                try:
                    if not active:
                        new.append(self._pending.get(timeout=0.1))
                    while len(active) + len(new) < self.max_batch_size:
                        new.append(self._pending.get_nowait())
                except queue.Empty:
                    pass
                for request in new:
                    if request.cancel.is_set():
                        self._finish(request, "cancelled")
                        continue
                    try:
                        with self._model_lock:
                            row_cache, first = self._prefill(request)
                    except Exception as exc:  # one bad prompt must not take down the batch
                        log.exception("prefill failed")
                        self._finish(request, "error", error=f"generation failed: {type(exc).__name__}")
                        continue
                    if self._accept(request, first):
                        cache, mask = _merge(cache, mask, row_cache, len(request.prompt_ids))
                        active.append(request)
                if not active:
                    cache = mask = None
                    continue
                # Drop finished or cancelled rows before spending a forward pass on them.
                keep = [i for i, r in enumerate(active) if not self._should_stop(r)]
                if len(keep) < len(active):
                    active = [active[i] for i in keep]
                    if not active:
                        cache = mask = None
                        continue
                    cache, mask = _select(cache, mask, keep)
                try:
                    with self._model_lock:
                        next_ids = self._decode_step(active, cache, mask)
                except Exception as exc:
                    log.exception("decode step failed")
                    for request in active:
                        self._finish(request, "error", error=f"generation failed: {type(exc).__name__}")
                    active, cache, mask = [], None, None
                    continue
                mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
                still = []
                for i, (request, token) in enumerate(zip(active, next_ids)):
                    if self._accept(request, token):
                        still.append(i)
                if len(still) < len(active):
                    active = [active[i] for i in still]
                    cache, mask = (_select(cache, mask, still) if active else (None, None))
        for request in active:
            self._finish(request, "cancelled", error="the engine was shut down")

    def _adapter_kwargs(self, names: list[str]) -> dict[str, Any]:
        if not self.adapters:
            return {}
        return {"adapter_names": [_PEFT_BASE if n == BASE else n for n in names]}

    def _prefill(self, request: _Request):
        ids = torch.tensor([request.prompt_ids], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1,
                         **self._adapter_kwargs([request.adapter]))
        request.position = len(request.prompt_ids)
        token = self._sample(out.logits[:, -1, :].float(), [request])[0]
        return out.cache, token

    def _decode_step(self, active: list[_Request], cache, mask) -> list[int]:
        last = torch.tensor([[r.generated[-1]] for r in active], device=self.device)
        positions = torch.tensor([[r.position] for r in active], device=self.device)
        # Without padding (one row, or rows of equal length) the causal mask is implied; skipping
        # it saves building a 4-D mask every step.
        attention = None if bool(mask.all()) else torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        out = self.model(input_ids=last, attention_mask=attention, position_ids=positions,
                         cache=cache, use_cache=True, **self._adapter_kwargs([r.adapter for r in active]))
        for r in active:
            r.position += 1
        return self._sample(out.logits[:, -1, :].float(), active)

    def _sample(self, logits: torch.Tensor, requests: list[_Request]) -> list[int]:
        """Pick the next token per row. logits: [B, vocab] float32."""
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
        text = request.text
        stop_at = min((i for i in (text.find(s, max(0, request.emitted - len(s))) for s in request.params.stop)
                       if i >= 0), default=-1)
        if stop_at >= 0:
            text, final = text[:stop_at], True
        safe = len(text)
        if not final:
            for s in request.params.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        if safe > request.emitted:
            request.out.put(TextDelta(text[request.emitted:safe]))
            request.emitted = safe
        return stop_at >= 0

    def _finish(self, request: _Request, reason: str, error: str | None = None) -> None:
        now = time.perf_counter()
        usage = Usage(prompt_tokens=len(request.prompt_ids), completion_tokens=len(request.generated),
                      time_to_first_token_s=(request.first_token_at - request.submitted) if request.first_token_at else None,
                      total_time_s=now - request.submitted)
        request.out.put(Done(finish_reason=reason, usage=usage, error=error))  # type: ignore[arg-type]


def _merge(cache, mask, row_cache, row_len: int):
    """Add a prefilled row to the running batch, left-padding whichever side is shorter."""
    row_mask = torch.ones((1, row_len), dtype=torch.long, device=row_cache.layers[0].keys.device)
    if cache is None:
        return row_cache, row_mask
    total = mask.shape[1]
    pad_batch, pad_row = max(0, row_len - total), max(0, total - row_len)
    for layer, new in zip(cache.layers, row_cache.layers):
        for attr in ("keys", "values"):
            old_t, new_t = getattr(layer, attr), getattr(new, attr)
            if pad_batch:
                old_t = torch.nn.functional.pad(old_t, (0, 0, pad_batch, 0))
            if pad_row:
                new_t = torch.nn.functional.pad(new_t, (0, 0, pad_row, 0))
            setattr(layer, attr, torch.cat([old_t, new_t], dim=0))
    if pad_batch:
        mask = torch.nn.functional.pad(mask, (pad_batch, 0))
    if pad_row:
        row_mask = torch.nn.functional.pad(row_mask, (pad_row, 0))
    return cache, torch.cat([mask, row_mask], dim=0)


def _select(cache, mask, keep: list[int]):
    """Keep only the rows in ``keep``; drop left columns that are padding in every kept row."""
    index = torch.tensor(keep)
    mask = mask.index_select(0, index)
    lead = int((mask.cumsum(dim=1) == 0).sum(dim=1).min())  # padding columns shared by all rows
    mask = mask[:, lead:]
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[:, :, lead:, :]
        layer.values = layer.values.index_select(0, index.to(layer.values.device))[:, :, lead:, :]
    return cache, mask
