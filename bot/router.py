"""Which tool, if any: slash commands, then automatic intent routing for plain messages.

* ``parse_command``: ``/search QUERY``, ``/translate [from X] [to Y] TEXT``, ``/sentiment TEXT``,
  ``/help``. Wrong use gives a one-line usage hint instead of a call.
* ``IntentRouter``: for models without native tool calling (SmolLM2). The message is embedded
  with MiniLM (the same embedder the document index uses, loaded once per process) and compared
  with labelled examples (``tests/data/routing.jsonl``, split "train"); the score of a tool is the
  mean cosine similarity of its ``knn`` nearest examples. A few rules add evidence (a language
  name after "in/to/into", the word "translate", "sentiment", "my documents"). The best tool wins
  only when its score clears ``threshold`` and beats "none" by ``margin``, so small talk stays
  small talk (threshold and margin were chosen by leave-one-out on the train split only). Arguments (target language, the text to translate or rate, the search query) are
  taken from the message by rules.

Routing a message costs one MiniLM encode of a short text (a few ms on 2 CPU cores) plus a
matrix product over the examples.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from bot.errors import ConfigError
from bot.tool_names import TOOL_NAMES as TOOLS
CLASSES = TOOLS + ("none",)

USAGE = {
    "search": "/search QUERY - search your documents, e.g. /search quarterly revenue",
    "translate": "/translate [to LANGUAGE] TEXT - e.g. /translate to French good morning",
    "sentiment": "/sentiment TEXT - how positive or negative a text is, e.g. /sentiment I loved it",
    "help": "/help - list the commands",
}


@dataclass
class Command:
    """A parsed slash command. ``error`` (a usage hint) is set when it was used wrongly."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Route:
    """The router's decision for one message. ``tool`` is None for "no tool"."""

    tool: str | None
    arguments: dict[str, Any] = field(default_factory=dict)
    confidence: float = 0.0
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    query_vector: Any = None
    """The message's embedding (reused by search to skip a second encode)."""


# -- languages mentioned in text -------------------------------------------------------------------
_LANG_NAMES: dict[str, str] | None = None


def language_names() -> dict[str, str]:
    """Lower-case language names and native names -> ISO 639-1 code (lingua's list + common aliases)."""
    global _LANG_NAMES
    if _LANG_NAMES is None:
        from lingua import Language

        from bot.tools.translate import NATIVE_NAMES

        names = {lang.name.lower(): lang.iso_code_639_1.name.lower() for lang in Language.all()}
        names.pop("bokmal", None)
        names.update(NATIVE_NAMES)
        _LANG_NAMES = names
    return _LANG_NAMES


def _lang_pattern() -> str:
    names = sorted(language_names(), key=len, reverse=True)
    return "(" + "|".join(re.escape(n) for n in names) + ")"


_TARGET_RE: re.Pattern | None = None
_TARGET_ALT_RE: re.Pattern | None = None
_SOURCE_RE: re.Pattern | None = None


def find_target_language(text: str) -> tuple[str | None, tuple[int, int] | None]:
    """The language named after in/into/to ("in German", "into French"), and where it is."""
    global _TARGET_RE, _TARGET_ALT_RE
    if _TARGET_RE is None:
        _TARGET_RE = re.compile(r"\b(?:in|into|to|en|auf|al|na|em)\s+" + _lang_pattern() + r"(?![\w])", re.IGNORECASE)
        _TARGET_ALT_RE = re.compile(r"\b" + _lang_pattern() + r"\s+(?:for|word|words|translation|speaker|version|"
                                    r"equivalent)\b", re.IGNORECASE)
    m = _TARGET_RE.search(text) or _TARGET_ALT_RE.search(text)
    if not m:
        return None, None
    return language_names()[m.group(1).lower()], m.span()


def find_source_language(text: str) -> tuple[str | None, tuple[int, int] | None]:
    global _SOURCE_RE
    if _SOURCE_RE is None:
        _SOURCE_RE = re.compile(r"\bfrom\s+" + _lang_pattern() + r"(?![\w])", re.IGNORECASE)
    m = _SOURCE_RE.search(text)
    return (language_names()[m.group(1).lower()], m.span()) if m else (None, None)


# -- slash commands ---------------------------------------------------------------------------------
_COMMAND = re.compile(r"^\s*/([A-Za-z][\w-]*)(?=\s|$)(.*)$", re.DOTALL)


