"""The Documents tab: collections, uploads with per-file progress, the documents list, failures.

Everything here calls the process's ``DocumentLibrary`` (``runtime.documents``, bot/documents.py),
the same one /v1/collections and the chat's search use; this module only lays it out. Who is
asking is decided on the server for every event (``session.identity``). Progress lives in the
library's job files, so it is still there after a reload or a server restart; a ``gr.Timer``
refreshes it while a job runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gradio as gr

from bot.errors import ParleyError
from bot.owners import Identity
from ui.session import Session

DEFAULT_COLLECTION = "default"
"""Where an upload goes when no collection is picked: the chat searches "default" unless told otherwise."""
_STAGE_LABELS = {"queued": "queued", "loaded": "loaded", "chunked": "chunked", "embedded": "embedded",
                 "saved": "saved", "failed": "failed"}
PROGRESS_HEADERS = ["File", "Stage", "Chunks", "Size", "Detail"]
FAILED_HEADERS = ["File", "Reason", "How to fix it"]
DOCS_HEADERS = ["Title", "File", "Chunks", "Size", "Added", "Status", "ID"]


def human_bytes(n: int | None) -> str:
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else ""


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _stage(f, job_state: str) -> str:
    if f.stage not in ("saved", "failed") and job_state == "interrupted":
        return "interrupted"
    if f.stage == "chunked" and 0 < f.progress < 1:
        return f"embedding {f.progress:.0%}"
    return _STAGE_LABELS.get(f.stage, f.stage)


def progress_rows(jobs) -> list[list[Any]]:
    """The files of the most recent jobs, newest job first (what the progress table shows)."""
    rows = []
    for job in jobs:
        for f in job.files:
            detail = f.reason or f.note or ("re-index" if job.kind == "reindex" else "")
            rows.append([f.name, _stage(f, job.state), f.chunks or "", human_bytes(f.bytes), detail])
    return rows


def build_documents_tab(runtime, session: Session) -> None:
    """The Documents tab; call inside ``with gr.Tab("Documents"):`` of the app's Blocks."""
    from gradio.context import Context

    lib = runtime.documents
    if lib is None:
        gr.Markdown("Document collections are not available on this server.")
        return
    access = runtime.access
    laptop = not access.login_required and not access.keys_required and access.loopback
    tab = Context.block
    root = Context.root_block

    gr.Markdown("Upload files or a folder into a collection; the chat can then search it (pick collections "
                "under the chat's settings). PDF, DOCX, Markdown, HTML, text and JSONL; at most "
                f"{human_bytes(lib.max_upload_bytes)} per file.")
    with gr.Row(equal_height=True):
        collection = gr.Dropdown(choices=[], value=None, label="Collection", allow_custom_value=False, scale=3,
                                 interactive=True, elem_id="parley-doc-collection")
        new_name = gr.Textbox(label="New collection", placeholder="e.g. manuals", scale=2, max_lines=1,
                              elem_id="parley-doc-new-name")
        new_shared = gr.Checkbox(value=laptop, label="New collections are shared with everyone", visible=False, scale=1,
                                 elem_id="parley-doc-new-shared")
        create = gr.Button("Create", scale=1, elem_id="parley-doc-create")
    info = gr.Markdown("", elem_id="parley-doc-info")
    with gr.Row():
        files = gr.File(file_count="multiple", label="Add files", elem_id="parley-doc-files", height=140)
        folder = gr.File(file_count="directory", label="Add a folder", elem_id="parley-doc-folder", height=140)
    gr.Markdown("#### Progress")
    progress = gr.Dataframe(headers=PROGRESS_HEADERS, value=[], interactive=False, wrap=True,
                            elem_id="parley-doc-progress")
    retry = gr.Button("Retry the interrupted upload", visible=False, elem_id="parley-doc-retry")
    failed_title = gr.Markdown("#### Failed files", visible=False)
    failed = gr.Dataframe(headers=FAILED_HEADERS, value=[], interactive=False, wrap=True, visible=False,
                          elem_id="parley-doc-failed")
    gr.Markdown("#### Documents")
    docs = gr.Dataframe(headers=DOCS_HEADERS, value=[], interactive=False, wrap=True, elem_id="parley-doc-list")
    with gr.Row(equal_height=True):
        picked = gr.Dropdown(choices=[], value=[], multiselect=True, label="Selected documents (or click a row)",
                             scale=4, elem_id="parley-doc-picked")
        remove = gr.Button("Remove", variant="stop", scale=1, elem_id="parley-doc-remove")
        reindex = gr.Button("Re-index", scale=1, elem_id="parley-doc-reindex")
        reindex_all = gr.Button("Re-index all", scale=1, elem_id="parley-doc-reindex-all")
    with gr.Accordion("Try a search", open=False):
        with gr.Row(equal_height=True):
            query = gr.Textbox(label="Search this collection", scale=4, max_lines=1, elem_id="parley-doc-query")
            search = gr.Button("Search", scale=1, elem_id="parley-doc-search")
        results = gr.HTML("", elem_id="parley-doc-results")
    with gr.Accordion("Delete this collection", open=False):
        confirm = gr.Textbox(label="Type the collection's name to delete it with all its documents", max_lines=1,
                             elem_id="parley-doc-confirm")
        delete = gr.Button("Delete collection", variant="stop", elem_id="parley-doc-delete")
    timer = gr.Timer(1.0, active=False)

    def who(request: gr.Request | None, browser_id: str | None) -> Identity:
        return session.identity(request, browser_id)

    def fail(exc: Exception):
        raise gr.Error(str(exc)) from None

    def view(identity: Identity | None, name: str | None) -> list[Any]:
        """Every output of a refresh, for one identity and the collection it has picked."""
        if identity is None:
            return [gr.update(choices=[], value=None), "", [], gr.update(visible=False), gr.update(visible=False),
                    gr.update(value=[], visible=False), [], gr.update(choices=[], value=[]), gr.Timer(active=False),
                    gr.update(visible=False)]
        infos = lib.collections(identity.owner)
        names = [c.name for c in infos]
        if name not in names:
            name = names[0] if names else None
        choices = [(c.name + (" (shared)" if c.shared else ""), c.name) for c in infos]
        if name is None:
            return [gr.update(choices=choices, value=None),
                    f"No collection yet: add files and they go into **{DEFAULT_COLLECTION}** (or name a new "
                    f"collection first).", [], gr.update(visible=False), gr.update(visible=False),
                    gr.update(value=[], visible=False), [], gr.update(choices=[], value=[]), gr.Timer(active=False),
                    gr.update(visible=identity.admin)]
        info = next(c for c in infos if c.name == name)
        jobs = lib.jobs(identity.owner, name, limit=3)
        running = any(not j.finished for j in jobs)
        interrupted = any(j.state == "interrupted" for j in jobs)
        failures = lib.failures(identity.owner, name)
        documents = lib.documents(identity.owner, name)
        owner_text = "shared" + ("" if identity.admin else " (read-only: only admins change it)") if info.shared \
            else "yours"
        line = (f"**{name}** · {owner_text} · {_count(info.documents, 'document')} · {_count(info.chunks, 'chunk')} · "
                f"{human_bytes(info.bytes)}" + (f" · updated {_when(info.updated_at)}" if info.updated_at else "")
                + (f" · embedder `{info.embedder}`" if info.embedder else ""))
        if info.error:
            line += f"\n\n**This collection cannot be read:** {info.error}"
        rows = [[d.title, d.source, d.chunks, human_bytes(d.bytes), _when(d.added_at), d.status, d.doc_id]
                for d in documents]
        pick = [(f"{d.title} ({d.source})" if d.title != d.source else d.source, d.doc_id)
                for d in documents if d.status != "indexing"]
        return [gr.update(choices=choices, value=name), line, progress_rows(jobs), gr.update(visible=interrupted),
                gr.update(visible=bool(failures)),
                gr.update(value=[[f.name, f.reason, f.hint] for f in failures], visible=bool(failures)), rows,
                gr.update(choices=pick, value=[]), gr.Timer(active=running), gr.update(visible=identity.admin)]

    outputs = [collection, info, progress, retry, failed_title, failed, docs, picked, timer, new_shared]

    def refresh(browser_id, name, request: gr.Request):
        try:
            identity = who(request, browser_id)
        except gr.Error:  # a first visit before the page gave this browser its id: nothing to show yet
            return view(None, None)
        return view(identity, name)

    def create_collection(browser_id, name, shared, request: gr.Request):
        # May come before the page-load event gave this browser its id: make it now and return it.
        identity, browser_id = session.identity_or_new(request, browser_id)
        name = (name or "").strip()
        if not name:
            raise gr.Error("Type a name for the new collection first.")
        try:
            lib.create(identity, name, shared=bool(shared) and identity.admin)
        except ParleyError as exc:
            fail(exc)
        gr.Info(f"Collection {name} created: add files to it.")
        return [*view(identity, name), "", browser_id]

    def start(browser_id, name, typed, shared, paths, folder_mode: bool, request: gr.Request):
        identity, browser_id = session.identity_or_new(request, browser_id)
        if not paths:
            return [*view(identity, name), None, None, typed, browser_id]
        target = (typed or "").strip() or name or DEFAULT_COLLECTION
        items = [(Path(p).name, Path(p)) for p in (paths if isinstance(paths, list) else [paths])]
        left_out = []
        if folder_mode:  # a folder brings along files of every kind: take the documents, name the rest
            from retrieval.loaders import SUPPORTED_SUFFIXES

            keep = [(n, p) for n, p in items if not n.startswith(".") and Path(n).suffix.lower() in SUPPORTED_SUFFIXES]
            left_out = sorted({Path(n).suffix.lower() or n for n, _p in items if (n, _p) not in keep})
            items = keep
            if not items:
                raise gr.Error("That folder has no PDF, DOCX, Markdown, HTML, text or JSONL files.")
        # A new collection made by this upload is shared when an admin asks (a laptop: the terminal's
        # `parley chat` then sees it too); an existing name resolves as everywhere (own first).
        visible = {c.name: c for c in lib.collections(identity.owner)}
        want_shared = True if identity.admin and shared and target not in visible else None
        try:
            job = lib.upload(identity, target, items, shared=want_shared)
        except ParleyError as exc:
            fail(exc)
        note = f" (left out files of other types: {', '.join(left_out[:8])})" if left_out else ""
        where = job.collection + (" (shared)" if job.shared else "")
        if target in visible and visible[target].shared and not job.shared:
            where = f"your own collection {job.collection} (the shared one is read-only for you)"
        gr.Info(f"Indexing {len(items)} file(s) into {where}{note}.")
        return [*view(identity, job.collection), None, None, "", browser_id]

    def on_files(browser_id, name, typed, shared, paths, request: gr.Request):
        return start(browser_id, name, typed, shared, paths, False, request)

    def on_folder(browser_id, name, typed, shared, paths, request: gr.Request):
        return start(browser_id, name, typed, shared, paths, True, request)

    def remove_docs(browser_id, name, doc_ids, request: gr.Request):
        identity = who(request, browser_id)
        if not name or not doc_ids:
            raise gr.Error("Pick one or more documents first (click a row, or use the list).")
        removed = 0
        for doc_id in doc_ids:
            try:
                removed += 1 if lib.remove(identity, name, doc_id) else 0
            except ParleyError as exc:
                fail(exc)
        gr.Info(f"Removed {removed} document(s).")
        return view(identity, name)

    def reindex_docs(browser_id, name, doc_ids, request: gr.Request):
        identity = who(request, browser_id)
        if not name or not doc_ids:
            raise gr.Error("Pick one or more documents first (click a row, or use the list).")
        try:
            for doc_id in doc_ids:
                lib.reindex(identity, name, doc_id)
        except ParleyError as exc:
            fail(exc)
        return view(identity, name)

    def reindex_everything(browser_id, name, request: gr.Request):
        identity = who(request, browser_id)
        if not name:
            raise gr.Error("Pick a collection first.")
        try:
            lib.reindex(identity, name)
        except ParleyError as exc:
            fail(exc)
        return view(identity, name)

    def retry_job(browser_id, name, request: gr.Request):
        identity = who(request, browser_id)
        try:
            jobs = [j for j in lib.jobs(identity.owner, name, limit=10) if j.state == "interrupted"]
            for job in jobs:
                lib.retry(identity, name, job.id)
        except ParleyError as exc:
            fail(exc)
        return view(identity, name)

    def delete_collection(browser_id, name, typed, request: gr.Request):
        identity = who(request, browser_id)
        if not name:
            raise gr.Error("Pick a collection first.")
        if (typed or "").strip() != name:
            raise gr.Error(f"Type {name} in the box to confirm.")
        try:
            lib.delete_collection(identity, name)
        except ParleyError as exc:
            fail(exc)
        gr.Info(f"Collection {name} deleted.")
        return [*view(identity, None), ""]

    def run_search(browser_id, name, text, request: gr.Request):
        from ui.citations import render_sources

        identity = who(request, browser_id)
        if not name:
            raise gr.Error("Pick a collection first.")
        try:
            found = lib.search(identity.owner, [name], text or "", k=5)
        except ParleyError as exc:
            fail(exc)
        if not found:
            return "<p>Nothing matches.</p>"
        return render_sources("", found, heading=f"The {len(found)} best passages for this search:")

    def pick_row(current, evt: gr.SelectData):
        # A click on a row of the documents table adds that document to the selection.
        row = evt.row_value if isinstance(evt.row_value, list) else None
        doc_id = row[-1] if row else None
        chosen = list(current or [])
        if doc_id and doc_id not in chosen:
            chosen.append(doc_id)
        return chosen

    inputs = [session.browser_id, collection]
    triggers = [root.load, session.browser_id.change]
    if isinstance(tab, gr.Tab):
        triggers.append(tab.select)
    gr.on(triggers, refresh, inputs, outputs, api_name=False, show_progress="hidden")
    collection.input(refresh, inputs, outputs, api_name=False, show_progress="hidden")
    timer.tick(refresh, inputs, outputs, api_name=False, show_progress="hidden")
    create.click(create_collection, [session.browser_id, new_name, new_shared], [*outputs, new_name, session.browser_id],
                 api_name=False)
    upload_inputs = [session.browser_id, collection, new_name, new_shared]
    upload_outputs = [*outputs, files, folder, new_name, session.browser_id]
    files.upload(on_files, [*upload_inputs, files], upload_outputs, api_name=False)
    folder.upload(on_folder, [*upload_inputs, folder], upload_outputs, api_name=False)
    remove.click(remove_docs, [*inputs, picked], outputs, api_name=False)
    reindex.click(reindex_docs, [*inputs, picked], outputs, api_name=False)
    reindex_all.click(reindex_everything, inputs, outputs, api_name=False)
    retry.click(retry_job, inputs, outputs, api_name=False)
    delete.click(delete_collection, [*inputs, confirm], [*outputs, confirm], api_name=False)
    search.click(run_search, [*inputs, query], results, api_name=False)
    query.submit(run_search, [*inputs, query], results, api_name=False)
    docs.select(pick_row, picked, picked, api_name=False)
