"""Translation: detect the source language, translate with a seq2seq model or the chat model.

Backends, tried in this order for a language pair:
1. a seq2seq model configured for the pair (``{"en-fr": "Helsinki-NLP/opus-mt-en-fr"}``),
2. a multilingual seq2seq model configured as ``"*"`` (NLLB-200, M2M100, or a multi-target
   Marian model with ``>>xx<<`` tokens),
3. the chat model itself with a translation prompt (always available, quality depends on it).

Models are Hugging Face ids (from the local cache; Parley does not download at run time) or
local folders, and load on first use. Layout survives: the text is split into lines (blank lines
and line breaks kept exactly), long lines into sentence groups of at most ``max_chunk_chars``.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from bot.errors import ConfigError, ModelLoadError
from bot.tools.registry import ToolError
from bot.tools.text import chunk_sentences, split_layout, split_sentences

log = logging.getLogger(__name__)

# Languages the detector considers. A closed set keeps detection fast and accurate (lingua
# loads one model per language, about 15 MB each); targets may be any language lingua knows.
DETECT_CODES = ("en", "fr", "de", "es", "pt", "it", "nl", "ru", "zh", "ja", "ko", "ar", "tr", "pl", "sv",
                "uk", "hi", "el", "cs", "da", "fi", "ro", "hu", "vi", "id", "he", "fa")
# Names people use for a language in its own tongue (lingua knows the English names).
NATIVE_NAMES = {
    "français": "fr", "francais": "fr", "deutsch": "de", "español": "es", "espanol": "es", "castellano": "es",
    "português": "pt", "portugues": "pt", "italiano": "it", "nederlands": "nl", "dutch": "nl", "flemish": "nl",
    "русский": "ru", "中文": "zh", "mandarin": "zh", "日本語": "ja", "한국어": "ko", "العربية": "ar",
    "türkçe": "tr", "polski": "pl", "svenska": "sv", "українська": "uk", "हिन्दी": "hi", "ελληνικά": "el",
    "čeština": "cs", "dansk": "da", "suomi": "fi", "română": "ro", "magyar": "hu", "tiếng việt": "vi",
    "farsi": "fa", "inglés": "en", "ingles": "en", "anglais": "en", "englisch": "en", "francés": "fr",
    "alemán": "de", "allemand": "de", "espagnol": "es", "spanisch": "es", "französisch": "fr", "norwegian": "nb", "brazilian": "pt", "chinese": "zh", "simplified chinese": "zh",
}
# FLORES-200 codes for NLLB.
FLORES = {"en": "eng_Latn", "fr": "fra_Latn", "de": "deu_Latn", "es": "spa_Latn", "pt": "por_Latn",
          "it": "ita_Latn", "nl": "nld_Latn", "ru": "rus_Cyrl", "zh": "zho_Hans", "ja": "jpn_Jpan",
          "ko": "kor_Hang", "ar": "arb_Arab", "tr": "tur_Latn", "pl": "pol_Latn", "sv": "swe_Latn",
          "uk": "ukr_Cyrl", "hi": "hin_Deva", "el": "ell_Grek", "cs": "ces_Latn", "da": "dan_Latn",
          "fi": "fin_Latn", "ro": "ron_Latn", "hu": "hun_Latn", "vi": "vie_Latn", "id": "ind_Latn",
          "he": "heb_Hebr", "fa": "pes_Arab", "nb": "nob_Latn", "ca": "cat_Latn"}


@dataclass(frozen=True)
class Lang:
    """A language: English name ("French") and ISO 639-1 code ("fr")."""

    name: str
    code: str


def _lingua_languages() -> dict[str, Any]:
    from lingua import Language

    return {lang.iso_code_639_1.name.lower(): lang for lang in Language.all()}


def resolve_language(value: str) -> Lang:
    """A language name or code (``"French"``, ``"fr"``, ``"fra"``, ``"français"``) -> Lang.

    Raises ConfigError naming the value and a few valid examples.
    """
    from lingua import IsoCode639_3, Language

    raw = (value or "").strip()
    key = raw.lower().strip(" .!?:;,\"'")
    key = NATIVE_NAMES.get(key, key)
    by_code = _lingua_languages()
    lang = by_code.get(key)
    if lang is None:
        by_name = {lg.name.lower(): lg for lg in Language.all()}
        lang = by_name.get(key)
    if lang is None and len(key) == 3:
        try:
            lang = Language.from_iso_code_639_3(IsoCode639_3.from_str(key))
        except (ValueError, AttributeError):
            lang = None
    if lang is None:
        raise ConfigError(f"unknown language {raw!r}: give a name or code such as French, fr, German, de, "
                          f"Spanish, es")
    code = lang.iso_code_639_1.name.lower()
    name = "Norwegian" if lang.name == "BOKMAL" else lang.name.capitalize()
    return Lang(name=name, code=code)


class LanguageDetector:
    """lingua over ``DETECT_CODES``; built and loaded on first use (about 0.5 GB, a few seconds)."""

    def __init__(self, codes: Sequence[str] = DETECT_CODES):
        self.codes = tuple(codes)
        self._detector = None
        self._lock = threading.Lock()

    def detect(self, text: str) -> tuple[Lang | None, float]:
        """The most likely language of ``text`` and its confidence in [0, 1] (None if unsure)."""
        with self._lock:
            if self._detector is None:
                from lingua import LanguageDetectorBuilder

                by_code = _lingua_languages()
                self._detector = LanguageDetectorBuilder.from_languages(
                    *[by_code[c] for c in self.codes if c in by_code]).build()
        values = self._detector.compute_language_confidence_values(text[:2000])
        if not values or values[0].value <= 0:
            return None, 0.0
        best = values[0]
        # Very short texts ("hello") fit several languages about equally; ties go to English, the
        # language most people type to an English-prompted assistant in.
        if best.value < 0.6 and len(text.split()) <= 3:
            english = next((v for v in values[:3] if v.language.iso_code_639_1.name == "EN"), None)
            if english is not None and english.value >= 0.4 * best.value:
                best = english
        return resolve_language(best.language.iso_code_639_1.name.lower()), float(best.value)


# -- backends ---------------------------------------------------------------------------------------
class TranslationBackend(Protocol):
    name: str

    def supports(self, source: Lang, target: Lang) -> bool: ...

    def translate(self, pieces: list[str], source: Lang, target: Lang, cancel: threading.Event | None) -> list[str]: ...


class Seq2SeqBackend:
    """A Hugging Face encoder-decoder translation model: Marian (opus-mt), NLLB or M2M100.

    ``pair`` ("en-fr") fixes a single-pair model's languages; leave it None for a multilingual one.
    """

    def __init__(self, model: str, *, pair: str | None = None, device: str = "cpu", max_new_tokens: int = 256,
                 num_beams: int = 1, batch_size: int = 8):
        self.model_spec = str(model)
        self.pair = pair
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.batch_size = batch_size
        self.name = f"seq2seq:{self.model_spec}"
        self._model = None
        self._tokenizer = None
        self.kind = ""
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                import os

                from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

                offline = os.environ.get("HF_HUB_OFFLINE", "1") != "0"
                try:
                    tokenizer = AutoTokenizer.from_pretrained(self.model_spec, local_files_only=offline)
                    model = AutoModelForSeq2SeqLM.from_pretrained(self.model_spec, local_files_only=offline)
                except Exception as exc:
                    raise ModelLoadError(
                        f"could not load translation model {self.model_spec!r}: {exc}. Give a local folder or a "
                        f"Hugging Face id that is already in the cache (Parley does not download at run time)"
                    ) from exc
                model_type = getattr(model.config, "model_type", "")
                vocab = tokenizer.get_vocab()
                if "fra_Latn" in vocab:
                    self.kind = "nllb"
                elif model_type == "m2m_100":
                    self.kind = "m2m100"
                elif any(t.startswith(">>") and t.endswith("<<") for t in vocab):
                    self.kind = "marian-multi"
                else:
                    self.kind = "pair"
                self._tokenizer = tokenizer
                self._model = model.to(self.device).eval()
        return self._model, self._tokenizer

    def supports(self, source: Lang, target: Lang) -> bool:
        if self.pair is not None:
            src, _, tgt = self.pair.partition("-")
            return (src in ("*", source.code)) and tgt == target.code
        self._load()
        vocab = self._tokenizer.get_vocab()
        if self.kind == "nllb":
            return FLORES.get(source.code) in vocab and FLORES.get(target.code) in vocab
        if self.kind == "m2m100":
            codes = getattr(self._tokenizer, "lang_code_to_id", {}) or {}
            return source.code in codes and target.code in codes
        if self.kind == "marian-multi":
            return f">>{target.code}<<" in vocab
        return False  # a single-pair model needs its pair configured

    def translate(self, pieces: list[str], source: Lang, target: Lang, cancel: threading.Event | None) -> list[str]:
        import torch

        model, tok = self._load()
        gen_kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        inputs = list(pieces)
        if self.kind == "nllb":
            tok.src_lang = FLORES[source.code]
            gen_kwargs["forced_bos_token_id"] = tok.convert_tokens_to_ids(FLORES[target.code])
        elif self.kind == "m2m100":
            tok.src_lang = source.code
            gen_kwargs["forced_bos_token_id"] = tok.get_lang_id(target.code)
        elif self.kind == "marian-multi":
            inputs = [f">>{target.code}<< {p}" for p in pieces]
        out: list[str] = []
        for i in range(0, len(inputs), self.batch_size):
            if cancel is not None and cancel.is_set():
                raise ToolError("translation was cancelled")
            batch = tok(inputs[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=512).to(self.device)
            with torch.inference_mode():
                generated = model.generate(**batch, **gen_kwargs)
            out.extend(t.strip() for t in tok.batch_decode(generated, skip_special_tokens=True))
        return out


class ChatModelBackend:
    """The chat model with a translation prompt: always available, quality is the chat model's."""

    PROMPT = ("Translate the following text from {source} to {target}. Reply with the {target} translation "
              "only, without notes.\n\n{text}")

    def __init__(self, engine, *, max_new_tokens: int = 512, parallel: int = 4):
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.parallel = parallel
        self.name = f"chat model ({getattr(engine, 'model_name', 'chat')})"

    def supports(self, source: Lang, target: Lang) -> bool:
        return True

    def translate(self, pieces: list[str], source: Lang, target: Lang, cancel: threading.Event | None,
                  deadline: float | None = None) -> list[str]:
        """Pieces go to the engine concurrently (up to ``parallel``), so its batching decodes them together."""
        from concurrent.futures import ThreadPoolExecutor

        if len(pieces) <= 1:
            return [self._one(p, source, target, cancel, deadline) for p in pieces]
        with ThreadPoolExecutor(max_workers=min(self.parallel, len(pieces)), thread_name_prefix="parley-mt") as pool:
            return list(pool.map(lambda p: self._one(p, source, target, cancel, deadline), pieces))

    def _one(self, piece: str, source: Lang, target: Lang, cancel: threading.Event | None,
             deadline: float | None) -> str:
        from bot.engine import GenerationParams

        if cancel is not None and cancel.is_set():
            raise ToolError("translation was cancelled")
        n_tokens = len(self.engine.tokenizer(piece)["input_ids"])
        params = GenerationParams(max_new_tokens=min(self.max_new_tokens, 2 * n_tokens + 24), temperature=0.0,
                                  repetition_penalty=1.1)
        messages = [{"role": "system", "content": "You are a careful translator."},
                    {"role": "user", "content": self.PROMPT.format(source=source.name, target=target.name,
                                                                   text=piece)}]
        text, done = _generate_linked(self.engine, messages, params, cancel, deadline)
        if done.finish_reason == "cancelled":
            raise ToolError("translation was stopped (cancelled or out of time)")
        if done.finish_reason == "error":
            raise ToolError(f"the chat model could not translate: {done.error}")
        return clean_chat_translation(text, piece)


