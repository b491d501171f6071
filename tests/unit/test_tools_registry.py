"""The tool registry: schemas from signatures and docstrings, validation, timeouts, error hygiene."""

from __future__ import annotations

import json
import time
from typing import Literal

import pytest

from bot.tools.registry import ToolError, ToolRegistry, ToolResult, ToolValidationError, parse_docstring


def weather(city: str, days: int = 1, unit: Literal["c", "f"] = "c", detail: bool | None = None) -> ToolResult:
    """Forecast for a city.

    Longer text that the schema does not need.

    Args:
        city: The city name,
            possibly with a country.
        days: How many days ahead.
        unit: Celsius or Fahrenheit.
        detail: Hourly detail.
    """
    return ToolResult(text=f"{city} {days} {unit}", summary="ok")


@pytest.fixture
def registry():
    reg = ToolRegistry()
    reg.register(weather, timeout_s=2.0, max_argument_chars=200)
    yield reg
    reg.close()


def test_schema_comes_from_signature_and_docstring(registry):
    schema = registry.schemas()[0]
    assert schema["type"] == "function"
    fn = schema["function"]
    assert fn["name"] == "weather"
    assert fn["description"] == "Forecast for a city."
    params = fn["parameters"]
    assert params["required"] == ["city"]
    assert params["additionalProperties"] is False
    assert params["properties"]["city"] == {"type": "string", "description": "The city name, possibly with a country."}
    assert params["properties"]["days"] == {"type": "integer", "description": "How many days ahead.", "default": 1}
    assert params["properties"]["unit"]["enum"] == ["c", "f"]
    assert params["properties"]["detail"]["type"] == "boolean"
    json.dumps(schema)  # serializable as it goes into chat templates and the API


def test_schema_is_accepted_by_a_chat_template(registry, tiny_tokenizer):
    template = "{% for t in tools %}{{ t.function.name }}:{{ t.function.parameters.required }}{% endfor %}"
    out = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=registry.schemas(),
                                             chat_template=template, tokenize=False)
    assert out == "weather:['city']"


def test_docstring_parser_handles_types_in_parentheses():
    desc, params = parse_docstring("""Do it.\n\nArgs:\n    a (int): first\n    b: second\n\nReturns:\n    x""")
    assert desc == "Do it."
    assert params == {"a": "first", "b": "second"}


def test_registration_rejects_undescribable_functions():
    reg = ToolRegistry()

    def no_doc(x: str) -> ToolResult:
        return ToolResult("")

    def no_hint(x) -> ToolResult:
        """Doc."""

    def var_kw(**kw: str) -> ToolResult:
        """Doc."""

    for fn in (no_doc, no_hint, var_kw):
        with pytest.raises(TypeError):
            reg.register(fn)
    with pytest.raises(TypeError, match="name"):
        reg.register(weather, name="Bad Name")
    reg.register(weather)
    with pytest.raises(TypeError, match="already"):
        reg.register(weather)


@pytest.mark.parametrize("name, args, message", [
    ("nope", {}, "unknown tool 'nope'; available: weather"),
    ("weather", "{not json", "not valid JSON"),
    ("weather", "[1, 2]", "must be a JSON object"),
    ("weather", {}, "missing required argument(s) 'city'"),
    ("weather", {"city": "Oslo", "country": "NO"}, "unexpected argument(s) 'country'"),
    ("weather", {"city": 3}, "'city' must be a string"),
    ("weather", {"city": "Oslo", "days": True}, "'days' must be a integer"),
    ("weather", {"city": "Oslo", "unit": "k"}, "'unit' must be one of"),
    ("weather", {"city": "x" * 1_000_000}, "the limit is 200"),
    ("weather", json.dumps({"city": "x" * 1_000_000}), "the limit is 200"),
    (None, {}, "(invalid name)"),
])
def test_validation_refuses_bad_calls_with_a_reason(registry, name, args, message):
    with pytest.raises(ToolValidationError) as info:
        registry.validate(name, args)
    assert message in str(info.value)


def test_validation_accepts_json_strings_and_drops_nulls(registry):
    assert registry.validate("weather", '{"city": "Oslo", "detail": null}') == {"city": "Oslo"}
    assert registry.call("weather", {"city": "Oslo", "days": 3}).text == "Oslo 3 c"


def test_allowlist_is_enforced_by_the_registry(registry):
    with pytest.raises(ToolValidationError, match="available: none"):
        registry.validate("weather", {"city": "Oslo"}, allowed=[])


def test_timeout_gives_a_short_error():
    reg = ToolRegistry()

    def slow(x: str) -> ToolResult:
        """Sleeps."""
        time.sleep(1.0)
        return ToolResult("late")

    reg.register(slow, timeout_s=0.1)
    started = time.perf_counter()
    with pytest.raises(ToolError, match="took longer than 0 s"):
        reg.call("slow", {"x": "a"})
    assert time.perf_counter() - started < 0.8
    with pytest.raises(ToolError, match="no time left"):
        reg.call("slow", {"x": "a"}, timeout_s=0)
    reg.close()


def test_crash_inside_a_tool_is_a_short_error_without_details(caplog):
    reg = ToolRegistry()

    def boom(x: str) -> ToolResult:
        """Fails."""
        raise KeyError("SECRET_TOKEN=abc")

    reg.register(boom)
    with pytest.raises(ToolError) as info:
        reg.call("boom", {"x": "a"})
    assert str(info.value) == "boom failed (KeyError); see the server log"
    assert "SECRET" not in str(info.value)
    assert "SECRET_TOKEN" in caplog.text  # the details are in the log
    reg.close()
