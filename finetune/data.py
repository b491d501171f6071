"""Training data: files in any common format -> checked chat messages -> token ids + labels.

The steps, in order (each is one function below):

1. ``read_records``   a file (JSONL, JSON array, CSV/TSV, a ``datasets`` folder) -> raw dict rows,
                      each with its source (``file:line``); unreadable rows become rejects.
2. ``detect_format``  which of ``FORMATS`` the rows are in (or the one named with ``--format``).
3. ``normalize``      one raw row -> ``Example`` (OpenAI-style messages, optional tools).
4. ``check_messages`` structural checks: roles, empty content, turn order, an assistant turn.
5. ``encode_chat``    the ONE function that owns the chat format and the loss mask: renders the
                      conversation with the model's own chat template and labels assistant tokens
                      (including the end-of-turn token) only.
6. ``split_examples`` train/eval split with its own seed (``data_seed``), independent of training.
7. ``length_grouped_batches`` + ``collate``: batches of similar length, padded per batch.

Rows are never dropped silently: every reject lands in ``DataReport`` with its source and reason,
and ``DataReport.check`` aborts the run when the rejected share passes the threshold.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from finetune.errors import DataError

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100

# ShareGPT speaker names (LLaMA-Factory, FastChat, Glaive) -> OpenAI roles.
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
    "function_call": "function_call",
    "observation": "tool", "tool": "tool", "function": "tool", "ipython": "tool",
}
OPENAI_ROLE_ALIASES = {"developer": "system", "function": "tool", "ipython": "tool"}

DEFAULT_MAX_FILE_BYTES = 4 * 1024 ** 3
DEFAULT_MAX_JSON_ARRAY_BYTES = 1024 ** 3
DEFAULT_MAX_ROWS = 2_000_000
DEFAULT_MAX_CHARS = 200_000


# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------
class RowError(ValueError):
    """One row is unusable; the message is the reason shown in the report."""


@dataclass
class Example:
    """One training row, normalized.

    ``messages`` are OpenAI-style dicts: ``role`` in ROLES, ``content`` a string; an assistant
    message may carry ``tool_calls`` ([{"type": "function", "function": {"name", "arguments": dict}}])
    and ``weight`` (0 = shown as context, not trained). ``text`` is set instead for plain-text rows
    (every token is trained).
    """

    source: str
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    text: str | None = None


@dataclass
class Encoded:
    """A tokenized example: ``input_ids`` [T] and ``labels`` [T] (-100 where not trained)."""

    source: str
    input_ids: list[int]
    labels: list[int]
    turns: int = 0

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class Reject:
    source: str
    reason: str


@dataclass
class DataReport:
    """Everything that was read, kept and rejected, with reasons; printed before training."""

    files: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)
    rows_read: int = 0
    rejects: list[Reject] = field(default_factory=list)

    def reject(self, source: str, reason: str) -> None:
        self.rejects.append(Reject(source, reason))

    @property
    def rejected_share(self) -> float:
        return len(self.rejects) / self.rows_read if self.rows_read else 0.0

    def reasons(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.rejects:
            key = re.sub(r"\d+", "N", r.reason.split(":")[0])
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def lines(self, limit: int = 20) -> list[str]:
        out = [f"data: {self.rows_read} rows read from {', '.join(self.files) or '-'}"
               f" ({', '.join(f'{k}: {v}' for k, v in self.formats.items())}); "
               f"{len(self.rejects)} rejected ({self.rejected_share:.1%})"]
        for r in self.rejects[:limit]:
            out.append(f"  rejected {r.source}: {r.reason}")
        if len(self.rejects) > limit:
            out.append(f"  ... and {len(self.rejects) - limit} more; by reason: {self.reasons()}")
        return out

    def check(self, max_reject_share: float) -> None:
        """Abort when too many rows were rejected (the threshold is a share of rows read)."""
        if self.rows_read == 0:
            raise DataError(f"no rows found in {', '.join(self.files) or 'the data'}: is the file empty?")
        if self.rows_read == len(self.rejects):
            raise DataError("every row was rejected, nothing to train on:\n" + "\n".join(self.lines()))
        if self.rejected_share > max_reject_share:
            raise DataError(
                f"{len(self.rejects)} of {self.rows_read} rows ({self.rejected_share:.1%}) were rejected, "
                f"more than the allowed {max_reject_share:.1%}; fix the rows below or raise "
                f"max_reject_share (--max-reject-share):\n" + "\n".join(self.lines()))

    def to_json(self) -> dict[str, Any]:
        return {"files": self.files, "formats": self.formats, "rows_read": self.rows_read,
                "rejected": len(self.rejects), "reasons": self.reasons(),
                "rejects": [{"source": r.source, "reason": r.reason} for r in self.rejects[:1000]]}


# --------------------------------------------------------------------------------------------
# 1. Reading
# --------------------------------------------------------------------------------------------
def _has_bad_utf8(value: Any) -> bool:
    """True when a string decoded with surrogateescape kept undecodable bytes (U+DC80..U+DCFF)."""
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, dict):
        return any(_has_bad_utf8(v) for v in value.values()) or any(_has_bad_utf8(k) for k in value)
    if isinstance(value, list):
        return any(_has_bad_utf8(v) for v in value)
    return False


class _Bounded(io.RawIOBase):
    """A read-only stream that raises DataError once more than ``limit`` bytes came out of it.

    Wraps a gzip stream, so a small file that inflates to gigabytes (a gzip bomb) is stopped
    while it is read, holding at most one buffer beyond the limit, instead of being inflated
    whole first.
    """

    def __init__(self, raw, limit: int, path: Path):
        self.raw, self.limit, self.path, self.count = raw, limit, path, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.count += n or 0
        if self.count > self.limit:
            raise DataError(f"{self.path} inflates to more than {self.limit / 1e9:.3g} GB, above the limit "
                            f"(max_file_bytes): it is not a training set but a gzip bomb, or it needs "
                            f"splitting (or a higher limit, if you mean it)")
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _open_bytes(path: Path, limit: int = DEFAULT_MAX_FILE_BYTES):
    """A binary file; a ``.gz`` file is inflated as it is read, and at most ``limit`` bytes of it."""
    if path.suffix == ".gz":
        return io.BufferedReader(_Bounded(gzip.open(path, "rb"), limit, path), buffer_size=1 << 16)
    return open(path, "rb")


def read_records(path: str | Path, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 max_rows: int = DEFAULT_MAX_ROWS) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    """Yield ``(source, row)`` for every row of a data file; an unreadable row yields a RowError.

    ``source`` is ``file:line`` for line-based files and ``file[index]`` for JSON arrays and
    ``datasets`` folders. Caps on file size and row count are enforced before anything is parsed.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file {path} does not exist: check the --data path")
    if path.is_dir():
        yield from _read_datasets_folder(path, max_rows)
        return
    size = path.stat().st_size
    if size > max_file_bytes:
        raise DataError(f"{path} is {size / 1e9:.1f} GB, above the {max_file_bytes / 1e9:.1f} GB limit "
                        f"(max_file_bytes): split it, or raise the limit if you mean it")
    name = path.name.removesuffix(".gz")
    if name.endswith((".tsv", ".csv")):
        yield from _read_table(path, "\t" if name.endswith(".tsv") else ",", max_rows, max_file_bytes)
        return
    with _open_bytes(path, max_file_bytes) as fh:
        head = fh.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if head.startswith(b"["):
        if size > DEFAULT_MAX_JSON_ARRAY_BYTES:
            raise DataError(f"{path} is a {size / 1e9:.1f} GB JSON array, which must be read whole: "
                            f"convert it to JSONL (one object a line) to stream it")
        yield from _read_json_array(path, max_rows, min(max_file_bytes, DEFAULT_MAX_JSON_ARRAY_BYTES))
    else:
        yield from _read_jsonl(path, max_rows, max_file_bytes)


