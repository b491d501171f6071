"""Helpers for the finetune tests: tiny conversation files, chat templates, and quick configs."""

from __future__ import annotations

import json
import random

import pytest
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "finetune"

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
    "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
# A Qwen-like ChatML template that renders tools and tool calls natively.
TOOLS_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\n' }}{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\n\n' }}{% endif %}{{ '# Tools\n' }}{% for t in tools %}{{ t | tojson }}"
    "{% endfor %}{{ '<|im_end|>\n' }}{% elif messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{% endif %}"
    "{%- for m in messages %}{% if m['role'] == 'system' %}{% elif m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' + (m['content'] or '') }}{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "{{ '<tool_call>\n' + c.function | tojson + '\n</tool_call>' }}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}"
    "{% elif m['role'] == 'tool' %}{{ '<|im_start|>user\n<tool_response>\n' + m['content'] + "
    "'\n</tool_response><|im_end|>\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# ChatML with {% generation %} markers, so transformers' own assistant mask can be compared.
MARKED_CHATML_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

EXTRA_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]

WORDS = ("apple river seven blue quick zebra math sum count tea où naïve 東京 emoji 🙂 <b> {x} \\n"
         .split())


def tokenizer_with(template: str):
    from tests.tiny import build_tokenizer

    tok = build_tokenizer(template)
    tok.add_tokens(EXTRA_SPECIALS, special_tokens=True)
    return tok


def random_conversation(rng: random.Random, *, system: bool | None = None, turns: int | None = None) -> list[dict]:
    def text() -> str:
        parts = [rng.choice(WORDS) for _ in range(rng.randint(1, 8))]
        sep = rng.choice([" ", " ", "\n", "  "])
        return sep.join(parts)

    msgs = []
    if system if system is not None else rng.random() < 0.4:
        msgs.append({"role": "system", "content": text()})
    for _ in range(turns or rng.randint(1, 3)):
        msgs.append({"role": "user", "content": text()})
        msgs.append({"role": "assistant", "content": text()})
    return msgs


def write_chat_jsonl(path: Path, n: int, seed: int = 0, turns: int = 1) -> Path:
    """n short, learnable conversations (the answer repeats part of the question)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            msgs = []
            for t in range(turns):
                msgs += [{"role": "user", "content": f"add {a} and {b}" + " please" * rng.randint(0, 3)},
                         {"role": "assistant", "content": f"{a}+{b}={a + b}"}]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return path


def tiny_lora_config(tiny_model_dir: Path, data: Path, output: Path, **overrides):
    """A LoRA config that trains the tiny model in well under a second a step."""
    from finetune.lora import LoraConfig

    settings = dict(data=[str(data)], output=str(output), model=str(tiny_model_dir), max_length=256,
                    batch_size=2, grad_accum=1, max_steps=8, eval_every=0, save_every=0, rank=4, alpha=8,
                    dropout=0.1, learning_rate=1e-2, warmup_steps=1, eval_fraction=0.1, max_eval_rows=4,
                    progress=False, device="cpu", eval_at_start=False)
    settings.update(overrides)
    return LoraConfig(**settings)


def read_metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def losses(output: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output) if "loss" in r and r["loss"] is not None
            and not r.get("skipped")}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models train far faster on one thread, and do not stall when the CPUs are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
