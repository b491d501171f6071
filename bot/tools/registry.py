"""Tools are plain typed functions in a registry; each one's JSON schema comes from its signature.

A tool is any callable with annotated parameters and a docstring::

    def sentiment(text: str) -> ToolResult:
        \"\"\"How positive or negative a text is, overall and per sentence.

        Args:
            text: The text to analyse.
        \"\"\"

``ToolRegistry.register`` reads the first docstring paragraph as the description and the
Google-style ``Args:`` section as parameter descriptions. Parameters without a default are
required. Supported annotations: str, int, float, bool, ``X | None``, ``Literal[...]`` and
``list[X]``. The schema has the OpenAI/Hugging Face shape ``{"type": "function", "function":
{"name", "description", "parameters"}}``, which chat templates accept as ``tools=``.

Calls are validated against the schema before anything runs (unknown tool, non-object or
oversized arguments, missing, extra or wrongly typed values), and each call runs with a
timeout. Nothing here ever evaluates text as code.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import threading
import types
import typing
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from bot.errors import ParleyError
from bot.tools.turn import TurnContext, bound_to

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class ToolError(ParleyError):
    """A tool could not do what was asked; the message is safe to show to the user and the model."""

    status = 400


class ToolValidationError(ToolError):
    """A tool call does not match the tool's schema (or names no tool)."""


@dataclass
class ToolResult:
    """What a tool returns.

    text: what the model reads (quoted as data by the runner).
    summary: one short line for people (tool step in the UI, CLI, logs).
    data: structured result for the UI/API (passages, translation, scores); JSON-serializable.
    sources: citable passages, for search-like tools (dicts: n, title, source, page, text, ...).
    """

    text: str
    summary: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Tool:
    """One registered tool: the function, its JSON schema and its limits."""

    name: str
    fn: Callable[..., ToolResult]
    description: str
    parameters: dict[str, Any]
    timeout_s: float = 30.0
    """Wall-time limit of one call; the caller gets a ToolError after it."""
    max_argument_chars: int = 8000
    """Largest accepted size of the arguments, as compact JSON."""

    @property
    def schema(self) -> dict[str, Any]:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