def _generate_linked(engine, messages, params, parent: threading.Event | None, deadline: float | None):
    """engine.generate with its own cancel flag, set when ``parent`` is set or ``deadline`` passes.

    The engine sets the cancel flag it is given when its stream ends, so the turn's own flag must
    never be handed to it from inside a tool.
    """
    import time

    from bot.events import Done, TextDelta

    own = threading.Event()
    parts: list[str] = []
    done = Done(finish_reason="error", error="the stream ended without a final event")
    stream = engine.stream(messages, params, cancel=own)
    try:
        for event in stream:
            if (parent is not None and parent.is_set()) or (deadline is not None and time.perf_counter() > deadline):
                own.set()
                return "".join(parts), Done(finish_reason="cancelled")
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Done):
                done = event
                break
    finally:
        stream.close()
    return "".join(parts), done


def clean_chat_translation(text: str, original: str) -> str:
    """Trim what chat models add around a translation: a label, quotes, trailing notes."""
    text = text.strip()
    text = re.sub(r"^(?:here is|here's|sure[,!.]?)[^\n:]*:\s*", "", text, flags=re.IGNORECASE)
    text = re.sub(r"^(?:translation|traduction|traducción|übersetzung|tradução)\s*(?:\([^)]*\))?\s*:\s*", "", text,
                  flags=re.IGNORECASE)
    if "\n" not in original.strip():  # a one-line input gets a one-line output; the rest is chatter
        text = text.split("\n\n", 1)[0].strip()
        text = text.split("\n", 1)[0].strip() if text.count("\n") and len(text) > 3 * len(original) else text
    if len(text) >= 2 and text[0] in "\"“«'" and text[-1] in "\"”»'" and original[:1] not in "\"“«'":
        text = text[1:-1].strip()
    return text