def parse_command(text: str) -> Command | None:
    """A slash command at the start of ``text``, or None for a plain message."""
    m = _COMMAND.match(text or "")
    if not m:
        return None
    name = m.group(1).lower()
    rest = m.group(2).strip()
    if name in ("help", "tools", "commands", "?"):
        return Command("help")
    if name == "search":
        if not rest:
            return Command("search", error="Usage: " + USAGE["search"])
        return Command("search", {"query": rest})
    if name == "sentiment":
        if not rest:
            return Command("sentiment", error="Usage: " + USAGE["sentiment"])
        return Command("sentiment", {"text": rest})
    if name == "translate":
        args: dict[str, Any] = {}
        # Optional "from X" and "to X" at the start, in either order; the rest is the text.
        for _ in range(2):
            m2 = re.match(r"(from|to|into|in)\s+", rest, re.IGNORECASE)
            if not m2:
                break
            after = rest[m2.end():]
            found = None
            for n in (2, 1):  # "simplified chinese", then "chinese"
                mm = re.match(r"\S+" + r"\s+\S+" * (n - 1), after)
                if mm:
                    candidate = mm.group(0).rstrip(":,").lower()
                    if candidate in language_names() or _is_code(candidate):
                        found = (candidate, mm.end())
                        break
            if found is None:
                if m2.group(1).lower() == "in":
                    break  # "in" may just start the text
                word = (after.split() or [""])[0].rstrip(":,")
                return Command("translate", error=f"Unknown language {word!r}. Usage: " + USAGE["translate"])
            key = "source" if m2.group(1).lower() == "from" else "target"
            args[key] = found[0]
            rest = after[found[1]:].lstrip(" :,\n")
        if not rest.strip() or rest.strip().lower() in ("to", "from", "into"):
            return Command("translate", error="Nothing to translate. Usage: " + USAGE["translate"])
        args["text"] = rest
        return Command("translate", args)
    known = ", ".join(f"/{n}" for n in (*TOOLS, "help"))
    return Command(name, error=f"Unknown command /{name}: try {known}")


def _is_code(value: str) -> bool:
    try:
        from bot.tools.translate import resolve_language

        resolve_language(value)
        return True
    except ConfigError:
        return False


def help_text(allowed: Iterable[str]) -> str:
    allowed = set(allowed)
    lines = ["Commands:"] + [f"- {USAGE[t]}" for t in TOOLS if t in allowed] + [f"- {USAGE['help']}"]
    if not allowed:
        lines.insert(1, "(tools are turned off in this conversation)")
    return "\n".join(lines)


# -- argument extraction for plain messages ---------------------------------------------------------
_QUOTED = re.compile(r"[\"“«„']([^\"”»“']{2,})[\"”»“']")
_PRONOUN_ONLY = re.compile(r"^(?:this|that|it|these|those|the (?:text|message|sentence|phrase|review|"
                           r"above|last (?:one|message)|previous (?:one|message)))?$", re.IGNORECASE)


def _payload(text: str) -> str | None:
    """Text after a colon/newline or inside quotes: where people put the thing to act on."""
    for sep in (":\n", ":", "\n"):
        if sep in text:
            after = text.split(sep, 1)[1].strip()
            if after:
                return after
    m = _QUOTED.search(text)
    if m:
        return m.group(1).strip()
    return None


def translate_arguments(text: str, previous: str | None = None) -> dict[str, Any] | None:
    """{"text", "target"[, "source"]} from a plain message, or None when no target language is named."""
    target, span = find_target_language(text)
    if target is None:
        return None
    source, sspan = find_source_language(text)
    payload = _payload(text)
    if payload is None:
        body = text[: span[0]] + " " + text[span[1]:]
        if sspan:
            body = body.replace(text[sspan[0]:sspan[1]], " ")
        body = re.sub(r"(?i)^\s*(?:please\s+|can you\s+|could you\s+|would you\s+|pls\s+)*"
                      r"(?:translate|say|write|put|render|convert|how (?:do|would|can|should) (?:you|i|we) "
                      r"(?:say|write|translate)|what(?:'s| is| are) (?:the word for\s+)?|what does)\s*", "", body)
        body = re.sub(r"(?i)\b(?:please|for me|mean)\b", " ", body)
        body = re.sub(r"\s+", " ", body).strip(" ?!.,:;")
        payload = body
    if _PRONOUN_ONLY.match(payload or ""):
        payload = previous
    if not payload:
        return None
    args = {"text": payload, "target": target}
    if source:
        args["source"] = source
    return args


def sentiment_arguments(text: str, previous: str | None = None) -> dict[str, Any] | None:
    payload = _payload(text)
    if payload is None and "?" in text.rstrip("? "):
        payload = text.split("?", 1)[1].strip()  # "is this review positive? The food was cold."
    if payload is None:
        body = re.sub(r"(?i)^\s*(?:please\s+)?(?:what(?:'s| is) the (?:sentiment|tone|mood) of|analy[sz]e the "
                      r"(?:sentiment|tone) of|rate the sentiment of|is|does|how)\b", "", text)
        body = body.strip(" ?!.:")
        words = body.split()
        payload = body if len(words) >= 6 else None  # a short question is about something else
    if payload is None or _PRONOUN_ONLY.match(payload):
        payload = previous
    return {"text": payload} if payload else None


def search_arguments(text: str) -> dict[str, Any]:
    query = re.sub(r"(?i)^\s*(?:please\s+)?(?:search|look up|find|check)\s+(?:in\s+)?(?:my|the|our)\s+"
                   r"(?:documents|docs|files|notes|papers?|reports?)\s+(?:for|about)\s+", "", text).strip()
    return {"query": query or text.strip()}


