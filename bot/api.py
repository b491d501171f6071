"""The HTTP face of Parley: an OpenAI-compatible /v1 API, /health, and the Gradio chat at /.

Requests are normalized once here (``parse_chat_request``) and then go through the same
``Assistant.respond`` as every other front end. A dropped stream cancels generation: the event
loop notices the disconnect, sets the turn's cancel flag, and the engine stops within a step.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bot import api_schema
from bot.api_schema import json_body
from bot.assistant import TurnOptions
from bot.engine import BASE, GenerationParams
from bot.errors import NotFoundError, ParleyError, RequestError, TooLargeError, UnsupportedMediaError
from bot.events import Done, Event, TextDelta, ToolFinished, ToolStarted
from bot.owners import Identity, UnauthorizedError
from bot.runtime import Runtime

log = logging.getLogger(__name__)

MAX_TRAIN_STEPS = 10_000
"""Most steps a training job started over the API may run (a typo must not book the machine for days)."""

KNOWN_FIELDS = {
    "model", "messages", "stream", "stream_options", "temperature", "top_p", "top_k", "max_tokens",
    "max_completion_tokens", "stop", "seed", "repetition_penalty", "frequency_penalty", "presence_penalty",
    "n", "user", "tools", "tool_choice", "parallel_tool_calls", "response_format", "logprobs",
    "metadata", "store", "adapter", "conversation_id", "parley",
}


def host_name(header: str) -> str:
    """The name in a Host header, without the port ('[::1]:7860' -> '::1')."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_host_names(settings) -> set[str] | None:
    """The Host names a server bound to loopback answers to (None: any, for a public bind, where
    auth is required anyway and the names are not known in advance)."""
    extra = {h.strip().lower() for h in settings.allowed_hosts.split(",") if h.strip()}
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not extra:
        return None
    return {"127.0.0.1", "localhost", "::1", settings.host.lower()} | extra


def is_upload(request: Request) -> bool:
    """A multipart document upload (bot/api_documents.py bounds its size itself, per file)."""
    return (request.method == "POST" and request.url.path.startswith("/v1/collections/")
            and request.headers.get("content-type", "").startswith("multipart/form-data"))


def identity_of(request: Request) -> Identity:
    """Who sent this /v1 request (set by the auth middleware for every /v1 route)."""
    return request.state.identity


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape, so SDKs show the message."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    options: TurnOptions
    stream: bool
    include_usage: bool
    model: str