# -- the translator ---------------------------------------------------------------------------------
@dataclass
class Translation:
    text: str
    source: Lang
    target: Lang
    backend: str
    detected: bool
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return {"translation": self.text, "source_language": self.source.name, "source_code": self.source.code,
                "target_language": self.target.name, "target_code": self.target.code, "backend": self.backend,
                "detected": self.detected, "confidence": round(self.confidence, 3)}


def build_seq2seq_backends(models: dict[str, str] | None, *, device: str = "cpu") -> dict[str, Seq2SeqBackend]:
    """``{"en-fr": "Helsinki-NLP/opus-mt-en-fr", "*": "facebook/nllb-200-distilled-600M"}`` -> backends.

    Keys are ``SRC-TGT`` ISO codes or names (``*`` as SRC accepts any source), or ``*`` for one
    multilingual model. Raises ConfigError listing every bad key.
    """
    backends: dict[str, Seq2SeqBackend] = {}
    problems = []
    for key, spec in (models or {}).items():
        key = key.strip()
        if key in ("*", "any", "multilingual"):
            backends["*"] = Seq2SeqBackend(spec, device=device)
            continue
        src, sep, tgt = key.partition("-")
        if not sep:
            problems.append(f"{key!r}: write a pair as SRC-TGT (e.g. en-fr) or '*' for a multilingual model")
            continue
        try:
            s = "*" if src.strip() == "*" else resolve_language(src).code
            t = resolve_language(tgt).code
        except ConfigError as exc:
            problems.append(f"{key!r}: {exc}")
            continue
        backends[f"{s}-{t}"] = Seq2SeqBackend(spec, pair=f"{s}-{t}", device=device)
    if problems:
        raise ConfigError("invalid translation_models:\n  - " + "\n  - ".join(problems))
    return backends


