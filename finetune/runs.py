"""Pieces every training recipe shares: typed configs from TOML, atomic checkpoints, RNG state,
metrics, the loss curve, model cards, and the hardware/precision/OOM helpers.

Checkpoint layout (``OUTPUT/checkpoints/checkpoint-000010/``)::

    weights.safetensors   trainable weights only (the LoRA tensors, or the classifier)
    optimizer.pt          optimizer state (torch.save; every .pt here is loaded with weights_only=True)
    scheduler.pt          LR scheduler state
    rng-rank0.pt ...      python + torch (+ CUDA) RNG state of every process
    state.json            step, epoch, config, data hashes; written last

A checkpoint is written into a hidden temporary folder, fsynced, then renamed into place, so a
run killed while saving leaves only a ``.tmp-*`` folder that resume ignores and deletes. Nothing
complete is ever deleted in place: a checkpoint being replaced (the same step saved again) is
first renamed to ``.old-*`` and removed only once the new one is in place, and one being rotated
out is renamed to ``.del-*`` before it is removed, so a run killed at any moment leaves a
complete newest checkpoint, which ``clean_partial_checkpoints`` restores if needed.

A run folder has one writer: ``run_lock`` holds a lock file beside it (``.NAME.lock``) for the
whole run; ``replace_dir`` swaps a finished folder in for an old one with two renames, and
``recover_dir`` repairs the one moment in between after a crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
import tomllib
import typing
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError, OutOfMemoryError, ResumeError

log = logging.getLogger("finetune")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.json"


# --------------------------------------------------------------------------------------------
# Config plumbing
# --------------------------------------------------------------------------------------------
def config_from_sources(cls, toml_path: str | Path | None, overrides: dict[str, Any], section: str):
    """Build a config dataclass: defaults < the TOML file (flat, or its [section]) < overrides.

    Unknown keys are reported together with the known ones, so a typo is obvious.
    """
    values: dict[str, Any] = {}
    if toml_path:
        path = Path(toml_path).expanduser()
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FinetuneError(f"config file {path} does not exist (--config)") from None
        except tomllib.TOMLDecodeError as exc:
            raise FinetuneError(f"config file {path} is not valid TOML: {exc}") from None
        raw = raw.get(section, raw)
        values.update(raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FinetuneError(f"unknown setting(s) {', '.join(unknown)} (from --config/--set); "
                            f"known: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    for k, v in list(values.items()):
        values[k] = _coerce(hints.get(k), v, k)
    return cls(**values)


def _coerce(hint, value, name):
    """Strings from --set NAME=VALUE -> the field's type."""
    if not isinstance(value, str) or hint in (str, None):
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    try:
        if hint is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            return int(value)
        if hint is float:
            return float(value)
        if typing.get_origin(hint) is list:
            return [v.strip() for v in value.split(",") if v.strip()]
    except ValueError:
        raise FinetuneError(f"setting {name}={value!r}: expected {getattr(hint, '__name__', hint)}") from None
    return value


def parse_set_args(pairs: list[str] | None) -> dict[str, Any]:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise FinetuneError(f"--set {pair!r}: write NAME=VALUE, e.g. --set lora_dropout=0.1")
        k, v = pair.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def config_dict(cfg) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


