"""The LoRA recipe, top to bottom: setup -> data -> model -> train -> evaluate -> save.

    parley finetune lora --data FILE [--eval-data FILE] --output DIR [--config recipe.toml]
    accelerate launch --multi_gpu --num_processes N -m finetune lora ...   (N GPUs, or N CPU processes
                                                                         with --device cpu: DDP)

One process per device; with several processes every global batch is split between them and the
loss is normalized by the trained tokens of the whole global batch, so 2 processes x batch 2 trains
the same as 1 process x batch 4 (tested on 2 CPU processes). FSDP is configured through
``accelerate config``; it is not tested here (checkpoints gather the LoRA weights on each process).

Output folder (``--output DIR``; a bare name means PARLEY_HOME/adapters/NAME)::

    adapter_config.json, adapter_model.safetensors   a standard PEFT LoRA adapter
    README.md                                        model card: base, data + hashes, settings, metrics, command
    parley_adapter.json                              the same facts, machine-readable
    metrics.jsonl, loss_curve.png, data_report.json  the run's record
    checkpoints/checkpoint-NNNNNN/                   the newest K checkpoints (for --resume)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from finetune import data as D
from finetune import runs
from finetune.errors import DataError, FinetuneError, NonFiniteError, ResumeError

log = logging.getLogger("finetune")

# Settings that define the data order, the schedule and the model: a checkpoint only resumes
# into a run where all of them are unchanged.
SCHEDULE_FIELDS = ("model", "format", "max_length", "overlong", "eval_fraction", "data_seed", "rank", "alpha",
                   "dropout", "target_modules", "use_dora", "use_rslora", "learning_rate", "weight_decay",
                   "warmup_ratio", "warmup_steps", "lr_scheduler", "batch_size", "grad_accum", "max_steps",
                   "epochs", "max_grad_norm", "seed", "precision")


@dataclass
class LoraConfig:
    """Every setting of a LoRA run, with its default. Set them in a TOML file (flat, or under
    ``[lora]``), with ``--set NAME=VALUE``, or with the dedicated flags."""

    data: list[str] = field(default_factory=list)
    """Training data files (JSONL/JSON/CSV/a datasets folder), or ["feedback"] for the chat's feedback."""
    output: str = ""
    """Output folder; a bare name (no slash) means PARLEY_HOME/adapters/NAME."""
    eval_data: list[str] = field(default_factory=list)
    """Evaluation files; when empty, eval_fraction of the training rows is held out."""
    model: str = "smollm2-135m"
    """Base model: the embedded default, a local folder, a .gguf file or a Hugging Face id."""
    format: str = "auto"
    """auto, messages, sharegpt, alpaca, prompt_completion or text."""
    max_length: int = 1024
    """Longest row in tokens; longer rows are rejected (or cut, with overlong='truncate')."""
    overlong: str = "reject"
    """What to do with rows above max_length: reject (reported) or truncate."""
    max_reject_share: float = 0.05
    """Abort when more than this share of rows is rejected."""
    eval_fraction: float = 0.05
    """Share of training rows held out for evaluation when no eval_data is given (at most max_eval_rows)."""
    max_eval_rows: int = 200
    """Cap on held-out evaluation rows, to keep evaluations quick."""
    data_seed: int = 42
    """Seed of the train/eval split; independent of `seed`."""
    min_feedback_rating: int = 1
    """With data=feedback: the lowest rating kept (corrections are always kept)."""
    rank: int = 16
    """LoRA rank r."""
    alpha: int = 32
    """LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with use_rslora)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: str = "all-linear"
    """Which layers get LoRA: all-linear (every linear layer but the output head) or a comma list."""
    use_dora: bool = False
    """DoRA: weight-decomposed LoRA (slower per step, sometimes better at low rank)."""
    use_rslora: bool = False
    """rsLoRA: scale by alpha/sqrt(r), which keeps high ranks stable."""
    learning_rate: float = 2e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights."""
    warmup_ratio: float = 0.03
    """Share of the steps spent warming up linearly from 0."""
    warmup_steps: int = 0
    """Warm-up steps; overrides warmup_ratio when above 0."""
    lr_scheduler: str = "cosine"
    """cosine, linear or constant (all after warm-up)."""
    batch_size: int = 4
    """Rows per device per micro-batch."""
    grad_accum: int = 4
    """Micro-batches per optimizer step; effective batch = batch_size x grad_accum x processes."""
    max_steps: int = 0
    """Optimizer steps; 0 means `epochs` passes over the data."""
    epochs: int = 1
    """Passes over the data when max_steps is 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 turns clipping off (the norm is still checked for NaN/Inf)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    precision: str = "auto"
    """auto (bf16 autocast on GPUs and on bf16-capable CPUs, else fp32), bf16 or fp32."""
    seed: int = 42
    """Seed of LoRA init, dropout and batch order; the same seed gives the same losses."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda. Under `accelerate launch` the launcher decides."""
    threads: int = 0
    """CPU threads for torch; 0 keeps torch's default (all cores). On a busy machine 1 can be faster."""
    eval_every: int = 50
    """Evaluate (loss, perplexity) every N steps, and at the end; 0 = only at the end."""
    eval_at_start: bool = True
    """Evaluate the untrained model first (step 0), the baseline the adapter must beat."""
    save_every: int = 100
    """Write a checkpoint every N steps; 0 = only at the end."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    log_every: int = 1
    """Write a metrics.jsonl record every N steps."""
    nan_policy: str = "abort"
    """On a NaN/Inf loss or gradient: abort (nothing saved from that step) or skip the step."""
    max_skipped_steps: int = 10
    """With nan_policy=skip: abort after this many skipped steps in a row."""
    resume: bool = False
    """Continue from the newest complete checkpoint in the output folder (with overwrite: of the
    interrupted run that is replacing it)."""
    overwrite: bool = False
    """Replace the run already in the output folder instead of refusing. The new run trains beside
    it and takes its place only when its adapter is complete; until then the old one stays."""
    stop_after_steps: int = 0
    """Stop (with a checkpoint) after this step, as if interrupted; the schedule still targets max_steps."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.eval_data, str):
            self.eval_data = [self.eval_data]
        problems = []
        if not self.data:
            problems.append("data: give at least one file (--data FILE) or --data feedback")
        if self.format not in ("auto",) + D.FORMATS:
            problems.append(f"format={self.format!r}: use auto or one of {', '.join(D.FORMATS)}")
        for name in ("max_length", "rank", "alpha", "batch_size", "grad_accum", "epochs", "log_every",
                     "max_eval_rows"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r}: must be at least 1")
        for name in ("max_steps", "warmup_steps", "eval_every", "threads", "save_every", "keep_checkpoints",
                     "stop_after_steps", "max_skipped_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)!r}: must be 0 or more")
        for name, lo, hi in (("dropout", 0, 1), ("max_reject_share", 0, 1), ("eval_fraction", 0, 0.5),
                             ("warmup_ratio", 0, 1)):
            if not lo <= getattr(self, name) <= hi:
                problems.append(f"{name}={getattr(self, name)!r}: must be between {lo} and {hi}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate!r}: must be above 0")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            problems.append("weight_decay and max_grad_norm must be 0 or more")
        choices = {"overlong": ("reject", "truncate"), "lr_scheduler": ("cosine", "linear", "constant"),
                   "precision": ("auto", "bf16", "fp32"), "nan_policy": ("abort", "skip"),
                   "device": ("auto", "cpu", "cuda")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r}: use {' or '.join(allowed)}")
        if problems:
            raise FinetuneError("invalid LoRA settings:\n  " + "\n  ".join(problems))


