"""Slash commands, argument extraction and the intent router's decision logic.

Routing *accuracy* with the real MiniLM is measured in tests/integration/test_tools_routing.py;
here the router runs on retrieval's HashEmbedder (a real, deterministic bag-of-words embedder)
so the logic is tested in milliseconds.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from bot.router import (IntentRouter, default_examples, find_target_language, load_examples, parse_command,
                        sentiment_arguments, translate_arguments)

DATA = Path(__file__).resolve().parents[1] / "data" / "routing.jsonl"


@pytest.mark.parametrize("text, name, args", [
    ("/search quarterly revenue", "search", {"query": "quarterly revenue"}),
    ("  /SEARCH  spaced  query ", "search", {"query": "spaced  query"}),
    ("/translate to French hello there", "translate", {"target": "french", "text": "hello there"}),
    ("/translate from german to english: Guten Tag", "translate",
     {"source": "german", "target": "english", "text": "Guten Tag"}),
    ("/translate to fr line one\n\nline two", "translate", {"target": "fr", "text": "line one\n\nline two"}),
    ("/translate hola amigo", "translate", {"text": "hola amigo"}),
    ("/translate in the beginning", "translate", {"text": "in the beginning"}),
    ("/sentiment I loved it", "sentiment", {"text": "I loved it"}),
    ("/help", "help", {}),
])
def test_slash_commands_parse(text, name, args):
    command = parse_command(text)
    assert command is not None and command.error is None
    assert command.name == name
    assert command.arguments == args


@pytest.mark.parametrize("text, hint", [
    ("/search", "Usage: /search QUERY"),
    ("/sentiment   ", "Usage: /sentiment TEXT"),
    ("/translate", "Nothing to translate"),
    ("/translate to French", "Nothing to translate"),
    ("/translate to Klingon hello", "Unknown language 'Klingon'"),
    ("/frobnicate now", "Unknown command /frobnicate"),
])
def test_wrong_use_gets_a_one_line_usage_hint(text, hint):
    command = parse_command(text)
    assert command.error is not None and hint in command.error
    assert "\n" not in command.error


@pytest.mark.parametrize("text", ["hello", "/etc/hosts is a file", "a /search in the middle", "http://x/search"])
def test_plain_messages_are_not_commands(text):
    assert parse_command(text) is None


@pytest.mark.parametrize("text, expected", [
    ("How would you say this in German: where is the train station?",
     {"text": "where is the train station?", "target": "de"}),
    ("Translate 'good morning' into Spanish", {"text": "good morning", "target": "es"}),
    ("how do you say I love you in Portuguese", {"text": "I love you", "target": "pt"}),
    ("Translate from Spanish to English: ¿Dónde está?", {"text": "¿Dónde está?", "target": "en", "source": "es"}),
    ("What is the French for 'apple pie'?", {"text": "apple pie", "target": "fr"}),
])
def test_translate_arguments(text, expected):
    assert translate_arguments(text) == expected


def test_translate_this_refers_to_the_previous_message():
    assert translate_arguments("translate that into French", previous="The shop opens at nine.") == {
        "text": "The shop opens at nine.", "target": "fr"}
    assert translate_arguments("I visited France last year") is None  # no target language


def test_sentiment_arguments():
    assert sentiment_arguments("Is this review positive? The food was cold.") == {"text": "The food was cold."}
    assert sentiment_arguments("What's the sentiment of this tweet: best day ever!!!") == {"text": "best day ever!!!"}
    assert sentiment_arguments("how did that sound?", previous="You are late again.") == {"text": "You are late again."}


def test_language_names_need_a_preposition():
    assert find_target_language("I speak German at home")[0] is None
    assert find_target_language("say it in german please")[0] == "de"


def test_labelled_set_is_large_varied_and_split():
    rows = load_examples(DATA, split=None)
    assert len(rows) >= 200
    assert len({r["text"] for r in rows}) == len(rows)
    counts = collections.Counter((r["tool"], r["split"]) for r in rows)
    for tool in ("search", "translate", "sentiment", "none"):
        assert counts[(tool, "train")] >= 30 and counts[(tool, "test")] >= 15


def test_shipped_examples_are_exactly_the_train_split():
    train = load_examples(DATA, "train")
    assert [(r["tool"], r["text"]) for r in train] == [(r["tool"], r["text"]) for r in default_examples()]
    test_texts = {r["text"] for r in load_examples(DATA, "test")}
    assert not test_texts & {r["text"] for r in default_examples()}  # the held-out part stays out


@pytest.fixture(scope="module")
def hash_router():
    from retrieval import HashEmbedder

    return IntentRouter(default_examples(), embedder=HashEmbedder(512))


def test_router_respects_allowed_tools_and_search_availability(hash_router):
    text = "What does the employee handbook say about remote work?"
    assert hash_router.route(text).tool == "search"
    assert hash_router.route(text, search_available=False).tool is None
    assert hash_router.route(text, allowed=["translate"]).tool is None
    assert hash_router.route("Translate 'good night' into French", allowed=[]).tool is None


def test_router_returns_arguments_and_scores(hash_router):
    route = hash_router.route("Translate 'good night' into French")
    assert route.tool == "translate"
    assert route.arguments == {"text": "good night", "target": "fr"}
    assert set(route.scores) == {"search", "translate", "sentiment", "none"}
    assert route.query_vector is not None


def test_small_talk_stays_small_talk(hash_router):
    for text in ("Hi there!", "Tell me a joke", "Thanks, that was helpful"):
        assert hash_router.route(text).tool is None, text
