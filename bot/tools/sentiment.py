"""Sentiment: negative / neutral / positive with scores, overall and per sentence.

Backends:
* ``VaderBackend`` (default): the VADER lexicon; label from the compound score (>= 0.05
  positive, <= -0.05 negative, else neutral, the thresholds VADER's authors recommend).
* ``ClassifierBackend``: a folder from ``parley finetune classify`` or any Hugging Face
  text-classification model (id or folder), through ``pipeline("text-classification")``. Labels
  are mapped to negative/neutral/positive by name (``negative``, ``NEG``, ``LABEL_0``...); a binary
  model reports neutral as 0.
"""

from __future__ import annotations

import re
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence

from bot.errors import ConfigError, ModelLoadError
from bot.tools.text import split_sentences

LABELS = ("negative", "neutral", "positive")


@dataclass
class Sentiment:
    """One verdict. ``scores`` sum to about 1; ``compound`` in [-1, 1] is positive minus negative."""

    label: str
    scores: dict[str, float]
    compound: float
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SentimentReport:
    """The whole text's sentiment plus one per sentence."""

    overall: Sentiment
    sentences: list[Sentiment] = field(default_factory=list)
    backend: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.overall.label, "scores": self.overall.scores, "compound": self.overall.compound,
                "backend": self.backend, "sentences": [s.to_dict() for s in self.sentences]}


class SentimentBackend(Protocol):
    name: str

    def score(self, texts: Sequence[str]) -> list[Sentiment]: ...


class VaderBackend:
    """VADER lexicon + rules; fast (about 0.1 ms per sentence) and needs no model."""

    name = "vader"

    def __init__(self, threshold: float = 0.05):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.threshold = threshold
        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, texts: Sequence[str]) -> list[Sentiment]:
        out = []
        for text in texts:
            s = self._analyzer.polarity_scores(text)
            c = s["compound"]
            label = "positive" if c >= self.threshold else "negative" if c <= -self.threshold else "neutral"
            out.append(Sentiment(label, {"negative": s["neg"], "neutral": s["neu"], "positive": s["pos"]},
                                 round(c, 4), text))
        return out


def map_label(raw: str, id2label: dict[int, str] | None = None, n_labels: int = 0) -> str:
    """A classifier's label name -> negative / neutral / positive (ConfigError if it cannot tell)."""
    name = raw.strip().lower()
    if name.startswith("label_") and id2label is None:
        index = int(name.split("_", 1)[1])
        order = ("negative", "positive") if n_labels == 2 else LABELS
        if index < len(order):
            return order[index]
    for key, target in (("neg", "negative"), ("pos", "positive"), ("neu", "neutral"),
                        ("bad", "negative"), ("good", "positive"), ("1 star", "negative"), ("2 stars", "negative"),
                        ("3 stars", "neutral"), ("4 stars", "positive"), ("5 stars", "positive")):
        if name.startswith(key):
            return target
    if name in ("0", "1", "2"):
        order = ("negative", "positive") if n_labels == 2 else LABELS
        return order[int(name)]
    raise ConfigError(f"sentiment classifier label {raw!r} is not negative/neutral/positive: give the model "
                      f"an id2label with those names")


class ClassifierBackend:
    """A text-classification model (folder or Hugging Face id), loaded on first use."""

    def __init__(self, model: str, *, device: str = "cpu", batch_size: int = 32, max_length: int = 256):
        self.model = model
        self.name = f"classifier:{model}"
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self._pipe = None
        self._lock = threading.Lock()

    def _pipeline(self):
        with self._lock:
            if self._pipe is None:
                try:
                    from transformers import pipeline

                    self._pipe = pipeline("text-classification", model=self.model, top_k=None, device=self.device)
                except Exception as exc:
                    raise ModelLoadError(f"could not load the sentiment classifier {self.model!r}: {exc}. "
                                         f"Give a folder from `parley finetune classify` or a cached "
                                         f"Hugging Face text-classification model") from exc
                config = self._pipe.model.config
                n = int(getattr(config, "num_labels", 0) or len(config.id2label))
                self._map = {lab: map_label(lab, None, n) for lab in config.id2label.values()}
            return self._pipe

    def score(self, texts: Sequence[str]) -> list[Sentiment]:
        pipe = self._pipeline()
        results = pipe(list(texts), batch_size=self.batch_size, truncation=True, max_length=self.max_length)
        out = []
        for text, row in zip(texts, results):
            scores = {"negative": 0.0, "neutral": 0.0, "positive": 0.0}
            for item in row:
                scores[self._map[item["label"]]] += float(item["score"])
            label = max(scores, key=scores.get)
            out.append(Sentiment(label, {k: round(v, 4) for k, v in scores.items()},
                                 round(scores["positive"] - scores["negative"], 4), text))
        return out


def make_backend(spec: str | None) -> SentimentBackend:
    """``None``/``"vader"`` -> VADER; anything else is a classifier folder or model id."""
    if spec is None or spec.strip().lower() == "vader":
        return VaderBackend()
    return ClassifierBackend(spec)


class SentimentAnalyzer:
    """Whole-text and per-sentence sentiment with one backend."""

    def __init__(self, backend: SentimentBackend | None = None, *, max_sentences: int = 50):
        self.backend = backend or VaderBackend()
        self.max_sentences = max_sentences

    def analyze(self, text: str) -> SentimentReport:
        text = text.strip()
        sentences = [s for line in re.split(r"\n+", text) for s in split_sentences(line)][: self.max_sentences]
        texts = [text] + (sentences if len(sentences) > 1 else [])
        scored = self.backend.score(texts)
        return SentimentReport(overall=scored[0], sentences=scored[1:], backend=self.backend.name)

    def label_many(self, texts: Sequence[str]) -> list[Sentiment]:
        return self.backend.score(texts)


def format_report(report: SentimentReport) -> str:
    """A short human answer: the verdict with scores, then one line per sentence when several."""
    o = report.overall
    s = o.scores
    lines = [f"**{o.label.capitalize()}** (negative {s['negative']:.2f}, neutral {s['neutral']:.2f}, "
             f"positive {s['positive']:.2f}; {report.backend})"]
    if report.sentences:
        for sent in report.sentences:
            preview = sent.text if len(sent.text) <= 80 else sent.text[:77] + "..."
            lines.append(f"- {sent.label} ({sent.compound:+.2f}): {preview}")
    return "\n".join(lines)


def conversation_mood(messages: Sequence[dict[str, Any]], analyzer: SentimentAnalyzer | None = None) -> list[dict[str, Any]]:
    """The sentiment of each user message over a conversation, oldest first (for a mood chart).

    Returns ``[{"index": i, "label", "compound", "scores", "preview"}]`` where ``index`` is the
    message's position in ``messages``.
    """
    analyzer = analyzer or _default_analyzer()
    picked = [(i, m.get("content") or "") for i, m in enumerate(messages)
              if m.get("role") == "user" and isinstance(m.get("content"), str) and m.get("content").strip()]
    if not picked:
        return []
    scored = analyzer.label_many([text for _, text in picked])
    return [{"index": i, "label": s.label, "compound": s.compound, "scores": s.scores,
             "preview": text[:60]} for (i, text), s in zip(picked, scored)]


_DEFAULT: SentimentAnalyzer | None = None


def _default_analyzer() -> SentimentAnalyzer:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = SentimentAnalyzer(VaderBackend())
    return _DEFAULT