def resolve_output(output: str, home: Path, default_name: str = "", kind: str = "adapters") -> Path:
    """A bare name (no path separator) lands in PARLEY_HOME/<kind>/NAME; a path is used as is."""
    name = output or default_name
    if not name:
        raise FinetuneError(f"--output is required: a folder path, or a bare NAME for PARLEY_HOME/{kind}/NAME")
    if os.sep not in name and "/" not in name and name not in (".", "..") and not name.startswith("~"):
        return Path(home) / kind / name
    return Path(name).expanduser()


def base_model_ref(spec: str, source: Path | str) -> str:
    """What adapter_config.json calls the base: the Parley spec for embedded models (what
    `parley chat --model` takes), the Hugging Face id, or the absolute local folder."""
    from bot.models import EMBEDDED_MODELS

    if spec in EMBEDDED_MODELS or isinstance(source, str):
        return spec
    return str(Path(source).resolve())


class SelectedPositionsHead:
    """Wraps the model's output head so logits are computed only where a token is trained.

    The vocabulary projection and its softmax are the largest tensors of a training step
    ([B, T, V], V = 49,152 for SmolLM2); prompts, system text and padding need none of it. The
    model's own forward still runs (so DDP hooks and any logit soft-capping after the head apply);
    the head just sees hidden states [1, N, H] for the N selected positions instead of [B, T, H].
    """

    def __init__(self, model):
        import torch

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.base, self.head = base, base.get_output_embeddings()
        self.select = None
        outer = self

        class _Head(torch.nn.Module):
            def __init__(self, head):
                super().__init__()
                self.inner = head

            def forward(self, hidden):
                if outer.select is not None:
                    hidden = hidden[outer.select].unsqueeze(0)  # [B, T, H] -> [1, N, H]
                return self.inner(hidden)

        self.wrapper = _Head(self.head)
        self.depth = 0

    def __enter__(self):  # re-entrant: evaluation inside the training loop nests
        self.depth += 1
        if self.depth == 1:
            self.base.set_output_embeddings(self.wrapper)
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0:
            self.base.set_output_embeddings(self.head)
        return False


