"""The Fine-tune tab in headless Chromium on the tiny model: upload and preview (the trained tokens
highlighted), start a run and watch the loss plot update, close the page and find the run again,
Stop and save, chat with the adapter, Resume, and the history."""

from __future__ import annotations

import json
import re
import time

import pytest

from bot.api import create_app
from tests.browser import launch, send
from tests.helpers import build_test_runtime, running_server
from tests.unit.finetune_fixtures import write_chat_jsonl


@pytest.fixture(scope="module")
def app_url(tiny_model_dir, tmp_path_factory):
    runtime = build_test_runtime(tiny_model_dir, tmp_path_factory.mktemp("ft-home"), max_new_tokens_cap=8)
    with running_server(create_app(runtime)) as url:
        yield url, runtime
    for job in runtime.jobs.jobs.values():  # never leave a training process behind
        if job.status == "running":
            runtime.jobs.cancel(job.name)
            runtime.jobs.wait(job.name, 60)
    runtime.engine.close()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = write_chat_jsonl(tmp_path_factory.mktemp("ft-data") / "sums.jsonl", 40)
    with open(path, "a") as fh:  # one row with nothing to train on: reported with its line
        fh.write(json.dumps({"messages": [{"role": "user", "content": "a question only"}]}) + "\n")
    return path


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        yield browser
        browser.close()


def open_tab(browser, url):
    page = browser.new_context().new_page()
    page.set_default_timeout(60_000)
    page.goto(url + "/")
    page.get_by_role("tab", name="Fine-tune").click()
    # The cockpit's first refresh needs this browser's id: the tab is ready once it has answered.
    page.locator("#parley-ft-run-status").filter(has_text=re.compile(r"No run yet: bring|\(sft\)")).wait_for()
    return page


def step_of(page) -> int:
    match = re.search(r"step (\d+) of", page.locator("#parley-ft-run-status").inner_text())
    return int(match.group(1)) if match else 0


def wait_until(predicate, timeout=180, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_upload_shows_the_format_the_trained_tokens_the_lengths_and_the_rejects(app_url, data_file, browser):
    url, _ = app_url
    page = open_tab(browser, url)
    page.locator("#parley-ft-upload input[type=file]").set_input_files(str(data_file))
    marks = page.locator("#parley-ft-preview mark.parley-trained")
    marks.first.wait_for()
    summary = page.locator("#parley-ft-data-summary").inner_text()
    assert "messages" in summary and "rows read 41" in summary and "rejected 1" in summary
    # The highlighted text is the assistant's reply and its end-of-turn token, nothing of the prompt.
    first = marks.first.inner_text()
    assert re.fullmatch(r"\d\+\d=\d+<\|im_end\|>", first), first
    assert "add" not in "".join(marks.all_inner_texts())
    assert "<|im_start|>user" in page.locator("#parley-ft-preview").inner_text()
    rejects = page.locator("#parley-ft-rejects textarea").input_value()
    assert re.search(r"sums\.jsonl:41: no assistant turn to train on", rejects), rejects
    page.locator("#parley-ft-lengths").locator("canvas, svg").first.wait_for()


def test_run_watch_reattach_stop_chat_resume(app_url, data_file, browser, tmp_path):
    url, runtime = app_url
    page = open_tab(browser, url)
    page.locator("#parley-ft-upload input[type=file]").set_input_files(str(data_file))
    page.locator("#parley-ft-preview mark.parley-trained").first.wait_for()
    page.locator("#parley-train-name").locator("input, textarea").first.fill("browser-run")
    page.locator("#parley-ft-lora-settings").get_by_text("Advanced: every SFT").click()
    # Thousands of millisecond steps on one thread: time to watch, stop and resume.
    for name, value in (("max_steps", "3000"), ("threads", "1"), ("eval_every", "500"), ("save_every", "1000"),
                        ("batch_size", "2"), ("learning_rate", "0.01")):
        page.locator(f"#parley-ft-lora-{name} input").fill(value)
    page.locator("#parley-ft-start").click()

    wait_until(lambda: step_of(page) >= 3, what="the first steps in the status")
    plot = page.locator("#parley-ft-loss-plot")
    plot.locator("canvas, svg").first.wait_for()
    before = plot.screenshot()
    first_step = step_of(page)
    wait_until(lambda: step_of(page) > first_step + 20, what="more steps")
    time.sleep(2.5)  # one timer tick redraws the plot with the new steps
    assert plot.screenshot() != before, "the loss plot did not change as the run went on"
    assert "ETA" in page.locator("#parley-ft-run-status").inner_text()
    assert "lora:" in page.locator("#parley-ft-log textarea").input_value()

    # Closing the page does not stop the run; a new page finds it and goes on showing it.
    page.context.close()
    page = open_tab(browser, url)
    wait_until(lambda: "browser-run" in page.locator("#parley-ft-run-status").inner_text(), what="reattach")
    reopened = step_of(page)
    wait_until(lambda: step_of(page) > reopened, what="steps after reopening")

    page.locator("#parley-ft-stop").click()
    page.locator("#parley-ft-run-status").filter(has_text="stopped").wait_for(timeout=120_000)
    job = runtime.jobs.get("browser-run")
    assert job.status == "stopped"
    stopped_at = json.loads((runtime.jobs.adapter_dir("browser-run") / "parley_adapter.json").read_text())[
        "metrics"]["stopped_at_step"]
    assert 0 < stopped_at < 3000 and "browser-run" in runtime.engine.adapters

    # "Chat with it": the chat tab opens with the adapter picked, and the next reply uses it.
    page.locator("#parley-ft-chat").click()
    page.locator("#parley-input textarea").wait_for(state="visible")
    page.locator("#parley-settings").get_by_text("Settings").first.click()  # the adapter picker lives there
    wait_until(lambda: page.locator("#parley-adapter input").input_value() == "browser-run", 30, "adapter picked")
    send(page, "what is 2 and 3")
    wait_until(lambda: any(t.adapter == "browser-run" and t.finish_reason != "running"
                           for c in runtime.store.list_conversations(50)
                           for t in runtime.store.turns(c["id"])), 60, "a reply from the adapter")

    # Resume continues the plan from the stop's checkpoint; stop it again.
    page.get_by_role("tab", name="Fine-tune").click()
    page.locator("#parley-ft-resume").click()
    wait_until(lambda: job.status == "running" and step_of(page) > stopped_at, what="steps after resuming")
    page.locator("#parley-ft-stop").click()
    page.locator("#parley-ft-run-status").filter(has_text="stopped").wait_for(timeout=120_000)
    steps = [r["step"] for r in runtime.jobs.metrics("browser-run") if "loss" in r]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > stopped_at

    page.get_by_text("4. History").click()
    page.locator("#parley-ft-overlay").wait_for(state="visible")
    table = page.locator("#parley-ft-history")
    wait_until(lambda: "browser-run" in (table.text_content() or "") and "stopped" in table.text_content(), 30,
               "the run in the history table")
    page.screenshot(path=str(tmp_path / "finetune.png"), full_page=True)
