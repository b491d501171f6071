"""The browser chat in headless Chromium: send, stream, Stop, history across reloads, safe rendering."""

from __future__ import annotations

import time

import pytest

from bot.api import create_app
from tests.browser import CHROMIUM, FLAGS, launch, send  # noqa: F401  (re-exported for other tests)
from tests.helpers import build_test_runtime, running_server



@pytest.fixture(scope="module")
def app_url(tiny_model_dir, tmp_path_factory):
    runtime = build_test_runtime(tiny_model_dir, tmp_path_factory.mktemp("ui-home"))
    # 20 ms per forward pass: replies take a few seconds, so Stop has something to stop.
    runtime.engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    with running_server(create_app(runtime)) as url:
        yield url, runtime
    runtime.engine.close()


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def wait_for_turns(runtime, n, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        convs = runtime.store.list_conversations(50, source="web")
        for c in convs:
            turns = runtime.store.turns(c["id"])
            if len(turns) >= n and all(t.finish_reason != "running" for t in turns):
                return c["id"], turns
        time.sleep(0.2)
    raise AssertionError(f"no conversation reached {n} stored turns")


def test_send_stop_and_history_survives_reload(app_url, page, tmp_path):
    url, runtime = app_url
    page.goto(url + "/")
    send(page, "hello from the browser")
    page.locator(".message.user").first.wait_for()
    page.locator(".message.bot").first.wait_for()
    page.locator("#parley-stop").click()
    conversation_id, turns = wait_for_turns(runtime, 1)
    assert turns[0].messages[0]["content"] == "hello from the browser"
    # 256 tokens at 20 ms a step take about 5 s; Stop came right after the first text.
    assert turns[0].finish_reason == "cancelled"
    assert turns[0].usage["completion_tokens"] < 256
    page.reload()
    page.get_by_text("hello from the browser").first.wait_for()  # restored from the server-side store
    page.screenshot(path=str(tmp_path / "chat.png"))


def test_model_output_cannot_run_script_or_load_outside_images(app_url, page):
    url, runtime = app_url
    store = runtime.store
    # Conversations are the browser's own: learn this browser's owner from a first message.
    page.goto(url + "/")
    send(page, "who am I")
    owner, deadline = None, time.time() + 60
    while owner is None and time.time() < deadline:
        owner = next((c["owner"] for c in store.list_conversations(50, source="web")
                      if any(t.messages[0]["content"] == "who am I" for t in store.turns(c["id"]))), None)
        time.sleep(0.2)
    assert owner and owner.startswith("browser:")
    cid = store.create_conversation(title="xss probe", source="web", owner=owner)
    store.add_turn(cid, messages=[{"role": "user", "content": "show me"}], model="m",
                   reply='<img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script> '
                         '[click](javascript:window.__pwned=3) ![leak](http://127.0.0.1:9/leak.png?d=secret)')
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.reload()
    page.get_by_text("xss probe").first.click()
    page.get_by_text("show me").first.wait_for()
    time.sleep(1.0)
    assert page.evaluate("window.__pwned") is None
    for link in page.locator("a").all():
        assert not (link.get_attribute("href") or "").startswith("javascript:")
    assert not any("leak.png" in u for u in requests)
