"""Lexical retrieval: BM25 (bm25s) over chunk texts, persisted as JSON + .npy (no pickle).

Tokens are lowercase Unicode words minus English stop words, stemmed with the English Snowball
stemmer when PyStemmer or snowballstemmer is installed. The index records which it used, because a
query must be tokenized exactly as the corpus was.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConfigError, IndexCorruptError

_TOKEN = re.compile(r"\w+", re.UNICODE)


def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def _load_stemmer(language: str):
    """Snowball `stemWords` for `language`: PyStemmer (C) if installed, else snowballstemmer
    (pure Python). Both implement the same Snowball algorithm, so their stems are identical and
    an index built with one reads with the other."""
    try:
        import Stemmer  # PyStemmer

        return Stemmer.Stemmer(language).stemWords
    except ImportError:
        pass
    try:
        import snowballstemmer
    except ImportError:
        return None
    return snowballstemmer.stemmer(language).stemWords


def stemmer_available() -> bool:
    return _load_stemmer("english") is not None


class LexicalTokenizer:
    """text -> list of terms. `stemmer` is a Snowball language ("english") or None."""

    _CACHE_LIMIT = 500_000

    def __init__(self, stemmer: str | None = None):
        self.stemmer_name = stemmer
        self._stop = _stopwords()
        self._stem = None
        self._cache: dict[str, str] = {}
        if stemmer is not None:
            self._stem = _load_stemmer(stemmer)
            if self._stem is None:
                raise ConfigError(
                    f"this index uses the {stemmer!r} Snowball stemmer, which needs PyStemmer or "
                    "snowballstemmer: pip install snowballstemmer"
                )

    def __call__(self, text: str) -> list[str]:
        words = [w for w in _TOKEN.findall(text.lower()) if w not in self._stop]
        if self._stem is None or not words:
            return words
        # A vocabulary is small next to a corpus: stem each distinct word once.
        cache = self._cache
        missing = [w for w in set(words) if w not in cache]
        if missing:
            if len(cache) > self._CACHE_LIMIT:
                cache.clear()
            cache.update(zip(missing, self._stem(missing)))
        out = []
        for w in words:
            stem = cache.get(w)  # another thread may have cleared the cache meanwhile
            out.append(stem if stem is not None else self._stem([w])[0])
        return out


class BM25Index:
    """BM25 scores over rows 0..n-1; `chunk_ids[row]` maps a row to its chunk id."""

    def __init__(self, retriever, chunk_ids: np.ndarray):
        self.retriever = retriever
        self.chunk_ids = chunk_ids

    @staticmethod
    def build(token_lists: Sequence[list[str]], chunk_ids: Sequence[int], k1: float = 1.5, b: float = 0.75) -> "BM25Index":
        import bm25s

        retriever = bm25s.BM25(k1=k1, b=b)
        retriever.index(list(token_lists), show_progress=False)
        return BM25Index(retriever, np.asarray(chunk_ids, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.chunk_ids.shape[0])

    def search(self, terms: list[str], k: int) -> list[tuple[int, float]]:
        """Top `k` `(chunk_id, score)` with score > 0, best first."""
        r = self.retriever
        ids = [r.vocab_dict[t] for t in terms if t in r.vocab_dict]
        if not ids or k <= 0 or len(self) == 0:
            return []
        scores = np.asarray(r.get_scores_from_ids(ids), dtype=np.float32)
        k = min(k, scores.shape[0])
        top = np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(scores.shape[0])
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(self.chunk_ids[i]), float(scores[i])) for i in top if scores[i] > 0]

    # -- persistence (.npy with allow_pickle=False, vocabulary and parameters in JSON) ---------
    def writers(self) -> dict:
        r = self.retriever
        s = r.scores

        def npy(arr):
            return lambda p: np.save(p, np.ascontiguousarray(arr), allow_pickle=False)

        meta = {
            "k1": r.k1, "b": r.b, "method": r.method, "num_docs": int(s["num_docs"]),
            "vocab": {str(k): int(v) for k, v in r.vocab_dict.items()},
        }
        return {
            "bm25.data.npy": npy(s["data"]),
            "bm25.indices.npy": npy(s["indices"]),
            "bm25.indptr.npy": npy(s["indptr"]),
            "bm25.rows.npy": npy(self.chunk_ids),
            "bm25.json": lambda p: p.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8"),
        }

    @staticmethod
    def load(folder: Path) -> "BM25Index":
        import bm25s

        try:
            meta = json.loads((folder / "bm25.json").read_text(encoding="utf-8"))
            arrays = {n: np.load(folder / f"bm25.{n}.npy", allow_pickle=False) for n in ("data", "indices", "indptr", "rows")}
        except (OSError, ValueError) as exc:
            raise IndexCorruptError(f"lexical index in {folder} is unreadable: {exc}") from exc
        r = bm25s.BM25(k1=meta["k1"], b=meta["b"], method=meta["method"])
        r.scores = {"data": arrays["data"], "indices": arrays["indices"], "indptr": arrays["indptr"],
                    "num_docs": int(meta["num_docs"])}
        r.vocab_dict = meta["vocab"]
        r.unique_token_ids_set = set(r.vocab_dict.values())
        r.nonoccurrence_array = None  # only BM25L/BM25+ use it; this index is "lucene"
        if arrays["rows"].shape[0] != r.scores["num_docs"]:
            raise IndexCorruptError(f"lexical index in {folder}: row map does not match the document count")
        return BM25Index(r, arrays["rows"].astype(np.int64))
