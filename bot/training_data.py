"""What a training run would see, before it starts: the Fine-tune tab's data preview.

For a data file (any format finetune/data.py reads), the chat's feedback, or preference pairs:
the detected format, the rejected rows with ``file:line: reason``, the token length of every
kept row, and a few rows rendered in the model's own chat template and split into segments
that are trained or not. The split comes from the recipes' own encoders (``encode_chat`` for
SFT, ``finetune.dpo.encode_pair`` for DPO), so the highlighted tokens are exactly the tokens
the loss is computed on, not a guess made for display.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.errors import RequestError

FEEDBACK, PREFERENCES = "feedback", "preferences"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".jsonl.gz", ".json.gz", ".csv.gz", ".tsv.gz")
"""What the Fine-tune tab offers to upload or pick (a ``datasets`` folder can be picked too)."""
SKIP_DIRS = {"models", "adapters", "indexes", "classifiers", "runs", "documents", "cache", "hub"}


@dataclass
class Sample:
    """One rendered row: ``segments`` are (text, trained) pieces in order; ``label`` names the
    reply of a preference pair ("chosen" / "rejected")."""

    source: str
    segments: list[tuple[str, bool]]
    tokens: int
    trained: int
    label: str = ""


@dataclass
class Preview:
    source: str
    kind: str
    formats: dict[str, str]
    rows_read: int
    kept: int
    rejects: list[tuple[str, str]]
    lengths: list[int]
    samples: list[Sample] = field(default_factory=list)
    tokens_trained: int = 0
    truncated_read: bool = False
    """True when only the first ``max_rows`` rows were read (a large file)."""

    @property
    def reject_lines(self) -> list[str]:
        return [f"{source}: {reason}" for source, reason in self.rejects]

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "formats": self.formats, "rows_read": self.rows_read,
                "kept": self.kept, "rejected": len(self.rejects), "tokens_trained": self.tokens_trained,
                "longest": max(self.lengths) if self.lengths else 0, "truncated_read": self.truncated_read}


def segments(tokenizer, ids: list[int], trained: list[bool]) -> list[tuple[str, bool]]:
    """Group consecutive tokens by trained/untrained and decode each group (special tokens kept)."""
    out: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            out.append((tokenizer.decode(ids[start:i], skip_special_tokens=False), trained[start]))
            start = i
    return out


def preview(source: str | Path, tokenizer, *, home: Path, kind: str = "sft", fmt: str = "auto",
            max_length: int = 1024, samples: int = 3, max_rows: int = 20_000) -> Preview:
    """Read, check and encode up to ``max_rows`` rows of ``source`` as the recipe would.

    ``source``: a data file or ``datasets`` folder, ``"feedback"`` (SFT on the chat's 👍 and
    corrections) or ``"preferences"`` / a pairs file with ``kind="dpo"``. Raises RequestError
    when the source cannot be read at all (the message says why and how to fix it).
    """
    from finetune import data as D
    from finetune.errors import FinetuneError

    try:
        if kind == "dpo":
            return _preview_pairs(str(source), tokenizer, home, max_length, samples, max_rows)
        report = D.DataReport()
        if str(source) == FEEDBACK:
            examples, _ = D.load_feedback(home, report=report)
            truncated = False
        else:
            examples, truncated = _read_examples(Path(source), fmt, report, max_rows)
        encoded = D.encode_all(tokenizer, examples, report, max_length=max_length)
    except FinetuneError as exc:
        raise RequestError(str(exc)) from None
    shown = []
    for enc in encoded[:samples]:
        flags = [label != D.IGNORE_INDEX for label in enc.labels]
        shown.append(Sample(enc.source, segments(tokenizer, enc.input_ids, flags), len(enc.input_ids),
                            enc.trained_tokens))
    return Preview(source=str(source), kind="sft", formats=dict(report.formats), rows_read=report.rows_read,
                   kept=len(encoded), rejects=[(r.source, r.reason) for r in report.rejects],
                   lengths=[len(e.input_ids) for e in encoded], samples=shown,
                   tokens_trained=sum(e.trained_tokens for e in encoded), truncated_read=truncated)


def _read_examples(path: Path, fmt: str, report, max_rows: int):
    """finetune.data.load_examples for one file, stopping after ``max_rows`` rows."""
    from finetune import data as D

    report.files.append(str(path))
    file_fmt = None if fmt == "auto" else fmt
    examples = []
    truncated = False
    for source, row in D.read_records(path):
        if report.rows_read >= max_rows:
            truncated = True
            break
        report.rows_read += 1
        if isinstance(row, D.RowError):
            report.reject(source, str(row))
            continue
        if file_fmt is None:
            file_fmt = D.detect_format(row)
            if file_fmt is None:
                raise D.DataError(f"{source}: cannot tell the data format from the keys {sorted(row)[:8]}; expected "
                                  f"'messages' (OpenAI), 'conversations' (ShareGPT), 'instruction'+'output' "
                                  f"(Alpaca), 'prompt'+'completion' or 'text'")
            report.formats[path.name] = file_fmt
        try:
            examples.append(D.normalize(row, file_fmt, source))
        except D.RowError as exc:
            report.reject(source, str(exc))
        except D.MALFORMED as exc:
            report.reject(source, D._malformed(exc))
    report.formats.setdefault(path.name, file_fmt or "empty")
    return examples, truncated


def _preview_pairs(source: str, tokenizer, home: Path, max_length: int, samples: int, max_rows: int) -> Preview:
    from finetune import dpo

    pairs, report = dpo.load_pairs([source], home)
    truncated = len(pairs) > max_rows
    pairs = pairs[:max_rows]
    encoded = dpo.encode_pairs(tokenizer, pairs, report, max_length)
    shown: list[Sample] = []
    for enc in encoded[:samples]:
        for label, reply in (("chosen", enc.chosen_ids), ("rejected", enc.rejected_ids)):
            ids = enc.prompt_ids + reply
            flags = [False] * len(enc.prompt_ids) + [True] * len(reply)
            shown.append(Sample(enc.source, segments(tokenizer, ids, flags), len(ids), len(reply), label=label))
    return Preview(source=source, kind="dpo", formats=dict(report.formats), rows_read=report.rows_read,
                   kept=len(encoded), rejects=[(r.source, r.reason) for r in report.rejects],
                   lengths=[len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in encoded],
                   samples=shown, tokens_trained=sum(len(e.chosen_ids) + len(e.rejected_ids) for e in encoded),
                   truncated_read=truncated)


def data_files(home: Path, limit: int = 500) -> list[str]:
    """Data files under PARLEY_HOME a run can train on (models, adapters, indexes... left out),
    as paths relative to PARLEY_HOME, newest first."""
    home = Path(home)
    found: list[tuple[float, str]] = []
    if not home.is_dir():
        return []
    stack = [home]
    while stack and len(found) < limit:
        folder = stack.pop()
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if folder == home and entry.name in SKIP_DIRS:
                    continue
                if any((entry / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
                    found.append((entry.stat().st_mtime, str(entry.relative_to(home))))
                else:
                    stack.append(entry)
            elif entry.name.endswith(DATA_SUFFIXES):
                found.append((entry.stat().st_mtime, str(entry.relative_to(home))))
    return [p for _, p in sorted(found, reverse=True)]


def resolve_under_home(home: Path, relative: str) -> Path:
    """A path picked in the UI, confined to PARLEY_HOME (no ``..`` or absolute escapes)."""
    home = Path(home).resolve()
    path = (home / relative).resolve()
    if path != home and home not in path.parents:
        raise RequestError(f"{relative!r} is not under PARLEY_HOME ({home}): pick a file from the list")
    if not path.exists():
        raise RequestError(f"{relative!r} does not exist under PARLEY_HOME ({home})")
    return path


def chat_data_counts(store) -> dict[str, int]:
    """How much the chat has given to train on: rated/corrected replies (SFT) and preference pairs
    (DPO; 0 while the store has no ``preference_pairs``)."""
    feedback = sum(1 for _ in store.feedback_examples())
    pairs = sum(1 for _ in store.preference_pairs()) if hasattr(store, "preference_pairs") else 0
    return {"feedback": feedback, "pairs": pairs}
