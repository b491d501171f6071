"""Document collections (knowledge bases): upload, per-file progress, list, remove, re-index, search.

One ``DocumentLibrary`` serves the whole process: the Documents tab, ``/v1/collections`` and the
chat's search tool all go through it, so they see the same collections under the same rules.

Where collections live (``home`` is PARLEY_HOME)::

    indexes/NAME/                        SHARED: what `parley index add` makes; everyone reads,
                                         only an admin uploads into or removes from it
    owners/<owner_slug(owner)>/indexes/NAME/    PRIVATE: one owner's own collection

A collection folder is a ``retrieval`` index folder (CURRENT, versions/, write.lock) plus:

    collection.json     name, created_at, embedder (written when the library creates it)
    files/<name>        the original of each uploaded file (for re-index and its size)
    uploads/<job>/...   staged copies while a job runs (kept for a retry until the job ends)
    jobs/<job>.json     one upload job's per-file progress (survives a reload and a restart)

Names resolve to the owner's own collection first, then the shared one. Something the owner
cannot see is a ``NotFoundError`` (HTTP 404), never data. Uploads by a non-admin always go into
their own collection (created on first upload).

An upload is a job. Each file goes through the stages ``queued -> loaded -> chunked -> embedded ->
saved``, or ends ``failed`` with a one-line ``reason`` and a ``hint`` (how to fix it). Bad input
(too big, empty, binary, damaged or password-protected, a zip bomb, macros, a name with '..', a
symbolic link) fails that file only: the rest of the upload goes on and the index keeps
everything it had. Jobs run one at a time on a background thread, in batches of files, each
batch one atomic commit of the index. A job that a stopped server left unfinished is shown as
``interrupted``; ``retry`` picks up its unfinished files from their staged copies.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import secrets
import shutil
import stat
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from bot.errors import NotFoundError, RequestError
from bot.owners import Identity, owner_slug

log = logging.getLogger(__name__)

NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_JOB_ID = re.compile(r"^job_[0-9a-f]{16}$")
STAGES = ("queued", "loaded", "chunked", "embedded", "saved")
FINAL_STAGES = ("saved", "failed")
MAX_FILES_PER_JOB = 10_000
KEEP_JOBS = 30
_BATCH_FILES = 64
_BATCH_BYTES = 8_000_000
_PERSIST_EVERY_S = 0.5
_EMBED_SLICE = 512


class ConflictError(RequestError):
    """The collection is in a state that does not allow this now (exists already, job running)."""

    status = 409


def check_name(name: Any) -> str:
    """A valid collection name, or RequestError saying what is allowed."""
    if not isinstance(name, str) or not NAME_RULE.match(name) or ".." in name:
        shown = str(name)[:80]
        raise RequestError(f"collection name {shown!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
                           f"starting with a letter or digit (no '/', no '..')")
    return name


def check_file_name(name: Any) -> str:
    """The name of an uploaded file as a safe relative POSIX path ("notes/intro.md"); LoadSkip-style
    one-line reasons as ValueError."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("the file has no name: give it one")
    raw = name.replace("\\", "/").strip()
    if any(ord(c) < 32 or c == "\x7f" for c in raw):
        raise ValueError(f"the file name {name[:80]!r} has control characters: rename it")
    parts = [p.strip() for p in raw.split("/")]
    if ".." in parts:
        raise ValueError(f"the file name {name[:80]!r} climbs out of its folder ('..'): refused; rename the file")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise ValueError(f"the file name {name[:80]!r} is an absolute path: refused; send only the file's own name")
    parts = [p for p in parts if p not in ("", ".")]
    if not parts:
        raise ValueError(f"the file name {name[:80]!r} is empty once '.' and '/' are removed: rename it")
    if any(len(p.encode()) > 200 for p in parts) or len(parts) > 16:
        raise ValueError(f"the file name {name[:80]!r} is too long or too deeply nested: shorten it")
    return "/".join(parts)


# -- what callers see -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CollectionInfo:
    name: str
    shared: bool
    """True: PARLEY_HOME/indexes/NAME, readable by everyone; False: the owner's own."""
    documents: int
    """Files (a JSONL file of many records counts once)."""
    chunks: int
    bytes: int
    """Disk used: the current index version plus the kept originals."""
    updated_at: float | None
    embedder: str | None = None
    records: int = 0
    """Documents in the index (each JSONL record is one)."""
    error: str | None = None
    """Why the collection cannot be read (a damaged index), else None."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DocumentInfo:
    """One indexed file (a JSONL file's records are listed together)."""

    doc_id: str
    """Remove and re-index take this id."""
    title: str
    source: str
    """The file's name as uploaded (or its path, for files `parley index add` indexed)."""
    chunks: int
    bytes: int | None
    added_at: float | None
    status: str
    """indexed | indexing (a job is adding it) | updating (a job is replacing it)."""
    kind: str = ""
    records: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FileProgress:
    """One file of a job. stage: queued | loaded | chunked | embedded | saved | failed."""

    name: str
    stage: str = "queued"
    reason: str | None = None
    """Why it failed (one line), or None."""
    hint: str | None = None
    """How to fix a failure."""
    bytes: int = 0
    chunks: int = 0
    records: int = 0
    progress: float = 0.0
    """0..1 within the current stage (embedding of a large file reports it)."""
    note: str | None = None
    """e.g. "unchanged: already indexed" or "replaced the earlier version"."""
    doc_id: str | None = None
    times: dict[str, float] = field(default_factory=dict)
    retryable: bool = False
    """A failure that a retry may fix (the index was busy, the server stopped)."""
    path: str | None = None
    """Internal: where the worker reads the file (relative to home when inside it)."""
    keep: bool = True
    """Internal: move the staged copy into files/ once saved (False for a re-index)."""

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        d.pop("keep")
        return d


@dataclass
class UploadJob:
    """An upload (or re-index) into one collection, file by file."""

    id: str
    collection: str
    shared: bool
    owner: str
    kind: str = "upload"
    """upload | reindex."""
    state: str = "queued"
    """queued | running | done | interrupted."""
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    files: list[FileProgress] = field(default_factory=list)
    folder: str = ""
    """Internal: the collection folder, relative to home."""
    boot: str = ""
    """Internal: the library instance that ran it (an unfinished job of another one was interrupted)."""
    pid: int = field(default_factory=os.getpid)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "interrupted")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.files:
            out[f.stage] = out.get(f.stage, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        counts = self.counts()
        return {"id": self.id, "object": "upload_job", "collection": self.collection, "shared": self.shared,
                "kind": self.kind, "state": self.state, "created_at": self.created_at,
                "updated_at": self.updated_at, "counts": counts, "saved": counts.get("saved", 0),
                "failed": counts.get("failed", 0), "files": [f.public() for f in self.files]}

    def _record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def _from_record(cls, d: dict[str, Any]) -> "UploadJob":
        files = [FileProgress(**{k: v for k, v in f.items() if k in FileProgress.__dataclass_fields__})
                 for f in d.get("files", [])]
        fields_ = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "files"}
        return cls(files=files, **fields_)


