"""Index behaviour with a tiny deterministic embedder: add, search, update, delete, edges."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval import (ChunkingConfig, ConfigError, DenseConfig, DocumentNotFoundError, EmbedderMismatchError,
                       HashEmbedder, IndexNotFoundError, open_index)

pytestmark = pytest.mark.unit

SMALL = ChunkingConfig(chunk_tokens=12, overlap_tokens=2)


@pytest.fixture
def emb():
    return HashEmbedder(64)


def write_docs(folder):
    folder.mkdir(exist_ok=True)
    (folder / "cats.md").write_text(
        "# Cats\n\nCats purr when they are content. A cat sleeps most of the day.\n\n"
        "Kittens learn to hunt by playing with their siblings."
    )
    (folder / "volcano.txt").write_text(
        "Volcanoes erupt when magma rises through the crust. Lava flows can bury whole villages.\n\n"
        "Basalt forms when lava cools quickly at the surface."
    )
    (folder / "trains.txt").write_text("Steam locomotives burn coal to boil water. The boiler pressure drives the pistons.")
    return folder


@pytest.fixture
def index(tmp_path, emb):
    idx = open_index(tmp_path / "idx", embedder=emb, chunking=SMALL)
    idx.add_paths([write_docs(tmp_path / "docs")])
    return idx


@pytest.mark.parametrize("mode", ["hybrid", "dense", "lexical"])
def test_search_finds_the_passage_with_its_citation(index, tmp_path, mode):
    hits = index.search("magma rises through the crust", k=3, mode=mode)
    top = hits[0]
    assert top.source == str((tmp_path / "docs" / "volcano.txt").resolve())
    text = (tmp_path / "docs" / "volcano.txt").read_text()
    assert text[top.start:top.end] == top.text
    assert "magma rises" in top.text
    assert top.page is None and top.title == "volcano"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_readd_unchanged_is_a_noop(index, tmp_path):
    before = index.info()["version"]
    report = index.add_paths([tmp_path / "docs"])
    assert {f.status for f in report.files} == {"unchanged"}
    assert report.chunks_added == report.chunks_removed == 0
    assert index.info()["version"] == before


def test_changed_file_replaces_its_chunks(index, tmp_path):
    path = tmp_path / "docs" / "trains.txt"
    old = {p.chunk_id for p in index.search("steam locomotives boiler", k=50, mode="lexical") if p.source == str(path)}
    others = {p.chunk_id for p in index.search("cats magma", k=50) if p.source != str(path)}
    path.write_text("Electric trains draw current from an overhead catenary wire.")
    report = index.add_paths([path])
    assert [f.status for f in report.files] == ["updated"]
    assert index.search("steam locomotives boiler", k=5, mode="lexical") == []
    new = [p for p in index.search("overhead catenary", k=5) if p.source == str(path)]
    assert new and not old & {p.chunk_id for p in new}
    # Other documents keep their chunk ids.
    assert others <= {p.chunk_id for p in index.search("cats magma", k=50)}


def test_delete_removes_every_chunk_of_one_document_and_nothing_else(index, tmp_path):
    cats = [d for d in index.documents() if d.title == "Cats"][0]
    assert cats.chunks >= 2
    before = {p.chunk_id: p for p in index.search("volcano magma lava basalt", k=50, mode="lexical")}
    removed = index.remove(cats.doc_id)
    assert removed == cats.chunks
    for mode in ("hybrid", "dense", "lexical"):
        assert all(p.doc_id != cats.doc_id for p in index.search("cats purr kittens", k=50, mode=mode))
    after = {p.chunk_id: p for p in index.search("volcano magma lava basalt", k=50, mode="lexical")}
    assert after.keys() == before.keys()
    assert all(after[c].text == before[c].text and after[c].start == before[c].start for c in after)
    # The removal is durable.
    reopened = open_index(index.root)
    assert cats.doc_id not in {d.doc_id for d in reopened.documents()}
    with pytest.raises(DocumentNotFoundError):
        index.remove(cats.doc_id)


def test_remove_by_source_path(index, tmp_path):
    assert index.remove(str(tmp_path / "docs" / "trains.txt")) >= 1
    assert "trains" not in {d.title for d in index.documents()}


def test_chunk_ids_are_never_reused(index, tmp_path):
    ids_before = {p.chunk_id for p in index.search("cats volcano trains", k=100)}
    index.remove(index.documents()[0].doc_id)
    (tmp_path / "new.txt").write_text("Penguins huddle together to survive the Antarctic winter.")
    index.add_paths([tmp_path / "new.txt"])
    new = [p for p in index.search("penguins huddle", k=3) if p.title == "new"]
    assert new and new[0].chunk_id > max(ids_before)


def test_k_larger_than_index_and_empty_or_blank_queries(index, tmp_path, emb):
    n = len(index)
    hits = index.search("cats", k=1000, mode="dense")
    assert len(hits) == n and len({h.chunk_id for h in hits}) == n
    assert index.search("   ", k=5) == []
    empty = open_index(tmp_path / "empty", embedder=emb)
    assert empty.search("anything", k=5) == []
    assert empty.info()["chunks"] == 0


def test_zero_vector_query_gives_no_dense_hits_and_no_nan(index, emb):
    zero = np.zeros(emb.dim, dtype=np.float32)
    assert index.search("cats", k=5, mode="dense", query_vector=zero) == []
    # Hybrid still answers from the lexical side.
    hits = index.search("cats purr", k=5, mode="hybrid", query_vector=zero)
    assert hits and all(np.isfinite(h.score) for h in hits)
    # A query of only unknown words / stop words gives no lexical hits, no error.
    assert index.search("the of and", k=5, mode="lexical") == []


def test_bad_batch_members_are_skipped_and_nothing_is_lost(index, tmp_path):
    before = {d.doc_id for d in index.documents()}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "blob.txt").write_bytes(b"\x00\x01binary")
    (bad / "empty.md").write_text("")
    (bad / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")
    (bad / "good.txt").write_text("Honeybees dance to tell the hive where the flowers are.")
    report = index.add_paths([bad, tmp_path / "missing.txt"])
    status = {f.path.rsplit("/", 1)[-1]: (f.status, f.reason) for f in report.files}
    assert status["good.txt"][0] == "added"
    for name in ("blob.txt", "empty.md", "broken.pdf", "missing.txt"):
        assert status[name][0] == "skipped" and status[name][1]
    assert before < {d.doc_id for d in index.documents()}


def test_jsonl_records_update_and_leave_with_their_file(tmp_path, emb):
    idx = open_index(tmp_path / "idx", embedder=emb)
    path = tmp_path / "kb.jsonl"
    path.write_text(json.dumps({"id": 1, "text": "Owls hunt at night."}) + "\n" +
                    json.dumps({"id": 2, "text": "Hawks hunt by day."}) + "\n")
    assert idx.add_paths([path]).chunks_added == 2
    path.write_text(json.dumps({"id": 1, "text": "Owls hunt at night."}) + "\n")
    report = idx.add_paths([path])
    assert report.files[0].status == "updated" and report.chunks_removed == 1 and report.chunks_added == 0
    assert [d.source for d in idx.documents()] == [f"{path}#1"]


def test_embedder_mismatch_is_a_clear_error(index):
    with pytest.raises(EmbedderMismatchError, match="hash-64"):
        open_index(index.root, embedder=HashEmbedder(32))
    assert open_index(index.root).info()["embedder"] == "hash-64"  # None: use the recorded one


def test_other_settings_mismatch_and_missing_index(index, tmp_path):
    with pytest.raises(ConfigError, match="chunking"):
        open_index(index.root, chunking=ChunkingConfig(chunk_tokens=100))
    with pytest.raises(IndexNotFoundError):
        open_index(tmp_path / "nowhere", create=False)


def test_index_is_self_describing(index):
    root = index.root
    name = (root / "CURRENT").read_text().strip()
    manifest = json.loads((root / "versions" / name / "manifest.json").read_text())
    assert manifest["embedder"] == {"name": "hash-64", "dim": 64}
    assert manifest["chunking"]["chunk_tokens"] == 12
    assert manifest["counts"]["documents"] == 3
    docs = json.loads((root / "versions" / name / "docs.json").read_text())["documents"]
    assert all(len(d["content_hash"]) == 64 for d in docs)
    assert set(manifest["files"]) >= {"docs.json", "chunks.json", "dense.faiss", "bm25.json"}


def test_hnsw_index_deletes_with_tombstones_and_compacts(tmp_path, emb):
    idx = open_index(tmp_path / "hnsw", embedder=emb, dense=DenseConfig(index_type="hnsw"),
                     chunking=ChunkingConfig(chunk_tokens=12, overlap_tokens=0))
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i}.txt").write_text(f"Topic{i} is discussed here. Keyword{i} appears in document {i}.")
    idx.add_paths([folder])
    victim = [d for d in idx.documents() if d.title == "doc3"][0]
    idx.remove(victim.doc_id)
    for mode in ("dense", "hybrid"):
        assert all(p.doc_id != victim.doc_id for p in idx.search("Topic3 Keyword3", k=50, mode=mode))
    reopened = open_index(idx.root)
    assert all(p.doc_id != victim.doc_id for p in reopened.search("Topic3 Keyword3", k=50, mode="dense"))
    assert idx._dense.tombstones  # HNSW cannot remove: the vector is excluded at search time
    raw_before = idx._dense.index.ntotal
    # Removing more than a fifth triggers a rebuild that drops the tombstoned vectors.
    for d in [d for d in idx.documents() if d.title in ("doc4", "doc5", "doc6")]:
        idx.remove(d.doc_id)
    assert idx._dense.index.ntotal < raw_before
    assert idx._dense.index.ntotal == len(idx) + len(idx._dense.tombstones)
    assert len(idx.search("Topic", k=100, mode="dense")) == len(idx)
