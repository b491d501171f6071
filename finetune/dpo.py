"""The DPO recipe, top to bottom: setup -> pairs -> model -> train -> evaluate -> save.

    parley finetune dpo --data pairs.jsonl --output NAME [--init-adapter SFT_ADAPTER]
    parley finetune dpo --data preferences --output NAME      (the chat's votes and corrections)

Direct Preference Optimization (Rafailov et al. 2023) trains on pairs of replies to one prompt,
the better and the worse, in TRL's preference format, one JSON object a line::

    {"prompt": [{"role": "system"|"user"|"assistant", "content": "..."}, ..., {"role": "user", ...}]
               (or a plain string: one user turn),
     "chosen": "the better reply"   (or [{"role": "assistant", "content": "..."}]),
     "rejected": "the worse reply"}

``--data preferences`` reads the pairs from PARLEY_HOME/parley.db (``Store.preference_pairs``:
the Compare tab's votes, and each correction paired with the reply it corrected).

Why TRL: its ``DPOTrainer`` (trl 1.16) with a peft LoRA trains here on a CPU with transformers
5.24 (checked on the tiny test model and on SmolLM2-135M), and with peft it needs no second
model in memory: the reference is the base model with the adapter switched off, or, with
``--init-adapter`` (SFT then DPO), a frozen copy of that adapter. What this file adds around it:

- the pairs are read and checked by finetune/data.py's own reader, normalizer and chat-template
  encoding (``encode_chat``: the one owner of the chat format and the loss mask), and every bad
  pair is reported as ``file:line: reason``; TRL gets the ids already encoded, so the tokens it
  trains are exactly the reply's assistant tokens the LoRA recipe would train;
- one writer per run folder, and ``--overwrite`` that keeps the old adapter until the new one is
  complete (the LoRA recipe's ``_run_folder``);
- metrics.jsonl in the LoRA recipe's shape (step, loss, lr, tokens/s, eval loss) plus the DPO
  signals (reward margin and accuracy, chosen/rejected log-probs), so the Fine-tune tab plots both;
- "Stop and save" on SIGUSR1 (finish the step, checkpoint, save a usable adapter), ``--resume``
  from the newest checkpoint, and a self-describing adapter (parley_adapter.json, README.md).

Output folder: the adapter (adapter_config.json, adapter_model.safetensors), parley_adapter.json,
README.md, metrics.jsonl, data_report.json, checkpoints/checkpoint-N (TRL/Trainer checkpoints).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from finetune import data as D
from finetune import runs
from finetune.errors import DataError, FinetuneError, ResumeError

log = logging.getLogger("finetune")

PREFERENCES = "preferences"
"""``--data preferences``: the pairs of the chat's preference store (PARLEY_HOME/parley.db)."""

SCHEDULE_FIELDS = ("model", "init_adapter", "max_length", "eval_fraction", "data_seed", "beta", "loss_type",
                   "rank", "alpha", "dropout", "target_modules", "learning_rate", "warmup_ratio",
                   "lr_scheduler", "batch_size", "grad_accum", "max_steps", "epochs", "seed", "precision")


