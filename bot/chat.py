"""Message types, normalization at the boundaries, chat-template prompts, context trimming.

A conversation is a list of ``{"role": ..., "content": ...}`` dicts with string content. Every
boundary (browser, API, Slack, Discord, CLI) calls ``normalize_messages`` once, so the rest of
Parley sees one shape.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from bot.errors import ContextOverflowError, RequestError

ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, Any]


def content_text(content: Any) -> str:
    """Flatten message content: a string, or a list of typed parts (OpenAI and Gradio 6 shape)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        if "text" in content:
            return str(content["text"])
        if content.get("type") == "text":
            return str(content.get("text", ""))
        raise RequestError(f"message content part {dict(content)!r} has no text: send text parts only")
    if isinstance(content, Iterable):
        return "".join(content_text(part) for part in content)
    raise RequestError(f"message content must be a string or a list of text parts, not {type(content).__name__}")


def normalize_messages(raw: Any, *, where: str = "messages") -> list[Message]:
    """Validate and normalize a conversation; raise RequestError that names the bad message.

    Keeps ``tool_calls``/``tool_call_id``/``name`` when present so native tool calling survives.
    The last message must come from the user (or a tool) so there is something to answer.
    """
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise RequestError(f"{where} must be a list of {{'role', 'content'}} objects")
    if not raw:
        raise RequestError(f"{where} is empty: send at least one user message")
    out: list[Message] = []
    for i, message in enumerate(raw):
        if not isinstance(message, Mapping):
            raise RequestError(f"{where}[{i}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}[{i}].role is {role!r}: use one of {', '.join(ROLES)}")
        text = content_text(message.get("content"))
        if "\x00" in text:
            raise RequestError(f"{where}[{i}].content contains a NUL byte: send plain text")
        item: Message = {"role": role, "content": text}
        for key in ("tool_calls", "tool_call_id", "name"):
            if message.get(key) is not None:
                item[key] = message[key]
        if role == "user" and not text.strip():
            raise RequestError(f"{where}[{i}] is an empty user message: type something to send")
        out.append(item)
    if out[-1]["role"] not in ("user", "tool"):
        raise RequestError(f"the last of {where} must be a user message (got {out[-1]['role']!r})")
    return out


def with_system_prompt(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """Prepend the default system prompt unless the conversation brings its own."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def render_ids(tokenizer, messages: list[Message], *, tools: list[dict] | None = None,
               add_generation_prompt: bool = True) -> list[int]:
    """The model's own chat template -> prompt token ids. The one place prompts are rendered."""
    kwargs: dict[str, Any] = {"add_generation_prompt": add_generation_prompt, "tokenize": True}
    if tools:
        kwargs["tools"] = tools
    encoded = tokenizer.apply_chat_template(messages, **kwargs)
    # transformers 5 returns a BatchEncoding by default; older versions a list.
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) or hasattr(encoded, "keys") else encoded
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return list(ids)


def fit_to_context(tokenizer, messages: list[Message], budget: int, *,
                   tools: list[dict] | None = None) -> tuple[list[Message], list[int]]:
    """Drop the oldest turns until the prompt fits ``budget`` tokens; keep the system prompt.

    Whole exchanges are dropped (a user message with the replies after it), so the model never
    sees an answer without its question. Returns the kept messages and their prompt ids.
    Raises ContextOverflowError when even the system prompt plus the last message cannot fit.

    The result is the longest tail that fits: the one that dropping exchanges oldest first, one
    at a time, reaches. It costs one render of the whole conversation, one batch tokenization of
    the message texts (to guess the cut) and a few renders of the tail to confirm the guess,
    instead of one full render per dropped exchange (20,000 short messages took 20,000 full
    renders). Confirming relies on one property of chat templates: dropping leading exchanges
    never makes the prompt longer (every template renders the messages it is given, in order).
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    # Where the kept tail may start: the whole conversation, or any user turn after the first
    # (dropping up to the second user turn also drops replies that precede the first one).
    cuts = [0] + [i for i, m in enumerate(rest) if m["role"] == "user"][1:]
    renders: dict[int, list[int]] = {}

    def fits(k: int) -> bool:
        if k not in renders:
            renders[k] = render_ids(tokenizer, system + rest[cuts[k]:], tools=tools)
        return len(renders[k]) <= budget

    last = len(cuts) - 1
    if fits(0):
        return system + rest, renders[0]
    if not fits(last):
        raise ContextOverflowError(
            f"the message is {len(renders[last])} tokens with the system prompt, but only {budget} fit in "
            f"the context window (after reserving room for the reply): shorten the message or "
            f"lower max_tokens")
    # fits(k) is False for k < answer and True from it on. Search outwards from the guess with
    # doubling steps, then bisect between the nearest miss and hit: a good guess costs 2 renders.
    guess = _guess_cut(tokenizer, rest, cuts, len(renders[0]), len(renders[last]), budget)
    miss, hit = 0, last
    step = 1
    if fits(guess):
        hit = guess
        while hit - step > miss:
            if not fits(hit - step):
                miss = hit - step
                break
            hit, step = hit - step, step * 2
    else:
        miss = guess
        while miss + step < hit:
            if fits(miss + step):
                hit = miss + step
                break
            miss, step = miss + step, step * 2
    while hit - miss > 1:
        mid = (miss + hit) // 2
        if fits(mid):
            hit = mid
        else:
            miss = mid
    return system + rest[cuts[hit]:], renders[hit]


def _guess_cut(tokenizer, rest: list[Message], cuts: list[int], full: int, tail: int, budget: int) -> int:
    """The cut (an index into ``cuts``, 1..len(cuts)-1) at which the prompt should first fit.

    Every droppable message is charged its text's tokens plus an equal share of the template's
    overhead, calibrated so the charges add up to what dropping all of them really saves
    (``full - tail`` tokens). Exact for templates that render each message independently.
    """
    from bisect import bisect_left
    from itertools import accumulate

    droppable = rest[:cuts[-1]]
    texts = [m["content"] if isinstance(m.get("content"), str) else "" for m in droppable]
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    overhead = (full - tail - sum(counts)) / len(droppable)
    saved = [0.0, *accumulate(c + overhead for c in counts)]  # saved[i]: tokens saved by dropping rest[:i]
    need = full - budget
    k = bisect_left([saved[c] for c in cuts], need - 0.5)
    return min(max(k, 1), len(cuts) - 1)
