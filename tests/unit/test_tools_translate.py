"""Translation: language names, layout, the seq2seq path on a tiny random Marian model, the chat path."""

from __future__ import annotations

import threading

import pytest

from bot.errors import ConfigError
from bot.tools.registry import ToolError
from bot.tools.text import chunk_sentences, split_layout, split_sentences
from bot.tools.translate import (ChatModelBackend, LanguageDetector, Seq2SeqBackend, Translator, build_seq2seq_backends,
                                 clean_chat_translation, resolve_language)


@pytest.mark.parametrize("value, code, name", [
    ("French", "fr", "French"), ("fr", "fr", "French"), ("FRA", "fr", "French"), ("français", "fr", "French"),
    ("deutsch", "de", "German"), ("Spanish.", "es", "Spanish"), ("zh", "zh", "Chinese"), ("pt", "pt", "Portuguese"),
])
def test_resolve_language(value, code, name):
    lang = resolve_language(value)
    assert (lang.code, lang.name) == (code, name)


def test_unknown_language_explains_itself():
    with pytest.raises(ConfigError, match="unknown language 'Klingon'.*French, fr"):
        resolve_language("Klingon")


def test_layout_split_rebuilds_the_text_exactly():
    text = "  Title\n\nFirst line. Second sentence!\n   indented\n\n\nlast"
    parts = split_layout(text)
    assert "".join(a + b for a, b in parts) == text
    assert [p for p, _ in parts if p] == ["Title", "First line. Second sentence!", "indented", "last"]


def test_sentences_and_chunks():
    assert split_sentences("Dr. Smith arrived. He said hi! Did you? Yes.") == [
        "Dr. Smith arrived.", "He said hi!", "Did you?", "Yes."]
    pieces = chunk_sentences(["a" * 30, "b" * 30, "c" * 90], max_chars=64)
    assert pieces[0] == "a" * 30 + " " + "b" * 30
    assert all(len(p) <= 64 for p in pieces)


def test_translation_models_config_is_validated():
    backends = build_seq2seq_backends({"en-fr": "some/model", "*": "multi/model", "*-de": "x/y"})
    assert set(backends) == {"en-fr", "*", "*-de"}
    with pytest.raises(ConfigError) as info:
        build_seq2seq_backends({"enfr": "a", "en-xx": "b"})
    assert "'enfr'" in str(info.value) and "'en-xx'" in str(info.value)


@pytest.fixture(scope="module")
def tiny_marian_dir(tmp_path_factory):
    """A random 1-layer MarianMTModel with the tiny byte-level tokenizer, saved as a normal folder."""
    import torch
    from transformers import MarianConfig, MarianMTModel

    from tests.tiny import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = MarianConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=256, pad_token_id=0, eos_token_id=2,
                          decoder_start_token_id=0, forced_eos_token_id=2)
    model = MarianMTModel(config).eval()
    path = tmp_path_factory.mktemp("tiny-marian")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_seq2seq_marian_path_keeps_layout_and_names_its_backend(tiny_marian_dir):
    backend = Seq2SeqBackend(str(tiny_marian_dir), pair="en-fr", max_new_tokens=6)
    translator = Translator({"en-fr": backend}, chat=None)
    text = "The first sentence is here. And a second one.\n\nA new paragraph.\nA line break."
    result = translator.translate(text, "French", "English")
    assert backend.kind == "pair"
    assert result.backend == f"seq2seq:{tiny_marian_dir}"
    assert (result.source.code, result.target.code, result.detected) == ("en", "fr", False)
    lines = result.text.split("\n")
    assert len(lines) == 4 and lines[1] == ""  # paragraphs and line breaks survive
    assert result.to_dict()["target_language"] == "French"


def test_pair_model_is_not_used_for_other_pairs(tiny_marian_dir):
    translator = Translator({"en-fr": Seq2SeqBackend(str(tiny_marian_dir), pair="en-fr")}, chat=None)
    with pytest.raises(ToolError, match="no translation model handles English -> German"):
        translator.translate("Hello there my friend.", "German", "English")


def test_missing_model_fails_with_an_actionable_error():
    from bot.errors import ModelLoadError

    backend = Seq2SeqBackend("/nonexistent/model-folder", pair="en-fr")
    with pytest.raises(ModelLoadError, match="does not download at run time"):
        backend.translate(["hi"], resolve_language("en"), resolve_language("fr"), None)


def test_same_language_is_returned_unchanged():
    # A small detector keeps the test fast; the full set loads about 27 language models.
    result = Translator(chat=None, detector=LanguageDetector(("en", "fr", "de"))).translate("Bonjour tout le monde, comment allez-vous ?", "fr")
    assert result.text == "Bonjour tout le monde, comment allez-vous ?"
    assert result.detected and result.source.code == "fr"


def test_chat_model_backend_on_the_tiny_engine(tiny_model_dir, parley_home):
    from bot.engine import Engine
    from bot.models import load_model

    engine = Engine(load_model(str(tiny_model_dir), parley_home, progress=False))
    try:
        backend = ChatModelBackend(engine, max_new_tokens=8)
        cancel = threading.Event()
        result = Translator(chat=backend).translate("Good morning.\nSee you later.", "German", "en", cancel=cancel)
        assert result.backend == f"chat model ({engine.model_name})"
        assert result.text.count("\n") == 1
        assert not cancel.is_set()  # the engine's own flag is separate from the turn's
        cancel.set()
        with pytest.raises(ToolError, match="stopped|cancelled"):
            Translator(chat=backend).translate("Good morning.", "German", "en", cancel=cancel)
    finally:
        engine.close()


def test_clean_chat_translation():
    assert clean_chat_translation('Translation: "Bonjour."', "Hello.") == "Bonjour."
    assert clean_chat_translation("Sure! Here is the translation: Hallo.\n\nNote: informal.", "Hello.") == "Hallo."
