"""Sentiment: VADER, a classifier folder (tiny random model), per-sentence breakdown, conversation mood."""

from __future__ import annotations

import pytest

from bot.errors import ConfigError
from bot.tools.sentiment import (ClassifierBackend, SentimentAnalyzer, VaderBackend, conversation_mood,
                                 format_report, make_backend, map_label)


@pytest.fixture(scope="module")
def vader():
    return SentimentAnalyzer(VaderBackend())


def test_vader_on_clear_reviews(vader):
    assert vader.analyze("I absolutely loved it, the staff were wonderful!").overall.label == "positive"
    assert vader.analyze("Terrible. Cold food and a rude waiter, never again.").overall.label == "negative"
    assert vader.analyze("The meeting is at 3 pm in room 4.").overall.label == "neutral"


def test_per_sentence_breakdown(vader):
    report = vader.analyze("I loved the start. The middle was awful.\nThe ending was fine.")
    assert [s.label for s in report.sentences] == ["positive", "negative", "positive"]
    data = report.to_dict()
    assert set(data) == {"label", "scores", "compound", "backend", "sentences"}
    assert abs(sum(data["scores"].values()) - 1) < 0.01
    text = format_report(report)
    assert text.splitlines()[0].startswith("**") and len(text.splitlines()) == 4


def test_single_sentence_has_no_breakdown(vader):
    assert vader.analyze("Great!").sentences == []


def test_conversation_mood_rates_each_user_message():
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "This is great, thanks!"},
                {"role": "assistant", "content": "Glad to help"}, {"role": "user", "content": "Now it is broken, I hate it."}]
    mood = conversation_mood(messages)
    assert [(m["index"], m["label"]) for m in mood] == [(1, "positive"), (3, "negative")]
    assert conversation_mood([]) == []


@pytest.mark.parametrize("raw, n, expected", [
    ("negative", 3, "negative"), ("POSITIVE", 2, "positive"), ("Neutral", 3, "neutral"), ("LABEL_0", 2, "negative"),
    ("LABEL_1", 2, "positive"), ("LABEL_1", 3, "neutral"), ("5 stars", 5, "positive"), ("neg", 2, "negative"),
])
def test_label_mapping(raw, n, expected):
    assert map_label(raw, None, n) == expected


def test_unknown_label_explains_itself():
    with pytest.raises(ConfigError, match="'sports'"):
        map_label("sports", None, 3)


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory):
    """A random 1-layer BERT classifier with negative/neutral/positive labels, like `finetune classify` saves."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from tests.tiny import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, pad_token_id=0, num_labels=3,
                        id2label={0: "negative", 1: "neutral", 2: "positive"},
                        label2id={"negative": 0, "neutral": 1, "positive": 2})
    path = tmp_path_factory.mktemp("tiny-classifier")
    BertForSequenceClassification(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_classifier_folder_backend(tiny_classifier_dir):
    backend = make_backend(str(tiny_classifier_dir))
    assert isinstance(backend, ClassifierBackend)
    report = SentimentAnalyzer(backend).analyze("Nice place. Bad coffee.")
    assert report.backend == f"classifier:{tiny_classifier_dir}"
    assert report.overall.label in ("negative", "neutral", "positive")
    assert abs(sum(report.overall.scores.values()) - 1) < 1e-3
    assert len(report.sentences) == 2


def test_missing_classifier_fails_with_an_actionable_error():
    from bot.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="finetune classify"):
        make_backend("/nonexistent/classifier").score(["hi"])
