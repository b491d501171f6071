"""The classifier recipe on a tiny random BERT: labels, validation, metrics, output loading, resume."""

from __future__ import annotations

import json
import random

import pytest

from finetune import classify, runs
from finetune.classify import ClassifyConfig, train_classifier
from finetune.errors import DataError, FinetuneError
from tests.unit.finetune_fixtures import one_torch_thread  # noqa: F401

POSITIVE = "good great lovely fine superb happy".split()
NEGATIVE = "bad awful poor sad terrible ugly".split()
FILLER = "the movie was and a plot it film".split()


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A 2-layer BERT with MiniLM's tokenizer (the real vocabulary, random weights)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(classify.encoder_path("minilm"))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def _sentiment_tsv(path, n, seed=0, numeric=True):
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        positive = rng.random() < 0.5
        words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE if positive else NEGATIVE)]
        rng.shuffle(words)
        label = int(positive) if numeric else ("positive" if positive else "negative")
        lines.append(f"{' '.join(words)}\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(encoder, data, output, **kw):
    settings = dict(data=[str(data)], output=str(output), model=str(encoder), text_column="sentence",
                    label_column="label", labels=["negative", "positive"], batch_size=16, epochs=3,
                    learning_rate=3e-3, eval_every=0, save_every=0, progress=False, device="cpu",
                    eval_fraction=0.2, warmup_ratio=0.0, freeze_embeddings=False)  # random embeddings must learn
    settings.update(kw)
    return ClassifyConfig(**settings)


def test_learns_and_loads_with_a_pipeline(tiny_encoder, tmp_path, parley_home):
    from transformers import AutoModelForSequenceClassification, pipeline

    data = _sentiment_tsv(tmp_path / "s.tsv", 400)
    result = train_classifier(_cfg(tiny_encoder, data, "sent"), parley_home)
    out = parley_home / "classifiers" / "sent"  # a bare name lands in PARLEY_HOME/classifiers
    assert result["output"] == str(out)
    assert result["accuracy"] > 0.9 and result["macro_f1"] > 0.9
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    clf = pipeline("text-classification", model=str(out), device="cpu")
    assert clf("the film was superb")[0]["label"] == "positive"
    assert clf("the plot was awful")[0]["label"] == "negative"
    facts = json.loads((out / "parley_classifier.json").read_text())
    assert facts["labels"] == ["negative", "positive"] and facts["metrics"]["accuracy"] == result["accuracy"]
    assert len(facts["confusion"]) == 2 and facts["data"][0]["sha256"]
    card = (out / "README.md").read_text()
    assert "accuracy" in card and "macro_f1" in card and str(data.resolve()) in card and "pipeline(" in card
    assert (out / "loss_curve.png").is_file() and (out / "metrics.jsonl").is_file()


def test_label_names_ids_and_unknown_labels(tiny_encoder, tmp_path, parley_home):
    data = tmp_path / "d.tsv"
    data.write_text("sentence\tlabel\ngood one\tpositive\nbad one\tnegative\nmeh\tmaybe\n  \tpositive\nfine\t1\n"
                    "poor\t0\n" + "".join(f"x {i}\tpositive\ny {i}\tnegative\n" for i in range(20)))
    report = classify.D.DataReport()
    cfg = _cfg(tiny_encoder, data, tmp_path / "o")
    rows, _ = classify.read_labelled(cfg.data, cfg, report, cfg.labels)
    items, names = classify.to_label_ids(rows, cfg, report, cfg.labels)
    reasons = {r.source: r.reason for r in report.rejects}
    assert reasons == {"d.tsv:4": "label 'maybe' is not one of ['negative', 'positive']", "d.tsv:5": "empty text"}
    by_text = {it.text: it.label for it in items}
    assert by_text["good one"] == 1 and by_text["bad one"] == 0 and by_text["fine"] == 1 and by_text["poor"] == 0
    with pytest.raises(DataError, match=r"2 of 46 rows .*rejected"):
        report.check(0.01)


def test_score_thresholds_make_three_classes(tiny_encoder, tmp_path):
    cfg = _cfg(tiny_encoder, tmp_path / "x.tsv", tmp_path / "o", labels=["negative", "neutral", "positive"],
               score_thresholds=[-0.5, 0.5])
    report = classify.D.DataReport()
    rows = [("a", "t", "-2"), ("b", "t", "-0.5"), ("c", "t", "0"), ("d", "t", "0.5"), ("e", "t", "3.1"), ("f", "t", "x")]
    items, names = classify.to_label_ids(rows, cfg, report, cfg.labels)
    assert [it.label for it in items] == [0, 0, 1, 1, 2]
    assert report.rejects[0].source == "f"


def test_missing_column_names_the_columns(tiny_encoder, tmp_path, parley_home):
    data = _sentiment_tsv(tmp_path / "s.tsv", 10)
    with pytest.raises(DataError, match=r"no column 'text'.*\['label', 'sentence'\].*--text-column"):
        train_classifier(_cfg(tiny_encoder, data, tmp_path / "o", text_column="text"), parley_home)


def test_config_problems_reported_together():
    with pytest.raises(FinetuneError) as info:
        ClassifyConfig(data=["x"], batch_size=0, class_weights="heavy", score_thresholds=[1.0, 0.0])
    for needle in ("batch_size=0", "class_weights='heavy'", "must be increasing"):
        assert needle in str(info.value)


def test_resume_matches_a_straight_run(tiny_encoder, tmp_path, parley_home):
    data = _sentiment_tsv(tmp_path / "s.tsv", 200)
    straight = tmp_path / "straight"
    train_classifier(_cfg(tiny_encoder, data, straight, max_steps=12, save_every=3), parley_home)
    resumed = tmp_path / "resumed"
    first = train_classifier(_cfg(tiny_encoder, data, resumed, max_steps=12, save_every=3, stop_after_steps=6),
                             parley_home)
    assert first["stopped_early"] and [s for s, _ in runs.list_checkpoints(resumed)] == [6]
    train_classifier(_cfg(tiny_encoder, data, resumed, max_steps=12, save_every=3, resume=True), parley_home)

    def loss_by_step(folder):
        return {r["step"]: r["loss"] for r in (json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    a, b = loss_by_step(straight), loss_by_step(resumed)
    assert sorted(b) == list(range(1, 13))
    assert [a[s] for s in range(1, 13)] == pytest.approx([b[s] for s in range(1, 13)], rel=1e-5)
