"""The `index` verb: the argparse contract with the main CLI, and each sub-command."""

from __future__ import annotations

import argparse
import json

import pytest

from retrieval import ConfigError, IndexNotFoundError, RetrievalError
from retrieval.cli import add_parser, main

pytestmark = pytest.mark.unit


def run(home, *argv):
    parser = argparse.ArgumentParser(prog="parley")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    args.home = home
    return args.func(args)


def test_add_search_list_remove_info(tmp_path, capsys):
    home = tmp_path / "home"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "owls.md").write_text("# Owls\n\nOwls hunt at night and swallow their prey whole.")
    (docs / "bees.txt").write_text("Bees dance to share where the flowers are.")
    (docs / "skip.bin.txt").write_bytes(b"\x00\x01")
    assert run(home, "index", "add", str(docs), "--embedder", "hash", "--no-progress") == 1  # one skipped
    out = capsys.readouterr().out
    assert "added" in out and "skipped" in out and "binary" in out
    assert (home / "indexes" / "default" / "CURRENT").exists()

    assert run(home, "index", "search", "owls hunt at night", "-k", "1", "--json") == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["title"] == "Owls" and hits[0]["source"].endswith("owls.md")

    assert run(home, "index", "search", "bees dance", "--mode", "lexical") == 0
    assert "bees.txt" in capsys.readouterr().out

    assert run(home, "index", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(d["title"] for d in listed) == ["Owls", "bees"]

    owl = [d for d in listed if d["title"] == "Owls"][0]["doc_id"]
    assert run(home, "index", "remove", owl) == 0
    capsys.readouterr()
    assert run(home, "index", "info", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["documents"] == 1 and info["embedder"] == "hash-256"


def test_named_indexes_and_errors(tmp_path, capsys):
    home = tmp_path / "home"
    (tmp_path / "n.txt").write_text("Narwhals have a long tusk.")
    assert run(home, "index", "add", str(tmp_path / "n.txt"), "--index", "work", "--embedder", "hash-32") == 0
    assert (home / "indexes" / "work" / "CURRENT").exists()
    with pytest.raises(IndexNotFoundError):
        run(home, "index", "search", "x", "--index", "other")
    with pytest.raises(ConfigError, match="not allowed"):
        run(home, "index", "info", "--index", "../escape")
    assert issubclass(IndexNotFoundError, RetrievalError) and issubclass(ConfigError, RetrievalError)


def test_standalone_main_prints_error_and_exits_2(tmp_path, capsys):
    assert main(["--home", str(tmp_path), "index", "info"]) == 2
    assert capsys.readouterr().err.startswith("error: no index at")