def _too_many(path: Path, max_rows: int) -> DataError:
    return DataError(f"{path} has more than {max_rows} rows (max_rows); take a sample or raise the limit")


def _read_jsonl(path: Path, max_rows: int, max_bytes: int = DEFAULT_MAX_FILE_BYTES
                ) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    n = 0
    with _open_bytes(path, max_bytes) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            n += 1
            if n > max_rows:
                raise _too_many(path, max_rows)
            source = f"{path.name}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield source, RowError(f"invalid UTF-8 at byte {exc.start} of the line")
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield source, RowError(f"invalid JSON: {exc.msg} at column {exc.colno}")
                continue
            if not isinstance(row, dict):
                yield source, RowError(f"a row must be a JSON object, not {type(row).__name__}")
                continue
            yield source, row


def _read_json_array(path: Path, max_rows: int, max_bytes: int = DEFAULT_MAX_JSON_ARRAY_BYTES
                     ) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    with _open_bytes(path, max_bytes) as fh:
        text = fh.read().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; "
                        f"fix the file (a JSON array of objects, or JSONL with one object a line)") from None
    if not isinstance(rows, list):
        raise DataError(f"{path} holds a JSON {type(rows).__name__}; expected an array of objects or JSONL")
    if len(rows) > max_rows:
        raise _too_many(path, max_rows)
    for i, row in enumerate(rows):
        source = f"{path.name}[{i}]"
        if not isinstance(row, dict):
            yield source, RowError(f"a row must be a JSON object, not {type(row).__name__}")
        elif _has_bad_utf8(row):
            yield source, RowError("invalid UTF-8 in a string")
        else:
            yield source, row


