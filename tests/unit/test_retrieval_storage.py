"""Durability: crash-safe saves, corrupt or truncated files, no pickle anywhere."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import retrieval
from retrieval import HashEmbedder, IndexCorruptError, open_index, store

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def emb():
    return HashEmbedder(64)


@pytest.fixture
def built(tmp_path, emb):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Aardvarks dig burrows at night. They eat ants and termites.")
    (docs / "b.txt").write_text("Bison graze on the open prairie. Herds migrate with the seasons.")
    idx = open_index(tmp_path / "idx", embedder=emb)
    idx.add_paths([docs])
    return idx, docs


def current_folder(root: Path) -> Path:
    return root / "versions" / (root / "CURRENT").read_text().strip()


def test_failure_between_writes_keeps_the_previous_version(built, tmp_path, monkeypatch):
    idx, docs = built
    version = idx.info()["version"]
    (docs / "c.txt").write_text("Cheetahs sprint faster than any other land animal.")
    real = store.write_artifact
    calls = {"n": 0}

    def flaky(folder, name, write):
        calls["n"] += 1
        if calls["n"] == 3:  # after docs.json and chunks.json, before the vectors
            raise OSError("disk full (injected)")
        return real(folder, name, write)

    monkeypatch.setattr(store, "write_artifact", flaky)
    with pytest.raises(OSError, match="injected"):
        idx.add_paths([docs])
    monkeypatch.setattr(store, "write_artifact", real)
    # Memory went back to the committed version; disk still names it; no half-written folder.
    assert idx.info()["version"] == version
    assert all(h.title != "c" for h in idx.search("cheetahs sprint", k=10))
    assert (tmp_path / "idx" / "CURRENT").read_text().strip() == version
    assert [p.name for p in (tmp_path / "idx" / "versions").iterdir() if ".tmp" in p.name] == []
    reopened = open_index(tmp_path / "idx")
    assert {d.title for d in reopened.documents()} == {"a", "b"}
    # The next save works and includes the new file.
    assert [f.status for f in idx.add_paths([docs]).files if f.path.endswith("c.txt")] == ["added"]


def test_kill_9_during_saves_leaves_a_consistent_index(tmp_path):
    root = tmp_path / "idx"
    script = textwrap.dedent(f"""
        import sys, itertools
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from retrieval import open_index
        idx = open_index({str(root)!r}, embedder="hash-64")
        src = Path({str(tmp_path)!r}) / "src"
        src.mkdir(exist_ok=True)
        for i in itertools.count():
            p = src / f"doc{{i % 7}}.txt"
            p.write_text(f"Document number {{i}} talks about topic{{i % 7}} and more words " * 20)
            idx.add_paths([p])
            if i == 0:
                print("ready", flush=True)
    """)
    for delay in (0.3, 0.7, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        idx = open_index(root)  # verifies every checksum and cross-checks the stores
        docs = idx.documents()
        assert 1 <= len(docs) <= 7
        assert len(idx) == sum(d.chunks for d in docs)
        for hit in idx.search("topic3 document", k=50):
            assert hit.doc_id in {d.doc_id for d in docs}


def _corrupt(folder: Path, name: str, how: str) -> None:
    path = folder / name
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # same size, one byte flipped
        path.write_bytes(data[:10] + bytes([data[10] ^ 0xFF]) + data[11:])


@pytest.mark.parametrize("name", ["dense.faiss", "docs.json", "chunks.json", "bm25.data.npy", "bm25.json"])
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_or_truncated_files_are_clear_errors(built, tmp_path, name, how):
    idx, _ = built
    _corrupt(current_folder(idx.root), name, how)
    with pytest.raises(IndexCorruptError, match=name.replace(".", r"\.")):
        open_index(idx.root)


def test_damaged_manifest_and_current(built):
    idx, _ = built
    folder = current_folder(idx.root)
    manifest = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(manifest[: len(manifest) // 2])
    with pytest.raises(IndexCorruptError, match="manifest"):
        open_index(idx.root)
    (folder / "manifest.json").write_text(manifest)
    (idx.root / "CURRENT").write_text("../../etc\n")
    with pytest.raises(IndexCorruptError, match="CURRENT"):
        open_index(idx.root)


def test_unreadable_faiss_file_with_valid_checksum_is_a_clear_error(built):
    """Like an index written by a newer faiss: the bytes are intact but faiss cannot parse them."""
    idx, _ = built
    folder = current_folder(idx.root)
    (folder / "dense.faiss").write_bytes(b"IxM2" + b"\x00" * 64)
    manifest = json.loads((folder / "manifest.json").read_text())
    digest, size = store.file_digest(folder / "dense.faiss")
    manifest["files"]["dense.faiss"] = {"sha256": digest, "bytes": size}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match="dense index"):
        open_index(idx.root)


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PARLEY_PICKLE_MARKER']}",))


def test_a_crafted_pickle_is_never_executed(built, tmp_path, monkeypatch):
    idx, _ = built
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PARLEY_PICKLE_MARKER", str(marker))
    folder = current_folder(idx.root)
    payload = pickle.dumps(_Boom())
    # Dropped beside the real files: ignored.
    for name in ("docstore.pkl", "index.pkl", "dense.pkl"):
        (folder / name).write_bytes(payload)
    assert len(open_index(idx.root)) == len(idx)
    # In place of the docstore and the BM25 arrays: refused, never unpickled.
    for name in ("docs.json", "bm25.data.npy"):
        original = (folder / name).read_bytes()
        (folder / name).write_bytes(payload)
        with pytest.raises(IndexCorruptError):
            open_index(idx.root)
        (folder / name).write_bytes(original)
    assert not marker.exists()


def test_a_pickle_with_a_forged_checksum_is_still_not_loaded(built, tmp_path, monkeypatch):
    import numpy as np

    idx, _ = built
    marker = tmp_path / "pwned2"
    monkeypatch.setenv("PARLEY_PICKLE_MARKER", str(marker))
    folder = current_folder(idx.root)
    np.save(folder / "bm25.rows.npy", np.array([_Boom()], dtype=object), allow_pickle=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    digest, size = store.file_digest(folder / "bm25.rows.npy")
    manifest["files"]["bm25.rows.npy"] = {"sha256": digest, "bytes": size}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError):
        open_index(idx.root)
    assert not marker.exists()


def test_package_source_never_uses_pickle():
    for path in Path(retrieval.__file__).parent.glob("*.py"):
        src = path.read_text()
        assert "import pickle" not in src and "allow_pickle=True" not in src, path.name
        assert "torch.load" not in src, path.name


def test_old_versions_are_pruned(built):
    idx, docs = built
    for i in range(4):
        (docs / f"n{i}.txt").write_text(f"Note {i} about narwhals.")
        idx.add_paths([docs])
    versions = store.list_versions(idx.root)
    assert len(versions) == store.KEEP_VERSIONS
    assert store.version_name(versions[-1]) == idx.info()["version"]


def test_repair_sets_a_damaged_version_aside_and_rolls_back(built, tmp_path):
    idx, docs = built
    (docs / "c.txt").write_text("Cheetahs sprint faster than any other land animal.")
    idx.add_paths([docs])
    damaged = idx.info()["version"]
    _corrupt(current_folder(idx.root), "chunks.json", "flip")
    with pytest.raises(IndexCorruptError, match="repair"):
        open_index(idx.root)
    result = retrieval.repair_index(idx.root)
    assert result["quarantined"] == [damaged] and result["current"] != damaged
    reopened = open_index(idx.root)
    assert {d.title for d in reopened.documents()} == {"a", "b"}
    assert (idx.root / "quarantine").is_dir()
    # Adding the sources again brings it up to date; unchanged files are no-ops.
    statuses = {Path(f.path).name: f.status for f in reopened.add_paths([docs]).files}
    assert statuses == {"a.txt": "unchanged", "b.txt": "unchanged", "c.txt": "added"}