def token_loss_sum(model, batch: dict[str, Any], autocast, head: SelectedPositionsHead | None = None):
    """Sum of next-token cross-entropy over labelled tokens, and how many there were.

    Position t predicts token t+1, so labels are shifted left by one. With ``head`` installed only
    the N labelled positions get logits ([1, N, V]); without it the whole [B, T, V] is computed.
    """
    import torch.nn.functional as F

    labels = batch["labels"][:, 1:]
    trained = labels != D.IGNORE_INDEX  # [B, T-1]
    if head is not None:
        select = F.pad(trained, (0, 1), value=False)  # [B, T]: positions whose next token is trained
        head.select = select
        try:
            with autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            head.select = None
        loss = F.cross_entropy(logits[0].float(), labels[trained], reduction="sum")
    else:
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                               ignore_index=D.IGNORE_INDEX, reduction="sum")
    return loss, int(trained.sum())


def make_scheduler(optimizer, cfg: LoraConfig, total_steps: int):
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    warmup = getattr(cfg, "warmup_steps", 0) or int(math.ceil(cfg.warmup_ratio * total_steps))
    if cfg.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    make = get_cosine_schedule_with_warmup if cfg.lr_scheduler == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, warmup, total_steps)


def train_lora(cfg: LoraConfig, home: Path, *, command: str = "",
               on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the recipe; returns the final metrics and paths. Raises FinetuneError subclasses."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from bot.models import load_model, validate_adapter_dir

    # ---- setup ------------------------------------------------------------------------------
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Under `accelerate launch --multi_gpu` (torchrun) with device=cpu, processes join a gloo group.
    accelerator = Accelerator(cpu=cfg.device == "cpu")
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    if cfg.device == "cuda" and device.type != "cuda":
        raise FinetuneError("device=cuda was asked for but no CUDA GPU is visible: use --device cpu")
    precision = runs.pick_precision(cfg.precision, device.type)
    from_feedback = cfg.data == ["feedback"]
    output = resolve_output(cfg.output, home, f"feedback-{time.strftime('%Y%m%d-%H%M%S')}" if from_feedback else "")
    # One writer per run folder. A run that replaces another (--overwrite) trains in a staging
    # folder beside it, which takes the old one's place only once the new adapter is complete.
    # "Stop and save" (SIGUSR1, from bot/jobs.py) ends the loop after the step under way; the
    # adapter is then evaluated and saved as usual, and a checkpoint lets Resume finish the plan.
    with _run_folder(output, cfg, main) as work, runs.stop_and_save_requests() as stop_requested:
        accelerator.wait_for_everyone()
        resume_with = "--resume --overwrite" if work != output else "--resume"

        # ---- data (read and checked before the model loads, so bad data fails fast) ---------------
        report = D.DataReport()
        if from_feedback:
            examples, _ = D.load_feedback(home, min_rating=cfg.min_feedback_rating, report=report)
        else:
            examples, _ = D.load_examples(cfg.data, cfg.format, report=report)
        report.check(cfg.max_reject_share)  # structural rejects, before anything is tokenized
        if cfg.eval_data:
            eval_report = D.DataReport()
            eval_examples, _ = D.load_examples(cfg.eval_data, cfg.format, report=eval_report)
        loaded = load_model(cfg.model, home, device="cpu", dtype="bfloat16" if precision == "bf16" and
                            device.type == "cuda" else "float32", progress=main and cfg.progress)
        tokenizer = loaded.tokenizer
        train_enc = D.encode_all(tokenizer, examples, report, max_length=cfg.max_length, overlong=cfg.overlong)
        if cfg.eval_data:
            eval_enc = D.encode_all(tokenizer, eval_examples, eval_report, max_length=cfg.max_length,
                                    overlong=cfg.overlong)
            eval_report.check(cfg.max_reject_share)
            eval_enc = eval_enc[: cfg.max_eval_rows]
        else:
            train_enc, eval_enc = D.split_examples(train_enc, cfg.eval_fraction, cfg.data_seed, cfg.max_eval_rows)
        report.check(cfg.max_reject_share)
        if main:
            for line in report.lines():
                log.info(line)
        if not train_enc:
            raise DataError("no training rows left after the evaluation split: add data or lower eval_fraction")
        stats = {"train": D.dataset_stats(train_enc), "eval": D.dataset_stats(eval_enc)}
        if main:
            log.info(D.format_stats("train", stats["train"]))
            log.info(D.format_stats("eval", stats["eval"]))
            runs.write_json_atomic(work / "data_report.json", {**report.to_json(), "stats": stats})
        data_files = _data_facts(cfg, home, examples, report, from_feedback)

        # ---- model --------------------------------------------------------------------------------
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        set_seed(cfg.seed)
        model = loaded.model
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        targets = cfg.target_modules if cfg.target_modules == "all-linear" else \
            [t.strip() for t in cfg.target_modules.split(",") if t.strip()]
        try:
            model = get_peft_model(model, PeftLoraConfig(
                r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                use_dora=cfg.use_dora, use_rslora=cfg.use_rslora, task_type="CAUSAL_LM", bias="none"))
        except ValueError as exc:
            raise FinetuneError(f"cannot put LoRA on {cfg.model}: {exc}; check target_modules "
                                f"(all-linear, or names like q_proj,v_proj)") from None
        base_ref = base_model_ref(cfg.model, loaded.path if loaded.path.exists() else str(loaded.path))
        model.peft_config["default"].base_model_name_or_path = base_ref
        model.to(device)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in trainable)
        n_total = sum(p.numel() for p in model.parameters())
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)

        # ---- schedule ------------------------------------------------------------------------------
        global_rows = cfg.batch_size * world  # rows per micro-batch over all processes
        lengths = [len(e.input_ids) for e in train_enc]
        micro_per_epoch = math.ceil(len(train_enc) / global_rows)
        total_steps = cfg.max_steps or max(1, cfg.epochs * micro_per_epoch // cfg.grad_accum)
        scheduler = make_scheduler(optimizer, cfg, total_steps)
        epoch_batches: dict[int, list[list[int]]] = {}

        def micro_batch(index: int) -> list[D.Encoded]:
            """The index-th micro-batch of the whole run, this process's share of it."""
            epoch, pos = divmod(index, micro_per_epoch)
            if epoch not in epoch_batches:
                epoch_batches.clear()
                epoch_batches[epoch] = D.length_grouped_batches(lengths, global_rows, seed=cfg.seed, epoch=epoch)
            rows = epoch_batches[epoch][pos]
            return [train_enc[i] for i in rows[rank::world]]

        # ---- resume ------------------------------------------------------------------------------
        start_step = 0
        config_now = runs.config_dict(cfg)
        if cfg.resume:
            if main:
                for p in runs.clean_partial_checkpoints(work):
                    log.info("removed incomplete checkpoint %s (a run was stopped while saving it)", p.name)
            accelerator.wait_for_everyone()
            found = runs.list_checkpoints(work)
            if not found:
                raise ResumeError(f"--resume: no complete checkpoint in {runs.checkpoints_dir(work)}; "
                                  f"start without --resume")
            start_step, ckpt = found[-1]
            saved_state = json.loads((ckpt / runs.STATE_FILE).read_text())
            runs.check_resumable(saved_state["config"], config_now, SCHEDULE_FIELDS, ckpt)
            if saved_state.get("data_sha256") != data_files["sha256"]:
                raise ResumeError(f"cannot resume from {ckpt}: the training data changed since it was written "
                                  f"(sha256 {saved_state.get('data_sha256', '?')[:12]} -> {data_files['sha256'][:12]})")
            weights, _ = runs.load_checkpoint(ckpt, optimizer=optimizer, scheduler=scheduler, rank=rank)
            set_peft_model_state_dict(model, weights)
            if main:
                log.info("resuming from %s (step %d of %d)", ckpt.name, start_step, total_steps)

        model, optimizer = accelerator.prepare(model, optimizer)
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
            else contextlib.nullcontext
        metrics = runs.MetricsLog(work / "metrics.jsonl", resume_step=start_step if cfg.resume else None,
                                  enabled=main)
        if main:
            log.info("model %s: %s trainable of %s parameters (%.2f%%); %d steps of %d rows (%d x %d micro-batches "
                     "x %d processes); %s on %s", cfg.model, f"{n_trainable:,}", f"{n_total:,}",
                     100 * n_trainable / n_total, total_steps, global_rows * cfg.grad_accum, cfg.batch_size,
                     cfg.grad_accum, world, precision, device)

        head = SelectedPositionsHead(accelerator.unwrap_model(model))

        def evaluate() -> dict[str, float]:
            """Token-weighted eval loss and perplexity over every eval row (all processes)."""
            if not eval_enc:
                return {}
            model.eval()
            total = torch.zeros(2, dtype=torch.float64, device=device)
            order = sorted(range(len(eval_enc)), key=lambda i: -len(eval_enc[i].input_ids))[rank::world]
            with torch.no_grad():
                for b in range(0, len(order), cfg.batch_size * 2):
                    batch = D.collate([eval_enc[i] for i in order[b: b + cfg.batch_size * 2]], tokenizer.pad_token_id)
                    batch = {k: v.to(device) for k, v in batch.items()}
                    with head:
                        loss, n = token_loss_sum(model, batch, autocast, head)
                    total += torch.tensor([loss.item(), n], dtype=torch.float64, device=device)
            model.train()
            total = accelerator.reduce(total, "sum")
            mean = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
            return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50))}

        def checkpoint(step: int) -> None:
            state = {"config": config_now, "data_sha256": data_files["sha256"], "total_steps": total_steps,
                     "world_size": world}
            weights = get_peft_model_state_dict(accelerator.unwrap_model(model))
            bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
            if bad:
                raise NonFiniteError(f"refusing to save checkpoint {step}: non-finite values in {bad[:3]}")
            runs.save_checkpoint(work, step, weights=weights, optimizer=optimizer, scheduler=scheduler,
                                 state=state, accelerator=accelerator, keep=cfg.keep_checkpoints)

        # ---- train -------------------------------------------------------------------------------
        bar = tqdm(total=total_steps, initial=start_step, disable=not (main and cfg.progress), unit="step",
                   desc="lora", dynamic_ncols=True)
        last_eval: dict[str, float] = {}
        loss_value = float("nan")
        skipped_in_a_row = skipped_total = 0
        train_seconds = 0.0
        tokens_seen = trained_seen = 0
        step = start_step
        if cfg.eval_at_start and start_step == 0 and eval_enc:
            last_eval = evaluate()
            metrics.write({"step": 0, **last_eval})
            if main:
                log.info("step 0 (untrained): eval loss %.4f, perplexity %.2f", last_eval["eval_loss"], last_eval["eval_ppl"])
        stop_at = min(total_steps, cfg.stop_after_steps or total_steps)
        try:
            head.__enter__()
            while step < stop_at and not stop_requested.is_set():
                step_started = time.time()
                micro = [micro_batch(step * cfg.grad_accum + j) for j in range(cfg.grad_accum)]
                # The loss is normalized by the labelled tokens of the whole global step (all micro-batches,
                # all processes), so accumulation and process count do not change what is learned.
                local_labelled = sum(sum(1 for l in r.labels[1:] if l != D.IGNORE_INDEX) for m in micro for r in m)
                n_global = accelerator.reduce(torch.tensor(float(local_labelled), device=device), "sum").item()
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                real_tokens = 0
                longest = 0
                for j, rows in enumerate(micro):
                    if not rows:
                        continue
                    batch = {k: v.to(device) for k, v in D.collate(rows, tokenizer.pad_token_id).items()}
                    longest = max(longest, batch["input_ids"].shape[1])
                    real_tokens += int(batch["attention_mask"].sum())
                    sync = j == len(micro) - 1
                    try:
                        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                            loss, _ = token_loss_sum(model, batch, autocast, head)
                            # DDP averages gradients over processes, hence the factor `world`.
                            accelerator.backward(loss * world / max(n_global, 1.0))
                    except Exception as exc:
                        if runs.is_oom(exc):
                            raise runs.oom_error(str(device), step + 1, cfg.batch_size, longest, cfg.max_length) from None
                        raise
                    loss_sum += loss.detach().double()
                loss_value = accelerator.reduce(loss_sum, "sum").item() / max(n_global, 1.0)
                grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
                grad_norm = float(grad_norm)
                step += 1
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                    optimizer.zero_grad(set_to_none=True)
                    what = f"loss {loss_value} / gradient norm {grad_norm}"
                    if cfg.nan_policy == "abort":
                        done = runs.list_checkpoints(work)
                        raise NonFiniteError(
                            f"step {step}: {what} is not finite, so the run stopped and saved nothing from this "
                            f"step. Usual causes: a learning rate too high ({cfg.learning_rate}), fp16 overflow, "
                            f"or a broken row. Lower --lr, or set nan_policy=skip to skip such steps"
                            + (f"; the last good checkpoint is {done[-1][1]} ({resume_with})" if done else ""))
                    skipped_in_a_row += 1
                    skipped_total += 1
                    log.warning("step %d: %s is not finite; step skipped (%d in a row)", step, what, skipped_in_a_row)
                    if skipped_in_a_row > cfg.max_skipped_steps:
                        raise NonFiniteError(f"{skipped_in_a_row} steps in a row had non-finite loss or gradients; "
                                             f"stopping. Lower the learning rate or check the data")
                    scheduler.step()
                    metrics.write({"step": step, "skipped": True, "loss": None if not math.isfinite(loss_value) else loss_value})
                    continue
                skipped_in_a_row = 0
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                real_tokens = int(accelerator.reduce(torch.tensor(float(real_tokens), device=device), "sum").item())
                tokens_seen += real_tokens
                trained_seen += int(n_global)
                train_seconds += time.time() - step_started  # optimizer steps only: no evals, no saving
                record = {"step": step, "total_steps": total_steps,
                          "epoch": round(step * cfg.grad_accum / micro_per_epoch, 4),
                          "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                          "tokens": real_tokens, "trained_tokens": int(n_global),
                          "tokens_per_s": round(tokens_seen / train_seconds, 1),
                          "elapsed_s": round(time.time() - started, 2)}
                if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                    last_eval = evaluate()
                    record.update(last_eval)
                if step % cfg.log_every == 0 or "eval_loss" in record:
                    metrics.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{record['tokens_per_s'] or 0:.0f}",
                                **({"eval": f"{last_eval['eval_loss']:.4f}"} if last_eval else {}))
                if on_step:
                    on_step(record)
                if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.stop_after_steps:
                    checkpoint(step)
        except KeyboardInterrupt:
            bar.close()
            if step > start_step:
                checkpoint(step)
            raise FinetuneError(f"interrupted at step {step}; a checkpoint was written: continue with {resume_with} "
                                f"and the same --output {output}") from None
        finally:
            head.__exit__()
        bar.close()

        stopped = step < stop_at  # "Stop and save": save what was trained so far
        if stopped:
            if step == start_step:
                raise FinetuneError(f"stopped at step {step} before another step was trained; nothing new "
                                    f"was saved")
            if not runs.list_checkpoints(work) or runs.list_checkpoints(work)[-1][0] != step:
                checkpoint(step)
            log.info("stop requested: saving the adapter at step %d of %d; continue the plan with %s",
                     step, total_steps, resume_with)
        elif step < total_steps:  # stopped early on purpose (stop_after_steps)
            return {"output": str(output), "step": step, "total_steps": total_steps, "stopped_early": True,
                    "resume_with": resume_with,
                    "final_loss": loss_value, "main_process": main}

        # ---- evaluate + save ------------------------------------------------------------------------
        final_eval = evaluate()
        elapsed = time.time() - started
        peak_mb = runs.peak_memory_mb(device.type)
        initial = next((r["eval_loss"] for r in metrics.records if r.get("step") == 0 and "eval_loss" in r), None)
        final = {"step": step, "train_loss": loss_value, **final_eval, "initial_eval_loss": initial, "skipped_steps": skipped_total,
                 "tokens_per_s": round(tokens_seen / train_seconds, 1) if train_seconds else None,
                 "trained_tokens_per_s": round(trained_seen / train_seconds, 1) if train_seconds else None,
                 "tokens": tokens_seen, "step_seconds": round(train_seconds, 2), "total_seconds": round(elapsed, 1),
                 "peak_memory_mb": round(peak_mb, 1)}
        if stopped:
            final.update({"stopped_at_step": step, "planned_steps": total_steps})
        metrics.write({"step": step, **final_eval, "final": True, **({"stopped": True} if stopped else {})})
        unwrapped = accelerator.unwrap_model(model)
        if main:
            weights = get_peft_model_state_dict(unwrapped)
            bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
            if bad:
                raise NonFiniteError(f"the trained adapter has non-finite values in {bad[:3]}; nothing was saved")
            _save_adapter(unwrapped, work)
            hyper = {k: config_now[k] for k in SCHEDULE_FIELDS if k not in ("model", "format")}
            hyper.update({"processes": world, "effective_batch": global_rows * cfg.grad_accum,
                          "total_steps": total_steps, "trainable_params": n_trainable,
                          "gradient_checkpointing": cfg.gradient_checkpointing, "precision_used": precision})
            base = {"spec": cfg.model, "base_model_name_or_path": base_ref, "path": str(loaded.path)}
            facts = {"kind": "lora", "parley_version": _version(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "base_model": base, "data": data_files["files"], "data_sha256": data_files["sha256"],
                     "data_stats": stats, "rejected_rows": len(report.rejects), "hyperparameters": hyper,
                     "metrics": final, "command": command or runs.command_line(), "device": str(device)}
            runs.write_json_atomic(work / "parley_adapter.json", facts)
            (work / "README.md").write_text(runs.model_card(
                title=f"LoRA adapter {output.name} for {cfg.model}", kind="lora", base=base,
                data=data_files["files"], hyperparameters=hyper,
                metrics={k: v for k, v in final.items() if v is not None}, command=facts["command"],
                usage=(f"```\nparley chat --model {cfg.model} --adapter {output.name}={output}\n"
                       f"parley serve --model {cfg.model} --adapter {output.name}={output}\n```\n\n"
                       f"or in Python: `PeftModel.from_pretrained(base_model, \"{output}\")`."),
                tags=["parley", "lora", "peft"]))
            runs.plot_curve(metrics.records, work / "loss_curve.png", f"LoRA {output.name}")
            validate_adapter_dir(work)
            if work != output:  # the new adapter is complete: only now does it replace the old one
                runs.replace_dir(work, output)
            log.info("adapter saved to %s (eval loss %s); use it with: parley chat --adapter %s=%s", output,
                     f"{final_eval['eval_loss']:.4f}" if final_eval else "n/a", output.name, output)
        accelerator.wait_for_everyone()
        return {"output": str(output), "total_steps": total_steps, "main_process": main, "stopped": stopped,
                **final}


# ------------------------------------------------------------------------------------------------
# Helpers the recipe uses once; kept below so the recipe reads top to bottom.
# ------------------------------------------------------------------------------------------------
def _holds_run(folder: Path) -> bool:
    return (folder / "adapter_config.json").exists() or bool(runs.list_checkpoints(folder)) or \
        (folder / "metrics.jsonl").exists()


@contextlib.contextmanager
def _run_folder(output: Path, cfg: LoraConfig, main: bool):
    """Lock ``output`` for this run and yield the folder the run writes to.

    That is ``output`` itself, except when the run replaces one already there (--overwrite):
    then it is a staging folder beside it (``.NAME.staging``) that ``replace_dir`` swaps in
    once the new adapter is complete, so bad data, a crash or Ctrl-C never costs the adapter
    that works. An interrupted replacement continues with --resume --overwrite; a staging
    folder with nothing to resume is removed when the run fails.
    """
    with runs.run_lock(output, enabled=main):
        work = _prepare_output(output, cfg, main)
        try:
            yield work
        except BaseException:
            if main and work != output and not runs.list_checkpoints(work):
                shutil.rmtree(work, ignore_errors=True)
            raise


def _prepare_output(output: Path, cfg: LoraConfig, main: bool) -> Path:
    """Decide (and, on the main process, create) the folder the run writes to; see _run_folder.

    The decision reads only what the main process does not change before the other processes
    read it (the run already in ``output``; a staging folder while resuming), so every process
    of a distributed run decides the same.
    """
    staging = runs.sibling(output, "staging")
    if main:
        runs.recover_dir(output)  # a crash in the middle of an earlier swap
    if cfg.resume:
        if cfg.overwrite and staging.is_dir():
            return staging  # continue the interrupted replacement run
        if not output.exists():
            raise ResumeError(f"--resume: {output} does not exist; nothing to resume")
        return output
    if _holds_run(output):
        if not cfg.overwrite:
            raise FinetuneError(f"{output} already holds a training run: pass --resume to continue it, "
                                f"--overwrite to replace it, or choose another --output")
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        return staging
    if main:
        output.mkdir(parents=True, exist_ok=True)
    return output


def _data_facts(cfg: LoraConfig, home: Path, examples, report: D.DataReport, from_feedback: bool) -> dict[str, Any]:
    import hashlib

    files = []
    if from_feedback:
        files.append({"path": str(Path(home) / "parley.db"), "sha256": D.examples_sha256(examples),
                      "rows": len(examples), "rejected": len(report.rejects), "note": "chat feedback rows"})
    else:
        for p in cfg.data:
            files.append({"path": str(Path(p).expanduser().resolve()), "sha256": D.file_sha256(p),
                          "format": report.formats.get(Path(p).name, cfg.format)})
        if len(files) == 1:
            files[0].update({"rows": len(examples), "rejected": len(report.rejects)})
    for p in cfg.eval_data:
        files.append({"path": str(Path(p).expanduser().resolve()), "sha256": D.file_sha256(p), "role": "eval"})
    digest = hashlib.sha256("".join(f["sha256"] for f in files).encode()).hexdigest()
    return {"files": files, "sha256": digest}


def _save_adapter(model, output: Path) -> None:
    """save_pretrained into a temporary folder, then move the files in: never a half-written adapter."""
    tmp = output / ".adapter-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in tmp.iterdir():
        os.replace(f, output / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("parley")
    except Exception:
        return "dev"