@dataclass
class DpoConfig:
    """Every setting of a DPO run, with its default (TOML ``[dpo]``, ``--set NAME=VALUE`` or flags)."""

    data: list[str] = field(default_factory=list)
    """Preference files (JSONL/JSON/CSV with prompt, chosen, rejected), or ["preferences"]."""
    output: str = ""
    """Output folder; a bare name (no slash) means PARLEY_HOME/adapters/NAME."""
    eval_data: list[str] = field(default_factory=list)
    """Evaluation pairs; when empty, eval_fraction of the pairs is held out."""
    model: str = "smollm2-135m"
    """Base model: the embedded default, a local folder, a .gguf file or a Hugging Face id."""
    init_adapter: str = ""
    """Start from this LoRA adapter (an SFT run: a folder or a NAME under PARLEY_HOME/adapters); the
    reference model is then a frozen copy of it. Empty: a new LoRA on the base, which is the reference."""
    beta: float = 0.1
    """How far the policy may move from the reference: higher keeps it closer (TRL's beta)."""
    loss_type: str = "sigmoid"
    """sigmoid (the DPO paper), ipo or hinge."""
    max_length: int = 1024
    """Longest prompt + reply in tokens; longer pairs are rejected (reported)."""
    max_reject_share: float = 0.05
    """Abort when more than this share of pairs is rejected."""
    eval_fraction: float = 0.1
    """Share of pairs held out for evaluation when no eval_data is given (at most max_eval_rows)."""
    max_eval_rows: int = 100
    """Cap on held-out evaluation pairs."""
    data_seed: int = 42
    """Seed of the train/eval split."""
    rank: int = 16
    """LoRA rank r (ignored with init_adapter: the adapter's own)."""
    alpha: int = 32
    """LoRA alpha."""
    dropout: float = 0.0
    """LoRA dropout (TRL switches model dropout off for DPO; 0 keeps the two log-probs comparable)."""
    target_modules: str = "all-linear"
    """all-linear or a comma list like q_proj,v_proj."""
    learning_rate: float = 5e-5
    """Peak AdamW learning rate (DPO wants a smaller one than SFT)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Share of the steps spent warming up."""
    lr_scheduler: str = "cosine"
    """cosine, linear or constant."""
    batch_size: int = 2
    """Pairs per micro-batch (each pair is two sequences)."""
    grad_accum: int = 4
    """Micro-batches per optimizer step."""
    max_steps: int = 0
    """Optimizer steps; 0 means `epochs` passes over the pairs."""
    epochs: int = 1
    """Passes over the pairs when max_steps is 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, slower."""
    precision: str = "auto"
    """auto (bf16 on GPUs and bf16-capable CPUs, else fp32), bf16 or fp32."""
    seed: int = 42
    """Seed of LoRA init and batch order."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""
    threads: int = 0
    """CPU threads for torch; 0 keeps torch's default."""
    eval_every: int = 0
    """Evaluate every N steps; 0 = at the start and the end only."""
    eval_at_start: bool = True
    """Evaluate before training (the reference: loss ln 2, margin 0; and the log-probs to beat)."""
    save_every: int = 50
    """Write a checkpoint every N steps; 0 = none until the end (Stop and save still writes one)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    log_every: int = 1
    """Write a metrics.jsonl record every N steps."""
    resume: bool = False
    """Continue from the newest checkpoint in the output folder."""
    overwrite: bool = False
    """Replace the run in the output folder; the old adapter stays until the new one is complete."""
    stop_after_steps: int = 0
    """Stop (with a checkpoint, no adapter) after this step, as if interrupted; the schedule still
    targets max_steps. The pre-flight estimate measures a few steps this way."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.eval_data, str):
            self.eval_data = [self.eval_data]
        problems = []
        if not self.data:
            problems.append("data: give a pairs file (--data pairs.jsonl) or --data preferences")
        for name in ("max_length", "rank", "alpha", "batch_size", "grad_accum", "epochs", "log_every",
                     "max_eval_rows"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r}: must be at least 1")
        for name in ("max_steps", "eval_every", "threads", "save_every", "keep_checkpoints", "stop_after_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)!r}: must be 0 or more")
        for name, lo, hi in (("dropout", 0, 1), ("max_reject_share", 0, 1), ("eval_fraction", 0, 0.5),
                             ("warmup_ratio", 0, 0.99)):
            if not lo <= getattr(self, name) <= hi:
                problems.append(f"{name}={getattr(self, name)!r}: must be between {lo} and {hi}")
        if not self.beta > 0:
            problems.append(f"beta={self.beta!r}: must be above 0 (0.1 is the usual value)")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate!r}: must be above 0")
        choices = {"loss_type": ("sigmoid", "ipo", "hinge"), "lr_scheduler": ("cosine", "linear", "constant"),
                   "precision": ("auto", "bf16", "fp32"), "device": ("auto", "cpu", "cuda")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r}: use {' or '.join(allowed)}")
        if problems:
            raise FinetuneError("invalid DPO settings:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------------------
# Pairs: read -> check -> encode (each step reports bad pairs as file:line: reason)
# ------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    """One checked preference pair: the prompt as messages, and the two replies as text."""

    source: str
    prompt: list[dict[str, Any]]
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_trl(self) -> dict[str, Any]:
        """TRL's conversational preference row (what ``export`` writes and DPOTrainer reads)."""
        return {"prompt": self.prompt, "chosen": [{"role": "assistant", "content": self.chosen}],
                "rejected": [{"role": "assistant", "content": self.rejected}]}


@dataclass
class EncodedPair:
    """A pair as TRL's collator wants it: the shared prompt ids and each reply's trained ids."""

    source: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def _reply(value: Any, key: str) -> str:
    """A reply: a string, or TRL's [{"role": "assistant", "content": ...}] (one message)."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise D.RowError(f"{key}: expected a string or one assistant message [{{\"role\": \"assistant\", "
                             f"\"content\": ...}}]")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise D.RowError(f"{key}: must be a string, not {type(value).__name__}")
    if not value.strip():
        raise D.RowError(f"{key}: empty reply")
    return value


def check_pair(row: dict[str, Any], source: str, max_chars: int = D.DEFAULT_MAX_CHARS) -> Pair:
    """One raw row -> a checked Pair; raises RowError with the reason (the caller reports it)."""
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        raise D.RowError(f"missing key {missing[0]!r}: a preference pair has prompt, chosen and rejected")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise D.RowError("prompt: expected a string or a non-empty list of messages")
    last = prompt[-1].get("role") if isinstance(prompt[-1], dict) else None
    if last == "assistant":
        raise D.RowError("prompt: the last message is 'assistant'; it must be the user turn the two replies answer")
    chosen, rejected = _reply(row["chosen"], "chosen"), _reply(row["rejected"], "rejected")
    if chosen.strip() == rejected.strip():
        raise D.RowError("chosen and rejected are the same reply: there is nothing to prefer")
    # The prompt plus a reply must be a conversation the LoRA recipe would accept (roles, order,
    # no empty turns), ending with the reply being judged.
    example = D.normalize({"messages": [*prompt, {"role": "assistant", "content": chosen}]}, "messages",
                          source, max_chars)
    messages = example.messages[:-1]
    if messages[-1]["role"] not in ("user", "tool"):
        raise D.RowError(f"prompt: the last message is {messages[-1]['role']!r}; it must be the user turn "
                         f"the two replies answer")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages]
    meta = {k: row[k] for k in ("id", "source") if k in row}
    return Pair(source=source, prompt=prompt, chosen=chosen, rejected=rejected, meta=meta)


def load_pairs(paths: Iterable[str | Path], home: Path | None = None, *,
               report: D.DataReport | None = None) -> tuple[list[Pair], D.DataReport]:
    """Read and check every pair of every file (or of the preference store); rejects go to the report."""
    report = report or D.DataReport()
    pairs: list[Pair] = []
    for path in paths:
        if str(path) == PREFERENCES:
            rows = _preference_rows(Path(home or "."), report)
        else:
            report.files.append(str(path))
            report.formats[Path(path).name] = "preference pairs"
            rows = D.read_records(path)
        for source, row in rows:
            report.rows_read += 1
            if isinstance(row, D.RowError):
                report.reject(source, str(row))
                continue
            try:
                pairs.append(check_pair(row, source))
            except D.RowError as exc:
                report.reject(source, str(exc))
            except D.MALFORMED as exc:
                report.reject(source, D._malformed(exc))
    return pairs, report


def _preference_rows(home: Path, report: D.DataReport):
    """(source, row) for each pair of PARLEY_HOME/parley.db's preference store."""
    from bot.store import Store

    db = home / "parley.db"
    if not db.is_file():
        raise DataError(f"no chat store at {db}: vote in the Compare tab or correct replies in the chat "
                        f"first (PARLEY_HOME={home}), or train from a file with --data pairs.jsonl")
    store = Store(db)
    if not hasattr(store, "preference_pairs"):
        raise DataError("this Parley's store has no preference pairs yet (bot/store.py Store.preference_pairs): "
                        "train from a file with --data pairs.jsonl")
    report.files.append(str(db))
    report.formats[db.name] = "preferences"
    for i, row in enumerate(store.preference_pairs()):
        yield f"{db.name}#pair={row.get('id', i)}", row


def encode_pair(tokenizer, pair: Pair, max_length: int) -> EncodedPair:
    """Encode prompt + chosen and prompt + rejected with ``encode_chat``; raises RowError.

    Earlier assistant turns of the prompt are context (weight 0): only the judged reply is
    trained, its tokens through the end-of-turn token, exactly as the LoRA recipe labels them.
    """
    history = [({**m, "weight": 0} if m["role"] == "assistant" else m) for m in pair.prompt]
    encoded = []
    for reply in (pair.chosen, pair.rejected):
        example = D.Example(source=pair.source, messages=[*history, {"role": "assistant", "content": reply}])
        enc = D.encode_chat(tokenizer, example, max_length, "reject")
        trained = [i for i, label in enumerate(enc.labels) if label != D.IGNORE_INDEX]
        encoded.append((enc.input_ids, trained[0], trained[-1] + 1))
    (c_ids, c_start, c_end), (r_ids, r_start, r_end) = encoded
    # Both renders share the prompt; cut where they part, as TRL does, in case a template differs.
    start = min(c_start, r_start, _common_prefix(c_ids, r_ids))
    return EncodedPair(pair.source, c_ids[:start], c_ids[start:c_end], r_ids[start:r_end])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_pairs(tokenizer, pairs: list[Pair], report: D.DataReport, max_length: int) -> list[EncodedPair]:
    """Encode every pair; over-long ones become rejects in the same report."""
    from jinja2 import TemplateError

    out = []
    for pair in pairs:
        try:
            out.append(encode_pair(tokenizer, pair, max_length))
        except D.RowError as exc:
            report.reject(pair.source, str(exc))
        except (TemplateError, *D.MALFORMED) as exc:
            report.reject(pair.source, D._malformed(exc))
    return out


def export_pairs(pairs: Iterable[Pair], path: Path) -> int:
    """Write pairs as TRL's preference JSONL (``prompt``/``chosen``/``rejected``); returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for pair in pairs:
            fh.write(json.dumps({**pair.to_trl(), **pair.meta}, ensure_ascii=False) + "\n")
            n += 1
    return n


# ------------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------------
def train_dpo(cfg: DpoConfig, home: Path, *, command: str = "") -> dict[str, Any]:
    """Run the recipe; returns the final metrics and paths. Raises FinetuneError subclasses."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig

    from bot.models import load_model, validate_adapter_dir
    from finetune.lora import _run_folder, base_model_ref, resolve_output

    # ---- setup ------------------------------------------------------------------------------
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = "cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and device != "cuda":
        raise FinetuneError("device=cuda was asked for but no CUDA GPU is visible: use --device cpu")
    precision = runs.pick_precision(cfg.precision, device)
    output = resolve_output(cfg.output, home)
    init_adapter = resolve_output(cfg.init_adapter, home) if cfg.init_adapter else None
    if init_adapter is not None:
        validate_adapter_dir(init_adapter)
    with _run_folder(output, cfg, True) as work, runs.stop_and_save_requests() as stop_requested:
        # ---- pairs (checked before the model loads, so bad data fails fast) ----------------------
        report = D.DataReport()
        pairs, _ = load_pairs(cfg.data, home, report=report)
        report.check(cfg.max_reject_share)
        eval_pairs: list[Pair] = []
        if cfg.eval_data:
            eval_report = D.DataReport()
            eval_pairs, _ = load_pairs(cfg.eval_data, home, report=eval_report)
            eval_report.check(cfg.max_reject_share)
        loaded = load_model(cfg.model, home, device="cpu", dtype="float32", progress=cfg.progress)
        tokenizer = loaded.tokenizer
        train_enc = encode_pairs(tokenizer, pairs, report, cfg.max_length)
        report.check(cfg.max_reject_share)
        if cfg.eval_data:
            eval_enc = encode_pairs(tokenizer, eval_pairs, eval_report, cfg.max_length)[: cfg.max_eval_rows]
        else:
            train_enc, eval_enc = D.split_examples(train_enc, cfg.eval_fraction, cfg.data_seed, cfg.max_eval_rows)
        for line in report.lines():
            log.info(line)
        if not train_enc:
            raise DataError("no training pairs left after the evaluation split: add pairs or lower eval_fraction")
        stats = {"train_pairs": len(train_enc), "eval_pairs": len(eval_enc),
                 "tokens_total": sum(p.tokens for p in train_enc),
                 "length_max": max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in train_enc)}
        log.info("pairs: %d to train on, %d held out; %d tokens per epoch", stats["train_pairs"],
                 stats["eval_pairs"], stats["tokens_total"])
        runs.write_json_atomic(work / "data_report.json", {**report.to_json(), "stats": stats})
        data_facts = _data_facts(cfg, home, pairs, report)

        # ---- resume: the run's settings and data must be the checkpoint's ---------------------------
        config_now = runs.config_dict(cfg)
        ckpt_dir = runs.checkpoints_dir(work)
        resume_from = None
        if cfg.resume:
            found = _trainer_checkpoints(work)
            if not found:
                raise ResumeError(f"--resume: no complete checkpoint in {ckpt_dir}; start without --resume")
            saved = json.loads((work / "dpo_run.json").read_text())
            runs.check_resumable(saved["config"], config_now, SCHEDULE_FIELDS, found[-1][1])
            if saved.get("data_sha256") != data_facts["sha256"]:
                raise ResumeError(f"cannot resume from {found[-1][1]}: the pairs changed since it was written")
            resume_from = found[-1]
            log.info("resuming from %s", resume_from[1].name)
        runs.write_json_atomic(work / "dpo_run.json", {"config": config_now, "data_sha256": data_facts["sha256"]})

        # ---- model -------------------------------------------------------------------------------
        from peft import LoraConfig as PeftLoraConfig
        from peft import PeftModel

        model = loaded.model
        model.config.use_cache = False
        peft_config = None
        if init_adapter is not None:
            # TRL copies the adapter to a frozen "ref" adapter: the reference is the SFT model.
            model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        else:
            targets = cfg.target_modules if cfg.target_modules == "all-linear" else \
                [t.strip() for t in cfg.target_modules.split(",") if t.strip()]
            peft_config = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                         target_modules=targets, task_type="CAUSAL_LM", bias="none")
        base_ref = base_model_ref(cfg.model, loaded.path if loaded.path.exists() else str(loaded.path))

        # ---- train -----------------------------------------------------------------------------------
        columns = lambda enc: Dataset.from_list([{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,  # noqa: E731
                                                  "rejected_ids": p.rejected_ids} for p in enc])
        micro_per_epoch = math.ceil(len(train_enc) / cfg.batch_size)
        total_steps = cfg.max_steps or max(1, cfg.epochs * micro_per_epoch // cfg.grad_accum)
        args = DPOConfig(
            output_dir=str(ckpt_dir), per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
            max_steps=total_steps, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
            lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm,
            beta=cfg.beta, loss_type=[cfg.loss_type], max_length=cfg.max_length, seed=cfg.seed,
            data_seed=cfg.data_seed, bf16=precision == "bf16", use_cpu=device == "cpu",
            gradient_checkpointing=cfg.gradient_checkpointing, logging_steps=cfg.log_every,
            eval_strategy="steps" if cfg.eval_every and eval_enc else "no", eval_steps=cfg.eval_every or None,
            save_strategy="steps" if cfg.save_every else "no", save_steps=cfg.save_every or 500,
            save_total_limit=cfg.keep_checkpoints or None, report_to=[], disable_tqdm=not cfg.progress,
            dataloader_num_workers=0, dataset_num_proc=None)
        metrics = runs.MetricsLog(work / "metrics.jsonl", resume_step=resume_from[0] if resume_from else None)
        recorder = _Recorder(metrics, stop_requested, total_steps, started, cfg.stop_after_steps,
                             resumed=resume_from is not None)
        trainer = _dpo_trainer_class()(model=model, args=args, train_dataset=columns(train_enc),
                                         eval_dataset=columns(eval_enc) if eval_enc else None,
                                         processing_class=tokenizer, peft_config=peft_config,
                                         callbacks=[_callback(TrainerCallback, recorder)])
        if not cfg.progress:  # the metrics file and the log lines below say it all; no dict per step
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        log.info("model %s%s: %s trainable parameters; %d steps of %d pairs (beta %s, %s on %s)", cfg.model,
                 f" + {init_adapter.name}" if init_adapter else "", f"{n_trainable:,}", total_steps,
                 cfg.batch_size * cfg.grad_accum, cfg.beta, precision, device)
        if cfg.eval_at_start and eval_enc and resume_from is None:
            recorder.evaluation(0, trainer.evaluate())
        trainer.train(resume_from_checkpoint=str(resume_from[1]) if resume_from else None)
        step = trainer.state.global_step
        stopped = step < total_steps
        if stopped:
            if not _trainer_checkpoints(work) or _trainer_checkpoints(work)[-1][0] != step:
                trainer._save_checkpoint(trainer.model, trial=None)  # what Resume continues from
            if step == cfg.stop_after_steps and not stop_requested.is_set():  # stopped early on purpose
                return {"output": str(output), "step": step, "total_steps": total_steps, "stopped_early": True,
                        "resume_with": "--resume", "final_loss": recorder.last_loss}
            log.info("stop requested: saving the adapter at step %d of %d; continue with --resume", step, total_steps)

        # ---- evaluate + save -----------------------------------------------------------------------
        final_eval = recorder.evaluation(step, trainer.evaluate(), final=True, stopped=stopped) if eval_enc else {}
        initial = next((r for r in metrics.records if r.get("step") == 0 and "eval_loss" in r), {})
        elapsed = time.time() - started
        final = {"step": step, "train_loss": recorder.last_loss, **final_eval,
                 "initial_eval_loss": initial.get("eval_loss"),
                 "initial_reward_margin": initial.get("eval_reward_margin"),
                 "tokens_per_s": round(recorder.tokens / recorder.train_seconds, 1) if recorder.train_seconds else None,
                 "tokens": recorder.tokens, "step_seconds": round(recorder.train_seconds, 2),
                 "total_seconds": round(elapsed, 1), "peak_memory_mb": round(runs.peak_memory_mb(device), 1)}
        if stopped:
            final.update({"stopped_at_step": step, "planned_steps": total_steps})
        _save_adapter(trainer.model, work)
        hyper = {k: config_now[k] for k in SCHEDULE_FIELDS if k not in ("model",)}
        hyper.update({"total_steps": total_steps, "effective_batch": cfg.batch_size * cfg.grad_accum,
                      "trainable_params": n_trainable, "precision_used": precision})
        base = {"spec": cfg.model, "base_model_name_or_path": base_ref, "path": str(loaded.path)}
        facts = {"kind": "dpo", "parley_version": _version(),
                 "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "base_model": base,
                 "init_adapter": str(init_adapter) if init_adapter else None, "data": data_facts["files"],
                 "data_sha256": data_facts["sha256"], "data_stats": stats, "rejected_rows": len(report.rejects),
                 "hyperparameters": hyper, "metrics": final, "command": command or runs.command_line(),
                 "device": device}
        runs.write_json_atomic(work / "parley_adapter.json", facts)
        (work / "README.md").write_text(runs.model_card(
            title=f"DPO LoRA adapter {output.name} for {cfg.model}", kind="lora", base=base,
            data=data_facts["files"], hyperparameters=hyper,
            metrics={k: v for k, v in final.items() if v is not None}, command=facts["command"],
            usage=(f"```\nparley chat --model {cfg.model} --adapter {output.name}={output}\n```\n\n"
                   f"or in Python: `PeftModel.from_pretrained(base_model, \"{output}\")`."),
            tags=["parley", "lora", "peft", "dpo", "trl"]))
        runs.plot_curve(metrics.records, work / "loss_curve.png", f"DPO {output.name}")
        validate_adapter_dir(work)
        if work != output:  # --overwrite: the new adapter is complete, only now does it replace the old one
            runs.replace_dir(work, output)
        log.info("adapter saved to %s (eval loss %s, reward margin %s)", output,
                 _fmt(final.get("eval_loss")), _fmt(final.get("eval_reward_margin")))
        return {"output": str(output), "total_steps": total_steps, "stopped": stopped, **final}


# ------------------------------------------------------------------------------------------------
# Helpers the recipe uses once; kept below so the recipe reads top to bottom.
# ------------------------------------------------------------------------------------------------
def _dpo_trainer_class():
    from trl import DPOTrainer

    class EncodedPairsDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer fed pairs that finetune.data already encoded (``prompt_ids``,
        ``chosen_ids``, ``rejected_ids``): TRL's own tokenizing step is skipped, so the trained
        tokens are ``encode_chat``'s and nothing is truncated behind the report's back."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return EncodedPairsDPOTrainer


class _Recorder:
    """Turns TRL's logs into metrics.jsonl records shaped like the LoRA recipe's."""

    def __init__(self, metrics: runs.MetricsLog, stop_requested, total_steps: int, started: float,
                 stop_after_steps: int = 0, resumed: bool = False):
        self.metrics, self.stop_requested, self.total_steps, self.started = metrics, stop_requested, total_steps, started
        self.stop_after_steps = stop_after_steps
        self.tokens = 0
        self.train_seconds = 0.0
        self.last_loss = float("nan")
        # TRL logs the tokens seen since the run began; after a resume the first count is a baseline.
        self._tokens_seen: int | None = None if resumed else 0
        self._step_started: float | None = None

    def step_begin(self) -> None:
        self._step_started = time.time()

    def step_end(self) -> None:
        if self._step_started is not None:
            self.train_seconds += time.time() - self._step_started

    def train_log(self, step: int, logs: dict[str, Any]) -> None:
        seen = int(float(logs.get("num_tokens", 0)))
        new = seen - self._tokens_seen if self._tokens_seen is not None and seen >= self._tokens_seen else 0
        self._tokens_seen = seen
        self.tokens += new
        self.last_loss = float(logs["loss"])
        self.metrics.write({
            "step": step, "total_steps": self.total_steps, "loss": self.last_loss,
            "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"), "tokens": new,
            "tokens_per_s": round(self.tokens / self.train_seconds, 1) if self.train_seconds and self.tokens else None,
            "reward_margin": logs.get("rewards/margins"), "reward_accuracy": logs.get("rewards/accuracies"),
            "chosen_logp": logs.get("logps/chosen"), "rejected_logp": logs.get("logps/rejected"),
            "elapsed_s": round(time.time() - self.started, 2)})

    def evaluation(self, step: int, logs: dict[str, Any], **flags) -> dict[str, Any]:
        record = {"eval_loss": logs.get("eval_loss"), "eval_reward_margin": logs.get("eval_rewards/margins"),
                  "eval_reward_accuracy": logs.get("eval_rewards/accuracies"),
                  "eval_chosen_logp": logs.get("eval_logps/chosen"), "eval_rejected_logp": logs.get("eval_logps/rejected")}
        record = {k: float(v) for k, v in record.items() if v is not None}
        self.metrics.write({"step": step, **record, **{k: v for k, v in flags.items() if v}})
        return record