_HINTS = (
    ("over the limit", "Split the file into smaller ones, or ask the admin to raise max_upload_bytes."),
    ("unsupported file type", "Convert it to PDF, DOCX, Markdown, HTML, plain text or JSONL first."),
    ("macro", "Save a copy without macros (in Word: Save As > Word Document (.docx)) and upload that."),
    ("password", "Open it, remove the password, save an unprotected copy and upload that."),
    ("encrypted", "Open it, remove the password, save an unprotected copy and upload that."),
    ("zip bomb", "The file would expand to far more data than a document holds; it was refused for safety."),
    ("old word", "Open it in Word or LibreOffice and save it as .docx."),
    ("old-format", "Open it in Word or LibreOffice and save it as .docx."),
    ("empty", "The file has no content: check that you picked the right file."),
    ("no extractable text", "This looks like a scanned PDF: run OCR first (e.g. ocrmypdf) and upload the result."),
    ("no text", "Nothing readable was found in it: check the file, or export it as text."),
    ("binary file", "Only documents with text can be indexed: export it as PDF, DOCX or text."),
    ("not utf-8", "Save it with UTF-8 encoding (most editors: Save As > Encoding: UTF-8)."),
    ("broken", "The file is damaged or was cut off: download or export it again."),
    ("symbolic link", "Upload the file itself, not a link to it."),
    ("climbs out", "Rename the file so its name has no '..' and upload it again."),
    ("absolute path", "Upload the file with its own name only."),
    ("control characters", "Rename the file with ordinary characters."),
    ("not a regular file", "Upload ordinary files only."),
    ("jsonl", "Give each line a JSON object with a non-empty \"text\" field."),
    ("interrupted", "Press Retry (or POST .../jobs/ID/retry) to finish it."),
    ("busy", "Try again in a moment."),
)


def hint_for(reason: str) -> str:
    low = reason.lower()
    return next((hint for key, hint in _HINTS if key in low), "Check the file and upload it again.")


# -- the embedder, observed ------------------------------------------------------------------------
class _ObservedEmbedder:
    """Delegates to a real embedder and tells the running batch how far chunking and embedding got.

    The index calls ``token_spans`` once per document it chunks and ``encode`` once per batch;
    embedding is done in slices so a large file reports its progress.
    """

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.listener = None

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def max_tokens(self) -> int:
        return self.inner.max_tokens

    def token_spans(self, text: str):
        spans = self.inner.token_spans(text)
        listener = self.listener
        if listener is not None:
            listener.chunked(text)
        return spans

    def encode(self, texts: Sequence[str], show_progress: bool = False):
        import numpy as np

        listener = self.listener
        if listener is None or len(texts) <= _EMBED_SLICE:
            if listener is not None:
                listener.embedding(0, len(texts))
            out = self.inner.encode(texts, show_progress=show_progress)
        else:
            parts = []
            for start in range(0, len(texts), _EMBED_SLICE):
                listener.embedding(start, len(texts))
                parts.append(self.inner.encode(texts[start:start + _EMBED_SLICE]))
            out = np.concatenate(parts, axis=0)
        if listener is not None:
            listener.embedding(len(texts), len(texts))
        return out

    def encode_query(self, text: str):
        return self.inner.encode_query(text)


class _BatchListener:
    def __init__(self, library: "DocumentLibrary", job: UploadJob, loaded):
        self.library = library
        self.job = job
        self.by_text: dict[int, FileProgress] = {}
        self.left: dict[int, int] = {}
        for entry, docs in loaded:
            for d in docs:
                self.by_text[id(d.text)] = entry
            self.left[id(entry)] = len(docs)
        self.entries = [e for e, _ in loaded]

    def chunked(self, text: str) -> None:
        entry = self.by_text.get(id(text))
        if entry is None:
            return
        self.left[id(entry)] -= 1
        if self.left[id(entry)] <= 0 and entry.stage == "loaded":
            self.library._stage(self.job, entry, "chunked")

    def embedding(self, done: int, total: int) -> None:
        lib = self.library
        with lib._lock:
            for entry in self.entries:
                if entry.stage == "loaded" and self.left[id(entry)] <= 0:
                    lib._stage(self.job, entry, "chunked")
                if entry.stage == "chunked":
                    entry.progress = done / total if total else 1.0
            if done >= total:
                for entry in self.entries:
                    if entry.stage == "chunked":
                        lib._stage(self.job, entry, "embedded")
            lib._persist(self.job)


