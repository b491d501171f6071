"""Atomic, versioned, self-checking storage of an index folder.

Layout of an index folder:

    CURRENT                 one line, the name of the committed version ("v00000007")
    write.lock              held by the one writer (filelock)
    versions/v00000007/     the files of that version, plus manifest.json
        manifest.json       settings, counts and {file: {sha256, bytes}} of every other file

A save writes a new version into `versions/<name>.tmp-<pid>`, fsyncs every file and the folder,
renames it into place, then switches CURRENT with `os.replace` (atomic on POSIX) and fsyncs the
root. A crash at any point leaves CURRENT naming the previous complete version. Loading checks
every file's size and sha256 against the manifest before parsing, so a truncated or modified
file is a clear `IndexCorruptError`, never wrong passages. Nothing here uses pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from .errors import IndexCorruptError, IndexNotFoundError

FORMAT = "parley-retrieval-index"
FORMAT_VERSION = 1
KEEP_VERSIONS = 2
REPAIR_HINT = ("`parley index repair` sets the damaged version aside and goes back to the last intact one; "
               "then add your documents again to bring it up to date")
_VERSION_RE = re.compile(r"^v(\d{8})$")


def version_name(number: int) -> str:
    return f"v{number:08d}"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(1 << 20)
            if not block:
                break
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def write_artifact(folder: Path, name: str, write: Callable[[Path], None]) -> dict:
    """Write one file with `write(path)`, fsync it, and return its manifest entry.

    Tests patch this function to inject a failure between two writes of a save.
    """
    path = folder / name
    write(path)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    digest, size = file_digest(path)
    return {"sha256": digest, "bytes": size}


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, separators=(",", ":"))


def list_versions(root: Path) -> list[int]:
    vdir = root / "versions"
    if not vdir.is_dir():
        return []
    out = []
    for entry in vdir.iterdir():
        m = _VERSION_RE.match(entry.name)
        if m and entry.is_dir():
            out.append(int(m.group(1)))
    return sorted(out)


def read_current(root: Path) -> str | None:
    """The committed version's name, or None for a folder with no committed version."""
    try:
        raw = (root / "CURRENT").read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexCorruptError(f"index at {root}: cannot read CURRENT ({exc}); see `parley index info`") from exc
    if not _VERSION_RE.match(raw):
        raise IndexCorruptError(
            f"index at {root}: CURRENT holds {raw[:40]!r}, not a version name; "
            f"restore it to name one of {[version_name(v) for v in list_versions(root)]}"
        )
    return raw


def commit_version(root: Path, files: dict[str, Callable[[Path], None]], manifest: dict) -> str:
    """Write `files` (name -> writer) and `manifest` as a new version and make it current.

    The caller holds the write lock. Returns the new version's name.
    """
    vdir = root / "versions"
    vdir.mkdir(parents=True, exist_ok=True)
    existing = list_versions(root)
    number = (existing[-1] if existing else 0) + 1
    name = version_name(number)
    tmp = vdir / f"{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        entries = {}
        for fname, writer in files.items():
            entries[fname] = write_artifact(tmp, fname, writer)
        manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION, version=number, files=entries)
        write_artifact(tmp, "manifest.json", lambda p: write_json(p, manifest))
        fsync_dir(tmp)
        os.rename(tmp, vdir / name)
        fsync_dir(vdir)
        switch_current(root, name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep=name)
    return name


def switch_current(root: Path, name: str) -> None:
    """Atomically point CURRENT at an existing version (used by repair)."""
    cur_tmp = root / f"CURRENT.tmp-{os.getpid()}"
    with open(cur_tmp, "w", encoding="ascii") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(cur_tmp, root / "CURRENT")
    fsync_dir(root)


def quarantine(root: Path, name: str) -> Path:
    """Move a damaged version out of the way (kept for inspection, never loaded again)."""
    target = root / "quarantine" / f"{name}-{int(time.time())}"
    target.parent.mkdir(exist_ok=True)
    os.rename(root / "versions" / name, target)
    fsync_dir(root / "versions")
    return target


def prune(root: Path, keep: str) -> None:
    """Remove versions older than the last KEEP_VERSIONS and leftovers of crashed saves."""
    vdir = root / "versions"
    numbers = list_versions(root)
    keep_numbers = set(numbers[-KEEP_VERSIONS:]) | {int(keep[1:])}
    for entry in vdir.iterdir():
        m = _VERSION_RE.match(entry.name)
        if m and int(m.group(1)) not in keep_numbers:
            shutil.rmtree(entry, ignore_errors=True)
        elif ".tmp-" in entry.name:
            pid = entry.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
    for entry in root.glob("CURRENT.tmp-*"):
        pid = entry.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            entry.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers are from an earlier failed save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_version(root: Path, name: str | None = None, verify: bool = True) -> tuple[str, Path, dict]:
    """Locate and verify a committed version; returns (name, folder, manifest).

    With `verify`, every file listed in the manifest is checked (size, then sha256) before
    anything is parsed; without it only the manifest is read.
    """
    if name is None:
        name = read_current(root)
        if name is None:
            raise IndexNotFoundError(f"no index at {root} (no CURRENT file); create it by adding documents")
    folder = root / "versions" / name
    mpath = folder / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise IndexCorruptError(f"index at {root}: version {name} has no manifest.json") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexCorruptError(f"index at {root}: manifest of {name} is unreadable or truncated ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexCorruptError(f"index at {root}: {mpath} is not a Parley index manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexCorruptError(
            f"index at {root} has format version {manifest.get('format_version')!r}; this Parley reads "
            f"version {FORMAT_VERSION}. Upgrade Parley, or rebuild the index from its source documents"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise IndexCorruptError(f"index at {root}: manifest of {name} lists no files")
    if not verify:
        return name, folder, manifest
    for fname, entry in files.items():
        path = folder / fname
        if "/" in fname or fname.startswith("."):
            raise IndexCorruptError(f"index at {root}: manifest names an invalid file {fname!r}")
        try:
            size = path.stat().st_size
        except FileNotFoundError as exc:
            raise IndexCorruptError(f"index at {root}: {name}/{fname} is missing; " + REPAIR_HINT) from exc
        if size != entry.get("bytes"):
            raise IndexCorruptError(
                f"index at {root}: {name}/{fname} has {size} bytes, the manifest says {entry.get('bytes')} "
                "(truncated or replaced); " + REPAIR_HINT
            )
        digest, _ = file_digest(path)
        if digest != entry.get("sha256"):
            raise IndexCorruptError(
                f"index at {root}: {name}/{fname} fails its sha256 checksum (corrupted or modified); "
                + REPAIR_HINT
            )
    return name, folder, manifest
