"""Native tool calling: does a chat template take tools, and what tool calls did the model write?

Two output styles are understood:
* Hermes/Qwen2.5: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (one or more).
* Llama 3.x: the whole reply is a JSON object ``{"name": ..., "parameters": {...}}`` (optionally
  after ``<|python_tag|>``), or a JSON list of them.

Parsing never evaluates anything; a malformed call becomes a ``ParsedCall`` with ``error`` set so
the runner can tell the model what was wrong.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"
MAX_CALLS_PER_MESSAGE = 8


def supports_native_tools(tokenizer) -> bool:
    """True when the tokenizer's chat template uses a ``tools`` variable (Qwen2.5, Llama 3.x, Hermes)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = " ".join(str(t) for t in template.values())
    return bool(template) and re.search(r"\btools\b", template) is not None


@dataclass
class ParsedCall:
    """One tool call as written by the model. ``error`` is set when it could not be read."""

    name: str | None
    arguments: Any = field(default_factory=dict)
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:12])
    error: str | None = None


def _from_obj(obj: Any) -> ParsedCall:
    if not isinstance(obj, dict):
        return ParsedCall(None, {}, error="a tool call must be a JSON object with 'name' and 'arguments'")
    if isinstance(obj.get("function"), dict):  # OpenAI shape {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(name, str) or not name:
        return ParsedCall(None, args, error="the tool call has no 'name'")
    return ParsedCall(name, args)


def _loads(raw: str) -> tuple[Any, str | None]:
    try:
        return json.loads(raw), None
    except json.JSONDecodeError as exc:
        return None, f"the tool call is not valid JSON ({exc.msg} at character {exc.pos})"


def looks_like_tool_call(prefix: str) -> bool | None:
    """While streaming: True if the reply so far starts a tool call, False if it cannot, None if unsure."""
    text = prefix.lstrip()
    if not text:
        return None
    for marker in ("<tool_call>", _PYTHON_TAG):
        if text.startswith(marker):
            return True
        if marker.startswith(text):
            return None
    if text[0] in "{[":
        if len(text) < 12:
            return None
        return bool(re.match(r"^\[?\s*\{\s*\"(name|type|function)\"", text))
    return False


def parse_tool_calls(text: str) -> tuple[list[ParsedCall], str]:
    """(tool calls, the remaining visible text). No calls -> ([], text)."""
    if "<tool_call>" in text:
        calls = []
        for m in list(_HERMES.finditer(text))[:MAX_CALLS_PER_MESSAGE]:
            obj, error = _loads(m.group(1))
            calls.append(ParsedCall(None, {}, error=error) if error else _from_obj(obj))
        rest = _HERMES.sub("", text).strip()
        return calls, rest
    stripped = text.strip()
    if stripped.startswith(_PYTHON_TAG):
        stripped = stripped[len(_PYTHON_TAG):].strip()
    elif not stripped.startswith(("{", "[")):
        return [], text
    if stripped.endswith(("<|eom_id|>", "<|eot_id|>")):
        stripped = stripped.rsplit("<|", 1)[0].strip()
    obj, error = _loads(stripped)
    if error:
        # Only an error if it was clearly meant as a call; otherwise it is just a reply.
        if re.match(r"^\[?\s*\{\s*\"(name|function)\"", stripped):
            return [ParsedCall(None, {}, error=error)], ""
        return [], text
    items = obj if isinstance(obj, list) else [obj]
    if not items or not all(isinstance(i, dict) and ("name" in i or "function" in i) for i in items):
        return [], text
    return [_from_obj(i) for i in items[:MAX_CALLS_PER_MESSAGE]], ""
