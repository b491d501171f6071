"""Base model vs adapter on an evaluation file: loss, perplexity and generations side by side.

    parley finetune eval ADAPTER --data FILE [--samples 3] [--max-new-tokens 128]
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from finetune import data as D
from finetune.errors import DataError


def mean_loss(model, tokenizer, encoded: list[D.Encoded], *, batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy over the labelled (assistant) tokens."""
    import contextlib

    import torch

    from finetune.lora import token_loss_sum

    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            batch = D.collate([encoded[i] for i in order[b: b + batch_size]], tokenizer.pad_token_id)
            loss, n = token_loss_sum(model, {k: v.to(device) for k, v in batch.items()}, contextlib.nullcontext)
            total += loss.item()
            count += n
    return total / count if count else float("nan")


def generate(model, tokenizer, messages: list[dict[str, Any]], max_new_tokens: int) -> str:
    import torch

    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def compare(adapter: str | Path, data: list[str], *, home: Path, model: str | None = None, fmt: str = "auto",
            max_rows: int = 200, samples: int = 3, max_new_tokens: int = 128, max_length: int = 1024,
            device: str = "auto") -> dict[str, Any]:
    from bot.models import pick_device
    from finetune.merge import load_base_and_adapter, resolve_adapter

    adapter_dir = resolve_adapter(adapter, home)
    peft_model, tokenizer, spec = load_base_and_adapter(adapter_dir, home, model, device=pick_device(device))
    examples, report = D.load_examples(data, fmt)
    examples = [e for e in examples if e.messages is not None][:max_rows]
    encoded = D.encode_all(tokenizer, examples, report, max_length=max_length)
    if not encoded:
        raise DataError("no usable evaluation rows:\n" + "\n".join(report.lines()))
    with peft_model.disable_adapter():
        base_loss = mean_loss(peft_model, tokenizer, encoded)
    adapter_loss = mean_loss(peft_model, tokenizer, encoded)
    shown = []
    for ex in examples[:samples]:
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        prompt = ex.messages[:last]
        with peft_model.disable_adapter():
            base_text = generate(peft_model, tokenizer, prompt, max_new_tokens)
        shown.append({"source": ex.source, "prompt": prompt[-1]["content"], "reference": ex.messages[last]["content"],
                      "base": base_text, "adapter": generate(peft_model, tokenizer, prompt, max_new_tokens)})
    return {"adapter": str(adapter_dir), "base_model": spec, "rows": len(encoded), "rejected": len(report.rejects),
            "base": {"loss": base_loss, "ppl": math.exp(min(base_loss, 50))},
            "adapter_metrics": {"loss": adapter_loss, "ppl": math.exp(min(adapter_loss, 50))}, "samples": shown}


def format_comparison(result: dict[str, Any], width: int = 48) -> str:
    b, a = result["base"], result["adapter_metrics"]
    lines = [f"eval on {result['rows']} rows ({result['rejected']} rejected); base {result['base_model']}, "
             f"adapter {result['adapter']}",
             f"{'':12}{'base':>12}{'adapter':>12}",
             f"{'loss':12}{b['loss']:>12.4f}{a['loss']:>12.4f}",
             f"{'perplexity':12}{b['ppl']:>12.2f}{a['ppl']:>12.2f}"]
    for s in result["samples"]:
        lines += ["", f"--- {s['source']}: {textwrap.shorten(s['prompt'], 100)}"]
        cols = [textwrap.wrap(s[k], width) or [""] for k in ("base", "adapter")]
        lines.append(f"{'base':<{width}} | adapter")
        for i in range(max(len(c) for c in cols)):
            left = cols[0][i] if i < len(cols[0]) else ""
            right = cols[1][i] if i < len(cols[1]) else ""
            lines.append(f"{left:<{width}} | {right}")
    return "\n".join(lines)
