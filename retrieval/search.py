"""Hybrid search: dense and lexical candidate lists fused by reciprocal rank fusion (RRF).

RRF score of a chunk = sum over lists of `weight / (rrf_k + rank)`, rank 1-based; a chunk
missing from a list gets nothing from it. Scores are thus comparable within one result list
only. Dense-only results carry the cosine similarity, lexical-only results the BM25 score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConfigError

MODES = ("hybrid", "dense", "lexical")


@dataclass(frozen=True)
class SearchConfig:
    """Defaults for `Index.search`.

    mode: "hybrid", "dense" or "lexical".
    rrf_k: the RRF constant; larger flattens the difference between ranks.
    dense_weight / lexical_weight: weight of each list in the fusion.
    candidates: how deep each list is read before fusing (at least k).
    """

    mode: str = "hybrid"
    rrf_k: int = 60
    dense_weight: float = 1.0
    lexical_weight: float = 1.0
    candidates: int = 100

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.rrf_k, int) or self.rrf_k < 1:
            problems.append(f"rrf_k must be an integer >= 1, got {self.rrf_k!r}")
        if self.dense_weight < 0 or self.lexical_weight < 0 or self.dense_weight + self.lexical_weight <= 0:
            problems.append("weights must be >= 0 and not both 0")
        if not isinstance(self.candidates, int) or self.candidates < 1:
            problems.append(f"candidates must be an integer >= 1, got {self.candidates!r}")
        if problems:
            raise ConfigError("invalid search settings: " + "; ".join(problems))


@dataclass(frozen=True)
class Passage:
    """One search result: a chunk with its citation.

    `text == document_text[start:end]` (character offsets into the loaded document text; for
    text and Markdown files that is the file itself). `page` is the 1-based PDF page, else None.
    """

    score: float
    text: str
    doc_id: str
    chunk_id: int
    source: str
    title: str
    page: int | None
    start: int
    end: int

    def to_dict(self) -> dict:
        return asdict(self)

    def citation(self) -> str:
        """A short human-readable reference, e.g. `report.pdf p. 3 [120:480]`."""
        page = f" p. {self.page}" if self.page is not None else ""
        return f"{self.source}{page} [{self.start}:{self.end}]"


def rrf_fuse(lists: list[tuple[float, list[tuple[int, float]]]], rrf_k: int) -> list[tuple[int, float]]:
    """Fuse ranked `(id, score)` lists, each with a weight, into `(id, rrf score)` best first.

    Ties break by the best rank a chunk reached in any list, then by id, so results are
    deterministic.
    """
    fused: dict[int, float] = {}
    best: dict[int, int] = {}
    for weight, ranked in lists:
        if weight <= 0:
            continue
        for rank, (cid, _score) in enumerate(ranked, start=1):
            fused[cid] = fused.get(cid, 0.0) + weight / (rrf_k + rank)
            best[cid] = min(best.get(cid, rank), rank)
    return sorted(fused.items(), key=lambda kv: (-kv[1], best[kv[0]], kv[0]))


def check_query(query: str, k: int, mode: str) -> None:
    if not isinstance(query, str):
        raise ConfigError(f"query must be a string, got {type(query).__name__}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if mode not in MODES:
        raise ConfigError(f"search mode must be one of {', '.join(MODES)}; got {mode!r}")
