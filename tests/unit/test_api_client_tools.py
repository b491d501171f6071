"""Client-supplied OpenAI `tools`: refused clearly without template support, passed through with it."""

from __future__ import annotations

import json

import httpx
import pytest

from bot.api import create_app, hf_tool_messages, openai_tool_calls
from bot.errors import RequestError
from tests.helpers import build_test_runtime, running_server
from tests.tiny import build_model, build_tokenizer

HERMES = (
    "{% if tools %}<|im_start|>system\nYou may call tools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<tool_call>{{ c['function'] | tojson }}</tool_call>"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def test_tool_calls_convert_both_ways():
    calls, rest = openai_tool_calls('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')
    assert rest == "" and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert openai_tool_calls("just text") == ([], "just text")
    msgs = hf_tool_messages([{"role": "assistant", "content": "", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}])
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    with pytest.raises(RequestError, match="not JSON"):
        hf_tool_messages([{"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "f", "arguments": "{oops"}}]}])


def test_client_tools_refused_when_the_template_cannot_call_tools(tiny_model_dir, tmp_path):
    runtime = build_test_runtime(tiny_model_dir, tmp_path)
    with running_server(create_app(runtime, with_ui=False)) as url:
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "weather in Paris?"}], "tools": [WEATHER]})
        assert r.status_code == 400 and "no tool support" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]})
        assert r.status_code == 400 and "tools[0]" in r.json()["error"]["message"]
    runtime.engine.close()


def test_client_tools_pass_through_with_a_tool_template(tmp_path):
    folder = tmp_path / "tool-model"
    tokenizer = build_tokenizer(HERMES)
    build_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    runtime = build_test_runtime(folder, tmp_path / "home")
    with running_server(create_app(runtime, with_ui=False)) as url:
        body = {"messages": [{"role": "user", "content": "weather in Paris?"},
                             {"role": "assistant", "content": "", "tool_calls": [
                                 {"id": "c1", "type": "function",
                                  "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                             {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
                "tools": [WEATHER], "max_tokens": 6, "temperature": 0}
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] in ("stop", "length", "tool_calls")
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={**body, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
    # The tools really reached the prompt through the template.
    prompt = tokenizer.decode(runtime.engine.prompt_ids(hf_tool_messages(body["messages"]), 6, [WEATHER]))
    assert "get_weather" in prompt and '"city": "Paris"' in prompt
    runtime.engine.close()
