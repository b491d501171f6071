"""The index: documents -> chunks -> dense (faiss) + lexical (BM25) + metadata, on disk.

One `Index` object serves any number of searching threads and one writer at a time:
- threads: a readers-writer lock guards the in-memory state;
- processes: a file lock (`write.lock`) admits one writer; a second gets `IndexLockedError`.
  A writer that finds a newer committed version on disk reloads it before changing anything,
  and readers pick up new versions on their next search (`auto_refresh`).
Every write ends in an atomic commit of a new version (see `store.py`); if the commit fails, the
in-memory state is reloaded from the last committed version, so memory and disk never diverge.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import store
from .chunking import Chunk, ChunkingConfig, chunk_document
from .dense import DenseConfig, DenseIndex
from .embedder import Embedder, get_embedder
from .errors import (ConfigError, DocumentNotFoundError, EmbedderMismatchError, IndexCorruptError,
                     IndexLockedError, IndexNotFoundError, LoadSkip)
from .lexical import BM25Index, LexicalTokenizer, stemmer_available
from .loaders import DEFAULT_MAX_FILE_BYTES, JSONL_SUFFIXES, Document, iter_files, load_file, make_doc_id, sha256_bytes
from .rwlock import RWLock
from .search import Passage, SearchConfig, check_query, rrf_fuse


@dataclass
class FileReport:
    """What happened to one input. status: added | updated | unchanged | removed | skipped."""

    path: str
    status: str
    reason: str | None = None
    doc_ids: list[str] = field(default_factory=list)
    chunks: int = 0


@dataclass
class IngestReport:
    """The per-file outcome of one `add_paths` / `add_documents` call."""

    files: list[FileReport] = field(default_factory=list)
    version: str | None = None
    chunks_added: int = 0
    chunks_removed: int = 0
    seconds: float = 0.0

    def by_status(self, status: str) -> list[FileReport]:
        return [f for f in self.files if f.status == status]

    @property
    def skipped(self) -> list[FileReport]:
        return self.by_status("skipped")

    def summary(self) -> str:
        counts = {}
        for f in self.files:
            counts[f.status] = counts.get(f.status, 0) + 1
        parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing to do"
        return f"{parts}; +{self.chunks_added} / -{self.chunks_removed} chunks in {self.seconds:.1f}s"


@dataclass(frozen=True)
class DocumentInfo:
    doc_id: str
    source: str
    title: str
    kind: str
    chunks: int
    content_hash: str
    origin: str
    added_at: float


class _ChunkRec:
    __slots__ = ("doc_id", "position", "start", "end", "page", "text")

    def __init__(self, doc_id, position, start, end, page, text):
        self.doc_id, self.position, self.start, self.end, self.page, self.text = doc_id, position, start, end, page, text


def _resolve_embedder(embedder: str | Embedder | None) -> Embedder:
    if embedder is None or isinstance(embedder, str):
        return get_embedder(embedder)
    if not isinstance(embedder, Embedder):
        raise ConfigError(f"embedder must be a name or an Embedder, got {type(embedder).__name__}")
    return embedder


class Index:
    """A retrieval index in a folder. Create or open one with `open_index`."""

    def __init__(self, root: Path, embedder: Embedder, chunking: ChunkingConfig, dense: DenseConfig,
                 stemmer: str | None, search: SearchConfig, lock_timeout: float, auto_refresh: bool):
        self.root = root
        self._embedder = embedder
        self._embedder_checked = False
        self.chunking = chunking
        self.dense_config = dense
        self.search_config = search
        self.lock_timeout = lock_timeout
        self.auto_refresh = auto_refresh
        self._lexical_tokenizer = LexicalTokenizer(stemmer)
        self._rw = RWLock()
        self._writer_mutex = threading.Lock()
        self._refresh_mutex = threading.Lock()
        self._current_stat: tuple | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self._docs: dict[str, dict] = {}
        self._chunks: dict[int, _ChunkRec] = {}
        self._dense: DenseIndex | None = None
        self._bm25: BM25Index | None = None
        self._next_id = 1
        self._version: str | None = None
        self._dim: int | None = None
        self._created_at = time.time()

    # -- embedder ------------------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        """The embedder, checked against the index's recorded dimension on first use."""
        emb = self._embedder
        if not self._embedder_checked:
            if self._dim is not None and emb.dim != self._dim:
                raise EmbedderMismatchError(
                    f"index at {self.root} holds {self._dim}-d vectors but embedder {emb.name!r} makes "
                    f"{emb.dim}-d ones; open it with the embedder it was built with"
                )
            if self.chunking.chunk_tokens > emb.max_tokens:
                raise ConfigError(
                    f"chunk_tokens={self.chunking.chunk_tokens} exceeds what embedder {emb.name!r} reads "
                    f"({emb.max_tokens} tokens); choose chunk_tokens <= {emb.max_tokens}"
                )
            self._embedder_checked = True
        return emb

    # -- loading ------------------------------------------------------------------------------
    def _current_signature(self) -> tuple | None:
        try:
            st = os.stat(self.root / "CURRENT")
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _load(self) -> None:
        """Replace the in-memory state with the committed version on disk (caller holds the
        write side of the RW lock, or no other thread can see this object yet)."""
        last_exc: Exception | None = None
        for _attempt in range(3):
            sig = self._current_signature()
            name = store.read_current(self.root)
            if name is None:
                self._reset_state()
                self._current_stat = sig
                return
            try:
                self._load_version(name)
                self._current_stat = sig
                return
            except (IndexCorruptError, FileNotFoundError) as exc:
                # A writer in another process may have committed and pruned meanwhile: retry
                # on the newer version; if CURRENT did not move, the damage is real.
                last_exc = exc
                if store.read_current(self.root) == name:
                    break
        if isinstance(last_exc, IndexCorruptError):
            raise last_exc
        raise IndexCorruptError(f"index at {self.root} could not be loaded: {last_exc}") from last_exc

    def _load_version(self, name: str) -> None:
        name, folder, manifest = store.open_version(self.root, name)
        emb = manifest.get("embedder") or {}
        if emb.get("name") != self._embedder.name:
            raise EmbedderMismatchError(
                f"index at {self.root} was built with embedder {emb.get('name')!r} (dim {emb.get('dim')}), "
                f"not {self._embedder.name!r}; open it without naming an embedder, or build a new index"
            )
        try:
            docs_raw = json.loads((folder / "docs.json").read_text(encoding="utf-8"))
            cols = json.loads((folder / "chunks.json").read_text(encoding="utf-8"))
            docs = {d["doc_id"]: d for d in docs_raw["documents"]}
            ids = cols["ids"]
            chunks = {
                int(cid): _ChunkRec(d, p, s, e, pg, t)
                for cid, d, p, s, e, pg, t in zip(ids, cols["doc_ids"], cols["positions"], cols["starts"],
                                                   cols["ends"], cols["pages"], cols["texts"], strict=True)
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexCorruptError(f"index at {self.root}: metadata of {name} is malformed ({exc}); "
                                    + store.REPAIR_HINT) from exc
        dim = emb.get("dim")
        dense_cfg = DenseConfig(**manifest["dense"])
        dense = DenseIndex.load(folder, dim, dense_cfg) if "dense.faiss" in manifest["files"] else None
        bm25 = BM25Index.load(folder) if "bm25.json" in manifest["files"] else None
        # The three stores must describe the same chunks; anything else is a damaged index.
        want = set(chunks)
        if (dense.ntotal if dense else 0) != len(want) or (dense is not None and set(dense.ids().tolist()) != want):
            raise IndexCorruptError(f"index at {self.root}: dense vectors of {name} do not match its chunk table; "
                                    + store.REPAIR_HINT)
        if (len(bm25) if bm25 else 0) != len(want) or (bm25 is not None and set(bm25.chunk_ids.tolist()) != want):
            raise IndexCorruptError(f"index at {self.root}: lexical index of {name} does not match its chunk table; "
                                    + store.REPAIR_HINT)
        lex = manifest.get("lexical") or {}
        if lex.get("stemmer") != self._lexical_tokenizer.stemmer_name:
            self._lexical_tokenizer = LexicalTokenizer(lex.get("stemmer"))
        self.chunking = ChunkingConfig(**manifest["chunking"])
        self.dense_config = dense_cfg
        self._docs, self._chunks, self._dense, self._bm25 = docs, chunks, dense, bm25
        self._next_id = int(manifest["next_chunk_id"])
        self._version = name
        self._dim = dim
        self._created_at = manifest.get("created_at", time.time())

    def refresh(self) -> bool:
        """Load a version another process committed since; True if one was loaded."""
        sig = self._current_signature()
        if sig == self._current_stat:
            return False
        with self._refresh_mutex:
            if self._current_signature() == self._current_stat:
                return False
            name = store.read_current(self.root)
            if name == self._version:
                self._current_stat = sig
                return False
            with self._rw.write():
                self._load()
            return True

    # -- writing ------------------------------------------------------------------------------
    @contextmanager
    def _writing(self):
        """One writer: this process's threads (mutex), then other processes (file lock)."""
        import filelock

        if not self._writer_mutex.acquire(timeout=self.lock_timeout if self.lock_timeout >= 0 else -1):
            raise IndexLockedError(f"index at {self.root} is being written by another thread; try again when it is done")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(self.root / "write.lock", timeout=self.lock_timeout, preserve_lock_file=True)
            try:
                lock.acquire()
            except filelock.Timeout as exc:
                raise IndexLockedError(
                    f"index at {self.root} is being written by another process (lock {self.root / 'write.lock'}); "
                    "wait for it to finish, or stop the other writer"
                ) from exc
            try:
                if store.read_current(self.root) != self._version:
                    with self._rw.write():
                        self._load()
                yield
            finally:
                lock.release()
        finally:
            self._writer_mutex.release()

    def _commit(self) -> str:
        """Save the in-memory state as a new version (caller is the writer)."""
        with self._rw.read():
            files = self._writers()
            manifest = self._manifest()
            name = store.commit_version(self.root, files, manifest)
        self._version = name
        self._current_stat = self._current_signature()
        return name

    def _writers(self) -> dict:
        docs = {"documents": list(self._docs.values())}
        ids = sorted(self._chunks)
        recs = [self._chunks[i] for i in ids]
        cols = {
            "ids": ids,
            "doc_ids": [r.doc_id for r in recs],
            "positions": [r.position for r in recs],
            "starts": [r.start for r in recs],
            "ends": [r.end for r in recs],
            "pages": [r.page for r in recs],
            "texts": [r.text for r in recs],
        }
        files = {
            "docs.json": lambda p: store.write_json(p, docs),
            "chunks.json": lambda p: store.write_json(p, cols),
        }
        if self._dense is not None:
            files.update(self._dense.writers())
        if self._bm25 is not None:
            files.update(self._bm25.writers())
        return files

    def _manifest(self) -> dict:
        import faiss

        return {
            "embedder": {"name": self._embedder.name, "dim": self._dim},
            "chunking": self.chunking.to_dict(),
            "dense": self.dense_config.to_dict(),
            "lexical": {"stemmer": self._lexical_tokenizer.stemmer_name, "k1": 1.5, "b": 0.75,
                        "stopwords": "en"},
            "next_chunk_id": self._next_id,
            "counts": {"documents": len(self._docs), "chunks": len(self._chunks)},
            "created_at": self._created_at,
            "updated_at": time.time(),
            "faiss_version": faiss.__version__,
        }

    def _rebuild_lexical(self) -> None:
        ids = sorted(self._chunks)
        if not ids:
            self._bm25 = None
            return
        tok = self._lexical_tokenizer
        self._bm25 = BM25Index.build([tok(self._chunks[i].text) for i in ids], ids)

    def _apply(self, removals: list[str], new_docs: list[tuple[dict, list[Chunk]]], vectors: np.ndarray) -> tuple[int, int]:
        """Remove documents, add new ones with their chunk vectors, rebuild BM25, commit.

        On any failure the previous committed version is reloaded and the error re-raised.
        """
        removed = added = 0
        try:
            with self._rw.write():
                for doc_id in removals:
                    removed += self._remove_doc_locked(doc_id)
                n_new = sum(len(ch) for _, ch in new_docs)
                if n_new:
                    if self._dense is None:
                        self._dim = int(vectors.shape[1])
                        self._dense = DenseIndex(self._dim, self.dense_config)
                    ids = np.arange(self._next_id, self._next_id + n_new, dtype=np.int64)
                    self._next_id += n_new
                    self._dense.add(vectors, ids)
                    it = iter(ids.tolist())
                    for meta, chunks in new_docs:
                        cids = []
                        for ch in chunks:
                            cid = next(it)
                            self._chunks[cid] = _ChunkRec(ch.doc_id, ch.position, ch.start, ch.end, ch.page, ch.text)
                            cids.append(cid)
                        self._docs[meta["doc_id"]] = dict(meta, chunk_ids=cids)
                    added = n_new
                elif new_docs:
                    for meta, _ in new_docs:
                        self._docs[meta["doc_id"]] = dict(meta, chunk_ids=[])
                if self._dense is not None:
                    self._dense.maybe_compact()
                self._rebuild_lexical()
            self._commit()
        except BaseException:
            with self._rw.write():
                self._load()
            raise
        return added, removed

    def _remove_doc_locked(self, doc_id: str) -> int:
        meta = self._docs.pop(doc_id, None)
        if meta is None:
            return 0
        cids = meta.get("chunk_ids", [])
        if cids and self._dense is not None:
            self._dense.remove(cids)
        for cid in cids:
            self._chunks.pop(cid, None)
        return len(cids)

    def add_paths(self, paths: Iterable[str | os.PathLike], *, include: Sequence[str] | None = None,
                  exclude: Sequence[str] | None = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                  show_progress: bool = False) -> IngestReport:
        """Index files and folders (recursively, filtered by include/exclude globs).

        Unchanged files are no-ops (content hash); changed files replace their old chunks; files
        that cannot be read are skipped with a reason in the report and change nothing.
        """
        t0 = time.time()
        paths = list(paths)
        with self._writing():
            report = IngestReport()
            loaded: list[tuple[FileReport, list[Document]]] = []
            seen: set[str] = set()
            entries = list(iter_files(paths, list(include or []), list(exclude or [])))
            bar = None
            if show_progress and len(entries) > 1:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(entries), desc="reading", unit="file", leave=False)
            for path, skip in entries:
                if bar is not None:
                    bar.update(1)
                key = str(path)
                if key in seen:
                    continue
                seen.add(key)
                fr = FileReport(key, "skipped", skip)
                report.files.append(fr)
                if skip:
                    continue
                if self._unchanged_file(path, max_file_bytes):
                    fr.status, fr.doc_ids = "unchanged", [make_doc_id(key)]
                    continue
                try:
                    docs = load_file(path, max_file_bytes)
                except LoadSkip as exc:
                    fr.reason = str(exc)
                    continue
                except Exception as exc:  # a loader bug must not sink the batch
                    fr.reason = f"could not be loaded: {type(exc).__name__}: {exc}"
                    continue
                loaded.append((fr, docs))
            if bar is not None:
                bar.close()
            self._ingest(loaded, report, show_progress)
        report.seconds = time.time() - t0
        return report

    def add_documents(self, docs: Sequence[Document], show_progress: bool = False) -> IngestReport:
        """Index documents built in code (see `loaders.Document`); same rules as `add_paths`."""
        t0 = time.time()
        with self._writing():
            report = IngestReport()
            groups: dict[str, list[Document]] = {}
            for d in docs:
                groups.setdefault(d.origin, []).append(d)
            loaded = []
            for origin, group in groups.items():
                fr = FileReport(origin, "skipped")
                report.files.append(fr)
                loaded.append((fr, group))
            self._ingest(loaded, report, show_progress, prune_origin=False)
        report.seconds = time.time() - t0
        return report

    def _unchanged_file(self, path: Path, max_file_bytes: int) -> bool:
        """Fast path: a single-document file whose bytes hash as recorded needs no parsing."""
        if path.suffix.lower() in JSONL_SUFFIXES:
            return False
        meta = self._docs.get(make_doc_id(str(path)))
        if meta is None:
            return False
        try:
            if path.stat().st_size > max_file_bytes:
                return False
            return sha256_bytes(path.read_bytes()) == meta["content_hash"]
        except OSError:
            return False

    def _ingest(self, loaded: list[tuple[FileReport, list[Document]]], report: IngestReport,
                show_progress: bool, prune_origin: bool = True) -> None:
        removals: list[str] = []
        new_docs: list[tuple[dict, list[Chunk]]] = []
        texts: list[str] = []
        now = time.time()
        for fr, docs in loaded:
            statuses = set()
            fresh_ids = {d.doc_id for d in docs}
            if prune_origin and len(docs) and docs[0].kind == "jsonl":
                # Records that left a JSONL file leave the index with it.
                for old_id, meta in self._docs.items():
                    if meta["origin"] == fr.path and old_id not in fresh_ids:
                        removals.append(old_id)
                        statuses.add("updated")
            for d in docs:
                fr.doc_ids.append(d.doc_id)
                old = self._docs.get(d.doc_id)
                if old is not None and old["content_hash"] == d.content_hash:
                    statuses.add("unchanged")
                    continue
                chunks = chunk_document(d, self.embedder.token_spans, self.chunking)
                if old is not None:
                    removals.append(d.doc_id)
                    statuses.add("updated")
                else:
                    statuses.add("added")
                meta = {"doc_id": d.doc_id, "source": d.source, "title": d.title, "origin": d.origin,
                        "kind": d.kind, "content_hash": d.content_hash, "chars": len(d.text), "added_at": now}
                new_docs.append((meta, chunks))
                texts.extend(c.text for c in chunks)
                fr.chunks += len(chunks)
            fr.status = "updated" if "updated" in statuses else "added" if "added" in statuses else "unchanged"
        if not removals and not new_docs:
            report.version = self._version
            return
        emb = self.embedder
        vectors = emb.encode(texts, show_progress=show_progress) if texts else np.zeros((0, emb.dim), np.float32)
        report.chunks_added, report.chunks_removed = self._apply(removals, new_docs, vectors)
        report.version = self._version

    def remove(self, doc_id: str) -> int:
        """Remove a document (by id, or by its source path / origin file) with all its chunks.

        Returns the number of chunks removed; raises `DocumentNotFoundError` if nothing matches.
        """
        with self._writing():
            targets = [doc_id] if doc_id in self._docs else []
            if not targets:
                key = str(Path(doc_id).expanduser().resolve()) if not doc_id.startswith(("http://", "https://")) else doc_id
                targets = [i for i, m in self._docs.items() if m["source"] in (doc_id, key) or m["origin"] in (doc_id, key)]
            if not targets:
                raise DocumentNotFoundError(
                    f"no document {doc_id!r} in index at {self.root}; `parley index list` shows the ids"
                )
            _added, removed = self._apply(targets, [], np.zeros((0, 1), np.float32))
            return removed

    # -- reading ------------------------------------------------------------------------------
    def search(self, query: str, k: int = 5, mode: str | None = None, *, query_vector: np.ndarray | None = None,
               rrf_k: int | None = None, dense_weight: float | None = None, lexical_weight: float | None = None,
               candidates: int | None = None) -> list[Passage]:
        """The `k` best passages for `query`, best first.

        mode: "hybrid" (default; RRF of dense and BM25), "dense" or "lexical". `query_vector`
        skips embedding the query (a (dim,) normalized vector from the same embedder). Fewer
        than k results when the index holds fewer matching chunks; [] for a blank query or
        an empty index.
        """
        cfg = self.search_config
        mode = mode or cfg.mode
        check_query(query, k, mode)
        if self.auto_refresh:
            self.refresh()
        if not query.strip() and query_vector is None:
            return []
        depth = max(k, candidates or cfg.candidates)
        with self._rw.read():
            empty = not self._chunks
        if empty:
            return []
        dense_hits: list[tuple[int, float]] = []
        lexical_hits: list[tuple[int, float]] = []
        vec = None
        if mode in ("hybrid", "dense"):
            vec = query_vector if query_vector is not None else self.embedder.encode_query(query)
            vec = np.asarray(vec, dtype=np.float32).reshape(-1)
            if not np.isfinite(vec).all():
                raise ConfigError("query vector has NaN or infinite values")
        with self._rw.read():
            if vec is not None and self._dense is not None and float(np.linalg.norm(vec)) > 0:
                if vec.shape[0] != self._dense.dim:
                    raise EmbedderMismatchError(f"query vector has {vec.shape[0]} dims, the index {self._dense.dim}")
                dense_hits = self._dense.search(vec, depth)
            if mode in ("hybrid", "lexical") and self._bm25 is not None:
                lexical_hits = self._bm25.search(self._lexical_tokenizer(query), depth)
            if mode == "dense":
                ranked = dense_hits
            elif mode == "lexical":
                ranked = lexical_hits
            else:
                ranked = rrf_fuse(
                    [(cfg.dense_weight if dense_weight is None else dense_weight, dense_hits),
                     (cfg.lexical_weight if lexical_weight is None else lexical_weight, lexical_hits)],
                    rrf_k or cfg.rrf_k,
                )
            out = []
            for cid, score in ranked[:k]:
                rec = self._chunks.get(cid)
                if rec is None:  # cannot happen in a consistent index; never invent a passage
                    continue
                doc = self._docs[rec.doc_id]
                out.append(Passage(score=float(score), text=rec.text, doc_id=rec.doc_id, chunk_id=cid,
                                   source=doc["source"], title=doc["title"], page=rec.page,
                                   start=rec.start, end=rec.end))
            return out

    def documents(self) -> list[DocumentInfo]:
        """The indexed documents, in source order."""
        with self._rw.read():
            return sorted(
                (DocumentInfo(m["doc_id"], m["source"], m["title"], m["kind"], len(m.get("chunk_ids", [])),
                              m["content_hash"], m["origin"], m["added_at"]) for m in self._docs.values()),
                key=lambda d: (d.source, d.doc_id),
            )

    def __len__(self) -> int:
        return len(self._chunks)

    def info(self) -> dict:
        """Settings and counts: what `parley index info` shows."""
        with self._rw.read():
            size = 0
            if self._version:
                folder = self.root / "versions" / self._version
                size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            return {
                "path": str(self.root),
                "version": self._version,
                "embedder": self._embedder.name,
                "dim": self._dim,
                "chunking": self.chunking.to_dict(),
                "dense": self.dense_config.to_dict(),
                "lexical_stemmer": self._lexical_tokenizer.stemmer_name,
                "documents": len(self._docs),
                "chunks": len(self._chunks),
                "bytes_on_disk": size,
                "created_at": self._created_at,
            }