def _read_table(path: Path, delimiter: str, max_rows: int, max_bytes: int = DEFAULT_MAX_FILE_BYTES
                ) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    with _open_bytes(path, max_bytes) as fh:
        text = fh.read().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    # TSV has no quoting convention (a tweet may start with a quote mark); CSV uses RFC 4180 quotes.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise DataError(f"{path}: the header line cannot be read ({exc})") from None
    yield from _table_rows(path, reader, header, max_rows)


def _table_rows(path: Path, reader, header: list[str], max_rows: int):
    rows = enumerate(reader, start=2)
    while True:
        try:
            i, cells = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. a cell above the csv module's 131,072-character limit
            raise DataError(f"{path.name}:{reader.line_num}: {exc}; fix that line (an unclosed quote "
                            f"swallows the lines after it)") from None
        if i - 1 > max_rows:
            raise _too_many(path, max_rows)
        source = f"{path.name}:{i}"
        if not cells or not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield source, RowError(f"{len(cells)} columns where the header has {len(header)}")
            continue
        row = dict(zip(header, cells))
        if _has_bad_utf8(row):
            yield source, RowError("invalid UTF-8 in a cell")
            continue
        yield source, row


def _read_datasets_folder(path: Path, max_rows: int) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    if not any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"{path} is a folder but not one saved with datasets' save_to_disk "
                        f"(no dataset_info.json/state.json/dataset_dict.json): point --data at a file")
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path} holds splits {list(ds)} but no 'train' split: name the split folder")
        ds = ds["train"]
    if len(ds) > max_rows:
        raise _too_many(path, max_rows)
    for i, row in enumerate(ds):
        yield f"{path.name}[{i}]", dict(row)


