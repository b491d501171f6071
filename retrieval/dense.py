"""Dense retrieval: a faiss index with stable int64 ids over L2-normalized vectors.

- "flat" (default): exact inner product (= cosine on normalized vectors), `IndexIDMap2` over
  `IndexFlatIP`; removal is exact (`remove_ids`).
- "hnsw": approximate, `IndexIDMap2` over `IndexHNSWFlat` (inner product). HNSW cannot remove
  vectors, so removed ids become tombstones excluded at search time by an id selector, and the
  graph is rebuilt from its own stored vectors once tombstones pass a fifth of the index.

Ids are only ever added with `add_with_ids`, never `add`, so ids never shift after removals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, IndexCorruptError

INDEX_TYPES = ("flat", "hnsw")


@dataclass(frozen=True)
class DenseConfig:
    """Dense index settings.

    index_type: "flat" (exact) or "hnsw" (approximate, for large collections).
    hnsw_m: graph degree; hnsw_ef_construction / hnsw_ef_search: build / search beam widths
        (higher = better recall, slower).
    """

    index_type: str = "flat"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 96

    def __post_init__(self) -> None:
        problems = []
        if self.index_type not in INDEX_TYPES:
            problems.append(f"index_type must be one of {INDEX_TYPES}, got {self.index_type!r}")
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 2:
                problems.append(f"{name} must be an integer >= 2, got {v!r}")
        if problems:
            raise ConfigError("invalid dense index settings: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return {"index_type": self.index_type, "hnsw_m": self.hnsw_m,
                "hnsw_ef_construction": self.hnsw_ef_construction, "hnsw_ef_search": self.hnsw_ef_search}


class DenseIndex:
    def __init__(self, dim: int, config: DenseConfig, index=None, tombstones: np.ndarray | None = None):
        import faiss

        self.dim = dim
        self.config = config
        if index is None:
            if config.index_type == "flat":
                inner = faiss.IndexFlatIP(dim)
            else:
                inner = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                inner.hnsw.efConstruction = config.hnsw_ef_construction
                inner.hnsw.efSearch = config.hnsw_ef_search
            index = faiss.IndexIDMap2(inner)
        self.index = index
        self.tombstones: set[int] = set(int(t) for t in (tombstones if tombstones is not None else []))

    @property
    def ntotal(self) -> int:
        """Live vectors (tombstoned ones excluded)."""
        return int(self.index.ntotal) - len(self.tombstones)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """vectors: (n, dim) float32 normalized; ids: (n,) int64, new and unique."""
        if vectors.shape[0] == 0:
            return
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ConfigError(f"vectors have shape {vectors.shape}, the index wants (n, {self.dim})")
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids) -> None:
        ids = np.asarray(sorted(set(int(i) for i in ids)), dtype=np.int64)
        if ids.size == 0:
            return
        if self.config.index_type == "flat":
            self.index.remove_ids(ids)
        else:
            self.tombstones.update(int(i) for i in ids)

    def maybe_compact(self) -> None:
        """Rebuild an HNSW graph without its tombstones once they pass 20% of it."""
        if not self.tombstones or self.tombstones and len(self.tombstones) * 5 < self.index.ntotal:
            return
        import faiss

        all_ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        keep = np.array([i for i, cid in enumerate(all_ids) if int(cid) not in self.tombstones], dtype=np.int64)
        inner = self.index.index
        vectors = np.vstack([inner.reconstruct(int(i)) for i in keep]) if keep.size else np.zeros((0, self.dim), np.float32)
        fresh = DenseIndex(self.dim, self.config)
        fresh.add(vectors, all_ids[keep])
        self.index = fresh.index
        self.tombstones = set()

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Top `k` `(id, inner product)`, best first; the -1 padding of faiss is dropped."""
        import faiss

        n = self.ntotal
        if n <= 0 or k <= 0:
            return []
        k = min(k, n)
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        params = None
        if self.config.index_type == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.config.hnsw_ef_search, k)
            if self.tombstones:
                params.sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self.tombstones, dtype=np.int64)))
        scores, ids = self.index.search(q, k, params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def ids(self) -> np.ndarray:
        import faiss

        all_ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        if self.tombstones:
            all_ids = all_ids[~np.isin(all_ids, np.fromiter(self.tombstones, dtype=np.int64))]
        return all_ids

    def vector(self, chunk_id: int) -> np.ndarray:
        return self.index.reconstruct(int(chunk_id))

    # -- persistence (faiss native format, tombstones as .npy) --------------------------------
    def writers(self) -> dict:
        import faiss

        index = self.index
        tomb = np.asarray(sorted(self.tombstones), dtype=np.int64)
        return {
            "dense.faiss": lambda p: faiss.write_index(index, str(p)),
            "dense.tombstones.npy": lambda p: np.save(p, tomb, allow_pickle=False),
        }

    @staticmethod
    def load(folder: Path, dim: int, config: DenseConfig) -> "DenseIndex":
        import faiss

        try:
            index = faiss.read_index(str(folder / "dense.faiss"))
            tomb = np.load(folder / "dense.tombstones.npy", allow_pickle=False)
        except (RuntimeError, OSError, ValueError) as exc:
            raise IndexCorruptError(
                f"dense index in {folder} cannot be read ({str(exc).splitlines()[0][:200]}); it may come from a "
                "newer faiss or be damaged: rebuild the index from its source documents"
            ) from exc
        if index.d != dim:
            raise IndexCorruptError(f"dense index in {folder} has dimension {index.d}, the manifest says {dim}")
        if not isinstance(index, faiss.IndexIDMap2):
            raise IndexCorruptError(f"dense index in {folder} is a {type(index).__name__}, expected IndexIDMap2")
        return DenseIndex(dim, config, index=index, tombstones=tomb)
