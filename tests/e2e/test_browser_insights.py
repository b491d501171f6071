"""The Training vs inference tab in headless Chromium: an adapter trained by a real job and served by
real chat requests shows its training row next to its inference row, and the time-scale plot."""

from __future__ import annotations

import re

import gradio as gr
import httpx
import pytest

from bot.api import create_app
from tests.browser import launch
from tests.helpers import build_test_runtime, running_server
from tests.unit.finetune_fixtures import write_chat_jsonl


def insights_app(runtime):
    """The API plus a page with the tab (composed here the way ui/app.py composes it)."""
    from ui.insights import build_insights_tab
    from ui.session import ensure_browser_id, make_session

    app = create_app(runtime, with_ui=False)
    with gr.Blocks(title="insights") as demo:
        session = make_session(runtime.access)
        with gr.Tabs(elem_id="parley-tabs"):
            with gr.Tab("Chat"):
                gr.Markdown("the chat lives here in the real app")
            with gr.Tab("Training vs inference", elem_id="parley-tab-insights"):
                build_insights_tab(runtime, session)
        demo.load(ensure_browser_id, session.browser_id, session.browser_id, api_name=False)
    return gr.mount_gradio_app(app, demo, path="/ui")


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("insights-home")
    runtime = build_test_runtime(tiny_model_dir, home, max_new_tokens_cap=16)
    data = write_chat_jsonl(home / "sums.jsonl", 24)
    job = runtime.jobs.start("measured", kind="sft", data=str(data),
                             settings={"max_steps": 6, "batch_size": 2, "grad_accum": 1, "rank": 4, "alpha": 8,
                                       "threads": 1, "max_length": 256, "save_every": 0, "eval_every": 0})
    runtime.jobs.wait("measured", 300)
    assert job.status == "succeeded", job.tail(30)
    with running_server(insights_app(runtime)) as url:
        for model, n in (("measured", 3), ("base", 2)):
            for i in range(n):
                r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                    "model": model, "messages": [{"role": "user", "content": f"add {i} and 2"}], "max_tokens": 8,
                    "temperature": 0})
                assert r.status_code == 200, r.text
        yield url, runtime
    runtime.engine.close()


def test_the_table_shows_training_next_to_inference(served, tmp_path):
    from playwright.sync_api import sync_playwright

    url, runtime = served
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page()
        page.set_default_timeout(60_000)
        page.goto(url + "/ui/")
        page.get_by_role("tab", name="Training vs inference").click()
        table = page.locator("#parley-insights-table")
        table.wait_for(state="visible")
        rows = table.locator("[role=row]").filter(has=page.locator("[role=gridcell]"))
        rows.filter(has_text="measured").first.wait_for()

        def row_cells(row):
            return [c.strip() for c in row.locator("[role=gridcell], td").all_inner_texts()]

        headers = [h.replace("⋮", "").strip() for h in table.locator("thead [role=columnheader], thead th")
                   .all_inner_texts()]
        cells_of = {row_cells(r)[0]: row_cells(r) for r in rows.all()}
        values = dict(zip(headers, cells_of["measured"]))
        assert values["Adapter"] == "measured" and values["Recipe"] == "lora"
        assert values["Rows"] == "23" and values["Trained on"] == "cpu"  # 24 rows, 1 held out for eval
        assert re.fullmatch(r"[\d.]+ (s|min)", values["Training time"]), values
        assert float(values["Final eval loss"]) > 0
        assert values["Requests"] == "3" and re.fullmatch(r"\d+ ms|[\d.]+ s", values["First token p50"]), values
        assert values["Serving on"].startswith("transformers")
        base = dict(zip(headers, cells_of["base"]))
        assert base["Requests"] == "2" and base["Training time"] == ""
        assert "waits for a first token" in page.locator("#parley-insights-summary").inner_text()
        page.locator("#parley-insights-plot img, #parley-insights-plot canvas, #parley-insights-plot svg").first.wait_for()
        page.screenshot(path=str(tmp_path / "insights.png"), full_page=True)
        browser.close()