def file_sha256(path: str | Path) -> str:
    """Content hash of a data file, or of every file in a folder (sorted by relative path)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# 2-4. Formats, normalization, checks
# --------------------------------------------------------------------------------------------
def detect_format(row: dict[str, Any]) -> str | None:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and ("output" in row or "instances" in row):
        return "alpaca"  # "instances" rows are Self-Instruct seed tasks
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    return None


def _text(value: Any, where: str) -> str:
    """Message content -> str; OpenAI content parts are joined, non-text parts refused."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RowError(f"{where}: content part of type {kind!r} is not supported (text only)")
        return "".join(parts)
    raise RowError(f"{where}: content must be a string, not {type(value).__name__}")


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(f"tools: not valid JSON ({exc.msg})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RowError("tools: expected a list of JSON schemas")
    # Accept both bare schemas ({"name", "parameters"}) and OpenAI's {"type": "function", "function": ...}.
    return [t if "function" in t else {"type": "function", "function": t} for t in value]


def _tool_call(raw: Any, where: str) -> dict[str, Any]:
    """A tool call (OpenAI shape, or a ShareGPT function_call JSON) -> {"type", "function": {name, arguments: dict}}."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RowError(f"{where}: tool call is not valid JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise RowError(f"{where}: tool call must be an object")
    fn = raw.get("function", raw)
    name = fn.get("name") if isinstance(fn, dict) else None
    if not name:
        raise RowError(f"{where}: tool call without a function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):  # the OpenAI API sends a JSON string; HF templates want a dict
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            raise RowError(f"{where}: tool call arguments are not valid JSON ({exc.msg})") from None
    call = {"type": "function", "function": {"name": name, "arguments": args}}
    if raw.get("id"):
        call["id"] = raw["id"]
    return call


def _from_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = row["messages"]
    if not isinstance(msgs, list):
        raise RowError("'messages' must be a list")
    out = []
    for i, m in enumerate(msgs, start=1):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise RowError(f"{where}: must be an object with role and content")
        raw_role = m.get("role")
        if not isinstance(raw_role, str):
            raise RowError(f"{where}: role must be a string such as \"user\", not {type(raw_role).__name__}")
        role = OPENAI_ROLE_ALIASES.get(raw_role, raw_role)
        if role not in ROLES:
            raise RowError(f"{where}: unknown role {m.get('role')!r} (use one of {', '.join(ROLES)})")
        msg: dict[str, Any] = {"role": role, "content": _text(m.get("content"), where)}
        if role == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise RowError(f"{where}: tool_calls must be a list of tool calls")
            msg["tool_calls"] = [_tool_call(c, where) for c in m["tool_calls"]]
        if role == "assistant" and m.get("function_call"):
            msg["tool_calls"] = [_tool_call(m["function_call"], where)]
        if role == "tool" and m.get("tool_call_id"):
            msg["tool_call_id"] = m["tool_call_id"]
        if role == "assistant" and "weight" in m:
            if m["weight"] not in (0, 1):
                raise RowError(f"{where}: weight must be 0 or 1, not {m['weight']!r}")
            msg["weight"] = int(m["weight"])
        out.append(msg)
    return out


def _from_sharegpt(row: dict[str, Any]) -> list[dict[str, Any]]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise RowError("'conversations' must be a list")
    out: list[dict[str, Any]] = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        out.append({"role": "system", "content": row["system"]})
    for i, t in enumerate(turns, start=1):
        where = f"turn {i}"
        if not isinstance(t, dict):
            raise RowError(f"{where}: must be an object with from and value")
        speaker = t.get("from", t.get("role"))
        role = SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise RowError(f"{where}: unknown speaker {speaker!r} "
                           f"(use human/user, gpt/assistant, system, function_call, observation/tool)")
        value = _text(t.get("value", t.get("content")), where)
        if role == "function_call":
            out.append({"role": "assistant", "content": "", "tool_calls": [_tool_call(value, where)]})
        else:
            out.append({"role": role, "content": value})
    return out


def _from_alpaca(row: dict[str, Any]) -> list[dict[str, Any]]:
    if "output" not in row and isinstance(row.get("instances"), list) and row["instances"]:
        # Self-Instruct seed task: the instruction with its first worked instance.
        first = row["instances"][0]
        if not isinstance(first, dict):
            raise RowError("instances: expected a list of {input, output} objects")
        row = {**row, "input": first.get("input", ""), "output": first.get("output", "")}
    instruction = _text(row.get("instruction"), "instruction")
    extra = _text(row.get("input"), "input")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    out: list[dict[str, Any]] = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        out.append({"role": "system", "content": row["system"]})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowError(f"history: expected [[question, answer], ...], not {type(history).__name__}")
    for pair in history:  # LLaMA-Factory: [[question, answer], ...]
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RowError("history: expected [[question, answer], ...]")
        out += [{"role": "user", "content": _text(pair[0], "history")},
                {"role": "assistant", "content": _text(pair[1], "history")}]
    out += [{"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(row.get("output"), "output")}]
    if "output" not in row:
        raise RowError("missing key 'output' for the alpaca format")
    return out


def _from_prompt_completion(row: dict[str, Any]) -> list[dict[str, Any]]:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational variant
        return _from_messages({"messages": prompt + completion})
    return [{"role": "user", "content": _text(prompt, "prompt")},
            {"role": "assistant", "content": _text(completion, "completion")}]


NORMALIZERS = {"messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
               "prompt_completion": _from_prompt_completion}
REQUIRED_KEYS = {"messages": ("messages",), "sharegpt": ("conversations",),
                 "alpaca": ("instruction",), "prompt_completion": ("prompt", "completion"),
                 "text": ("text",)}


MALFORMED = (TypeError, AttributeError, KeyError, IndexError, ValueError)
"""What a row of an unforeseen shape raises inside normalization (``"role": ["user"]`` is
unhashable, ``"history": 5`` is not iterable...): rejected with the row, never fatal to the load."""


def _malformed(exc: Exception) -> str:
    return f"malformed row ({type(exc).__name__}: {str(exc)[:120]})"


def check_messages(messages: list[dict[str, Any]], max_chars: int = DEFAULT_MAX_CHARS) -> None:
    """Raise RowError when a conversation cannot be trained on as it is."""
    if not messages:
        raise RowError("no messages")
    chars = 0
    first_turn = None
    for i, m in enumerate(messages, start=1):
        role, content = m["role"], m["content"]
        chars += len(content)
        if role == "system" and i != 1:
            raise RowError(f"message {i}: a system message is only allowed first")
        if not content.strip() and not (role == "assistant" and m.get("tool_calls")):
            raise RowError(f"message {i} ({role}): empty content")
        if role != "system" and first_turn is None:
            first_turn = role
            if role != "user":
                raise RowError(f"message {i}: the conversation starts with {role}; it needs a user turn first")
        if i > 1:
            prev = messages[i - 2]
            if role == "tool" and not (prev["role"] == "tool" or prev.get("tool_calls")):
                raise RowError(f"message {i}: a tool result must follow an assistant tool call")
            if role == prev["role"] and role in ("user", "assistant") and not prev.get("tool_calls"):
                raise RowError(f"message {i}: turns do not alternate ({role} follows {role})")
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
        raise RowError("no assistant turn to train on")
    if chars > max_chars:
        raise RowError(f"{chars} characters, above the {max_chars} limit (max_chars)")


def normalize(row: dict[str, Any], fmt: str, source: str, max_chars: int = DEFAULT_MAX_CHARS) -> Example:
    """One raw row in format ``fmt`` -> a checked Example; raises RowError with the reason."""
    missing = [k for k in REQUIRED_KEYS[fmt] if k not in row]
    if missing:
        raise RowError(f"missing key {missing[0]!r} for the {fmt} format")
    if fmt == "text":
        text = _text(row["text"], "text")
        if not text.strip():
            raise RowError("empty text")
        if len(text) > max_chars:
            raise RowError(f"{len(text)} characters, above the {max_chars} limit (max_chars)")
        return Example(source=source, text=text)
    messages = NORMALIZERS[fmt](row)
    check_messages(messages, max_chars)
    return Example(source=source, messages=messages, tools=_tools(row.get("tools")))


def load_examples(paths: Iterable[str | Path], fmt: str = "auto", *, report: DataReport | None = None,
                  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, max_rows: int = DEFAULT_MAX_ROWS,
                  max_chars: int = DEFAULT_MAX_CHARS) -> tuple[list[Example], DataReport]:
    """Read, detect, normalize and check every row of every file; rejects go to the report."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}: use auto or one of {', '.join(FORMATS)}")
    report = report or DataReport()
    examples: list[Example] = []
    for path in paths:
        path = Path(path)
        report.files.append(str(path))
        file_fmt = None if fmt == "auto" else fmt
        for source, row in read_records(path, max_file_bytes=max_file_bytes, max_rows=max_rows):
            report.rows_read += 1
            if isinstance(row, RowError):
                report.reject(source, str(row))
                continue
            if file_fmt is None:
                file_fmt = detect_format(row)
                if file_fmt is None:
                    raise DataError(
                        f"{source}: cannot tell the data format from the keys {sorted(row)[:8]}; expected "
                        f"'messages' (OpenAI), 'conversations' (ShareGPT), 'instruction'+'output' (Alpaca), "
                        f"'prompt'+'completion' or 'text'; or name it with --format")
                report.formats[path.name] = file_fmt
            try:
                examples.append(normalize(row, file_fmt, source, max_chars))
            except RowError as exc:
                report.reject(source, str(exc))
            except MALFORMED as exc:  # a value of a shape no check above foresaw: this row only
                report.reject(source, _malformed(exc))
        report.formats.setdefault(path.name, file_fmt or "empty")
    return examples, report