def parse_chat_request(body: Any, runtime: Runtime) -> ChatRequest:
    """Validate a /v1/chat/completions body; RequestError names the field and the fix."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}: see /docs for the accepted fields")
    if body.get("n", 1) != 1:
        raise RequestError("n must be 1: Parley returns one choice per request")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {'role', 'content'} objects")
    model = body.get("model") or BASE
    if not isinstance(model, str):
        raise RequestError("model must be a string: 'base', an adapter name, or the model name")
    # `model` names an adapter (how OpenAI clients pick one) unless it names the base model.
    if body.get("adapter") is not None and not isinstance(body["adapter"], str):
        raise RequestError("adapter must be a string: an adapter name from GET /v1/models, or 'base'")
    adapter = body.get("adapter") or (BASE if model in (BASE, runtime.engine.model_name) else model)
    if not isinstance(adapter, str):
        raise RequestError("adapter must be a string: an adapter name from GET /v1/models, or 'base'")
    runtime.engine.require_adapter(adapter)
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)):
        raise RequestError("stop must be a string or a list of strings")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or runtime.settings.max_new_tokens

    def number(name, default, kind=float):
        value = body.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RequestError(f"{name} must be a finite number, not {str(value)[:40]!r}")
        if kind is int and value != int(value):
            raise RequestError(f"{name} must be a whole number, not {value!r}")
        return kind(value)

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise RequestError(f"max_tokens must be a whole number, not {str(max_tokens)[:40]!r}")
    if not all(isinstance(s, str) for s in stop):
        raise RequestError("stop must be a string or a list of strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise RequestError(f"seed must be a whole number from 0 to 2**63-1, not {str(seed)[:40]!r}")
    params = GenerationParams(
        max_new_tokens=max_tokens,
        temperature=number("temperature", 0.7), top_p=number("top_p", 1.0), top_k=number("top_k", 0, int),
        repetition_penalty=number("repetition_penalty", 1.0), seed=seed,
        stop=tuple(stop))
    extra = body.get("parley") or {}
    if not isinstance(extra, dict):
        raise RequestError("parley must be an object, e.g. {\"tools\": [\"search\"], \"index\": \"default\"}")
    tools = extra.get("tools")
    collections = extra.get("collections", [extra["index"]] if "index" in extra else ["default"])
    if isinstance(collections, str):
        collections = [collections]
    if not isinstance(collections, list) or not all(isinstance(c, str) for c in collections):
        raise RequestError("parley.collections must be a list of collection names, e.g. [\"default\", \"manuals\"]")
    options = TurnOptions(params=runtime.engine.clamp(params), adapter=adapter,
                          tools=tuple(tools) if isinstance(tools, list) else None,
                          always_search=bool(extra.get("always_search", False)),
                          collections=tuple(collections), source="api")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("stream_options must be an object, e.g. {\"include_usage\": true}")
    conversation_id = body.get("conversation_id")
    if conversation_id is not None and not isinstance(conversation_id, str):
        raise RequestError("conversation_id must be a string from GET /v1/conversations")
    options.conversation_id = conversation_id
    return ChatRequest(messages=messages, options=options, stream=bool(body.get("stream", False)),
                       include_usage=bool(stream_options.get("include_usage", False)), model=model)


def validate_client_tools(tools: Any, tokenizer) -> list[dict[str, Any]]:
    """Client-supplied OpenAI tools: checked, and refused clearly when the model cannot call tools."""
    from bot.tools.native import supports_native_tools

    if not isinstance(tools, list) or not tools:
        raise RequestError("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                               f"\"parameters\": {{...}}}}}}")
    if not supports_native_tools(tokenizer):
        raise RequestError("this model's chat template has no tool support, so client tools cannot be offered "
                           "to it: use a model that calls tools (e.g. Qwen2.5 or Llama 3.x). Parley's own tools "
                           "(search, translate, sentiment) still run server-side without `tools`.")
    return tools


def hf_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI sends tool-call arguments as JSON strings; Hugging Face chat templates want dicts."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = dict(call.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"] or "{}")
                    except json.JSONDecodeError:
                        raise RequestError(f"tool call {fn.get('name')!r} has arguments that are not JSON") from None
                calls.append({**call, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out


def openai_tool_calls(text: str) -> tuple[list[dict[str, Any]], str]:
    """Parse the model's tool calls into OpenAI's shape; returns (calls, remaining text)."""
    from bot.tools.native import parse_tool_calls

    parsed, rest = parse_tool_calls(text)
    calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
              "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
             for c in parsed if getattr(c, "name", None) and not getattr(c, "error", None)]
    return calls, (rest if calls else text)


def _usage(done: Done) -> dict[str, Any]:
    u = done.usage.to_dict()
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["total_tokens"]}


def _finish(done: Done) -> str:
    # OpenAI knows stop/length; a cancelled or failed turn ends as "stop" with Parley's reason aside.
    return "length" if done.finish_reason == "length" else "stop"


def _parley_extra(done: Done, steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {"turn_id": done.turn_id, "finish_reason": done.finish_reason, "error": done.error,
            "sources": list(done.sources), "tool_steps": steps, "timings": done.usage.to_dict()}


def _step(event: Event) -> dict[str, Any]:
    if isinstance(event, ToolStarted):
        return {"type": "tool_started", "name": event.name, "arguments": event.arguments, "id": event.call_id}
    return {"type": "tool_finished", "name": event.name, "ok": event.ok, "summary": event.summary,
            "id": event.call_id}


class Guard:
    """Host check, identity and body-size limit for every request (a pure ASGI middleware).

    Why not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware hides the client's
    disconnect from non-streaming endpoints, so a request whose client hung up kept generating
    (and holding a queue slot) to the end.
    """

    def __init__(self, app, *, access, allowed_hosts: set[str] | None, max_request_bytes: int):
        self.app, self.access, self.allowed_hosts, self.max_request_bytes = app, access, allowed_hosts, max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        response = self.check(Request(scope), scope)
        if response is not None:
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, request: Request, scope) -> JSONResponse | None:
        if self.allowed_hosts is not None and host_name(request.headers.get("host", "")) not in self.allowed_hosts:
            # DNS rebinding: a page on evil.example that resolves to 127.0.0.1 still sends its own Host.
            return error_response(400, "unknown Host header: this server answers to "
                                       f"{', '.join(sorted(self.allowed_hosts))}; add yours with --allowed-hosts")
        if not request.url.path.startswith("/v1"):
            return None
        try:
            # Who is asking: every /v1 handler reads request.state.identity (bot/owners.py).
            scope.setdefault("state", {})["identity"] = self.access.api_identity(request.headers.get("authorization"))
        except UnauthorizedError as exc:
            return error_response(401, str(exc), "authentication_error", {"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        # Document uploads stream to disk under their own limit (max_upload_bytes), checked there.
        if length is not None and not is_upload(request):
            try:
                too_big = int(length) > self.max_request_bytes
            except ValueError:
                return error_response(400, "invalid Content-Length header")
            if too_big:
                return error_response(413, f"the request body is over {self.max_request_bytes} bytes: "
                                           f"send a shorter conversation")
        return None


async def _cancel_on_disconnect(request: Request, cancel: threading.Event, every_s: float = 0.25) -> None:
    """A non-streaming client that hangs up stops its generation (and frees its queue slot) too."""
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(every_s)


class TurnThreads:
    """The threads that step turns' blocking event generators for async code.

    Why not ``asyncio.to_thread``: its default pool has min(32, cores + 4) threads (6 here); a
    request waiting for a batch slot holds one for as long as it waits, so a full batch plus a few
    waiting requests took every thread and even the instant "queue full" answer, /health and
    uploads stalled behind them. This pool has a thread for every turn the engine can hold
    (batch + queue), and blocking work that is not a turn (store, files) keeps the default pool.
    """

    def __init__(self, size: int):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="parley-turn")

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def iterate(self, events: Iterator[Event], cancel: threading.Event) -> AsyncIterator[Event]:
        """Iterate a blocking event generator without blocking the event loop; closing it cancels."""
        sentinel = object()
        try:
            while True:
                event = await self.run(next, events, sentinel)
                if event is sentinel:
                    return
                yield event
        finally:
            cancel.set()
            await self.run(events.close)


def create_app(runtime: Runtime, *, with_ui: bool = True) -> FastAPI:
    settings = runtime.settings
    app = FastAPI(title="Parley", version="0.1.0",
                  description="OpenAI-compatible chat API of Parley, a chat assistant you can train.")
    app.state.runtime = runtime
    started_at = time.time()
    turns = TurnThreads(settings.max_batch_size + settings.queue_size + 4)
    _aiter = turns.iterate

    access = runtime.access

    app.add_middleware(Guard, access=access, allowed_hosts=allowed_host_names(settings),
                       max_request_bytes=settings.max_request_bytes)

    async def read_json(request: Request) -> Any:
        # Only application/json: a web page can POST text/plain or a form to a localhost server
        # without a CORS preflight (CSRF); JSON bodies need one, which this server never grants.
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise UnsupportedMediaError(f"send the body as JSON with 'Content-Type: application/json' "
                                        f"(got {kind[:60] or 'no Content-Type'})")
        body = bytearray()
        async for chunk in request.stream():  # also bounds chunked bodies without Content-Length
            body += chunk
            if len(body) > settings.max_request_bytes:
                raise TooLargeError(f"the request body is over {settings.max_request_bytes} bytes: "
                                    f"send a shorter conversation")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON: {exc}") from None

    @app.exception_handler(ParleyError)
    async def parley_error(request: Request, exc: ParleyError):
        status = getattr(exc, "status", 500)
        if status >= 500:
            log.error("request failed: %s", exc)
        return error_response(status, str(exc), "invalid_request_error" if status < 500 else "server_error",
                              {"Retry-After": "1"} if status == 503 else None)

    @app.get("/health")
    async def health():
        """The engine's real state: 503 when its worker is gone (a load balancer then stops sending)."""
        engine = runtime.engine.health()
        body = {"status": "ok" if engine["ok"] else "unavailable", "model": runtime.engine.model_name,
                "adapters": engine["adapters"], "uptime_s": round(time.time() - started_at, 1),
                "engine": {k: engine[k] for k in ("worker_alive", "queue_depth", "queue_size", "active_rows",
                                                  "max_batch_size", "errors", "last_error", "last_step_age_s")}}
        return body if engine["ok"] else JSONResponse(body, status_code=503)

    @app.get("/v1/models")
    async def models():
        names = [runtime.engine.model_name, *sorted(runtime.engine.adapters)]
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": int(started_at), "owned_by": "parley",
             "parley": {"kind": "base" if i == 0 else "adapter"}} for i, name in enumerate(names)]}

    async def client_tool_completion(body: dict[str, Any], req: ChatRequest):
        """Client tools pass through as native tool calls: the client runs them, not Parley."""
        from bot.chat import normalize_messages, with_system_prompt

        tools = validate_client_tools(body["tools"], runtime.engine.tokenizer)
        messages = with_system_prompt(hf_tool_messages(normalize_messages(req.messages)), runtime.settings.system_prompt)
        runtime.engine.prompt_ids(messages, req.options.params.max_new_tokens, tools)  # 4xx if it cannot fit
        cancel = threading.Event()
        events = runtime.engine.stream(messages, req.options.params, adapter=req.options.adapter, cancel=cancel,
                                       tools=tools)
        text, done = [], None
        async for event in _aiter(events, cancel):
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, Done):
                done = event
        if done is None or done.finish_reason == "error":
            return error_response(500, (done and done.error) or "generation failed", "server_error")
        calls, content = openai_tool_calls("".join(text))
        message = {"role": "assistant", "content": content or None}
        finish = "tool_calls" if calls else _finish(done)
        if calls:
            message["tool_calls"] = calls
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": _usage(done)}

        def whole() -> Iterator[str]:  # the reply is complete already: send it as one delta
            base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": req.model}
            delta = {"role": "assistant", "content": message["content"] or ""}
            if calls:
                delta["tool_calls"] = [{**c, "index": i} for i, c in enumerate(calls)]
            yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': delta, 'finish_reason': None}]})}\n\n"
            yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': {}, 'finish_reason': finish}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(whole(), media_type="text/event-stream")

    @app.post("/v1/chat/completions", openapi_extra=json_body(api_schema.CHAT))
    async def chat_completions(request: Request):
        body = await read_json(request)
        req = parse_chat_request(body, runtime)
        if body.get("tools"):
            return await client_tool_completion(body, req)
        owner = identity_of(request).owner
        req.options.owner = owner
        cancel = threading.Event()
        # Validation renders and trims the whole conversation: a thread, not the event loop.
        # It runs before anything is stored, so a bad request leaves no orphan conversation.
        events = await turns.run(partial(runtime.assistant.respond, req.messages, req.options, cancel=cancel))
        if req.options.conversation_id:  # continue one of your own conversations (404 otherwise)
            await asyncio.to_thread(runtime.store.get_conversation, req.options.conversation_id, owner)
            req.options.new_messages = 1
        else:
            req.options.conversation_id = await asyncio.to_thread(runtime.store.create_conversation, owner=owner,
                                                                  source="api")
            req.options.new_messages = len(req.messages)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if not req.stream:
            text, steps, done = [], [], None
            watcher = asyncio.create_task(_cancel_on_disconnect(request, cancel))
            try:
                async for event in _aiter(events, cancel):
                    if isinstance(event, TextDelta):
                        text.append(event.text)
                    elif isinstance(event, (ToolStarted, ToolFinished)):
                        steps.append(_step(event))
                    elif isinstance(event, Done):
                        done = event
            finally:
                watcher.cancel()
            if done is None:  # the turn's stream ended without its final event
                return error_response(500, "generation ended unexpectedly; see the server log", "server_error")
            if done.finish_reason == "error":
                status = done.status if done.status >= 400 else 500
                return error_response(status, done.error or "generation failed",
                                      "invalid_request_error" if status < 500 else "server_error",
                                      {"Retry-After": "1"} if status == 503 else None)
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                 "finish_reason": _finish(done)}],
                    "usage": _usage(done), "parley": _parley_extra(done, steps)}

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra) -> str:
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                       "model": req.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(payload)}\n\n"

        # Wait for the first event before sending headers, so a turn refused at admission (server
        # busy, a tool-less failure) gets a real HTTP status instead of an error inside a 200 stream.
        stream_events = _aiter(events, cancel)
        first = await anext(stream_events, None)
        if isinstance(first, Done) and first.finish_reason == "error":
            await stream_events.aclose()
            status = first.status if first.status >= 400 else 500
            return error_response(status, first.error or "generation failed",
                                  "invalid_request_error" if status < 500 else "server_error",
                                  {"Retry-After": "1"} if status == 503 else None)

        async def replay_first() -> AsyncIterator[Event]:
            if first is not None:
                yield first
            async for event in stream_events:
                yield event

        async def sse() -> AsyncIterator[str]:
            try:
                async for line in sse_lines():
                    yield line
            finally:  # the client went away or the stream ended: stop generating either way
                cancel.set()
                await stream_events.aclose()

        async def sse_lines() -> AsyncIterator[str]:
            steps: list[dict[str, Any]] = []
            yield chunk({"role": "assistant", "content": ""})
            async for event in replay_first():
                if await request.is_disconnected():
                    cancel.set()
                    return
                if isinstance(event, TextDelta):
                    yield chunk({"content": event.text})
                elif isinstance(event, (ToolStarted, ToolFinished)):
                    steps.append(_step(event))
                    yield f": parley {json.dumps(_step(event))}\n\n"  # an SSE comment: clients ignore it
                elif isinstance(event, Done):
                    if event.finish_reason == "error":
                        yield f"data: {json.dumps({'error': {'message': event.error, 'type': 'server_error'}})}\n\n"
                    yield chunk({}, _finish(event), parley=_parley_extra(event, steps))
                    if req.include_usage:
                        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                   "model": req.model, "choices": [], "usage": _usage(event)}
                        yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/feedback", openapi_extra=json_body(api_schema.FEEDBACK))
    async def feedback(request: Request):
        """Rate a reply (turn_id from the `parley` field of a completion): the data fine-tuning learns from."""
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("turn_id"), str):
            raise RequestError("send {\"turn_id\": \"...\", \"rating\": 1 or -1, \"correction\": optional text}")
        rating = body.get("rating")
        if rating not in (1, -1) or isinstance(rating, bool):
            raise RequestError("rating must be 1 (good) or -1 (bad)")
        correction = body.get("correction")
        if correction is not None and not isinstance(correction, str):
            raise RequestError("correction must be text")
        fid = await asyncio.to_thread(partial(runtime.store.add_feedback, body["turn_id"], rating,
                                              comment=str(body.get("comment", ""))[:2000], correction=correction,
                                              source="api", owner=identity_of(request).owner))
        return {"id": fid, "turn_id": body["turn_id"], "rating": rating}

    @app.post("/v1/adapters", openapi_extra=json_body(api_schema.ADAPTER))
    async def load_adapter(request: Request):
        """Load (or reload) a LoRA adapter by name and folder; the chat can use it at once."""
        identity_of(request).require_admin("loading an adapter")
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not isinstance(body.get("path"), str):
            raise RequestError("send {\"name\": \"my-adapter\", \"path\": \"/path/to/adapter\"}")
        await asyncio.to_thread(runtime.engine.load_adapter, body["name"], body["path"])
        return {"name": body["name"], "loaded": sorted(runtime.engine.adapters)}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        """Unload an adapter; requests that name it get 404 afterwards."""
        identity_of(request).require_admin("unloading an adapter")
        await asyncio.to_thread(runtime.engine.unload_adapter, name)
        return {"name": name, "loaded": sorted(runtime.engine.adapters)}

    @app.post("/v1/train", status_code=202, openapi_extra=json_body(api_schema.TRAIN))
    async def start_training(request: Request):
        """Fine-tune a LoRA adapter on the chat's feedback; when it finishes the chat can use it."""
        identity_of(request).require_admin("training")
        body = await read_json(request) if int(request.headers.get("content-length") or 0) else {}
        if not isinstance(body, dict):
            raise RequestError("send {\"name\": \"my-adapter\", \"max_steps\": optional number}")
        max_steps = body.get("max_steps")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                      or not 1 <= max_steps <= MAX_TRAIN_STEPS):
            raise RequestError(f"max_steps must be a whole number from 1 to {MAX_TRAIN_STEPS}")
        name = body.get("name")
        if name is not None and not isinstance(name, str):
            raise RequestError("name must be a string: letters, digits, - and _")
        job = runtime.jobs.start_from_feedback(name, max_steps=max_steps)
        return job.to_dict()

    @app.get("/v1/train")
    async def list_training():
        return {"jobs": [job.to_dict() for job in runtime.jobs.jobs.values()]}

    @app.get("/v1/train/{name}")
    async def get_training(name: str):
        job = runtime.jobs.jobs.get(name)
        if job is None:
            raise NotFoundError(f"no training job named {name[:64]!r}")
        return job.to_dict()

    @app.delete("/v1/train/{name}")
    async def cancel_training(name: str, request: Request):
        """Stop a running training job (its adapter is not replaced)."""
        identity_of(request).require_admin("cancelling training")
        if name not in runtime.jobs.jobs:
            raise NotFoundError(f"no training job named {name[:64]!r}")
        runtime.jobs.cancel(name)
        return runtime.jobs.jobs[name].to_dict()

    # -- conversations: each person's own --------------------------------------------------------
    @app.get("/v1/conversations")
    async def list_conversations(request: Request, limit: int = 50):
        """Your conversations, newest first (every front end's: web, API, terminal)."""
        rows = await asyncio.to_thread(partial(runtime.store.list_conversations, max(1, min(limit, 500)),
                                               owner=identity_of(request).owner))
        return {"object": "list", "data": [{k: r[k] for k in ("id", "title", "source", "created_at", "updated_at")}
                                           for r in rows]}

    @app.get("/v1/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str, request: Request):
        """One of your conversations with its turns; someone else's is a 404."""
        owner = identity_of(request).owner
        row = await asyncio.to_thread(runtime.store.get_conversation, conversation_id, owner)
        turns = await asyncio.to_thread(runtime.store.turns, conversation_id, owner)
        return {"id": row["id"], "title": row["title"], "source": row["source"],
                "turns": [{"id": t.id, "seq": t.seq, "messages": t.messages, "reply": t.reply, "adapter": t.adapter,
                           "finish_reason": t.finish_reason, "created_at": t.created_at} for t in turns]}

    @app.delete("/v1/conversations/{conversation_id}")
    async def delete_conversation(conversation_id: str, request: Request):
        """Delete one of your conversations (its turns and their feedback go with it); an admin may
        delete anyone's (e.g. on a person's request to erase their data)."""
        identity = identity_of(request)
        await asyncio.to_thread(runtime.store.delete_conversation, conversation_id,
                                None if identity.admin else identity.owner)
        return {"id": conversation_id, "deleted": True}

    from bot.api_documents import documents_router

    app.include_router(documents_router(runtime))

    if os.environ.get("SLACK_SIGNING_SECRET") and os.environ.get("SLACK_BOT_TOKEN"):
        # Slack's HTTP Events API beside the chat (Socket Mode needs no server: `parley slack`).
        from bot.integrations.slack import mount_slack

        mount_slack(app, runtime.assistant, runtime.store)

    if with_ui:
        import gradio as gr

        from ui.app import build_ui
        from ui.session import install_browser_cookie

        demo = build_ui(runtime)
        install_browser_cookie(app)
        auth = access.check_login if access.login_required else None
        app = gr.mount_gradio_app(app, demo, path="/", auth=auth, show_error=False,
                                  max_file_size=max(settings.max_request_bytes, settings.max_upload_bytes))
    return app


def serve(settings) -> int:
    import uvicorn

    from bot.runtime import build_runtime

    from bot.owners import Access

    Access.from_settings(settings).check_startup()  # before minutes of loading, not after
    runtime = build_runtime(settings)
    app = create_app(runtime)
    if settings.insecure_public and not runtime.access.loopback and not runtime.access.login_required:
        log.warning("serving on %s without auth (--insecure-public): anyone who can reach it can chat; "
                    "admin actions are refused", settings.host)
    print(f"Parley is ready at http://{settings.host}:{settings.port}  (API: /v1, health: /health)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    return 0
