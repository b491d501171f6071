"""bot/documents.py: collections, per-file progress that survives a restart, bad input, ownership.

Real library, real retrieval index, the hash embedder (no model files); files are real PDFs,
DOCX (python-docx), zips and links made in the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bot.documents import ConflictError, DocumentLibrary, check_file_name
from bot.errors import NotFoundError, RequestError
from bot.owners import ForbiddenError, Identity
from tests.doc_fixtures import bad_inputs, make_docx, make_pdf

ALICE = Identity("user:alice")
BOB = Identity("user:bob")
ROOT = Identity("user:root", admin=True)
LIMIT = 2_000_000


@pytest.fixture
def lib(tmp_path):
    return DocumentLibrary(tmp_path / "home", max_upload_bytes=LIMIT, embedder="hash")


@pytest.fixture
def files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "cats.md").write_text("# Cats\n\nCats sleep sixteen hours a day. A purring cat is content.\n")
    (src / "dogs.txt").write_text("Dogs bark at the mailman. Dogs like long walks in the park.")
    make_pdf(src / "earth.pdf", ["Volcanoes erupt when magma rises.", "Glaciers carve valleys over centuries."],
             title="Earth science")
    make_docx(src / "report.docx", ["Quarterly revenue grew by ten percent.", "Costs fell."], title="Q3 report",
              table=[["Region", "Revenue"], ["North", "12"]])
    (src / "records.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"id": "r1", "title": "Saturn", "text": "Saturn has rings of ice."},
        {"id": "r2", "title": "Mars", "text": "Mars is red because of iron oxide."},
        {"id": "r3", "title": "Venus", "text": "Venus is the hottest planet."}]) + "\n")
    (src / "page.html").write_text("<html><head><title>Tea</title><script>alert(1)</script></head>"
                                   "<body><p>Green tea is steamed.</p></body></html>")
    return src


def upload_all(lib, who, name, folder: Path, names=None):
    names = names or sorted(p.name for p in folder.iterdir())
    job = lib.upload(who, name, [(n, folder / n) for n in names])
    return lib.wait(who.owner, job.id, timeout=60)


def test_upload_goes_through_every_stage_and_is_searchable(lib, files):
    job = upload_all(lib, ALICE, "notes", files)
    assert job.state == "done"
    by_name = {f.name: f for f in job.files}
    assert {f.stage for f in job.files} == {"saved"}, [(f.name, f.reason) for f in job.files]
    for f in job.files:  # each file reached each stage, in order
        stamps = [f.times[s] for s in ("queued", "loaded", "chunked", "embedded", "saved")]
        assert stamps == sorted(stamps)
        assert f.chunks >= 1
    assert by_name["records.jsonl"].records == 3
    docs = {d.source: d for d in lib.documents(ALICE.owner, "notes")}
    assert set(docs) == {"cats.md", "dogs.txt", "earth.pdf", "report.docx", "records.jsonl", "page.html"}
    assert docs["report.docx"].title == "Q3 report" and docs["report.docx"].kind == "docx"
    assert docs["earth.pdf"].title == "Earth science" and docs["earth.pdf"].bytes == (files / "earth.pdf").stat().st_size
    assert docs["records.jsonl"].records == 3 and all(d.status == "indexed" for d in docs.values())
    [info] = lib.collections(ALICE.owner)
    assert (info.name, info.shared, info.documents, info.records) == ("notes", False, 6, 8)
    assert info.chunks == sum(d.chunks for d in docs.values()) and info.bytes > 0
    hits = lib.search(ALICE.owner, ["notes"], "glaciers carve valleys", k=3)
    assert hits[0]["source"] == "earth.pdf" and hits[0]["page"] == 2 and hits[0]["n"] == 1
    assert hits[0]["collection"] == "notes" and hits[0]["text"] == "Glaciers carve valleys over centuries."
    assert lib.search(ALICE.owner, ["notes"], "revenue North", k=1)[0]["source"] == "report.docx"
    assert "alert" not in " ".join(h["text"] for h in lib.search(ALICE.owner, ["notes"], "green tea alert", k=5))


def test_progress_is_saved_on_disk_and_a_new_library_reads_it(lib, files, tmp_path):
    job = upload_all(lib, ALICE, "notes", files, ["cats.md", "dogs.txt"])
    again = DocumentLibrary(tmp_path / "home", embedder="hash")  # a server restart
    loaded = again.job(ALICE.owner, job.id)
    assert loaded.state == "done" and [f.stage for f in loaded.files] == ["saved", "saved"]
    assert [j.id for j in again.jobs(ALICE.owner, "notes")] == [job.id]
    assert {d.source for d in again.documents(ALICE.owner, "notes")} == {"cats.md", "dogs.txt"}


def test_same_file_again_is_unchanged_and_a_new_version_replaces_it(lib, files):
    upload_all(lib, ALICE, "notes", files, ["cats.md"])
    job = upload_all(lib, ALICE, "notes", files, ["cats.md"])
    assert job.files[0].stage == "saved" and job.files[0].note == "unchanged: already indexed"
    (files / "cats.md").write_text("# Cats\n\nCats are obligate carnivores.\n")
    job = upload_all(lib, ALICE, "notes", files, ["cats.md"])
    assert job.files[0].note == "replaced the earlier version"
    [doc] = lib.documents(ALICE.owner, "notes")
    hit = lib.search(ALICE.owner, ["notes"], "obligate carnivores", k=1)[0]
    assert hit["doc_id"] == doc.doc_id and "sixteen" not in hit["text"]


def test_jsonl_records_that_leave_the_file_leave_the_index(lib, files):
    upload_all(lib, ALICE, "notes", files, ["records.jsonl"])
    (files / "records.jsonl").write_text(json.dumps({"id": "r1", "title": "Saturn", "text": "Saturn has rings."}))
    upload_all(lib, ALICE, "notes", files, ["records.jsonl"])
    [doc] = lib.documents(ALICE.owner, "notes")
    assert doc.records == 1
    assert all(h["title"] == "Saturn" for h in lib.search(ALICE.owner, ["notes"], "Mars Venus Saturn", k=5))


def test_remove_and_reindex(lib, files):
    upload_all(lib, ALICE, "notes", files, ["cats.md", "records.jsonl", "earth.pdf"])
    docs = {d.source: d for d in lib.documents(ALICE.owner, "notes")}
    out = lib.remove(ALICE, "notes", docs["records.jsonl"].doc_id)  # a file of 3 records goes at once
    assert out["removed_chunks"] == docs["records.jsonl"].chunks
    assert {d.source for d in lib.documents(ALICE.owner, "notes")} == {"cats.md", "earth.pdf"}
    assert not any(h["source"].startswith("records") for h in lib.search(ALICE.owner, ["notes"], "Mars", k=5))
    job = lib.wait(ALICE.owner, lib.reindex(ALICE, "notes", docs["earth.pdf"].doc_id).id)
    assert [(f.name, f.stage) for f in job.files] == [("earth.pdf", "saved")] and job.kind == "reindex"
    job = lib.wait(ALICE.owner, lib.reindex(ALICE, "notes").id)
    assert sorted(f.name for f in job.files if f.stage == "saved") == ["cats.md", "earth.pdf"]
    assert {d.source for d in lib.documents(ALICE.owner, "notes")} == {"cats.md", "earth.pdf"}
    with pytest.raises(NotFoundError):
        lib.remove(ALICE, "notes", docs["records.jsonl"].doc_id)


@pytest.fixture
def bad_cases(tmp_path_factory):
    return bad_inputs(tmp_path_factory.mktemp("bad"), max_upload_bytes=LIMIT)


def test_every_bad_file_gets_a_one_line_reason_and_the_index_is_untouched(lib, files, bad_cases, tmp_path):
    upload_all(lib, ALICE, "notes", files, ["cats.md", "earth.pdf"])
    before = lib.collections(ALICE.owner)[0]
    before_docs = lib.documents(ALICE.owner, "notes")
    before_hit = lib.search(ALICE.owner, ["notes"], "glaciers", k=1)
    (tmp_path / "outside.txt").write_text("a secret outside the upload")
    link = tmp_path / "link.md"
    link.symlink_to(tmp_path / "outside.txt")
    cases = [*bad_cases, ("symlink", "link.md", link, "symbolic link")]
    upload = [(name, path) for _case, name, path, _expect in cases] + [("good.md", files / "dogs.txt")]
    job = lib.wait(ALICE.owner, lib.upload(ALICE, "notes", upload).id)
    results = {f.name: f for f in job.files}
    assert results["good.md"].stage == "saved"  # the rest of the upload goes on
    failed = [f for f in job.files if f.stage == "failed"]
    assert len(failed) == len(cases)
    for (case, _name, _path, expect), f in zip(cases, job.files):
        assert f.stage == "failed", case
        assert expect.lower() in f.reason.lower(), (case, f.reason)
        assert "\n" not in f.reason and len(f.reason) < 300, (case, f.reason)
        assert f.hint, case
    after = lib.collections(ALICE.owner)[0]
    assert after.documents == before.documents + 1 and after.chunks > before.chunks
    assert lib.search(ALICE.owner, ["notes"], "glaciers", k=1) == before_hit
    assert [d for d in lib.documents(ALICE.owner, "notes") if d.source != "good.md"] == before_docs
    assert "secret outside" not in json.dumps(lib.search(ALICE.owner, ["notes"], "secret outside", k=5))
    listed = {f.name for f in lib.failures(ALICE.owner, "notes")}
    assert "good.md" not in listed and "../../etc/passwd" in listed and "bomb.docx" in listed
    # Nothing was written outside the collection for the traversal name.
    assert not (lib.home / "etc").exists()
    assert not any("passwd" in str(p) for p in lib.home.rglob("*"))


def test_file_names_are_checked():
    assert check_file_name("docs\\sub/./a.md") == "docs/sub/a.md"
    for bad in ("../a.md", "a/../../b.md", "/etc/passwd", "C:/x.md", "a\x00.md", "", "./"):
        with pytest.raises(ValueError):
            check_file_name(bad)


@pytest.mark.parametrize("name", ["a/b", "../x", "..", "x..y", "", ".hidden", "a" * 65, "a b", "a\\b"])
def test_collection_names_with_slashes_or_dots_are_refused(lib, name, tmp_path):
    (tmp_path / "f.md").write_text("hello")
    for call in (lambda: lib.create(ALICE, name), lambda: lib.upload(ALICE, name, [("f.md", tmp_path / "f.md")]),
                 lambda: lib.documents(ALICE.owner, name), lambda: lib.search(ALICE.owner, [name], "hello")):
        with pytest.raises(RequestError) as err:
            call()
        assert "not valid" in str(err.value) and "\n" not in str(err.value)
    assert not any(lib.home.rglob("f.md"))


def test_two_owners_never_see_each_others_collections(lib, files):
    upload_all(lib, ALICE, "private", files, ["cats.md"])
    assert [c.name for c in lib.collections(BOB.owner)] == []
    job_id = lib.jobs(ALICE.owner, "private")[0].id
    doc_id = lib.documents(ALICE.owner, "private")[0].doc_id
    for call in (lambda: lib.documents(BOB.owner, "private"), lambda: lib.collection(BOB.owner, "private"),
                 lambda: lib.search(BOB.owner, ["private"], "cats"), lambda: lib.delete_collection(BOB, "private"),
                 lambda: lib.remove(BOB, "private", doc_id), lambda: lib.reindex(BOB, "private"),
                 lambda: lib.job(BOB.owner, job_id), lambda: lib.jobs(BOB.owner, "private"),
                 lambda: lib.retry(BOB, "private", job_id)):
        with pytest.raises(NotFoundError):
            call()
    # Bob's search of "everything he can see" finds nothing of Alice's.
    assert lib.search(BOB.owner, [], "cats sleep", k=5) == []
    # Bob's own collection of the same name is his alone.
    upload_all(lib, BOB, "private", files, ["dogs.txt"])
    assert {d.source for d in lib.documents(BOB.owner, "private")} == {"dogs.txt"}
    assert {d.source for d in lib.documents(ALICE.owner, "private")} == {"cats.md"}
    lib.delete_collection(BOB, "private")
    assert {d.source for d in lib.documents(ALICE.owner, "private")} == {"cats.md"}


def test_shared_collections_are_read_by_all_and_changed_by_admins(lib, files):
    with pytest.raises(ForbiddenError):
        lib.create(ALICE, "handbook", shared=True)
    lib.create(ROOT, "handbook", shared=True)
    job = upload_all(lib, ROOT, "handbook", files, ["earth.pdf"])  # an admin's upload goes into the shared one
    assert job.shared and job.files[0].stage == "saved"
    assert (lib.home / "indexes" / "handbook" / "CURRENT").is_file()
    [info] = lib.collections(ALICE.owner)
    assert info.shared and info.name == "handbook"
    assert lib.search(ALICE.owner, ["handbook"], "volcanoes", k=1)[0]["source"] == "earth.pdf"
    doc_id = lib.documents(ALICE.owner, "handbook")[0].doc_id
    for call in (lambda: lib.remove(ALICE, "handbook", doc_id), lambda: lib.delete_collection(ALICE, "handbook"),
                 lambda: lib.reindex(ALICE, "handbook")):
        with pytest.raises(ForbiddenError):
            call()
    # A non-admin's upload into that name goes into their own collection, which then comes first.
    job = upload_all(lib, ALICE, "handbook", files, ["cats.md"])
    assert not job.shared
    assert {d.source for d in lib.documents(ALICE.owner, "handbook")} == {"cats.md"}
    assert {d.source for d in lib.documents(BOB.owner, "handbook")} == {"earth.pdf"}
    assert [(c.name, c.shared) for c in lib.collections(ALICE.owner)] == [("handbook", False)]
    with pytest.raises(ConflictError):
        lib.create(ROOT, "handbook", shared=True)


def test_the_chat_search_tool_resolves_names_through_the_library(lib, files):
    from bot.tools.search import DocumentSearch

    lib.create(ROOT, "handbook", shared=True)
    upload_all(lib, ROOT, "handbook", files, ["earth.pdf"])
    upload_all(lib, ALICE, "notes", files, ["cats.md"])
    search = DocumentSearch(lib.home, library=lib)
    assert search.available(["notes"], owner=ALICE.owner) and not search.available(["notes"], owner=BOB.owner)
    assert search.available(["handbook"], owner=BOB.owner) and search.available(["handbook"], owner=None)
    assert not search.available(["notes"], owner=None)  # no owner: shared collections only
    sources = search.search("cats volcanoes", ["notes", "handbook"], k=4, owner=ALICE.owner)
    assert {s["collection"] for s in sources} == {"notes", "handbook"}
    assert [s["n"] for s in sources] == list(range(1, len(sources) + 1))
    assert {s["collection"] for s in search.search("cats volcanoes", ["notes", "handbook"], owner=BOB.owner)} \
        == {"handbook"}
    assert search.embedder_name(["notes"], owner=ALICE.owner) == "hash-256"


def test_a_job_a_killed_server_left_behind_is_interrupted_and_retry_finishes_it(lib, files, tmp_path):
    """A real server process is killed while its upload waits for the index; the next one retries it."""
    import filelock

    lib.create(ALICE, "notes")
    folder = lib._private_root(ALICE.owner) / "notes"
    lock = filelock.FileLock(folder / "write.lock")  # another writer holds the index: the upload waits
    lock.acquire()
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from pathlib import Path
        from bot.documents import DocumentLibrary
        from bot.owners import Identity
        lib = DocumentLibrary(Path({str(lib.home)!r}), embedder="hash")
        job = lib.upload(Identity("user:alice"), "notes", [("cats.md", Path({str(files / 'cats.md')!r})),
                                                           ("dogs.txt", Path({str(files / 'dogs.txt')!r}))])
        print(job.id, flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        job_id = proc.stdout.readline().strip()
        deadline = time.time() + 30
        while json.loads((folder / "jobs" / f"{job_id}.json").read_text())["state"] != "running":
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        lock.release()
    restarted = DocumentLibrary(lib.home, embedder="hash")
    job = restarted.jobs(ALICE.owner, "notes")[0]
    assert job.id == job_id and job.state == "interrupted"
    assert all(f.stage not in ("saved", "failed") and "interrupted" in f.note for f in job.files)
    again = restarted.wait(ALICE.owner, restarted.retry(ALICE, "notes", job_id).id)
    assert [f.stage for f in again.files] == ["saved", "saved"]
    assert {d.source for d in restarted.documents(ALICE.owner, "notes")} == {"cats.md", "dogs.txt"}
    assert not any((folder / "uploads").glob("*/*/*"))  # staged copies are cleaned up at the end


def test_delete_collection(lib, files):
    upload_all(lib, ALICE, "notes", files, ["cats.md"])
    assert lib.delete_collection(ALICE, "notes")["deleted"]
    assert lib.collections(ALICE.owner) == []
    with pytest.raises(NotFoundError):
        lib.documents(ALICE.owner, "notes")
    with pytest.raises(NotFoundError):
        lib.delete_collection(ALICE, "notes")


def test_duplicate_names_in_one_upload_get_a_suffix(lib, files):
    job = lib.wait(ALICE.owner, lib.upload(ALICE, "notes", [("a/README.md", files / "cats.md"),
                                                            ("b/README.md", files / "dogs.txt"),
                                                            ("README.md", files / "dogs.txt")]).id)
    assert [f.name for f in job.files] == ["a/README.md", "b/README.md", "README.md"]
    job = lib.wait(ALICE.owner, lib.upload(ALICE, "more", [("x.md", files / "cats.md"), ("X.md", files / "dogs.txt")]).id)
    assert [f.name for f in job.files] == ["x.md", "X (2).md"]


def test_folder_index_does_not_follow_links_out_of_the_folder(tmp_path):
    """`parley index add DIR` (retrieval.iter_files / add_paths): links out of DIR are skipped with a reason."""
    from retrieval import open_index

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwords.txt").write_text("hunter2 is the password")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "real.md").write_text("# Real\n\nA real note about apples.")
    (docs / "leak.txt").symlink_to(secret / "passwords.txt")
    (docs / "alias.md").symlink_to(docs / "real.md")
    (docs / "secretdir").symlink_to(secret, target_is_directory=True)
    (docs / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")
    index = open_index(tmp_path / "idx", embedder="hash")
    report = index.add_paths([docs])
    skipped = {Path(f.path).name: f.reason for f in report.files if f.status == "skipped"}
    assert "outside the folder" in skipped["leak.txt"] and "outside the folder" in skipped["secretdir"]
    assert "broken symbolic link" in skipped["dangling.txt"]
    assert [Path(d.source).name for d in index.documents()] == ["real.md"]
    assert "hunter2" not in json.dumps([p.text for p in index.search("password hunter2", k=5)])


def test_uploaded_symlinks_and_non_files_are_refused(lib, tmp_path):
    (tmp_path / "outside.md").write_text("outside")
    (tmp_path / "link.md").symlink_to(tmp_path / "outside.md")
    os.mkfifo(tmp_path / "pipe.md")
    (tmp_path / "dir.md").mkdir()
    job = lib.wait(ALICE.owner, lib.upload(ALICE, "notes", [("link.md", tmp_path / "link.md"),
                                                            ("pipe.md", tmp_path / "pipe.md"),
                                                            ("dir.md", tmp_path / "dir.md"),
                                                            ("gone.md", tmp_path / "missing.md")]).id)
    reasons = [f.reason for f in job.files]
    assert "symbolic link" in reasons[0] and "not a regular file" in reasons[1] and "not a regular file" in reasons[2]
    assert "missing" in reasons[3]
    assert lib.documents(ALICE.owner, "notes") == []


def test_an_index_made_by_parley_index_add_is_a_shared_collection(lib, files):
    """`parley index add` writes PARLEY_HOME/indexes/NAME; the library lists, searches, re-indexes it,
    and removing a document never touches the file it was read from."""
    from retrieval import open_index

    index = open_index(lib.home / "indexes" / "default", embedder="hash")
    index.add_paths([files / "cats.md", files / "earth.pdf"])
    [info] = lib.collections(ALICE.owner)
    assert (info.name, info.shared, info.documents) == ("default", True, 2)
    docs = {Path(d.source).name: d for d in lib.documents(ALICE.owner, "default")}
    assert docs["cats.md"].source == str((files / "cats.md").resolve()) and docs["cats.md"].bytes > 0
    assert lib.search(BOB.owner, ["default"], "glaciers", k=1)[0]["source"].endswith("earth.pdf")
    job = lib.wait(ROOT.owner, lib.reindex(ROOT, "default").id)
    assert [f.stage for f in job.files] == ["saved", "saved"]
    lib.remove(ROOT, "default", docs["cats.md"].doc_id)
    assert (files / "cats.md").is_file()
    assert [Path(d.source).name for d in lib.documents(ALICE.owner, "default")] == ["earth.pdf"]