# -- the intent router ------------------------------------------------------------------------------
_RULES = {
    "translate": [(re.compile(r"(?i)\btranslat\w*|\bhow (?:do|would|can) (?:you|i|we) say\b|\bin (?:the )?other "
                              r"language"), 0.15)],
    "sentiment": [(re.compile(r"(?i)\bsentiment|\bpositive or negative\b|\bnegative or positive\b|\b(?:tone|mood) "
                              r"of\b|\bhow (?:positive|negative)\b"), 0.15)],
    "search": [(re.compile(r"(?i)\b(?:my|our|the|these|uploaded|attached) (?:documents?|docs|files?|notes|pdfs?|"
                           r"reports?|papers?|contracts?|manuals?|handbook|slides|minutes|policy|spec)\b|"
                           r"\baccording to\b|\bin the (?:doc|document|report|paper|file|notes)\b"), 0.10)],
}


def load_examples(path: str | Path, split: str | None = "train") -> list[dict[str, Any]]:
    """Rows of a routing set (JSON lines: text, tool, split[, arguments]); ``split=None`` for all."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        if row.get("tool") not in CLASSES or not isinstance(row.get("text"), str):
            raise ConfigError(f"{path}:{i}: needs 'text' and 'tool' in {CLASSES}")
        if split is None or row.get("split", "train") == split:
            rows.append(row)
    return rows


def default_examples() -> list[dict[str, Any]]:
    """The labelled examples shipped with the package: the "train" split of tests/data/routing.jsonl."""
    from bot.tools.routing_examples import EXAMPLES

    return [{"text": text, "tool": tool} for tool, text in EXAMPLES]


class IntentRouter:
    """Nearest labelled examples + rules -> a tool and its arguments, or none."""

    def __init__(self, examples: Sequence[dict[str, Any]], embedder=None, *, knn: int = 3,
                 threshold: float = 0.25, margin: float = 0.06):
        if not examples:
            raise ConfigError("the intent router needs labelled examples")
        self.examples = list(examples)
        self._embedder = embedder
        self.knn = knn
        self.threshold = threshold
        self.margin = margin
        self._matrix: np.ndarray | None = None  # (n_examples, dim), rows L2-normalized
        self._labels = np.array([CLASSES.index(r["tool"]) for r in self.examples])
        self._lock = threading.Lock()

    @property
    def embedder(self):
        if self._embedder is None:
            from retrieval import get_embedder

            self._embedder = get_embedder()
        return self._embedder

    def _examples_matrix(self) -> np.ndarray:
        with self._lock:
            if self._matrix is None:
                self._matrix = np.asarray(self.embedder.encode([r["text"] for r in self.examples]), dtype=np.float32)
        return self._matrix

    def warm(self) -> None:
        """Load the embedder and embed the examples now rather than on the first message."""
        self._examples_matrix()
        self.embedder.encode_query("hello")

    def scores(self, text: str) -> tuple[dict[str, float], np.ndarray]:
        """Per-class score (mean similarity of the ``knn`` nearest examples + rule bonus) and the vector."""
        matrix = self._examples_matrix()
        vec = np.asarray(self.embedder.encode_query(text), dtype=np.float32).reshape(-1)
        sims = matrix @ vec  # (n_examples,)
        out: dict[str, float] = {}
        for ci, name in enumerate(CLASSES):
            cls = np.sort(sims[self._labels == ci])[::-1][: self.knn]
            score = float(cls.mean()) if cls.size else 0.0
            for pattern, bonus in _RULES.get(name, []):
                if pattern.search(text):
                    score += bonus
            out[name] = score
        return out, vec

    def route(self, text: str, *, allowed: Iterable[str] = TOOLS, search_available: bool = True,
              previous: str | None = None) -> Route:
        """Pick a tool for ``text`` among ``allowed``; ``previous`` is the message "this" may refer to."""
        allowed = set(allowed)
        if not search_available:
            allowed.discard("search")
        if not text.strip() or not allowed:
            return Route(None, reason="no tools allowed" if not allowed else "empty message")
        scores, vec = self.scores(text)
        # Translation needs a target language; without one the message is not a translate request.
        target, _ = find_target_language(text)
        if target is not None and "translate" in allowed:
            scores["translate"] += 0.05
        best = max(CLASSES, key=lambda c: scores[c])
        candidates = [c for c in TOOLS if c in allowed]
        pick = max(candidates, key=lambda c: scores[c]) if candidates else None
        rounded = {k: round(v, 4) for k, v in scores.items()}
        if pick is None or best == "none" and scores[pick] < scores["none"] + self.margin:
            return Route(None, confidence=scores["none"], reason="small talk / general", scores=rounded, query_vector=vec)
        if scores[pick] < self.threshold or scores[pick] < scores["none"] + self.margin:
            return Route(None, confidence=scores[pick], reason=f"{pick} below threshold", scores=rounded,
                         query_vector=vec)
        if pick == "translate":
            args = translate_arguments(text, previous)
        elif pick == "sentiment":
            args = sentiment_arguments(text, previous)
        else:
            args = search_arguments(text)
        if args is None:
            return Route(None, confidence=scores[pick], reason=f"{pick}: could not find its arguments",
                         scores=rounded, query_vector=vec)
        return Route(pick, args, confidence=scores[pick], reason="intent", scores=rounded, query_vector=vec)