@dataclass
class _Coll:
    name: str
    path: Path
    shared: bool


# -- the library ----------------------------------------------------------------------------------
class DocumentLibrary:
    """Every document collection of one PARLEY_HOME (see the module docstring). Thread-safe."""

    def __init__(self, home: Path, *, max_upload_bytes: int = 50_000_000, embedder: str | None = None):
        self.home = Path(home).expanduser()
        self.max_upload_bytes = int(max_upload_bytes)
        self.embedder = embedder
        """Embedder of new collections (None: all-MiniLM-L6-v2; "hash" for tests). Existing ones
        keep the embedder they were built with."""
        self._lock = threading.RLock()
        self._indexes: dict[Path, Any] = {}
        self._live: dict[str, UploadJob] = {}
        self._persisted_at: dict[str, float] = {}
        self._queue: queue.Queue[str] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._embedders: dict[Path, _ObservedEmbedder] = {}
        self._file_counts: dict[tuple[Path, str], int] = {}
        self._job_cache: dict[Path, tuple[int, UploadJob]] = {}
        self.boot = secrets.token_hex(8)

    # -- where things are -------------------------------------------------------------------------
    def _shared_root(self) -> Path:
        return self.home / "indexes"

    def _private_root(self, owner: str | None) -> Path | None:
        return self.home / "owners" / owner_slug(owner) / "indexes" if owner else None

    @staticmethod
    def _exists(path: Path) -> bool:
        return (path / "CURRENT").is_file() or (path / "collection.json").is_file()

    def _resolve(self, owner: str | None, name: str) -> _Coll:
        check_name(name)
        private = self._private_root(owner)
        if private is not None and self._exists(private / name):
            return _Coll(name, private / name, False)
        if self._exists(self._shared_root() / name):
            return _Coll(name, self._shared_root() / name, True)
        raise NotFoundError(f"no collection named {name!r}: list yours and the shared ones with GET /v1/collections "
                            f"(or the Documents tab)")

    def _writable(self, identity: Identity, name: str) -> _Coll:
        coll = self._resolve(identity.owner, name)
        if coll.shared:
            identity.require_admin(f"changing the shared collection {name!r}")
        return coll

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.home))
        except ValueError:
            return str(path)

    def _abs(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.home / p

    # -- collections --------------------------------------------------------------------------------
    def collections(self, owner: str | None) -> list[CollectionInfo]:
        """The owner's own collections, then the shared ones (a shared one that an own collection
        of the same name hides is left out: the name resolves to the own one)."""
        out: list[CollectionInfo] = []
        own: set[str] = set()
        private = self._private_root(owner)
        for root, shared in ((private, False), (self._shared_root(), True)):
            if root is None or not root.is_dir():
                continue
            for path in sorted(root.iterdir(), key=lambda p: p.name.lower()):
                if not NAME_RULE.match(path.name) or ".." in path.name or not self._exists(path):
                    continue
                if shared and path.name in own:
                    continue
                if not shared:
                    own.add(path.name)
                out.append(self._info(_Coll(path.name, path, shared)))
        return out

    def collection(self, owner: str | None, name: str) -> CollectionInfo:
        return self._info(self._resolve(owner, name))

    def _info(self, coll: _Coll) -> CollectionInfo:
        from retrieval import store
        from retrieval.errors import RetrievalError

        meta = self._meta(coll.path)
        files_bytes = _tree_bytes(coll.path / "files")
        try:
            current = store.read_current(coll.path)
            if current is None:
                return CollectionInfo(coll.name, coll.shared, 0, 0, files_bytes, meta.get("created_at"),
                                      meta.get("embedder") or self._new_embedder_name())
            _n, _folder, manifest = store.open_version(coll.path, current, verify=False)
            counts = manifest.get("counts") or {}
            index_bytes = sum(int(f.get("bytes", 0)) for f in (manifest.get("files") or {}).values())
            files = self._file_count(coll, current, int(counts.get("documents", 0)))
            return CollectionInfo(coll.name, coll.shared, files, int(counts.get("chunks", 0)),
                                  index_bytes + files_bytes, manifest.get("updated_at"),
                                  (manifest.get("embedder") or {}).get("name"), int(counts.get("documents", 0)))
        except (RetrievalError, OSError, ValueError, KeyError, TypeError) as exc:
            return CollectionInfo(coll.name, coll.shared, 0, 0, files_bytes, None, None, 0,
                                  error=f"the index cannot be read ({exc}); `parley index repair` may fix it")

    def _file_count(self, coll: _Coll, version: str, records: int) -> int:
        """Files in a version (records of one JSONL file count once), read once per version."""
        key = (coll.path, version)
        if key not in self._file_counts:
            index = self._indexes.get(coll.path)
            try:
                if index is not None and index.info()["version"] == version:
                    count = len({d.origin for d in index.documents()})
                else:
                    raw = json.loads((coll.path / "versions" / version / "docs.json").read_text(encoding="utf-8"))
                    count = len({d.get("origin") for d in raw.get("documents", [])})
            except (OSError, ValueError, AttributeError):
                count = records
            self._file_counts[key] = count
        return self._file_counts[key]

    def _meta(self, path: Path) -> dict[str, Any]:
        try:
            return json.loads((path / "collection.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _new_embedder_name(self) -> str:
        from retrieval.embedder import DEFAULT_EMBEDDER

        return self.embedder or DEFAULT_EMBEDDER

    def create(self, identity: Identity, name: str, *, shared: bool = False) -> CollectionInfo:
        """A new, empty collection: the identity's own, or a shared one (admins only)."""
        check_name(name)
        if shared:
            identity.require_admin("creating a shared collection")
            path = self._shared_root() / name
        else:
            path = self._private_root(identity.owner) / name
        with self._lock:
            if self._exists(path):
                raise ConflictError(f"a collection named {name!r} exists already"
                                    + (" (shared)" if shared else "") + ": pick another name, or upload into it")
            self._make(path, name)
        return self._info(_Coll(name, path, shared))

    def _make(self, path: Path, name: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        meta = {"name": name, "created_at": time.time(), "embedder": self._new_embedder_name()}
        _write_json(path / "collection.json", meta)

    def delete_collection(self, identity: Identity, name: str) -> dict[str, Any]:
        """Delete a collection and everything in it (shared ones: admins only)."""
        coll = self._writable(identity, name)
        with self._lock:
            busy = [j for j in self._live.values() if self._abs(j.folder) == coll.path and not j.finished]
            if busy:
                raise ConflictError(f"an upload into {name!r} is still running ({busy[0].id}): wait until it ends")
            index = self._indexes.pop(coll.path, None)
            self._embedders.pop(coll.path, None)
            trash = coll.path.parent / f".deleted-{name}-{secrets.token_hex(4)}"
            os.rename(coll.path, trash)  # gone at once for every reader; the files go below
        del index
        shutil.rmtree(trash, ignore_errors=True)
        return {"name": name, "shared": coll.shared, "deleted": True}

    # -- indexes ------------------------------------------------------------------------------------
    def _open(self, coll: _Coll):
        """The open Index of a collection (cached; one object per folder for every reader and writer)."""
        from retrieval import get_embedder, open_index, store

        with self._lock:
            index = self._indexes.get(coll.path)
            if index is not None:
                return index
            current = store.read_current(coll.path) if coll.path.is_dir() else None
            if current is not None:
                _n, _f, manifest = store.open_version(coll.path, current, verify=False)
                name = manifest["embedder"]["name"]
            else:
                name = self._meta(coll.path).get("embedder") or self._new_embedder_name()
            # Opening with an Embedder object checks its dimension, which loads a model on first use
            # (once per process: the search needs it anyway).
            embedder = _ObservedEmbedder(get_embedder(name))
            index = open_index(coll.path, embedder=embedder, lock_timeout=120.0)
            self._indexes[coll.path] = index
            self._embedders[coll.path] = embedder
            return index

    def open_indexes(self, owner: str | None, names: Sequence[str], *, missing: str = "skip") -> list[tuple[str, Any]]:
        """(name, Index) for each name the owner can see, in order; unknown names are skipped
        (missing="skip") or a NotFoundError (missing="error"). An empty list of names means every
        collection the owner can see."""
        if not names:
            names = [c.name for c in self.collections(owner) if c.error is None]
        found = []
        for name in dict.fromkeys(names):
            try:
                coll = self._resolve(owner, name)
            except NotFoundError:
                if missing == "error":
                    raise
                continue
            found.append((name, self._open(coll)))
        return found

    def search(self, owner: str | None, names: Sequence[str], query: str, k: int = 5, query_vector=None, *,
               mode: str = "hybrid") -> list[dict[str, Any]]:
        """The k best passages over the named collections (all visible ones when names is empty),
        best first, as source dicts numbered from 1: n, title, source, page, text, start, end,
        score, doc_id, collection, shared. Unknown names are a NotFoundError."""
        from retrieval.errors import RetrievalError

        if not isinstance(query, str) or not query.strip():
            raise RequestError("the search query is empty: send {\"query\": \"what to look for\"}")
        if len(query) > 4000:
            raise RequestError(f"the search query is {len(query)} characters long; keep it under 4000")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 50:
            raise RequestError(f"k must be a whole number from 1 to 50, not {k!r}")
        found = []
        for name, index in self.open_indexes(owner, names, missing="error"):
            shared = self._resolve(owner, name).shared
            try:
                found += [(name, shared, p) for p in index.search(query, k=k, mode=mode, query_vector=query_vector)]
            except RetrievalError as exc:
                raise RequestError(f"search in {name!r} failed: {exc}") from None
        found.sort(key=lambda item: -float(item[2].score))
        return [{"n": n, "title": p.title or PurePosixPath(p.source).name, "source": p.source, "page": p.page,
                 "text": p.text, "start": p.start, "end": p.end, "score": round(float(p.score), 4),
                 "doc_id": p.doc_id, "collection": name, "shared": shared}
                for n, (name, shared, p) in enumerate(found[:k], start=1)]

    # -- documents ----------------------------------------------------------------------------------
    def documents(self, owner: str | None, name: str) -> list[DocumentInfo]:
        """The files of a collection, indexed ones first (then those a running job is adding)."""
        coll = self._resolve(owner, name)
        index = self._open(coll)
        if index.auto_refresh:
            index.refresh()
        groups: dict[str, list] = {}
        for d in index.documents():
            groups.setdefault(d.origin, []).append(d)
        pending = {}
        for job in self._jobs_of(coll, owner):
            if not job.finished:
                for f in job.files:
                    if f.stage not in FINAL_STAGES:
                        pending[f.name] = f
        out = []
        for origin, docs in groups.items():
            first = docs[0]
            title = first.title if len(docs) == 1 else f"{PurePosixPath(origin).name} ({len(docs)} records)"
            out.append(DocumentInfo(doc_id=_file_id(origin, docs), title=title, source=origin,
                                    chunks=sum(d.chunks for d in docs), bytes=self._original_size(coll, origin),
                                    added_at=max(d.added_at for d in docs),
                                    status="updating" if origin in pending else "indexed", kind=first.kind,
                                    records=len(docs)))
        out.sort(key=lambda d: d.source.lower())
        for name_, f in pending.items():
            if name_ not in groups:
                out.append(DocumentInfo(doc_id=f.doc_id or "", title=PurePosixPath(name_).name, source=name_,
                                        chunks=0, bytes=f.bytes, added_at=None, status="indexing"))
        return out

    def _original(self, coll: _Coll, origin: str) -> Path | None:
        """The kept original of an uploaded file, or the file `parley index add` read."""
        if os.path.isabs(origin):
            return Path(origin)
        try:
            rel = check_file_name(origin)
        except ValueError:
            return None
        return coll.path / "files" / rel

    def _original_size(self, coll: _Coll, origin: str) -> int | None:
        path = self._original(coll, origin)
        try:
            return path.stat().st_size if path is not None else None
        except OSError:
            return None

    def _find(self, index, doc_id: str) -> tuple[str, list]:
        """(origin, its documents) of a file id from `documents()` or of one record's id."""
        if not isinstance(doc_id, str) or not re.fullmatch(r"d[0-9a-f]{15}", doc_id):
            raise NotFoundError(f"no document {str(doc_id)[:40]!r} here: ids look like d0123456789abcde "
                                f"(GET .../documents lists them)")
        groups: dict[str, list] = {}
        for d in index.documents():
            groups.setdefault(d.origin, []).append(d)
        for origin, docs in groups.items():
            if _file_id(origin, docs) == doc_id or any(d.doc_id == doc_id for d in docs):
                return origin, docs
        raise NotFoundError(f"no document {doc_id!r} in this collection (GET .../documents lists them)")

    def remove(self, identity: Identity, name: str, doc_id: str) -> dict[str, Any]:
        """Remove one file (every record of a JSONL file) and its kept original."""
        coll = self._writable(identity, name)
        index = self._open(coll)
        origin, docs = self._find(index, doc_id)
        if len(docs) == 1:
            removed = index.remove(docs[0].doc_id)
        else:
            removed = index.remove(origin)
        original = self._original(coll, origin)
        if original is not None and not os.path.isabs(origin):
            original.unlink(missing_ok=True)
        return {"doc_id": doc_id, "source": origin, "removed_chunks": removed}

    def reindex(self, identity: Identity, name: str, doc_id: str | None = None) -> UploadJob:
        """Load, chunk and embed one file (or every file) again from its original; a job."""
        coll = self._writable(identity, name)
        index = self._open(coll)
        groups: dict[str, list] = {}
        if doc_id is None:
            for d in index.documents():
                groups.setdefault(d.origin, []).append(d)
            if not groups:
                raise RequestError(f"collection {name!r} has no documents to re-index")
        else:
            origin, docs = self._find(index, doc_id)
            groups[origin] = docs
        job = self._new_job(coll, identity.owner, "reindex")
        for origin, docs in groups.items():
            entry = FileProgress(name=origin, doc_id=_file_id(origin, docs), keep=False, times={"queued": time.time()})
            path = self._original(coll, origin)
            if path is None or not path.is_file():
                self._fail(job, entry, "the original file was not kept, so it cannot be re-read: upload it again",
                           persist=False)
            else:
                entry.path = self._rel(path)
                entry.bytes = path.stat().st_size
            job.files.append(entry)
        return self._start(job)

    # -- uploads ------------------------------------------------------------------------------------
    def upload_target(self, identity: Identity, name: str, *, shared: bool | None = None) -> tuple[str, bool]:
        """Where an upload of this identity into NAME goes: (name, shared). Checks without creating.

        shared=None: the own collection when it exists; else the shared one for an admin when it
        exists; else a new own collection. shared=True: the shared one (admins only).
        shared=False: the own one."""
        check_name(name)
        if shared is True:
            identity.require_admin("uploading into a shared collection")
            return name, True
        if shared is None:
            private = self._private_root(identity.owner)
            if not self._exists(private / name) and identity.admin and self._exists(self._shared_root() / name):
                return name, True
        return name, False

    def upload(self, identity: Identity, name: str, files: Sequence[tuple[str, Path]], *,
               shared: bool | None = None, move: bool = False) -> UploadJob:
        """Start indexing files into a collection; returns the job at once (ingest runs in the background).

        files: (name as the uploader had it, e.g. "notes/intro.md"; path of the file already on
            disk). Each file is checked here (name, type, size, symbolic link) and copied into the
            collection's staging folder (moved with move=True), so the caller may delete its own
            copy when this returns. A file that fails a check is listed as failed at once.
        """
        name, to_shared = self.upload_target(identity, name, shared=shared)
        if not files:
            raise RequestError("no files were sent: attach one or more files")
        if len(files) > MAX_FILES_PER_JOB:
            raise RequestError(f"{len(files):,} files in one upload is over the limit of {MAX_FILES_PER_JOB:,}: "
                               f"upload them in parts")
        path = self._shared_root() / name if to_shared else self._private_root(identity.owner) / name
        with self._lock:
            if not self._exists(path):
                self._make(path, name)
        coll = _Coll(name, path, to_shared)
        job = self._new_job(coll, identity.owner, "upload")
        staging = coll.path / "uploads" / job.id
        seen: set[str] = set()
        from retrieval.loaders import make_doc_id

        for i, (given, source) in enumerate(files):
            entry = FileProgress(name=str(given)[:300], times={"queued": time.time()})
            job.files.append(entry)
            try:
                clean = check_file_name(given)
            except ValueError as exc:
                self._fail(job, entry, str(exc), persist=False)
                continue
            clean = _unique(clean, seen)
            entry.name = clean
            entry.doc_id = make_doc_id(clean)
            reason = self._check_file(Path(source), clean)
            if reason is not None:
                try:
                    entry.bytes = os.lstat(source).st_size
                except OSError:
                    pass
                self._fail(job, entry, reason, persist=False)
                continue
            entry.bytes = os.lstat(source).st_size
            target = staging / str(i) / PurePosixPath(clean).name
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                _copy_nofollow(Path(source), target, move=move)
            except OSError as exc:
                self._fail(job, entry, f"could not be stored on the server ({exc.strerror or exc})", persist=False)
                entry.retryable = False
                continue
            entry.path = self._rel(target)
        return self._start(job)

    def _check_file(self, source: Path, name: str) -> str | None:
        """The one-line reason a file is refused before it is even copied, or None."""
        from retrieval.loaders import REFUSED_SUFFIXES, SUPPORTED_SUFFIXES

        try:
            st = os.lstat(source)
        except OSError as exc:
            return f"the uploaded file is missing on the server ({exc.strerror or exc}): upload it again"
        if stat.S_ISLNK(st.st_mode):
            return "is a symbolic link: links are not followed; upload the file itself"
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file: upload ordinary files only"
        suffix = PurePosixPath(name).suffix.lower()
        if suffix in REFUSED_SUFFIXES:
            return REFUSED_SUFFIXES[suffix]
        if suffix not in SUPPORTED_SUFFIXES:
            return (f"unsupported file type {suffix or '(none)'!r}: supported are "
                    f"{', '.join(sorted(SUPPORTED_SUFFIXES))}")
        if st.st_size > self.max_upload_bytes:
            return f"file is {st.st_size:,} bytes, over the limit of {self.max_upload_bytes:,} bytes"
        if st.st_size == 0:
            return "empty file (0 bytes)"
        return None

    # -- jobs -----------------------------------------------------------------------------------------
    def _new_job(self, coll: _Coll, owner: str, kind: str) -> UploadJob:
        return UploadJob(id="job_" + secrets.token_hex(8), collection=coll.name, shared=coll.shared, owner=owner,
                         kind=kind, folder=self._rel(coll.path), boot=self.boot)

    def _start(self, job: UploadJob) -> UploadJob:
        with self._lock:
            if all(f.stage in FINAL_STAGES for f in job.files):
                job.state = "done"
            self._live[job.id] = job
            self._persist(job, force=True)
            self._prune_jobs(self._abs(job.folder))
            if job.state != "done":
                self._queue.put(job.id)
                if self._worker is None or not self._worker.is_alive():
                    self._worker = threading.Thread(target=self._work, name="documents-ingest", daemon=True)
                    self._worker.start()
            return self._snapshot(job)

    def job(self, owner: str, job_id: str) -> UploadJob:
        """A job of this owner, by id (a snapshot); NotFoundError otherwise."""
        if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
            raise NotFoundError(f"no upload job {str(job_id)[:40]!r}")
        with self._lock:
            live = self._live.get(job_id)
            if live is not None:
                if live.owner != owner:
                    raise NotFoundError(f"no upload job {job_id!r}")
                return self._snapshot(live)
        roots = [r for r in (self._private_root(owner), self._shared_root()) if r is not None and r.is_dir()]
        for root in roots:
            for folder in root.iterdir():
                path = folder / "jobs" / f"{job_id}.json"
                if path.is_file():
                    job = self._load_job(path)
                    if job is not None and job.owner == owner:
                        return self._snapshot(job)
        raise NotFoundError(f"no upload job {job_id!r}")

    def jobs(self, owner: str, name: str, limit: int = 20) -> list[UploadJob]:
        """This owner's jobs in a collection, newest first (snapshots)."""
        coll = self._resolve(owner, name)
        return [self._snapshot(j) for j in self._jobs_of(coll, owner)[:limit]]

    def failures(self, owner: str, name: str) -> list[FileProgress]:
        """Files of this owner's recent jobs that failed and were not added since, newest first."""
        coll = self._resolve(owner, name)
        out: dict[str, FileProgress] = {}
        done: set[str] = set()
        for job in self._jobs_of(coll, owner):  # newest first
            for f in job.files:
                if f.name in done or f.name in out:
                    continue
                if f.stage == "saved":
                    done.add(f.name)
                elif f.stage == "failed":
                    out[f.name] = f
        return list(out.values())

    def _jobs_of(self, coll: _Coll, owner: str | None) -> list[UploadJob]:
        folder = coll.path / "jobs"
        found: dict[str, UploadJob] = {}
        if folder.is_dir():
            for path in folder.glob("job_*.json"):
                job = self._load_job(path)
                if job is not None and job.owner == owner:
                    found[job.id] = job
        with self._lock:
            for job in self._live.values():
                if self._abs(job.folder) == coll.path and job.owner == owner:
                    found[job.id] = job
        return sorted(found.values(), key=lambda j: -j.created_at)

    def _load_job(self, path: Path) -> UploadJob | None:
        job_id = path.stem
        with self._lock:
            if job_id in self._live:
                return self._live[job_id]
        try:
            mtime = path.stat().st_mtime_ns
            cached = self._job_cache.get(path)
            if cached is not None and cached[0] == mtime:
                job = cached[1]  # the page refreshes every second while a job runs: parse once
            else:
                job = UploadJob._from_record(json.loads(path.read_text(encoding="utf-8")))
                self._job_cache[path] = (mtime, job)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("unreadable job file %s: %s", path, exc)
            return None
        other_process_running = job.pid != os.getpid() and _pid_alive(job.pid)
        if not job.finished and job.boot != self.boot and not other_process_running:
            # The server that ran it stopped: show it as interrupted, with a way to retry.
            job.state = "interrupted"
            for f in job.files:
                if f.stage not in FINAL_STAGES:
                    f.note = "interrupted: the server stopped before this file was saved; retry to finish it"
            with self._lock:
                self._write_job(job)
        return job

    def retry(self, identity: Identity, name: str, job_id: str) -> UploadJob:
        """Run the unfinished (and retryable failed) files of a job again, from their staged copies."""
        coll = self._writable(identity, name)
        job = self.job(identity.owner, job_id)
        if self._abs(job.folder) != coll.path:
            raise NotFoundError(f"no upload job {job_id!r} in collection {name!r}")
        with self._lock:
            live = self._live.get(job_id)
            if live is not None and not live.finished:
                raise ConflictError(f"job {job_id} is still running")
            again = 0
            for f in job.files:
                if f.stage in FINAL_STAGES and not (f.stage == "failed" and f.retryable):
                    continue
                if f.path is None or not self._abs(f.path).is_file():
                    self._fail(job, f, "the uploaded copy is gone, so it cannot be retried: upload the file again",
                               persist=False)
                    continue
                f.stage, f.reason, f.hint, f.retryable, f.progress, f.note = "queued", None, None, False, 0.0, None
                f.times = {"queued": time.time()}
                again += 1
            if not again:
                job.state = "done"
                self._live[job.id] = job
                self._persist(job, force=True)
                return self._snapshot(job)
            job.state, job.boot, job.pid = "queued", self.boot, os.getpid()
            return self._start(job)

    # -- the worker -------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            try:
                job_id = self._queue.get(timeout=30)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._worker = None
                        return
                continue
            job = self._live.get(job_id)
            if job is None:
                continue
            try:
                self._run(job)
            except Exception as exc:  # never let one job kill the worker
                log.exception("upload job %s failed", job_id)
                for f in job.files:
                    if f.stage not in FINAL_STAGES:
                        self._fail(job, f, f"indexing failed ({type(exc).__name__}: {_short(exc)}); see the server "
                                           f"log", retryable=True, persist=False)
            finally:
                with self._lock:
                    job.state = "done"
                    self._persist(job, force=True)
                    self._cleanup_staging(job)

    def _run(self, job: UploadJob) -> None:
        with self._lock:
            job.state = "running"
            self._persist(job, force=True)
        coll = _Coll(job.collection, self._abs(job.folder), job.shared)
        if not self._exists(coll.path):
            for f in job.files:
                if f.stage not in FINAL_STAGES:
                    self._fail(job, f, "the collection was deleted before this file was indexed", persist=False)
            return
        index = self._open(coll)
        pending = [f for f in job.files if f.stage == "queued"]
        batch: list[FileProgress] = []
        size = 0
        for entry in pending:
            batch.append(entry)
            size += entry.bytes
            if len(batch) >= _BATCH_FILES or size >= _BATCH_BYTES:
                self._ingest(job, coll, index, batch)
                batch, size = [], 0
        if batch:
            self._ingest(job, coll, index, batch)

    def _ingest(self, job: UploadJob, coll: _Coll, index, batch: list[FileProgress]) -> None:
        """Load every file of a batch, then add them all in one commit of the index."""
        from retrieval import LoadSkip, RetrievalError, load_file

        loaded = []
        for entry in batch:
            source = self._abs(entry.path) if entry.path else None
            key = None if os.path.isabs(entry.name) else entry.name  # files `parley index add` read keep their path
            try:
                if source is None:
                    raise LoadSkip("the uploaded copy is missing: upload the file again")
                docs = load_file(source, max(self.max_upload_bytes, entry.bytes), key=key)
            except LoadSkip as exc:
                self._fail(job, entry, str(exc))
                continue
            except Exception as exc:  # a loader bug must not sink the batch
                log.warning("loading %s failed", entry.name, exc_info=True)
                self._fail(job, entry, f"could not be read ({type(exc).__name__}: {_short(exc)})")
                continue
            entry.records = len(docs)
            self._stage(job, entry, "loaded")
            loaded.append((entry, docs))
        if not loaded:
            return
        embedder = self._embedders.get(coll.path)
        listener = _BatchListener(self, job, loaded)
        before = {}
        for d in index.documents():
            before.setdefault(d.origin, []).append(d)
        try:
            if job.kind == "reindex":
                # A re-index re-reads unchanged files on purpose: take their chunks out first.
                for entry, docs in loaded:
                    origin = docs[0].origin
                    if origin in before:
                        index.remove(before[origin][0].doc_id if len(before[origin]) == 1 else origin)
            if embedder is not None:
                embedder.listener = listener
            try:
                report = index.add_documents([d for _e, docs in loaded for d in docs])
            finally:
                if embedder is not None:
                    embedder.listener = None
        except RetrievalError as exc:
            for entry, _docs in loaded:
                self._fail(job, entry, f"the index could not be updated ({_short(exc)})", retryable=True)
            return
        except Exception as exc:
            log.exception("indexing a batch of job %s failed", job.id)
            for entry, _docs in loaded:
                self._fail(job, entry, f"indexing failed ({type(exc).__name__}: {_short(exc)}); see the server log",
                           retryable=True)
            return
        by_origin = {fr.path: fr for fr in report.files}
        after: dict[str, int] = {}
        for d in index.documents():
            after[d.origin] = after.get(d.origin, 0) + d.chunks
        for entry, docs in loaded:
            origin = docs[0].origin
            fr = by_origin.get(origin)
            fresh = {d.doc_id for d in docs}
            stale = [d for d in before.get(origin, []) if d.doc_id not in fresh]
            for d in stale:  # records that left a JSONL file leave the index with it
                try:
                    index.remove(d.doc_id)
                except RetrievalError:
                    log.warning("could not remove stale record %s", d.doc_id, exc_info=True)
            entry.chunks = after.get(origin, 0) - sum(d.chunks for d in stale)
            entry.doc_id = _file_id(origin, docs)
            if fr is not None and fr.status == "unchanged" and job.kind != "reindex" and not stale:
                entry.note = "unchanged: already indexed"
            elif origin in before and job.kind != "reindex":
                entry.note = "replaced the earlier version"
            if entry.keep and entry.path:
                target = coll.path / "files" / entry.name
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(self._abs(entry.path), target)
                    entry.path = self._rel(target)
                except OSError as exc:
                    log.warning("could not keep the original of %s: %s", entry.name, exc)
            entry.progress = 1.0
            self._stage(job, entry, "saved")

    # -- job bookkeeping ----------------------------------------------------------------------------------
    def _stage(self, job: UploadJob, entry: FileProgress, stage: str) -> None:
        with self._lock:
            entry.stage = stage
            entry.times[stage] = time.time()
            if stage != "embedded":
                entry.progress = 1.0 if stage == "saved" else 0.0
            self._persist(job)

    def _fail(self, job: UploadJob, entry: FileProgress, reason: str, *, retryable: bool = False,
              persist: bool = True) -> None:
        with self._lock:
            entry.stage, entry.reason, entry.hint = "failed", " ".join(reason.split()), hint_for(reason)
            entry.retryable = retryable
            entry.times["failed"] = time.time()
            if not retryable and entry.path and entry.keep:
                staged = self._abs(entry.path)
                if "uploads" in staged.parts:
                    staged.unlink(missing_ok=True)
                entry.path = None
            if persist:
                self._persist(job)

    def _persist(self, job: UploadJob, force: bool = False) -> None:
        """Write the job file (at most every half second, unless forced); caller holds the lock."""
        job.updated_at = time.time()
        if not force and job.updated_at - self._persisted_at.get(job.id, 0.0) < _PERSIST_EVERY_S:
            return
        self._write_job(job)

    def _write_job(self, job: UploadJob) -> None:
        folder = self._abs(job.folder) / "jobs"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _write_json(folder / f"{job.id}.json", job._record())
            self._persisted_at[job.id] = time.time()
        except OSError as exc:  # the collection was deleted meanwhile, or the disk is full
            log.warning("could not save job %s: %s", job.id, exc)

    def _cleanup_staging(self, job: UploadJob) -> None:
        if any(f.retryable or f.stage not in FINAL_STAGES for f in job.files):
            return
        shutil.rmtree(self._abs(job.folder) / "uploads" / job.id, ignore_errors=True)

    def _prune_jobs(self, folder: Path) -> None:
        paths = sorted((folder / "jobs").glob("job_*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for path in paths[KEEP_JOBS:]:
            if path.stem not in self._live or self._live[path.stem].finished:
                path.unlink(missing_ok=True)
                shutil.rmtree(folder / "uploads" / path.stem, ignore_errors=True)
                self._live.pop(path.stem, None)

    def _snapshot(self, job: UploadJob) -> UploadJob:
        with self._lock:
            return UploadJob._from_record(job._record())

    def wait(self, owner: str, job_id: str, timeout: float = 60.0) -> UploadJob:
        """Block until a job has finished (tests, scripts, the benchmark); returns its final state."""
        deadline = time.time() + timeout
        while True:
            job = self.job(owner, job_id)
            if job.finished:
                return job
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout:.0f} s: {job.counts()}")
            time.sleep(0.05)


# -- helpers ----------------------------------------------------------------------------------------
def _file_id(origin: str, docs) -> str:
    """The id of a file in `documents()`: its document's id, or for a file of many records one id
    made from its name (the same rule as the loaders' ids)."""
    if len(docs) == 1:
        return docs[0].doc_id
    from retrieval.loaders import make_doc_id

    return make_doc_id(origin)


def _unique(name: str, seen: set[str]) -> str:
    """The same name twice in one upload (two folders' README.md) gets " (2)" before its suffix."""
    candidate, n = name, 1
    while candidate.lower() in seen:
        n += 1
        p = PurePosixPath(name)
        candidate = str(p.with_name(f"{p.stem} ({n}){p.suffix}"))
    seen.add(candidate.lower())
    return candidate


def _copy_nofollow(source: Path, target: Path, *, move: bool) -> None:
    if move:
        try:
            os.replace(source, target)
            return
        except OSError:
            pass  # another filesystem: copy
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(source, flags)
    with os.fdopen(fd, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    if move:
        source.unlink(missing_ok=True)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False)
    os.replace(tmp, path)


def _tree_bytes(folder: Path) -> int:
    total = 0
    if folder.is_dir():
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
    return total


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True