def open_index(path: str | os.PathLike, embedder: str | Embedder | None = None, *, create: bool = True,
               chunking: ChunkingConfig | None = None, dense: DenseConfig | None = None,
               search: SearchConfig | None = None, stemmer: str | None = "auto",
               lock_timeout: float = 0.0, auto_refresh: bool = True) -> Index:
    """Open the index in folder `path`, or prepare a new one there if `create`.

    embedder: None uses the one the index was built with (or the default MiniLM for a new
        index); a name or Embedder that differs from the recorded one raises
        `EmbedderMismatchError`. The model itself loads on first use.
    chunking / dense: settings of a new index; for an existing one they must match (or be None).
    stemmer: lexical stemmer of a new index: "auto" (English if PyStemmer is installed),
        "english" or None.
    lock_timeout: seconds a write waits for another writer before `IndexLockedError`.
    auto_refresh: searches first pick up versions that other processes committed.
    """
    root = Path(path).expanduser()
    name = store.read_current(root) if root.is_dir() else None
    if name is None and not create:
        raise IndexNotFoundError(f"no index at {root}; add documents first (parley index add PATH)")
    manifest = None
    if name is not None:
        _n, _f, manifest = store.open_version(root, name, verify=False)
        recorded = manifest["embedder"]["name"]
        if embedder is None:
            embedder = recorded
        emb = _resolve_embedder(embedder)
        if emb.name != recorded:
            raise EmbedderMismatchError(
                f"index at {root} was built with embedder {recorded!r} (dim {manifest['embedder'].get('dim')}), "
                f"not {emb.name!r}; open it without naming an embedder, or build a new index elsewhere"
            )
        for given, key, cls in ((chunking, "chunking", ChunkingConfig), (dense, "dense", DenseConfig)):
            if given is not None and given != cls(**manifest[key]):
                raise ConfigError(
                    f"index at {root} was built with {key} settings {manifest[key]}, not {given.to_dict()}; "
                    "build a new index to change them"
                )
        stem = (manifest.get("lexical") or {}).get("stemmer")
    else:
        emb = _resolve_embedder(embedder)
        stem = ("english" if stemmer_available() else None) if stemmer == "auto" else stemmer
    index = Index(root, emb, chunking or ChunkingConfig(), dense or DenseConfig(), stem,
                  search or SearchConfig(), lock_timeout, auto_refresh)
    if name is not None:
        index._load()
    return index


