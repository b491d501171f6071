"""Context trimming in linear time, with the exact result of the old one-exchange-at-a-time loop."""

from __future__ import annotations

import math
import random

import pytest

import bot.chat
from bot.chat import fit_to_context, render_ids
from bot.errors import ContextOverflowError


def old_fit_to_context(tokenizer, messages, budget, *, tools=None):
    """The algorithm before the fix (one full render per dropped exchange): the reference."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    while True:
        kept = system + rest
        ids = render_ids(tokenizer, kept, tools=tools)
        if len(ids) <= budget:
            return kept, ids
        starts = [i for i, m in enumerate(rest) if m["role"] == "user"]
        if len(starts) < 2:
            raise ContextOverflowError(
                f"the message is {len(ids)} tokens with the system prompt, but only {budget} fit in "
                f"the context window (after reserving room for the reply): shorten the message or "
                f"lower max_tokens")
        rest = rest[starts[1]:]


class RenderCounter:
    """Wraps render_ids: counts calls and messages rendered (the work), and stops runaway loops."""

    def __init__(self, limit_calls: int):
        self.calls = 0
        self.messages = 0
        self.limit_calls = limit_calls

    def __call__(self, tokenizer, messages, **kwargs):
        self.calls += 1
        self.messages += len(messages)
        if self.calls > self.limit_calls:
            raise AssertionError(f"more than {self.limit_calls} renders: trimming is not logarithmic")
        return render_ids(tokenizer, messages, **kwargs)


def conversation(n, content="x", system=None):
    roles = ["user", "assistant"]
    msgs = [{"role": roles[i % 2], "content": content} for i in range(n)]
    if msgs and msgs[-1]["role"] != "user":
        msgs.append({"role": "user", "content": content})
    return ([{"role": "system", "content": system}] if system else []) + msgs


@pytest.mark.parametrize("budget", [300, 2000, 60_000, 175_000])
def test_twenty_thousand_messages_take_a_few_renders(tiny_tokenizer, monkeypatch, budget):
    """The 680 KB request of 20,000 one-character messages: about 20,000 full renders before."""
    messages = conversation(20_000, system="be brief")
    n = len(messages)
    counter = RenderCounter(limit_calls=4 + 2 * math.ceil(math.log2(n)))
    monkeypatch.setattr(bot.chat, "render_ids", counter)
    kept, ids = fit_to_context(tiny_tokenizer, messages, budget)
    assert len(ids) <= budget and kept[0]["role"] == "system" and kept[-1] == messages[-1]
    # Rendering work: one full render, then a few renders of about the kept tail (the guess from
    # the messages' token counts is exact for this template, so it is confirmed at once).
    assert counter.calls <= 4
    assert counter.messages <= n + 3 * len(kept) + 10
    # The longest tail that fits: it starts at a user turn, and one more exchange would not fit.
    start = n - (len(kept) - 1)
    assert kept[1:] == messages[start:] and messages[start]["role"] == "user"
    earlier = [i for i in range(1, start) if messages[i]["role"] == "user"]
    if earlier:
        assert len(render_ids(tiny_tokenizer, [messages[0]] + messages[earlier[-1]:])) > budget


def test_twenty_thousand_messages_that_fit_take_one_render(tiny_tokenizer, monkeypatch):
    messages = conversation(20_000)
    counter = RenderCounter(limit_calls=1)
    monkeypatch.setattr(bot.chat, "render_ids", counter)
    kept, _ = fit_to_context(tiny_tokenizer, messages, 10**7)
    assert kept == messages and counter.calls == 1


def test_single_oversized_message_is_still_a_context_overflow(tiny_tokenizer, monkeypatch):
    messages = conversation(20_000)[:-1] + [{"role": "user", "content": "z" * 5000}]
    counter = RenderCounter(limit_calls=3)
    monkeypatch.setattr(bot.chat, "render_ids", counter)
    with pytest.raises(ContextOverflowError, match="shorten the message") as err:
        fit_to_context(tiny_tokenizer, messages, 1000)
    assert err.value.status == 400


def random_conversation(rng: random.Random):
    words = ["a", "bb", "hello there", "z" * 40, "ü€", "line\nbreak", "x" * 150]
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": rng.choice(words)})
    for _ in range(rng.randint(0, 14)):
        role = rng.choices(["user", "assistant", "tool", "system"], [5, 5, 1, 0.3])[0]
        msgs.append({"role": role, "content": rng.choice(words) * rng.randint(1, 3)})
    msgs.append({"role": "user", "content": rng.choice(words)})
    return msgs


def outcome(fn, tokenizer, messages, budget, tools=None):
    try:
        return fn(tokenizer, messages, budget, tools=tools)
    except ContextOverflowError as exc:
        return ("overflow", str(exc))


def test_equals_the_old_algorithm_on_random_conversations(tiny_tokenizer):
    rng = random.Random(1234)
    tools = [{"type": "function", "function": {"name": "search", "description": "d", "parameters": {}}}]
    checked = overflows = trimmed = 0
    for _ in range(400):
        messages = random_conversation(rng)
        full = len(render_ids(tiny_tokenizer, messages))
        for budget in {rng.randint(1, full + 5), rng.randint(full // 2, full + 1), full, full - 1, 20}:
            use_tools = tools if rng.random() < 0.2 else None
            new = outcome(fit_to_context, tiny_tokenizer, messages, budget, use_tools)
            old = outcome(old_fit_to_context, tiny_tokenizer, messages, budget, use_tools)
            assert new == old, (messages, budget)
            checked += 1
            overflows += new[0] == "overflow"
            trimmed += new[0] != "overflow" and len(new[0]) < len(messages)
    assert checked > 1000 and overflows > 50 and trimmed > 200  # every branch was exercised


def test_a_wrong_guess_only_costs_renders_never_a_different_result(tiny_tokenizer, monkeypatch):
    """The search from the guessed cut is exact wherever the guess lands (templates that are not
    additive make the guess wrong)."""
    rng = random.Random(99)
    guesses = []

    def any_guess(tokenizer, rest, cuts, full, tail, budget):
        guesses.append(rng.randint(1, len(cuts) - 1))
        return guesses[-1]

    monkeypatch.setattr(bot.chat, "_guess_cut", any_guess)
    for _ in range(300):
        messages = random_conversation(rng) + conversation(rng.randint(0, 30))
        full = len(render_ids(tiny_tokenizer, messages))
        budget = rng.randint(1, full)
        assert outcome(fit_to_context, tiny_tokenizer, messages, budget) == \
            outcome(old_fit_to_context, tiny_tokenizer, messages, budget)
    assert len(guesses) > 100
