"""The openai backend: any OpenAI-compatible server generates (vLLM, llama-server, TGI, SGLang,
Ollama, ``python -m llama_cpp.server``, another Parley); Parley keeps its tools, retrieval, store,
feedback and UI.

Same contract as the local engines: ``stream`` yields TextDelta events and one Done; cancel within
a step; stop strings; caps on tokens and time; a queue-full BusyError at once.

* Streaming: ``POST {base_url}/chat/completions`` with ``stream: true`` over httpx, read as
  server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``). Raw ``prompt_ids`` go to
  ``/completions`` as a token list.
* Concurrency: at most ``max_batch_size`` requests are open at the server (it batches them, as vLLM
  does); up to ``queue_size`` more wait here; beyond that ``stream`` raises BusyError at once.
* Cancel: each request is read by its own thread; the consumer sees the cancel flag within a
  quarter second (or a closed generator at once) and shuts the HTTP stream, which is how an
  OpenAI-compatible server learns that the client went away. The reader checks the flag before
  every chunk, so at most the chunk in flight is read after it.
* Time cap: ``max_time_s`` per request (the reply ends with finish reason ``length``); connect and
  read timeouts per HTTP call.
* Retries: connection failures and HTTP 429/503 before anything streamed are retried with
  exponential backoff (``Retry-After`` honoured, within the time cap); a failure after text was
  sent ends the reply with an error (text cannot be unsent).
* Errors: the server's answers become Parley's errors with what went wrong and how to fix it:
  400/422 -> RequestError (400), 429/503 after retries -> BusyError (503), 401/403, 404, 5xx,
  timeouts, a dropped stream and unreadable answers -> UpstreamError (502).
* Adapters map to the server's model names: the server's other models (vLLM lists each LoRA it
  serves) are adapters under their own names; ``load_adapter(name, "server:MODEL")`` maps a name to
  one; ``load_adapter(name, folder)`` asks the server to load the folder
  (vLLM's ``/v1/load_lora_adapter``, when it was started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True).
* Prompts are trimmed to the context window here with a local tokenizer of the served model when
  one exists (the embedded model's, a cached Hugging Face one), else with an estimate.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

import httpx

from bot.chat import Message, fit_to_context
from bot.engine import BASE, GenerationParams, stop_boundary
from bot.errors import (BusyError, ConfigError, GenerationError, ModelLoadError, NotFoundError, ParleyError,
                        RequestError)
from bot.events import Done, Event, TextDelta, Usage

log = logging.getLogger(__name__)

SERVER_PREFIX = "server:"


class UpstreamError(GenerationError):
    """The model server failed, timed out, dropped the stream or answered something unreadable."""

    status = 502


class ApproxTokenizer:
    """Stands in for the served model's tokenizer when none exists locally: it counts about four
    UTF-8 bytes per token, which is enough to trim a long conversation to the context window (the
    server renders the real prompt). It has no chat template, so native tool calling is off."""

    chat_template = None
    eos_token = eos_token_id = pad_token = pad_token_id = None
    all_special_tokens: list[str] = []
    added_tokens_decoder: dict = {}

    def _ids(self, text: str) -> list[int]:
        return [0] * math.ceil(len((text or "").encode("utf-8")) / 4)

    def __call__(self, text, add_special_tokens: bool = True, **kwargs):
        if isinstance(text, (list, tuple)):
            return {"input_ids": [self._ids(t) for t in text]}
        return {"input_ids": self._ids(text)}

    def apply_chat_template(self, messages, tools=None, add_generation_prompt: bool = True, tokenize: bool = True,
                            **kwargs):
        text = "".join(f"<|{m.get('role')}|>\n{m.get('content') or ''}\n" for m in messages)
        if tools:
            text += json.dumps(tools)
        if add_generation_prompt:
            text += "<|assistant|>\n"
        return {"input_ids": self._ids(text)} if tokenize else text

    def decode(self, ids, **kwargs) -> str:
        return ""

    def __len__(self) -> int:
        return 0


def local_tokenizer(*specs: str | None, home: Path | None = None):
    """The first local Hugging Face tokenizer found for these model names (the embedded default,
    a .gguf file, a folder, a cached hub id); None when there is none. Never downloads."""
    import os

    from bot.models import EMBEDDED_MODELS

    for spec in specs:
        if not spec:
            continue
        try:
            if spec in EMBEDDED_MODELS or spec.endswith(".gguf"):
                from bot.backends import gguf_source, load_gguf_tokenizer

                if home is None:
                    continue
                return load_gguf_tokenizer(gguf_source(spec, home), home, spec=spec)
            from transformers import AutoTokenizer

            offline = os.environ.get("HF_HUB_OFFLINE", "1") != "0"
            path = Path(spec).expanduser()
            if path.is_dir():
                return AutoTokenizer.from_pretrained(path)
            if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
                return AutoTokenizer.from_pretrained(spec, local_files_only=offline)
        except Exception as exc:  # not available here: try the next name
            log.debug("no local tokenizer for %s: %s", spec, exc)
    return None


@dataclass(eq=False)  # compared and hashed by identity: requests live in a set
class _Remote:
    id: str
    body: dict[str, Any]
    path: str  # /chat/completions or /completions
    params: GenerationParams
    prompt_tokens: int
    cancel: threading.Event
    deadline: float
    out: "queue.Queue[Event]" = field(default_factory=queue.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    waiting: bool = False
    text: str = ""
    emitted: int = 0
    chunks: int = 0
    first_token_at: float | None = None
    usage: dict[str, Any] | None = None
    tool_calls: dict[int, dict[str, str]] = field(default_factory=dict)
    response: httpx.Response | None = None
    timed_out: bool = False  # the consumer saw the time cap pass while the server sent nothing
    cancelled_at: float | None = None  # when the consumer first saw the cancel flag
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class OpenAIEngine:
    """An OpenAI-compatible server behind Parley's engine interface. Thread-safe."""

    backend = "openai"

    def __init__(self, base_url: str, *, api_key: str = "", model: str | None = None, tokenizer=None,
                 tokenizer_spec: str | None = None, home: Path | None = None, max_batch_size: int = 16,
                 max_new_tokens_cap: int = 2048, max_time_s: float = 120.0, context_window: int = 0,
                 queue_size: int = 64, connect_timeout_s: float = 5.0, read_timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 0.5, max_backoff_s: float = 8.0):
        self.base_url = _normalize_url(base_url)
        self.max_batch_size = max_batch_size
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_time_s = max_time_s
        self.queue_size = queue_size
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.read_timeout_s = read_timeout_s
        headers = {"Accept": "text/event-stream, application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            headers=headers, timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_batch_size + 8, max_keepalive_connections=max_batch_size))
        self._lock = threading.Lock()
        self._slot_free = threading.Condition(self._lock)
        self._in_flight = 0
        self._waiting = 0
        self._open: set[_Remote] = set()
        self._errors = 0
        self._last_error: dict[str, Any] | None = None
        self._steps = 0
        self._heartbeat = time.monotonic()
        self._reachable = True
        self._probing = False
        self._closed = threading.Event()
        self.adapters: dict[str, str] = {}   # public name -> where it came from (what callers list)
        self._served: dict[str, str] = {}    # public name -> the server's model name
        self._loaded_here: set[str] = set()  # adapters this process asked the server to load

        models = self._list_models(startup=True)
        self.server_models = [m["id"] for m in models]
        base = self._pick_base(models, model)
        self.server_model = base
        self._name = model or base
        self._penalty_name = "repeat_penalty" if any(m.get("owned_by") in ("me", "llamacpp") for m in models) \
            else "repetition_penalty"
        for m in models:
            if m["id"] != base and _is_adapter_of(m, base):
                self.adapters[m["id"]] = SERVER_PREFIX + m["id"]
                self._served[m["id"]] = m["id"]
        if tokenizer is None:
            tokenizer = local_tokenizer(tokenizer_spec, base, home=home)
        self.tokenizer = tokenizer if tokenizer is not None else ApproxTokenizer()
        served_limit = next((int(m["max_model_len"]) for m in models
                             if m["id"] == base and isinstance(m.get("max_model_len"), int)), 0)
        own_limit = getattr(self.tokenizer, "model_max_length", 0) or 0
        limit = served_limit or (own_limit if 0 < own_limit < 1_000_000 else 8192)
        self.context_window = min(context_window, limit) if context_window else limit

    # -- discovery ---------------------------------------------------------------------------------
    def _list_models(self, *, startup: bool = False) -> list[dict[str, Any]]:
        attempts = self.retries + 1 if startup else 1
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                response = self._client.get(self.base_url + "/models", timeout=10.0)
            except httpx.HTTPError as exc:
                last = exc
                if attempt + 1 < attempts:
                    time.sleep(min(self.backoff_s * 2 ** attempt, self.max_backoff_s))
                continue
            if response.status_code in (429, 503) and attempt + 1 < attempts:
                time.sleep(min(self.backoff_s * 2 ** attempt, self.max_backoff_s))
                continue
            if response.status_code >= 400:
                raise ModelLoadError(f"the model server at {self.base_url} answered GET /models with "
                                     f"{_describe(response)}" + _fix_for(response.status_code))
            try:
                data = response.json()
                models = [m for m in data["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]
            except Exception:
                raise ModelLoadError(f"{self.base_url}/models did not answer an OpenAI model list "
                                     f"({response.text[:120]!r}): is --base-url an OpenAI-compatible API?") from None
            if not models:
                raise ModelLoadError(f"the model server at {self.base_url} serves no models")
            return models
        raise ModelLoadError(f"could not reach the model server at {self.base_url} ({type(last).__name__}: {last}): "
                             f"start it, or fix --base-url")

    @staticmethod
    def _pick_base(models: list[dict[str, Any]], wanted: str | None) -> str:
        ids = [m["id"] for m in models]
        if wanted:
            if wanted not in ids:
                raise ModelLoadError(f"the model server does not serve {wanted!r} (it serves: {', '.join(ids)}): "
                                     f"give one of those as --model")
            return wanted
        for m in models:  # Parley marks its base; vLLM gives LoRA modules a parent
            if (m.get("parley") or {}).get("kind") == "base" or not m.get("parent"):
                return m["id"]
        return ids[0]

    # -- public API --------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._name

    def require_adapter(self, name: str) -> None:
        if name != BASE and name not in self.adapters:
            known = ", ".join([BASE, *self.adapters])
            raise NotFoundError(f"adapter {name!r} is not loaded (loaded: {known}); start with "
                                f"--adapter {name}=PATH (or {name}={SERVER_PREFIX}MODEL for a model the server "
                                f"serves) or pick one of those")

    def load_adapter(self, name: str, path: str) -> None:
        """Map ``name`` to a model the server serves (``server:MODEL``), or ask the server to load
        a PEFT folder under ``name`` (vLLM's runtime LoRA loading). A failure changes nothing."""
        if name == BASE or not name:
            raise RequestError(f"adapter name {name!r} is reserved: pick another name")
        path = str(path)
        if path.startswith(SERVER_PREFIX):
            target = path[len(SERVER_PREFIX):]
            ids = [m["id"] for m in self._list_models()]
            if target not in ids:
                raise RequestError(f"could not load adapter {name!r}: the model server does not serve {target!r} "
                                   f"(it serves: {', '.join(ids)})")
            with self._lock:
                self.adapters[name], self._served[name] = path, target
            return
        from bot.models import validate_adapter_dir

        folder = validate_adapter_dir(path)
        if name in self._loaded_here:  # vLLM refuses to load a name twice: reload = unload + load
            self._post("/unload_lora_adapter", {"lora_name": name}, quiet=True)
        response = self._post("/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})
        if response is None or response.status_code in (404, 405):
            raise RequestError(
                f"could not load adapter {name!r}: the model server at {self.base_url} cannot load adapters at run "
                f"time (vLLM: start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or with --lora-modules "
                f"{name}={folder}); for an adapter it already serves, give --adapter {name}={SERVER_PREFIX}MODEL")
        if response.status_code >= 400:
            raise RequestError(f"could not load adapter {name!r} into the model server: {_describe(response)}")
        with self._lock:
            self.adapters[name], self._served[name] = str(folder), name
            self._loaded_here.add(name)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self.adapters:
                raise NotFoundError(f"adapter {name!r} is not loaded")
            self.adapters.pop(name)
            self._served.pop(name, None)
            ours = name in self._loaded_here
            self._loaded_here.discard(name)
        if ours:
            self._post("/unload_lora_adapter", {"lora_name": name}, quiet=True)

    def health(self) -> dict[str, Any]:
        """The server's reachability as last seen (refreshed in the background at most every 2 s,
        so /health never waits on a slow server), and this side's queue."""
        if time.monotonic() - self._heartbeat > 2.0 and not self._probing and not self._closed.is_set():
            self._probing = True
            threading.Thread(target=self._probe, name="parley-openai-probe", daemon=True).start()
        with self._lock:
            return {"ok": self._reachable and not self._closed.is_set(), "backend": self.backend,
                    "worker_alive": self._reachable, "closed": self._closed.is_set(),
                    "queue_depth": self._waiting, "queue_size": self.queue_size, "active_rows": self._in_flight,
                    "max_batch_size": self.max_batch_size, "adapters": sorted(self.adapters),
                    "retiring_adapters": 0, "errors": self._errors,
                    "last_error": dict(self._last_error) if self._last_error else None,
                    "last_step_age_s": round(time.monotonic() - self._heartbeat, 3), "steps": self._steps,
                    "base_url": self.base_url, "server_model": self.server_model}

    def _probe(self) -> None:
        try:
            response = self._client.get(self.base_url + "/models", timeout=2.0)
            self._reachable = response.status_code < 500
        except httpx.HTTPError:
            self._reachable = False
        finally:
            self._heartbeat = time.monotonic()
            self._probing = False

    def prompt_ids(self, messages: list[Message], max_new_tokens: int, tools: list[dict] | None = None) -> list[int]:
        return self._fit(messages, max_new_tokens, tools)[1]

    def _fit(self, messages, max_new_tokens, tools):
        budget = self.context_window - max_new_tokens
        if budget < 16:
            raise RequestError(f"max_tokens={max_new_tokens} leaves no room for the prompt in the "
                               f"{self.context_window}-token context window: ask for fewer tokens")
        return fit_to_context(self.tokenizer, messages, budget, tools=tools)

    def clamp(self, params: GenerationParams) -> GenerationParams:
        if params.max_new_tokens > self.max_new_tokens_cap:
            return replace(params, max_new_tokens=self.max_new_tokens_cap)
        return params

    def stream(self, messages: list[Message] | None = None, params: GenerationParams | None = None, *,
               prompt_ids: Sequence[int] | None = None, adapter: str = BASE,
               cancel: threading.Event | None = None, tools: list[dict] | None = None) -> Iterator[Event]:
        """Generate with the server, streaming events; the contract of ``Engine.stream``."""
        params = self.clamp(params or GenerationParams())
        adapter = adapter or BASE
        self.require_adapter(adapter)
        if self._closed.is_set():
            raise GenerationError("the engine has stopped; restart Parley")
        model = self.server_model if adapter == BASE else self._served[adapter]
        body: dict[str, Any] = {"model": model, "stream": True, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "top_p": params.top_p,
                                "stream_options": {"include_usage": True}}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.top_k:
            body["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            body[self._penalty_name] = params.repetition_penalty
        if prompt_ids is None:
            if messages is None:
                raise RequestError("give messages or prompt_ids")
            kept, ids = self._fit(messages, params.max_new_tokens, tools)
            body["messages"] = [_wire_message(m) for m in kept]
            if tools:
                body["tools"] = tools
            path, prompt_tokens = "/chat/completions", len(ids)
        else:
            ids = list(prompt_ids)
            if len(ids) + params.max_new_tokens > self.context_window:
                raise RequestError(f"the prompt is {len(ids)} tokens; with max_tokens={params.max_new_tokens} "
                                   f"it exceeds the {self.context_window}-token context window")
            body["prompt"] = ids
            path, prompt_tokens = "/completions", len(ids)
        request = _Remote(id=uuid.uuid4().hex, body=body, path=path, params=params, prompt_tokens=prompt_tokens,
                          cancel=cancel or threading.Event(), deadline=time.perf_counter() + self.max_time_s)
        with self._lock:
            if self._in_flight < self.max_batch_size:
                self._in_flight += 1
            elif self._waiting < self.queue_size:
                self._waiting += 1
                request.waiting = True
            else:
                raise BusyError("the server is busy (queue full): try again in a moment")
            self._open.add(request)
        threading.Thread(target=self._run_request, args=(request,), name="parley-openai", daemon=True).start()
        events = self._events(request)
        weakref.finalize(events, self._hang_up, request)
        return events

    def generate(self, messages: list[Message], params: GenerationParams | None = None, **kwargs) -> tuple[str, Done]:
        from bot.events import join_text

        return join_text(self.stream(messages, params, **kwargs))

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            open_now = list(self._open)
            self._slot_free.notify_all()
        for request in open_now:
            self._hang_up(request)
        self._client.close()

    # -- consumer side -----------------------------------------------------------------------------
    def _events(self, request: _Remote) -> Iterator[Event]:
        try:
            while True:
                try:
                    event = request.out.get(timeout=0.25)
                except queue.Empty:
                    if request.cancel.is_set():
                        self._hang_up(request)
                        now = time.perf_counter()
                        request.cancelled_at = request.cancelled_at or now
                        if now - request.cancelled_at > 0.5:
                            # Still waiting for the server's first byte (its socket cannot be shut
                            # yet): answer now; the reader hangs up when the server answers.
                            self._finish(request, "cancelled")
                    elif time.perf_counter() > request.deadline + 0.25 and not request.timed_out:
                        # The server is silent past the time cap: end the reply as `length`.
                        request.timed_out = True
                        self._shut(request)
                    continue
                yield event
                if isinstance(event, Done):
                    return
        finally:
            self._hang_up(request)

    def _hang_up(self, request: _Remote) -> None:
        """Cancel a request and shut its HTTP stream, which unblocks its reader at once."""
        request.cancel.set()
        self._shut(request)

    def _shut(self, request: _Remote) -> None:
        response = request.response
        if response is None:
            return
        stream = response.extensions.get("network_stream")
        try:
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- reader side -------------------------------------------------------------------------------
    def _run_request(self, request: _Remote) -> None:
        try:
            if request.waiting and not self._wait_for_slot(request):
                self._finish(request, "cancelled")
                return
            self._attempts(request)
        except ParleyError as exc:
            if request.timed_out and not request.cancel.is_set():
                self._emit(request, final=True)
                self._finish(request, "length")
            elif request.cancel.is_set():
                self._finish(request, "cancelled")
            else:
                self._note_error(exc)
                self._finish(request, "error", error=str(exc), status=exc.status)
        except Exception as exc:  # a bug here must not leave the consumer waiting
            log.exception("openai backend: request failed")
            self._note_error(exc)
            self._finish(request, "error", error=f"generation failed: {type(exc).__name__}", status=500)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._open.discard(request)
                self._slot_free.notify()
            if not request.finished:
                self._finish(request, "error", error="the request ended without an answer", status=500)

    def _wait_for_slot(self, request: _Remote) -> bool:
        with self._lock:
            while self._in_flight >= self.max_batch_size:
                if request.cancel.is_set() or self._closed.is_set():
                    self._waiting -= 1
                    self._in_flight += 1  # the finally in _run_request gives it back
                    return False
                self._slot_free.wait(timeout=0.1)
            self._waiting -= 1
            self._in_flight += 1
            request.waiting = False
        return True

    def _attempts(self, request: _Remote) -> None:
        url = self.base_url + request.path
        for attempt in range(self.retries + 1):
            if request.cancel.is_set():
                self._finish(request, "cancelled")
                return
            if time.perf_counter() > request.deadline:
                self._finish(request, "length")
                return
            delay: float | None = None
            try:
                timeout = httpx.Timeout(self.read_timeout_s, connect=self._client.timeout.connect)
                with self._client.stream("POST", url, json=request.body, timeout=timeout) as response:
                    request.response = response
                    if request.cancel.is_set():
                        self._finish(request, "cancelled")
                        return
                    if response.status_code in (429, 503) and attempt < self.retries:
                        delay = _retry_after(response) or self.backoff_s * 2 ** attempt
                        response.read()
                    elif response.status_code >= 400:
                        response.read()
                        raise _error_for(response, self.base_url)
                    else:
                        self._reachable = True
                        self._read_stream(request, response)
                        return
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                self._reachable = False
                if attempt >= self.retries:
                    raise UpstreamError(f"could not reach the model server at {self.base_url} after "
                                        f"{attempt + 1} tries ({type(exc).__name__}): is it running?") from None
                delay = self.backoff_s * 2 ** attempt
            except httpx.TimeoutException:
                if request.timed_out:
                    raise UpstreamError("the time cap passed") from None
                raise UpstreamError(f"the model server at {self.base_url} sent nothing for {self.read_timeout_s:g} s "
                                    f"(read timeout): it may be overloaded") from None
            except (httpx.TransportError, httpx.StreamError) as exc:
                if request.cancel.is_set():
                    self._finish(request, "cancelled")
                    return
                if request.timed_out:
                    self._emit(request, final=True)
                    self._finish(request, "length")
                    return
                if request.chunks or attempt >= self.retries:
                    raise UpstreamError(f"the model server at {self.base_url} dropped the connection "
                                        f"{'mid-reply' if request.chunks else 'before answering'} "
                                        f"({type(exc).__name__})") from None
                delay = self.backoff_s * 2 ** attempt
            finally:
                request.response = None
            # Wait before the next try, but never past the time cap, and stop at once on cancel.
            wait = min(delay or 0.0, self.max_backoff_s, max(0.0, request.deadline - time.perf_counter()))
            log.info("model server busy or unreachable; retrying in %.2f s", wait)
            if request.cancel.wait(wait):
                self._finish(request, "cancelled")
                return
        raise BusyError(f"the model server at {self.base_url} is busy (HTTP 429/503 after {self.retries + 1} tries): "
                        f"try again in a moment")

    def _read_stream(self, request: _Remote, response: httpx.Response) -> None:
        content_type = response.headers.get("content-type", "")
        if "text/event-stream" not in content_type:
            raw = response.read()[:160]
            raise UpstreamError(f"the model server at {self.base_url} did not stream (Content-Type "
                                f"{content_type or 'missing'}; it sent {raw!r}): is --base-url an OpenAI-compatible API?")
        finish: str | None = None
        done_marker = False
        for line in response.iter_lines():
            if request.cancel.is_set():
                self._finish(request, "cancelled")
                return
            if time.perf_counter() > request.deadline:
                self._emit(request, final=True)
                self._finish(request, "length")
                return
            if not line or line.startswith(":") or line.startswith(("event:", "id:", "retry:")):
                continue
            if not line.startswith("data:"):
                raise UpstreamError(f"the model server at {self.base_url} sent a line that is not server-sent "
                                    f"events: {line[:120]!r}")
            data = line[5:].strip()
            if data == "[DONE]":
                done_marker = True
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                raise UpstreamError(f"the model server at {self.base_url} sent a chunk that is not JSON: "
                                    f"{data[:120]!r}") from None
            if not isinstance(chunk, dict):
                raise UpstreamError(f"the model server at {self.base_url} sent a chunk that is not an object: "
                                    f"{data[:120]!r}")
            if chunk.get("error"):
                raise UpstreamError(f"the model server at {self.base_url} failed mid-reply: {_message(chunk)}")
            self._steps += 1
            self._heartbeat = time.monotonic()
            if isinstance(chunk.get("usage"), dict):
                request.usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
                piece = delta.get("content") if delta else choice.get("text")
                for call in delta.get("tool_calls") or []:
                    slot = request.tool_calls.setdefault(int(call.get("index", 0)), {"name": "", "arguments": ""})
                    fn = call.get("function") or {}
                    slot["name"] += fn.get("name") or ""
                    slot["arguments"] += fn.get("arguments") or ""
                if isinstance(piece, str) and piece:
                    if request.first_token_at is None:
                        request.first_token_at = time.perf_counter()
                    request.chunks += 1
                    request.text += piece
                    if self._emit(request, final=False):
                        self._finish(request, "stop")  # closing the stream tells the server to stop
                        return
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        if not done_marker and finish is None:
            raise UpstreamError(f"the model server at {self.base_url} ended the stream mid-reply "
                                f"(no finish reason, no [DONE])")
        if request.tool_calls:  # native tool calls come back as the text a tool-calling template writes
            for i in sorted(request.tool_calls):
                call = request.tool_calls[i]
                try:
                    arguments: Any = json.loads(call["arguments"] or "{}")
                except json.JSONDecodeError:
                    arguments = call["arguments"]
                request.text += "<tool_call>" + json.dumps({"name": call["name"], "arguments": arguments}) + "</tool_call>"
        if self._emit(request, final=True):
            self._finish(request, "stop")
            return
        self._finish(request, "length" if finish == "length" else "stop")

    def _emit(self, request: _Remote, *, final: bool) -> bool:
        """Send the text that is safe to send (stop strings held back); True when one was reached."""
        safe, stopped = stop_boundary(request.text, request.emitted, request.params.stop, final=final)
        if safe > request.emitted:
            request.out.put(TextDelta(request.text[request.emitted:safe]))
            request.emitted = safe
        return stopped

    def _finish(self, request: _Remote, reason: str, *, error: str | None = None, status: int | None = None) -> None:
        with request.lock:
            if request.finished:
                return
            request.finished = True
        usage = request.usage or {}
        now = time.perf_counter()
        out = Usage(prompt_tokens=int(usage.get("prompt_tokens") or request.prompt_tokens),
                    completion_tokens=int(usage.get("completion_tokens") or request.chunks),
                    time_to_first_token_s=(request.first_token_at - request.submitted) if request.first_token_at else None,
                    total_time_s=now - request.submitted)
        request.out.put(Done(finish_reason=reason, usage=out, error=error,  # type: ignore[arg-type]
                             status=status or (500 if reason == "error" else 200)))

    def _note_error(self, exc: Exception) -> None:
        with self._lock:
            self._errors += 1
            self._last_error = {"where": "server", "type": type(exc).__name__, "at": time.time(), "requests": 1}

    def _post(self, path: str, body: dict[str, Any], *, quiet: bool = False) -> httpx.Response | None:
        try:
            return self._client.post(self.base_url + path, json=body, timeout=60.0)
        except httpx.HTTPError as exc:
            if not quiet:
                raise RequestError(f"could not reach the model server at {self.base_url}: {exc}") from None
            return None


def _normalize_url(url: str) -> str:
    parsed = urlparse(url or "")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"base_url={url!r}: give the server's OpenAI API URL, e.g. http://127.0.0.1:8000/v1")
    url = url.rstrip("/")
    return url if parsed.path.strip("/") else url + "/v1"


def _is_adapter_of(model: dict[str, Any], base: str) -> bool:
    if (model.get("parley") or {}).get("kind") == "adapter":
        return True
    parent = model.get("parent")
    return parent is None or parent == base  # vLLM: a LoRA's parent is its base; other servers list peers


def _wire_message(message: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face chat templates take tool-call arguments as dicts; the OpenAI wire wants JSON text."""
    if not message.get("tool_calls"):
        return message
    out = dict(message)
    calls = []
    for call in message["tool_calls"]:
        call = dict(call)
        fn = dict(call.get("function") or {})
        if not isinstance(fn.get("arguments"), str):
            fn["arguments"] = json.dumps(fn.get("arguments") or {})
        call["function"] = fn
        call.setdefault("type", "function")
        calls.append(call)
    out["tool_calls"] = calls
    return out


def _message(payload: Any) -> str:
    if isinstance(payload, dict):
        err = payload.get("error", payload.get("detail", payload.get("message")))
        if isinstance(err, dict):
            return str(err.get("message") or err)[:300]
        if err:
            return str(err)[:300]
    return str(payload)[:300]


def _describe(response: httpx.Response) -> str:
    try:
        text = _message(response.json())
    except Exception:
        text = response.text[:200].strip() or "(no body)"
    return f"HTTP {response.status_code}: {text}"


def _fix_for(status: int) -> str:
    if status in (401, 403):
        return " (check --backend-api-key)"
    if status == 404:
        return " (check --base-url: it should end in the API's /v1)"
    return ""


def _error_for(response: httpx.Response, base_url: str) -> ParleyError:
    status, what = response.status_code, _describe(response)
    if status in (400, 422):
        return RequestError(f"the model server refused the request ({what})")
    if status == 413:
        return RequestError(f"the model server says the request is too large ({what}): send less")
    if status in (429, 503):
        return BusyError(f"the model server at {base_url} is busy ({what}): try again in a moment")
    if status in (401, 403):
        return UpstreamError(f"the model server at {base_url} refused Parley's key ({what}): check --backend-api-key")
    if status == 404:
        return UpstreamError(f"the model server at {base_url} does not know the model or route ({what}): check "
                             f"--model and --base-url (it should end in /v1)")
    if status in (408, 504):
        return UpstreamError(f"the model server at {base_url} timed out ({what})")
    return UpstreamError(f"the model server at {base_url} failed ({what})")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