def _callback(base, recorder: _Recorder):
    class Callback(base):
        def on_step_begin(self, args, state, control, **kwargs):
            recorder.step_begin()

        def on_step_end(self, args, state, control, **kwargs):
            recorder.step_end()
            if recorder.stop_requested.is_set() or state.global_step == recorder.stop_after_steps:
                control.should_training_stop = True  # "Stop and save", or stop_after_steps

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                recorder.train_log(state.global_step, logs)
            elif "eval_loss" in logs and state.global_step < state.max_steps:
                recorder.evaluation(state.global_step, logs)

    return Callback()


def _trainer_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete Trainer checkpoints (trainer_state.json is written last), oldest first."""
    root = runs.checkpoints_dir(folder)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = runs.CHECKPOINT_RE.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _save_adapter(model, output: Path) -> None:
    """Save the trained adapter only (not TRL's frozen "ref" copy), through a temporary folder."""
    tmp = output / ".adapter-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, selected_adapters=["default"], safe_serialization=True)
    for f in tmp.iterdir():
        if f.is_file():
            os.replace(f, output / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


def _data_facts(cfg: DpoConfig, home: Path, pairs: list[Pair], report: D.DataReport) -> dict[str, Any]:
    import hashlib

    files = []
    for p in cfg.data:
        if p == PREFERENCES:
            digest = hashlib.sha256(json.dumps([x.to_trl() for x in pairs], sort_keys=True).encode()).hexdigest()
            files.append({"path": str(Path(home) / "parley.db"), "sha256": digest, "rows": len(pairs),
                          "note": "preference pairs (votes and corrections)"})
        else:
            files.append({"path": str(Path(p).expanduser().resolve()), "sha256": D.file_sha256(p),
                          "format": "preference pairs"})
    if len(files) == 1:
        files[0].update({"rows": len(pairs), "rejected": len(report.rejects)})
    for p in cfg.eval_data:
        files.append({"path": str(Path(p).expanduser().resolve()), "sha256": D.file_sha256(p), "role": "eval"})
    return {"files": files, "sha256": hashlib.sha256("".join(f["sha256"] for f in files).encode()).hexdigest()}


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "n/a"


def _version() -> str:
    from finetune.lora import _version as version

    return version()
