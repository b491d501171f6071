"""The Documents tab in headless Chromium on the composed app: upload two files, watch them reach
"saved", reload and still see them, see a bad file's reason, remove one, upload a folder."""

from __future__ import annotations

import pytest

from bot.api import create_app
from tests.doc_fixtures import make_pdf
from tests.e2e.test_browser_chat import CHROMIUM, FLAGS
from tests.helpers import build_test_runtime, running_server


@pytest.fixture(scope="module")
def app_url(tiny_model_dir, tmp_path_factory):
    runtime = build_test_runtime(tiny_model_dir, tmp_path_factory.mktemp("docs-ui-home"))
    runtime.documents.embedder = "hash"  # new collections use the fast embedder (no model files)
    with running_server(create_app(runtime)) as url:
        yield url, runtime
    runtime.engine.close()


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_context().new_page()
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def open_documents(page, url):
    page.goto(url + "/")
    page.get_by_role("tab", name="Documents").click()
    page.locator("#parley-doc-files").wait_for()


def cell(page, table, text):
    return page.locator(f"#{table}").get_by_text(text, exact=True).filter(visible=True).first


def test_upload_progress_reload_and_remove(app_url, page, tmp_path):
    url, runtime = app_url
    (tmp_path / "cats.md").write_text("# Cats\n\nCats sleep sixteen hours a day.\n")
    make_pdf(tmp_path / "earth.pdf", ["Volcanoes erupt when magma rises.", "Glaciers carve valleys."])
    (tmp_path / "empty.txt").write_bytes(b"")
    open_documents(page, url)
    page.locator("#parley-doc-files input[type=file]").set_input_files([str(tmp_path / "cats.md"),
                                                                        str(tmp_path / "earth.pdf")])
    # Progress reaches "saved" for both files (the timer refreshes the table while the job runs).
    page.wait_for_function("document.querySelectorAll('#parley-doc-progress td').length > 0")
    saved = page.locator("#parley-doc-progress").get_by_text("saved", exact=True)
    saved.nth(1).wait_for()
    cell(page, "parley-doc-list", "cats.md").wait_for()
    cell(page, "parley-doc-list", "earth.pdf").wait_for()
    assert "default · shared" in page.locator("#parley-doc-info").inner_text()  # nothing picked: "default"
    page.screenshot(path=str(tmp_path / "documents-uploaded.png"), full_page=True)

    # A bad file: its reason is listed, the two documents stay.
    page.locator("#parley-doc-files input[type=file]").set_input_files([str(tmp_path / "empty.txt")])
    cell(page, "parley-doc-failed", "empty.txt").wait_for()
    assert "empty file" in page.locator("#parley-doc-failed").inner_text()

    # After a reload the documents, their progress and the failure are still shown.
    page.reload()
    page.get_by_role("tab", name="Documents").click()
    cell(page, "parley-doc-list", "cats.md").wait_for()
    cell(page, "parley-doc-list", "earth.pdf").wait_for()
    page.locator("#parley-doc-progress").get_by_text("saved", exact=True).first.wait_for()
    cell(page, "parley-doc-failed", "empty.txt").wait_for()

    # Remove one: click its row (it joins the selection), then Remove.
    cell(page, "parley-doc-list", "cats.md").click()
    page.wait_for_function("document.querySelector('#parley-doc-picked').innerText.includes('cats.md')")
    page.locator("#parley-doc-remove").click()
    page.wait_for_function("!document.querySelector('#parley-doc-list').innerText.includes('cats.md')")
    cell(page, "parley-doc-list", "earth.pdf").wait_for()
    page.screenshot(path=str(tmp_path / "documents-removed.png"), full_page=True)

    # A folder: its documents are indexed, files of other types are left out.
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "tea.md").write_text("# Tea\n\nGreen tea is steamed, black tea is oxidised.\n")
    (folder / "sub" / "coffee.txt").write_text("Coffee beans are roasted seeds.")
    (folder / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    page.locator("#parley-doc-folder input[type=file]").set_input_files(str(folder))
    cell(page, "parley-doc-list", "tea.md").wait_for()
    cell(page, "parley-doc-list", "coffee.txt").wait_for()
    assert "logo.png" not in page.locator("#parley-doc-list").inner_text()

    # The library agrees. On a laptop (loopback, no logins) the new collection is shared, so the
    # terminal (`parley chat`, owner "local") searches it too.
    lib = runtime.documents
    assert (runtime.settings.home / "indexes" / "default" / "CURRENT").is_file()
    assert [d.source for d in lib.documents("local", "default")] == ["coffee.txt", "earth.pdf", "tea.md"]
    assert all(h["source"] != "cats.md" for h in lib.search("local", ["default"], "cats sleep", k=5))
