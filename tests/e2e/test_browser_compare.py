"""The Compare tab in headless Chromium: a blind A/B of base against an adapter, a vote stored."""

from __future__ import annotations

import pytest

from bot.api import create_app
from bot.preferences import Preferences
from tests.browser import launch
from tests.helpers import build_test_runtime, running_server
from tests.tiny import make_tiny_adapter



@pytest.fixture(scope="module")
def app_url(tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("compare-home")
    adapter = make_tiny_adapter(tiny_model_dir, home / "adapters" / "tuned", seed=5)
    runtime = build_test_runtime(tiny_model_dir, home, adapters={"tuned": str(adapter)}, max_new_tokens_cap=24)
    with running_server(create_app(runtime)) as url:
        yield url, runtime
    runtime.engine.close()


def test_blind_compare_and_vote(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    url, runtime = app_url
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_context().new_page()
        page.set_default_timeout(60_000)
        page.goto(url + "/")
        page.get_by_role("tab", name="Compare").click()
        page.locator("#parley-compare-prompt textarea").fill("Say something nice.")
        page.locator("#parley-compare-go").click()
        page.get_by_text("Now vote").wait_for()
        # Blind: no model name in the pane titles before the vote.
        assert "tuned" not in page.locator("#parley-compare-result").inner_text()
        a_text = page.locator("#parley-compare-a").inner_text()
        b_text = page.locator("#parley-compare-b").inner_text()
        assert a_text != b_text  # the adapter really answers differently (the tiny model may stop at once)
        page.locator("#parley-vote-b").click()
        page.get_by_text("Saved:").wait_for()
        reveal = page.locator("#parley-compare-result").inner_text()
        page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
        browser.close()
    assert "tuned" in reveal and "base" in reveal
    (stored,) = Preferences(runtime.store).votes()
    assert stored["verdict"] == "b" and stored["blind"] and {stored["model_a"], stored["model_b"]} == {"base", "tuned"}
    assert stored["owner"].startswith("browser:") and stored["prompt"][-1]["content"] == "Say something nice."
    # The vote is a pair for DPO: the chosen side is B's answer.
    (pair,) = list(runtime.store.preference_pairs())
    assert pair["chosen"] == stored["answer_b"] and pair["rejected"] == stored["answer_a"]