# --------------------------------------------------------------------------------------------
# Hardware, precision, memory
# --------------------------------------------------------------------------------------------
def cpu_supports_bf16() -> bool:
    """True on CPUs with native bfloat16 math (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(precision: str, device_type: str) -> str:
    """`auto` -> bf16 on CUDA GPUs that support it and on bf16-capable CPUs, else fp32."""
    import torch

    if precision != "auto":
        if precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise FinetuneError("precision=bf16 but this GPU does not support bfloat16: use fp32")
        return precision
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device_type == "cpu" and cpu_supports_bf16():
        return "bf16"
    return "fp32"


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(exc, MemoryError))


def oom_error(device: str, step: int, batch_size: int, longest: int, max_length: int) -> OutOfMemoryError:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return OutOfMemoryError(
        f"ran out of {device} memory at step {step} (batch_size={batch_size}, longest row in the batch "
        f"{longest} tokens, max_length={max_length}). Lower --batch-size and raise --grad-accum to keep "
        f"the same effective batch, lower --max-length, or turn on --gradient-checkpointing; a "
        f"checkpoint written before this step can be continued with --resume")


def peak_memory_mb(device_type: str) -> float:
    """Peak memory of this process: CUDA allocator peak on GPUs, max RSS on CPUs."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2 ** 20


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    try:
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints_dir(output: Path) -> Path:
    return output / "checkpoints"


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a folder counts only once its state.json exists)."""
    folder = checkpoints_dir(output)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


_HIDDEN_RE = re.compile(r"^\.(tmp|old|del)-(checkpoint-\d+)$")


def clean_partial_checkpoints(output: Path) -> list[Path]:
    """Repair what a run killed while saving left behind; returns what was removed.

    A checkpoint that was being replaced by a new save of the same step and is missing (the
    process died between moving the old one aside and renaming the new one in) is restored
    from its ``.old-*`` copy; every hidden temporary folder and every checkpoint folder without
    its ``state.json`` is deleted.
    """
    folder = checkpoints_dir(output)
    removed = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        m = _HIDDEN_RE.match(p.name)
        if m and m.group(1) == "old" and (p / STATE_FILE).is_file():
            target = folder / m.group(2)
            if not (target / STATE_FILE).is_file():
                if target.exists():
                    _remove_dir(target)
                os.replace(p, target)
                log.info("restored %s (a run was stopped while replacing it)", target.name)
    for p in folder.iterdir():
        if _HIDDEN_RE.match(p.name) or (CHECKPOINT_RE.match(p.name) and not (p / STATE_FILE).is_file()):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _remove_dir(path: Path) -> None:
    """Delete a folder without ever leaving it half-deleted under its own name: rename, then delete."""
    doomed = path.with_name(f".del-{path.name}" if not path.name.startswith(".") else f"{path.name}.del")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_parent(path: Path) -> None:
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(output: Path, step: int, *, weights: dict[str, Any], optimizer, scheduler,
                    state: dict[str, Any], accelerator=None, keep: int = 2) -> Path | None:
    """Write checkpoint-STEP atomically (temporary folder + rename); keep the newest ``keep``.

    Every process calls this (each saves its own RNG state); the main process writes the rest.
    Order matters for a process killed at any point (see the module docstring): write and fsync
    the new folder; move an existing checkpoint of the same step aside; rename the new one in;
    only then delete the old one and rotate out checkpoints beyond ``keep``.
    """
    import torch
    from safetensors.torch import save_file

    rank = accelerator.process_index if accelerator else 0
    main = accelerator.is_main_process if accelerator else True
    folder = checkpoints_dir(output)
    final = folder / f"checkpoint-{step:06d}"
    tmp = folder / f".tmp-checkpoint-{step:06d}"
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if accelerator:
        accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if accelerator:
        accelerator.wait_for_everyone()
    if main:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "weights.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "saved_at": time.time()}, indent=2))
        _fsync_dir(tmp)
        old = folder / f".old-checkpoint-{step:06d}"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)  # still complete, under a name resume knows how to restore
        os.replace(tmp, final)
        _fsync_parent(final)
        shutil.rmtree(old, ignore_errors=True)
        for _, stale in list_checkpoints(output)[:-keep] if keep > 0 else []:
            _remove_dir(stale)
    if accelerator:
        accelerator.wait_for_everyone()
    return final if main else None


def load_checkpoint(path: Path, *, optimizer, scheduler, rank: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore optimizer, scheduler and this process's RNG; returns (weights, state)."""
    import torch
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    weights = load_file(path / "weights.safetensors")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("%s has no RNG state for process %d (the number of processes changed?); "
                    "dropout will differ from an uninterrupted run", path.name, rank)
    return weights, state


