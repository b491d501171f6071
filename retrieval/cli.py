"""`parley index ...`: add, search, list, remove, info, repair.

Contract with the main CLI (bot/cli.py): `add_parser(subparsers)` adds the `index` verb; every
sub-command sets `func(args) -> int` (the exit code). The main parser supplies `args.home`
(PARLEY_HOME as a resolved Path). Errors are raised as `RetrievalError`; the caller prints
`error: <message>` and exits 2. `python -m retrieval index ...` runs the same commands alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .chunking import ChunkingConfig
from .dense import DenseConfig
from .errors import ConfigError, RetrievalError
from .search import MODES

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def index_path(home: Path, name: str) -> Path:
    """PARLEY_HOME/indexes/NAME, refusing names that could escape that folder."""
    if not _NAME.match(name or ""):
        raise ConfigError(
            f"index name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return Path(home) / "indexes" / name


def _progress(args) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def cmd_add(args) -> int:
    from .index import open_index

    chunking = None
    if args.chunk_tokens is not None or args.overlap is not None:
        base = ChunkingConfig()
        chunking = ChunkingConfig(chunk_tokens=args.chunk_tokens or base.chunk_tokens,
                                  overlap_tokens=base.overlap_tokens if args.overlap is None else args.overlap)
    dense = DenseConfig(index_type=args.ann) if args.ann else None
    index = open_index(index_path(args.home, args.index), embedder=args.embedder, chunking=chunking, dense=dense,
                       lock_timeout=args.wait)
    report = index.add_paths(args.paths, include=args.include, exclude=args.exclude,
                             max_file_bytes=int(args.max_file_mb * 1024 * 1024), show_progress=_progress(args))
    for f in report.files:
        line = f"{f.status:9} {f.path}"
        if f.status in ("added", "updated"):
            line += f"  ({f.chunks} chunks)"
        if f.reason:
            line += f"  -- {f.reason}"
        print(line)
    print(f"index {args.index}: {report.summary()}; {len(index.documents())} documents, {len(index)} chunks")
    return 1 if report.skipped else 0


def cmd_search(args) -> int:
    from .index import open_index

    index = open_index(index_path(args.home, args.index), create=False)
    hits = index.search(args.query, k=args.k, mode=args.mode)
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=2))
        return 0
    if not hits:
        print("no results")
    for rank, h in enumerate(hits, start=1):
        text = " ".join(h.text.split())
        if len(text) > 300:
            text = text[:297] + "..."
        print(f"{rank}. [{h.score:.4f}] {h.title}  ({h.citation()})  doc {h.doc_id}\n   {text}")
    return 0


def cmd_list(args) -> int:
    from .index import open_index

    index = open_index(index_path(args.home, args.index), create=False)
    docs = index.documents()
    if args.json:
        print(json.dumps([d.__dict__ for d in docs], ensure_ascii=False, indent=2))
        return 0
    for d in docs:
        print(f"{d.doc_id}  {d.chunks:5d} chunks  {d.kind:8}  {d.source}  \"{d.title}\"")
    print(f"{len(docs)} documents")
    return 0


def cmd_remove(args) -> int:
    from .index import open_index

    index = open_index(index_path(args.home, args.index), create=False, lock_timeout=args.wait)
    n = index.remove(args.doc_id)
    print(f"removed {args.doc_id} ({n} chunks)")
    return 0


def cmd_info(args) -> int:
    from .index import open_index

    index = open_index(index_path(args.home, args.index), create=False)
    info = index.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        print(f"{key:16} {value}")
    return 0


def cmd_repair(args) -> int:
    from .index import repair_index

    result = repair_index(index_path(args.home, args.index))
    for name in result["quarantined"]:
        print(f"set aside damaged version {name} (under quarantine/)")
    if result["current"] is None:
        print(f"index {args.index}: no intact version left; add your documents again")
        return 1
    print(f"index {args.index}: now at {result['current']} with {result['documents']} documents"
          + ("; add your documents again to bring it up to date" if result["quarantined"] else "; nothing to repair"))
    return 0


def add_parser(subparsers) -> None:
    """Add the `index` verb and its sub-commands to an argparse subparsers object."""
    p = subparsers.add_parser("index", help="index your documents and search them",
                              description="Index documents under PARLEY_HOME/indexes/NAME and search them.")
    sub = p.add_subparsers(dest="index_command", metavar="COMMAND")
    sub.required = True

    def common(sp):
        sp.add_argument("--index", default="default", metavar="NAME", help="index name (default: default)")

    a = sub.add_parser("add", help="add or update files and folders")
    a.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (folders are walked recursively)")
    common(a)
    a.add_argument("--include", action="append", metavar="GLOB", help="only files matching (repeatable), e.g. '*.md'")
    a.add_argument("--exclude", action="append", metavar="GLOB", help="leave out files matching (repeatable)")
    a.add_argument("--embedder", default=None, help="sentence-transformers model id or folder, or 'hash' (new index only)")
    a.add_argument("--chunk-tokens", type=int, default=None, help="tokens per chunk (new index only; default 240)")
    a.add_argument("--overlap", type=int, default=None, help="overlap tokens between chunks (new index only; default 40)")
    a.add_argument("--ann", choices=("flat", "hnsw"), default=None, help="dense index type (new index only; default flat)")
    a.add_argument("--max-file-mb", type=float, default=50.0, help="skip files larger than this (default 50)")
    a.add_argument("--wait", type=float, default=0.0, help="seconds to wait for another writer (default 0)")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.set_defaults(func=cmd_add)

    s = sub.add_parser("search", help="search an index")
    s.add_argument("query")
    s.add_argument("-k", type=int, default=5, help="number of passages (default 5)")
    s.add_argument("--mode", choices=MODES, default="hybrid")
    common(s)
    s.add_argument("--json", action="store_true", help="print passages as JSON")
    s.set_defaults(func=cmd_search)

    ls = sub.add_parser("list", help="list indexed documents")
    common(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)

    r = sub.add_parser("remove", help="remove a document by id (or by its source path)")
    r.add_argument("doc_id", metavar="DOC_ID")
    common(r)
    r.add_argument("--wait", type=float, default=0.0, help="seconds to wait for another writer (default 0)")
    r.set_defaults(func=cmd_remove)

    i = sub.add_parser("info", help="settings and counts of an index")
    common(i)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    rp = sub.add_parser("repair", help="set damaged versions aside and go back to the last intact one")
    common(rp)
    rp.set_defaults(func=cmd_repair)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m retrieval index ...`), same contract as the main CLI."""
    parser = argparse.ArgumentParser(prog="python -m retrieval")
    parser.add_argument("--home", type=Path, default=None, help="PARLEY_HOME (default: $PARLEY_HOME or ~/.parley)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    add_parser(subparsers)
    args = parser.parse_args(argv)
    args.home = (args.home or Path(os.environ.get("PARLEY_HOME", "~/.parley"))).expanduser().resolve()
    try:
        return args.func(args)
    except RetrievalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
