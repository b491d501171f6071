"""OpenAPI request bodies of the /v1 routes that read JSON themselves (``read_json``).

The routes parse their bodies by hand (so every error names the field and the fix); these schemas
document them in /docs and /openapi.json, and let the schema fuzzer (tests/unit/test_api_fuzz.py)
generate real bodies instead of empty ones.
"""

from __future__ import annotations

from typing import Any


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose body is JSON of this schema."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
    "content": {"type": "string"}}}

CHAT = {"type": "object", "required": ["messages"], "properties": {
    "model": {"type": "string"}, "messages": {"type": "array", "items": MESSAGE, "minItems": 1},
    "stream": {"type": "boolean"}, "stream_options": {"type": "object", "properties": {
        "include_usage": {"type": "boolean"}}},
    "temperature": {"type": "number"}, "top_p": {"type": "number"}, "top_k": {"type": "integer"},
    "max_tokens": {"type": "integer"}, "max_completion_tokens": {"type": "integer"},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "seed": {"type": "integer"}, "repetition_penalty": {"type": "number"}, "adapter": {"type": "string"},
    "conversation_id": {"type": "string"},
    "parley": {"type": "object", "properties": {
        "tools": {"type": "array", "items": {"type": "string"}}, "always_search": {"type": "boolean"},
        "collections": {"type": "array", "items": {"type": "string"}}}}}}

FEEDBACK = {"type": "object", "required": ["turn_id", "rating"], "properties": {
    "turn_id": {"type": "string"}, "rating": {"type": "integer", "enum": [1, -1]},
    "correction": {"type": "string"}, "comment": {"type": "string"}}}

ADAPTER = {"type": "object", "required": ["name", "path"], "properties": {
    "name": {"type": "string"}, "path": {"type": "string"}}}

TRAIN = {"type": "object", "properties": {"name": {"type": "string"}, "max_steps": {"type": "integer"}}}