def check_resumable(saved: dict[str, Any], current: dict[str, Any], fields: tuple[str, ...], where: Path) -> None:
    """The run's schedule-defining settings must match the checkpoint's, or resuming is a lie."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
             for k in fields if saved.get(k) != current.get(k)]
    if diffs:
        raise ResumeError(f"cannot resume from {where}: these settings changed since it was written "
                          f"({'; '.join(diffs)}). Use the original settings, or train into a new --output")


# --------------------------------------------------------------------------------------------
# Stop and save
# --------------------------------------------------------------------------------------------
STOP_AND_SAVE_SIGNAL = "SIGUSR1"
"""What bot/jobs.py sends for "Stop and save": the recipe finishes the step under way, writes a
checkpoint (Resume continues the planned schedule from it) and saves the adapter as it is."""


@contextlib.contextmanager
def stop_and_save_requests():
    """Yield a ``threading.Event`` that SIGUSR1 sets while the block runs.

    Only the main thread can install a signal handler; elsewhere (a recipe called from a worker
    thread) the event is simply never set. With several processes (accelerate) each process has
    its own: jobs started by Parley run one process.
    """
    import signal
    import threading

    requested = threading.Event()
    sig = getattr(signal, STOP_AND_SAVE_SIGNAL, None)
    if sig is None or threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = signal.signal(sig, lambda *_: requested.set())
    try:
        yield requested
    finally:
        signal.signal(sig, previous)


# --------------------------------------------------------------------------------------------
# Metrics, plots, cards
# --------------------------------------------------------------------------------------------
class MetricsLog:
    """Appends one JSON object a line to metrics.jsonl; on resume, forgets steps after the checkpoint."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        if not enabled:
            return
        if resume_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= resume_step:
                    self.records.append(rec)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def plot_curve(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Train loss per step and eval loss at each evaluation, as a PNG."""
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Run folders: one writer each, replaced only by a finished run
# --------------------------------------------------------------------------------------------
def sibling(output: Path, kind: str) -> Path:
    """A hidden neighbour of a run folder: ``.NAME.lock``, ``.NAME.staging`` or ``.NAME.old``."""
    return output.with_name(f".{output.name}.{kind}")


@contextlib.contextmanager
def run_lock(output: Path, enabled: bool = True):
    """Hold the run folder's lock for the duration; a second run into the same folder is refused.

    The lock is an OS file lock (flock) on ``.NAME.lock`` beside the folder, so it is released
    when the process ends in any way, kill -9 included: there is never a stale lock to remove.
    """
    if not enabled:
        yield
        return
    from filelock import FileLock, Timeout

    output.parent.mkdir(parents=True, exist_ok=True)
    path = sibling(output, "lock")
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FinetuneError(f"another training run is writing to {output} right now (it holds {path}): "
                            f"wait for it to finish, stop it, or choose another --output") from None
    try:
        yield
    finally:
        lock.release()


def replace_dir(new: Path, target: Path) -> None:
    """Put the folder ``new`` in place of ``target`` (which may not exist), never leaving neither.

    Two renames: ``target`` -> ``.NAME.old``, then ``new`` -> ``target``; the old one is deleted
    after. A crash between the renames is repaired by ``recover_dir(target)``.
    """
    recover_dir(target)  # a leftover .old from an earlier crash may be the only copy
    old = sibling(target, "old")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    _fsync_parent(target)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: Path) -> bool:
    """Undo an interrupted ``replace_dir``: restore ``target`` from ``.NAME.old`` when it is
    missing, else delete the leftover. Returns True when something was restored."""
    old = sibling(target, "old")
    if not old.exists():
        return False
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        return False
    os.replace(old, target)
    log.info("restored %s (a run was stopped while replacing it)", target)
    return True


def model_card(*, title: str, kind: str, base: dict[str, Any], data: list[dict[str, Any]],
               hyperparameters: dict[str, Any], metrics: dict[str, Any], command: str,
               usage: str, tags: list[str]) -> str:
    """A README.md that lets someone reproduce and trust the artifact (YAML front matter + tables)."""
    front = ["---", f"library_name: {'peft' if kind == 'lora' else 'transformers'}"]
    if base.get("hf_id"):
        front.append(f"base_model: {base['hf_id']}")
    front += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    lines = front + [f"# {title}", "", f"Trained with Parley (`finetune/{'lora' if kind == 'lora' else 'classify'}.py`).", "",
                     "## Base model", ""]
    lines += [f"- {k}: `{v}`" for k, v in base.items()] + ["", "## Data", "",
                                                             "| file | sha256 | rows used | rejected |",
                                                             "|---|---|---|---|"]
    for d in data:
        lines.append(f"| `{d['path']}` | `{d.get('sha256', '-')[:16]}` | {d.get('rows', '-')} | {d.get('rejected', '-')} |")
    lines += ["", "## Hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in hyperparameters.items()]
    lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    lines += ["", "## Command", "", "```", command, "```", "", "## Use it", "", usage, ""]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def command_line() -> str:
    import shlex

    argv = list(sys.argv)
    if argv and argv[0].endswith(("__main__.py", "cli.py")):
        argv[0] = "parley"
    return " ".join(shlex.quote(a) for a in argv)


def format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