class Translator:
    """Detect, pick a backend, split by layout and sentences, translate, reassemble."""

    def __init__(self, seq2seq: dict[str, Seq2SeqBackend] | None = None, chat: ChatModelBackend | None = None, *,
                 detector: LanguageDetector | None = None, max_chunk_chars: int = 400, max_chars: int = 20000):
        self.seq2seq = dict(seq2seq or {})
        self.chat = chat
        self.detector = detector or LanguageDetector()
        self.max_chunk_chars = max_chunk_chars
        self.max_chars = max_chars

    def backend_for(self, source: Lang, target: Lang) -> TranslationBackend:
        for key in (f"{source.code}-{target.code}", f"*-{target.code}"):
            if key in self.seq2seq:
                return self.seq2seq[key]
        multi = self.seq2seq.get("*")
        if multi is not None:
            try:
                if multi.supports(source, target):
                    return multi
            except ModelLoadError:
                log.warning("multilingual translation model failed to load; falling back", exc_info=True)
        if self.chat is not None:
            return self.chat
        raise ToolError(f"no translation model handles {source.name} -> {target.name}: configure one for "
                        f"{source.code}-{target.code} or a multilingual model")

    def translate(self, text: str, target: str, source: str | None = None,
                  cancel: threading.Event | None = None, deadline: float | None = None) -> Translation:
        if not text or not text.strip():
            raise ToolError("there is no text to translate")
        if len(text) > self.max_chars:
            raise ToolError(f"the text is {len(text)} characters; translate at most {self.max_chars} at a time")
        try:
            tgt = resolve_language(target)
            src = resolve_language(source) if source else None
        except ConfigError as exc:
            raise ToolError(str(exc)) from None
        detected, confidence = False, 1.0
        if src is None:
            src, confidence = self.detector.detect(text)
            detected = True
            if src is None:
                raise ToolError("could not tell which language the text is in; say it: /translate from X to Y ...")
        if src.code == tgt.code:
            return Translation(text, src, tgt, "none (already in the target language)", detected, confidence)
        backend = self.backend_for(src, tgt)
        # Layout: translate line bodies only, keep separators verbatim.
        layout = split_layout(text)
        slots: list[tuple[int, int]] = []  # (line index, number of pieces)
        pieces: list[str] = []
        for i, (line, _sep) in enumerate(layout):
            if not line:
                slots.append((i, 0))
                continue
            chunked = chunk_sentences(split_sentences(line), self.max_chunk_chars)
            slots.append((i, len(chunked)))
            pieces.extend(chunked)
        if isinstance(backend, ChatModelBackend):
            translated = backend.translate(pieces, src, tgt, cancel, deadline) if pieces else []
        else:
            translated = backend.translate(pieces, src, tgt, cancel) if pieces else []
        # A translated line must not bring its own line breaks: the layout is the original's.
        translated = [re.sub(r"\s*\n\s*", " ", t).strip() for t in translated]
        out: list[str] = []
        pos = 0
        for (i, n), (_line, sep) in zip(slots, layout):
            out.append(" ".join(translated[pos:pos + n]) + sep)
            pos += n
        return Translation("".join(out), src, tgt, backend.name, detected, confidence)