# -- schema from signature + docstring --------------------------------------------------------------
def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """The first paragraph of a docstring, and ``{param: description}`` from its ``Args:`` section."""
    doc = inspect.cleandoc(doc or "")
    if not doc:
        return "", {}
    description = " ".join(doc.split("\n\n", 1)[0].split())
    params: dict[str, str] = {}
    lines = doc.splitlines()
    in_args = False
    current: str | None = None
    for line in lines:
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            in_args, current = True, None
            continue
        if not in_args:
            continue
        if stripped.endswith(":") and not line.startswith((" ", "\t")):  # the next section
            break
        if not stripped:
            current = None
            continue
        m = re.match(r"^\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
        if m and len(line) - len(line.lstrip()) <= 4:
            current = m.group(1)
            params[current] = m.group(2).strip()
        elif current:
            params[current] = (params[current] + " " + stripped).strip()
    return description, params


def _json_type(annotation: Any, where: str) -> tuple[dict[str, Any], bool]:
    """A JSON schema for one annotation, and whether ``None`` is allowed."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{where}: only `X | None` unions are supported, got {annotation!r}")
        schema, _ = _json_type(rest[0], where)
        return schema, True
    if origin is Literal:
        kinds = {type(a) for a in args}
        base = {str: "string", int: "integer", float: "number", bool: "boolean"}[kinds.pop()] if len(kinds) == 1 else None
        schema = {"enum": list(args)}
        if base:
            schema["type"] = base
        return schema, False
    if origin in (list, tuple) or annotation in (list, tuple):
        item = args[0] if args else str
        return {"type": "array", "items": _json_type(item, where)[0]}, False
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if annotation in simple:
        return {"type": simple[annotation]}, False
    raise TypeError(f"{where}: unsupported parameter type {annotation!r}; use str, int, float, bool, "
                    f"Literal, list or X | None")


def schema_from_function(fn: Callable[..., Any], name: str) -> tuple[str, dict[str, Any]]:
    """(description, parameters JSON schema) from ``fn``'s signature and docstring."""
    description, arg_docs = parse_docstring(fn.__doc__)
    if not description:
        raise TypeError(f"tool {name!r} needs a docstring: its first line tells the model what it does")
    hints = typing.get_type_hints(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {name!r}: *args/**kwargs cannot be described by a schema")
        if pname not in hints:
            raise TypeError(f"tool {name!r}: parameter {pname!r} needs a type annotation")
        schema, _nullable = _json_type(hints[pname], f"tool {name!r} parameter {pname!r}")
        if pname in arg_docs:
            schema["description"] = arg_docs[pname]
        if param.default is param.empty:
            required.append(pname)
        elif param.default is not None:
            schema["default"] = param.default
        properties[pname] = schema
    parameters = {"type": "object", "properties": properties, "required": required,
                  "additionalProperties": False}
    return description, parameters


# -- validation -------------------------------------------------------------------------------------
def _check_value(value: Any, schema: dict[str, Any], where: str) -> str | None:
    if value is None:
        return None  # optional parameters accept null (the default is used)
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {schema['enum']}, not {value!r}"
    kind = schema.get("type")
    ok = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        None: lambda v: True,
    }[kind]
    if not ok(value):
        return f"{where} must be a {kind}, not {type(value).__name__}"
    if kind == "array":
        for i, item in enumerate(value):
            problem = _check_value(item, schema.get("items", {}), f"{where}[{i}]")
            if problem:
                return problem
    return None


class ToolRegistry:
    """Named tools with schemas, validation and timeouts. Thread-safe for calls."""

    def __init__(self, *, max_workers: int = 4):
        self._tools: dict[str, Tool] = {}
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="parley-tool")
        self._lock = threading.Lock()

    def register(self, fn: Callable[..., ToolResult], *, name: str | None = None, timeout_s: float = 30.0,
                 max_argument_chars: int = 8000) -> Tool:
        """Add ``fn`` as a tool (named after the function unless ``name``); returns the Tool."""
        name = name or fn.__name__
        if not _NAME.match(name):
            raise TypeError(f"tool name {name!r}: use lowercase letters, digits and _ (starting with a letter)")
        description, parameters = schema_from_function(fn, name)
        tool = Tool(name=name, fn=fn, description=description, parameters=parameters, timeout_s=timeout_s,
                    max_argument_chars=max_argument_chars)
        with self._lock:
            if name in self._tools:
                raise TypeError(f"a tool named {name!r} is already registered")
            self._tools[name] = tool
        return tool

    def tool(self, **options):
        """Decorator form of ``register``."""
        def wrap(fn):
            self.register(fn, **options)
            return fn
        return wrap

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def names(self) -> list[str]:
        return list(self._tools)

    def schemas(self, allowed: typing.Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The JSON schemas of the tools in ``allowed`` (None: all), in registration order."""
        keep = None if allowed is None else set(allowed)
        return [t.schema for n, t in self._tools.items() if keep is None or n in keep]

    def validate(self, name: Any, arguments: Any, allowed: typing.Iterable[str] | None = None) -> dict[str, Any]:
        """Check a call against the schema; return the arguments with defaults filled in.

        ``arguments`` may be a dict or a JSON string (the OpenAI wire format). Raises
        ToolValidationError with a message the model can act on.
        """
        keep = None if allowed is None else set(allowed)
        if not isinstance(name, str) or name not in self._tools or (keep is not None and name not in keep):
            offered = sorted(self._tools if keep is None else keep & set(self._tools))
            shown = name if isinstance(name, str) and len(name) <= 64 else "(invalid name)"
            raise ToolValidationError(f"unknown tool {shown!r}; available: {', '.join(offered) or 'none'}")
        tool = self._tools[name]
        if isinstance(arguments, str):
            if len(arguments) > tool.max_argument_chars:
                raise ToolValidationError(f"{name}: arguments are {len(arguments)} characters; "
                                          f"the limit is {tool.max_argument_chars}")
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise ToolValidationError(f"{name}: arguments are not valid JSON ({exc.msg} at {exc.pos})") from None
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ToolValidationError(f"{name}: arguments must be a JSON object, not {type(arguments).__name__}")
        size = len(json.dumps(arguments, ensure_ascii=False, separators=(",", ":"), default=str))
        if size > tool.max_argument_chars:
            raise ToolValidationError(f"{name}: arguments are {size} characters; the limit is {tool.max_argument_chars}")
        props = tool.parameters["properties"]
        problems = []
        extra = sorted(set(arguments) - set(props))
        if extra:
            problems.append(f"unexpected argument(s) {', '.join(map(repr, extra))}")
        missing = [p for p in tool.parameters["required"] if arguments.get(p) is None]
        if missing:
            problems.append(f"missing required argument(s) {', '.join(map(repr, missing))}")
        for key, value in arguments.items():
            if key in props:
                problem = _check_value(value, props[key], repr(key))
                if problem:
                    problems.append(problem)
        if problems:
            raise ToolValidationError(f"{name}: " + "; ".join(problems) + f" (parameters: {', '.join(props) or 'none'})")
        return {k: v for k, v in arguments.items() if v is not None}

    def call(self, name: str, arguments: Any, *, allowed: typing.Iterable[str] | None = None,
             timeout_s: float | None = None, turn: TurnContext | None = None) -> ToolResult:
        """Validate and run one call with a timeout. Raises ToolError (never anything else).

        ``turn``: the facts of the calling turn; inside the call ``current_turn()`` returns it.

        A call that times out keeps running in its worker thread until it returns (Python cannot
        kill a thread); tools that can stop early should watch their own cancel flag.
        """
        args = self.validate(name, arguments, allowed)
        tool = self._tools[name]
        limit = tool.timeout_s if timeout_s is None else min(timeout_s, tool.timeout_s)
        if limit <= 0:
            raise ToolError(f"{name}: no time left in this turn's tool budget")
        future = self._executor.submit(bound_to(turn, tool.fn), **args)
        try:
            result = future.result(timeout=limit)
        except FutureTimeout:
            future.cancel()
            raise ToolError(f"{name} took longer than {limit:.0f} s and was stopped") from None
        except ToolError:
            raise
        except ParleyError as exc:
            raise ToolError(f"{name} failed: {exc}") from None
        except Exception as exc:  # details go to the log, a short reason to the user and model
            log.exception("tool %s failed", name)
            raise ToolError(f"{name} failed ({type(exc).__name__}); see the server log") from None
        if not isinstance(result, ToolResult):
            result = ToolResult(text=str(result), summary=str(result)[:80])
        return result

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