def load_feedback(home: Path, *, min_rating: int = 1, report: DataReport | None = None,
                  max_chars: int = DEFAULT_MAX_CHARS) -> tuple[list[Example], DataReport]:
    """Rows from the feedback people gave in the chat (PARLEY_HOME/parley.db), as Examples."""
    from bot.store import Store

    db = Path(home) / "parley.db"
    if not db.is_file():
        raise DataError(f"no chat store at {db}: chat with Parley and rate or correct some replies "
                        f"first (PARLEY_HOME={home}), or train from a file with --data FILE")
    report = report or DataReport()
    report.files.append(str(db))
    report.formats[db.name] = "feedback"
    examples = []
    for row in Store(db).feedback_examples(min_rating=min_rating):
        source = f"{db.name}#turn={row['turn_id']}"
        report.rows_read += 1
        try:
            examples.append(normalize({"messages": row["messages"]}, "messages", source, max_chars))
        except RowError as exc:
            report.reject(source, str(exc))
        except MALFORMED as exc:
            report.reject(source, _malformed(exc))
    if report.rows_read == 0:
        raise DataError(f"{db} has no usable feedback yet: rate replies with thumbs up or write a "
                        f"correction in the chat, then train again")
    return examples, report


def examples_sha256(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.messages, ex.tools, ex.text], sort_keys=True).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# 5. The chat format and the loss mask
# --------------------------------------------------------------------------------------------
def _template_of(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    return template or ""


def _adapt_to_template(tokenizer, messages: list[dict[str, Any]], tools):
    """Keep tool information visible for templates that do not render it natively.

    A template that never mentions ``tool_calls`` would silently drop them (SmolLM2's does), so
    they are written into the assistant content as ``<tool_call>{json}</tool_call>`` (the Hermes
    convention); a template without ``tools`` gets the schemas in the system message.
    """
    template = _template_of(tokenizer)
    msgs = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    if "tool_calls" not in template:
        for m in msgs:
            calls = m.pop("tool_calls", None)
            if calls:
                text = "\n".join("<tool_call>\n" + json.dumps(c["function"], ensure_ascii=False) + "\n</tool_call>"
                                 for c in calls)
                m["content"] = (m["content"] + "\n" + text) if m["content"].strip() else text
    if tools and "tools" not in template:
        listing = ("You can call these tools; answer with <tool_call>{\"name\": ..., \"arguments\": ...}"
                   "</tool_call> to use one:\n<tools>\n"
                   + "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
                   + "\n</tools>")
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {**msgs[0], "content": msgs[0]["content"] + "\n\n" + listing}
        else:
            msgs.insert(0, {"role": "system", "content": listing})
        tools = None
    return msgs, tools


def _render(tokenizer, messages, tools, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, example: Example, max_length: int | None = None,
                overlong: str = "reject") -> Encoded:
    """Render one example with the model's chat template; label assistant tokens only.

    The ids are exactly ``tokenizer.apply_chat_template(messages, tools=tools)["input_ids"]``.
    Assistant spans are found by rendering prefixes, which works for templates without
    ``{% generation %}`` markers (SmolLM2's has none): for assistant message i the span starts
    where ``render(messages[:i], add_generation_prompt=True)`` ends and stops where
    ``render(messages[:i+1])`` ends, minus trailing whitespace after the end-of-turn token (so
    ``<|im_end|>`` is trained and the newline after it is not). A token is labelled when it
    overlaps a span, as transformers' own ``return_assistant_tokens_mask`` does.

    Plain-text examples train every token, with the EOS token appended.
    Raises RowError (the caller reports it) when the row is too long or has nothing to train on.
    """
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        return _fit(Encoded(example.source, ids, list(ids), turns=0), max_length, overlong)

    messages, tools = _adapt_to_template(tokenizer, example.messages, example.tools)
    full = _render(tokenizer, messages, tools)
    spans: list[tuple[int, int]] = []
    shift = len(messages) - len(example.messages)  # 1 when a tools system message was inserted
    for i, original in enumerate(example.messages):
        if original["role"] != "assistant" or not original.get("weight", 1):
            continue
        before = _render(tokenizer, messages[: i + shift], tools, add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + shift + 1], tools)
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError(
                f"{example.source}: the model's chat template does not render conversations "
                f"prefix-consistently (rendering the first {i} messages changes earlier text), so the "
                f"assistant tokens cannot be located; use a model whose template appends turns, or "
                f"set a chat template with {{% generation %}} markers")
        end = len(before) + len(through[len(before):].rstrip())
        spans.append((len(before), end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    s = 0
    for t, (start, stop) in enumerate(enc["offset_mapping"]):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if stop > spans[s][0]:
            labels[t] = ids[t]
    turns = sum(1 for m in example.messages if m["role"] in ("user", "assistant"))
    return _fit(Encoded(example.source, ids, labels, turns=turns), max_length, overlong)


def _fit(enc: Encoded, max_length: int | None, overlong: str) -> Encoded:
    if max_length and len(enc.input_ids) > max_length:
        if overlong != "truncate":
            raise RowError(f"{len(enc.input_ids)} tokens, above max_length={max_length} "
                           f"(raise max_length, or set overlong='truncate')")
        enc = Encoded(enc.source, enc.input_ids[:max_length], enc.labels[:max_length], enc.turns)
    if enc.trained_tokens == 0:
        raise RowError("no assistant tokens left to train on")
    return enc


def encode_all(tokenizer, examples: list[Example], report: DataReport, *, max_length: int,
               overlong: str = "reject") -> list[Encoded]:
    """Tokenize every example; over-long or empty rows become rejects in the same report."""
    from jinja2 import TemplateError

    out = []
    for ex in examples:
        try:
            out.append(encode_chat(tokenizer, ex, max_length, overlong))
        except RowError as exc:
            report.reject(ex.source, str(exc))
        except (TemplateError, *MALFORMED) as exc:  # e.g. tool-call arguments the template cannot render
            report.reject(ex.source, _malformed(exc))
    return out


def dataset_stats(encoded: list[Encoded]) -> dict[str, Any]:
    """Rows, turns and token-length percentiles: what the run is about to train on."""
    if not encoded:
        return {"rows": 0}
    lengths = sorted(len(e.input_ids) for e in encoded)

    def pct(p: float) -> int:
        return lengths[min(len(lengths) - 1, int(math.ceil(p / 100 * len(lengths))) - 1)]

    trained = sum(e.trained_tokens for e in encoded)
    total = sum(lengths)
    return {"rows": len(encoded), "turns_mean": round(sum(e.turns for e in encoded) / len(encoded), 2),
            "tokens_total": total, "tokens_trained": trained,
            "trained_share": round(trained / total, 3) if total else 0.0,
            "length_p50": pct(50), "length_p90": pct(90), "length_p99": pct(99), "length_max": lengths[-1]}


def format_stats(name: str, stats: dict[str, Any]) -> str:
    if not stats.get("rows"):
        return f"{name}: 0 rows"
    return (f"{name}: {stats['rows']} rows, {stats['turns_mean']} turns/row, {stats['tokens_total']} tokens "
            f"({stats['trained_share']:.0%} trained); length p50 {stats['length_p50']}, p90 "
            f"{stats['length_p90']}, p99 {stats['length_p99']}, max {stats['length_max']}")


# --------------------------------------------------------------------------------------------
# 6-7. Split, batches, collation
# --------------------------------------------------------------------------------------------
def split_examples(items: list, eval_fraction: float, data_seed: int, max_eval_rows: int = 500):
    """Deterministic train/eval split that depends on ``data_seed`` only (not the training seed)."""
    if eval_fraction <= 0 or len(items) < 2:
        return list(items), []
    n_eval = min(max_eval_rows, max(1, round(len(items) * eval_fraction)), len(items) - 1)
    order = list(range(len(items)))
    random.Random(data_seed).shuffle(order)
    held = set(order[:n_eval])
    return ([x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held])


def length_grouped_batches(lengths: list[int], batch_size: int, *, seed: int, epoch: int,
                           group_batches: int = 64) -> list[list[int]]:
    """Shuffle, then sort each window of ``group_batches`` batches by length and cut it.

    Neighbours in a batch have similar lengths, so little compute goes to padding, while the
    batch order stays random. A pure function of (lengths, batch_size, seed, epoch): resuming
    recomputes the same order and skips the batches already trained.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * group_batches
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w: w + window], key=lambda i: -lengths[i])
        batches += [chunk[b: b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(rows: list[Encoded], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Pad one batch to its longest row (right padding).

    Returns torch tensors, for a batch of B rows whose longest has T tokens:
      ``input_ids``      [B, T] long, pad_id after each row's end
      ``attention_mask`` [B, T] long, 1 on real tokens
      ``labels``         [B, T] long, -100 on padding and on every non-assistant token
    """
    import torch

    longest = max(len(r.input_ids) for r in rows)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

