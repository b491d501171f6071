"""Concurrency: readers with a writer in one process, one writer across processes."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from retrieval import HashEmbedder, IndexLockedError, open_index
from retrieval.rwlock import RWLock

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def write_doc(folder: Path, i: int) -> Path:
    path = folder / f"doc{i}.txt"
    # Every sentence of doc i carries the marker "mark{i}": a passage that lacks its own
    # document's marker is a torn read.
    path.write_text(" ".join(f"Sentence {j} of mark{i} mentions shared words alpha beta." for j in range(30)))
    return path


def test_readers_and_a_writer_threads(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    idx = open_index(tmp_path / "idx", embedder=HashEmbedder(64))
    idx.add_paths([write_doc(src, i) for i in range(6)])
    stop = threading.Event()
    errors: list[str] = []
    searches = [0]

    def reader(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                mode = rng.choice(["hybrid", "dense", "lexical"])
                for hit in idx.search("shared words alpha mark3", k=rng.choice([1, 5, 50]), mode=mode):
                    title = hit.title  # "docN"
                    if f"mark{title[3:]}" not in hit.text:
                        errors.append(f"torn read: {title} / {hit.text[:40]}")
                searches[0] += 1
            except Exception as exc:  # noqa: BLE001 - any exception is a failure here
                errors.append(repr(exc))

    def writer():
        i = 6
        rng = random.Random(0)
        while not stop.is_set():
            try:
                if rng.random() < 0.5:
                    idx.add_paths([write_doc(src, i)])
                    i += 1
                else:
                    docs = idx.documents()
                    if len(docs) > 2:
                        idx.remove(rng.choice(docs).doc_id)
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:5]
    assert searches[0] > 20
    assert len(idx) == sum(d.chunks for d in idx.documents())
    assert len(idx) == idx._dense.ntotal == len(idx._bm25)
    assert len(open_index(idx.root)) == len(idx)


def test_rwlock_excludes_readers_during_a_write():
    lock = RWLock()
    state = {"readers": 0, "writing": False, "bad": False}
    guard = threading.Lock()

    def read():
        for _ in range(200):
            with lock.read():
                with guard:
                    state["readers"] += 1
                    state["bad"] |= state["writing"]
                with guard:
                    state["readers"] -= 1

    def write():
        for _ in range(200):
            with lock.write():
                with guard:
                    state["bad"] |= state["readers"] > 0
                    state["writing"] = True
                time.sleep(0)
                with guard:
                    state["writing"] = False

    threads = [threading.Thread(target=read) for _ in range(4)] + [threading.Thread(target=write)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not state["bad"]


def test_a_second_writer_process_gets_a_clear_error(tmp_path):
    root = tmp_path / "idx"
    (tmp_path / "a.txt").write_text("Anemones live in tide pools.")
    idx = open_index(root, embedder=HashEmbedder(64))
    idx.add_paths([tmp_path / "a.txt"])
    holder = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from retrieval import open_index
        idx = open_index({str(root)!r})
        with idx._writing():
            print("locked", flush=True)
            time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        (tmp_path / "b.txt").write_text("Barnacles cling to rocks.")
        with pytest.raises(IndexLockedError, match="another process"):
            idx.add_paths([tmp_path / "b.txt"])
        t0 = time.monotonic()
        with pytest.raises(IndexLockedError):
            open_index(root, lock_timeout=0.5).remove(str(tmp_path / "a.txt"))
        assert time.monotonic() - t0 >= 0.4
        # Reading is never blocked by the writer.
        assert idx.search("anemones", k=1)[0].title == "a"
    finally:
        proc.kill()
        proc.wait(10)
    # The lock dies with its process.
    assert idx.add_paths([tmp_path / "b.txt"]).files[0].status == "added"


def test_writers_take_turns_without_losing_updates(tmp_path):
    """Two handles (as two processes would have): each reloads the newer version before writing."""
    emb = HashEmbedder(64)
    a = open_index(tmp_path / "idx", embedder=emb)
    b = open_index(tmp_path / "idx", embedder=emb)
    (tmp_path / "x.txt").write_text("Xylophones have wooden bars.")
    (tmp_path / "y.txt").write_text("Yaks carry loads in the Himalayas.")
    a.add_paths([tmp_path / "x.txt"])
    b.add_paths([tmp_path / "y.txt"])
    assert {d.title for d in open_index(tmp_path / "idx").documents()} == {"x", "y"}
    # A reader picks up another handle's commit on its next search.
    assert a.search("yaks himalayas", k=1)[0].title == "y"