def repair_index(path: str | os.PathLike, lock_timeout: float = 0.0) -> dict:
    """Set damaged versions aside and make the newest intact version current.

    Versions are tried newest first; each one that fails to load (checksum, parse or
    cross-check) is moved to `quarantine/`. Returns `{"current": name or None, "quarantined":
    [names], "documents": n}`. Documents added after the version it goes back to are missing
    until they are added again (unchanged files are then no-ops, the rest is re-indexed).
    """
    import filelock

    root = Path(path).expanduser()
    if not (root / "versions").is_dir():
        raise IndexNotFoundError(f"no index at {root}")
    lock = filelock.FileLock(root / "write.lock", timeout=lock_timeout, preserve_lock_file=True)
    try:
        lock.acquire()
    except filelock.Timeout as exc:
        raise IndexLockedError(f"index at {root} is being written by another process; repair it when that is done") from exc
    try:
        try:
            current = store.read_current(root)
        except IndexCorruptError:
            current = None
        quarantined: list[str] = []
        for number in reversed(store.list_versions(root)):
            name = store.version_name(number)
            try:
                _n, _f, manifest = store.open_version(root, name)
                probe = Index(root, _resolve_embedder(manifest["embedder"]["name"]), ChunkingConfig(), DenseConfig(),
                              (manifest.get("lexical") or {}).get("stemmer"), SearchConfig(), 0.0, False)
                probe._load_version(name)
            except (IndexCorruptError, KeyError, TypeError, ValueError):
                store.quarantine(root, name)
                quarantined.append(name)
                continue
            if name != current:
                store.switch_current(root, name)
            return {"current": name, "quarantined": quarantined, "documents": len(probe._docs)}
        (root / "CURRENT").unlink(missing_ok=True)
        return {"current": None, "quarantined": quarantined, "documents": 0}
    finally:
        lock.release()
