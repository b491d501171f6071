"""Tools benchmark: routing, sentiment, translation, and what a search adds to the first token.

Routing: accuracy per class of the intent router (MiniLM nearest examples + rules) on the held-out
"test" split of tests/data/routing.jsonl (the router is built from the "train" split only), and
the latency of one routing decision (MiniLM encode included), p50/p95 over 3 passes.
Sentiment: each backend (VADER; classifier folders given with --classifier or found under
PARLEY_HOME/classifiers) on /work/shared/data/sentiment: SST-2 dev (binary accuracy; positive when
P(positive) >= P(negative), for VADER compound >= 0), TweetEval validation (3-class accuracy and
macro-recall), the VADER ground-truth half (binary accuracy per file, rows with a human score of
0 skipped).
Translation: chrF (sacrebleu) on a sample of TICO-19 en-fr/es/pt for each backend that runs here
(the chat model always; seq2seq models given with --translation-model PAIR=MODEL), next to the
"copy the English source" baseline on the same sentences. Requests run concurrently so the
engine batches them; --translation-max-s caps the time and the sentences actually done are
reported.
Search: time to the first token with and without ``always_search`` on an index of about 10k
chunks (SciFact abstracts with the default chunking, built once under --index-dir). Chunk vectors are
hashed to keep the build short (see ``_TimingEmbedder``); queries use the real MiniLM, so the
timing is real and the rankings are not.

Prints a table and writes JSON (default bench/results/tools.json). Not a test.

    nice -n 10 python bench/tools.py                                  # everything
    python bench/tools.py --skip-translation --skip-search            # quick look
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PARLEY_DATA", "/work/shared/data"))
csv.field_size_limit(10_000_000)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# -- routing ----------------------------------------------------------------------------------------
def bench_routing() -> dict:
    from bot.router import CLASSES, IntentRouter, load_examples

    path = ROOT / "tests" / "data" / "routing.jsonl"
    train, test = load_examples(path, "train"), load_examples(path, "test")
    router = IntentRouter(train)
    t0 = time.perf_counter()
    router.warm()
    warm_s = time.perf_counter() - t0
    per = {c: [0, 0] for c in CLASSES}
    confusion = collections.Counter()
    args_ok = [0, 0]
    for row in test:
        route = router.route(row["text"])
        got = route.tool or "none"
        per[row["tool"]][0] += got == row["tool"]
        per[row["tool"]][1] += 1
        confusion[(row["tool"], got)] += 1
        if row["tool"] == "translate" and got == "translate":
            args_ok[1] += 1
            args_ok[0] += bool(route.arguments.get("text")) and bool(route.arguments.get("target"))
    latencies = []
    loads = []
    for _ in range(3):
        loads.append(load_avg())
        for row in test:
            t = time.perf_counter()
            router.route(row["text"])
            latencies.append((time.perf_counter() - t) * 1000)
    # The encode alone, to separate model time from the router's own work.
    enc = []
    for row in test:
        t = time.perf_counter()
        router.embedder.encode_query(row["text"])
        enc.append((time.perf_counter() - t) * 1000)
    correct = sum(a for a, _ in per.values())
    return {
        "train_examples": len(train), "test_examples": len(test),
        "accuracy": round(correct / len(test), 4),
        "per_class": {c: {"correct": a, "n": n, "accuracy": round(a / n, 4) if n else None} for c, (a, n) in per.items()},
        "confusion": {f"{t}->{g}": n for (t, g), n in sorted(confusion.items())},
        "translate_arguments_found": args_ok,
        "latency_ms": {"p50": round(pct(latencies, 0.5), 2), "p95": round(pct(latencies, 0.95), 2),
                       "encode_p50": round(pct(enc, 0.5), 2), "n": len(latencies)},
        "warm_s": round(warm_s, 2), "threshold": router.threshold, "margin": router.margin,
        "load_avg_1m": [round(x, 2) for x in loads],
    }


# -- sentiment --------------------------------------------------------------------------------------
def _read_tsv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))


def bench_sentiment(backends: dict) -> dict:
    folder = DATA / "sentiment"
    sst = [(r[0], int(r[1])) for r in _read_tsv(folder / "sst2_dev_from_train.tsv")[1:] if len(r) >= 2]
    tweets = [(r[1], r[0]) for r in _read_tsv(folder / "tweeteval_val.tsv")[1:] if len(r) >= 2]
    gt = {}
    for path in sorted((folder / "vader_ground_truth").glob("*.tsv")):
        rows = [(r[2], float(r[1])) for r in _read_tsv(path)[1:] if len(r) >= 3]
        gt[path.stem] = [(t, s) for t, s in rows if s != 0]
    out = {}
    for name, backend in backends.items():
        t0 = time.perf_counter()
        res = {}
        scored = backend.score([t for t, _ in sst])
        res["sst2_dev_binary_accuracy"] = round(sum((s.compound >= 0) == bool(y) for s, (_, y) in zip(scored, sst)) / len(sst), 4)
        res["sst2_dev_n"] = len(sst)
        scored = backend.score([t for t, _ in tweets])
        labels = [y for _, y in tweets]
        preds = [s.label for s in scored]
        recalls = []
        for c in ("negative", "neutral", "positive"):
            idx = [i for i, y in enumerate(labels) if y == c]
            recalls.append(sum(preds[i] == c for i in idx) / len(idx))
        res["tweeteval_val_accuracy"] = round(sum(p == y for p, y in zip(preds, labels)) / len(labels), 4)
        res["tweeteval_val_macro_recall"] = round(sum(recalls) / 3, 4)
        res["tweeteval_val_n"] = len(labels)
        for stem, rows in gt.items():
            scored = backend.score([t for t, _ in rows])
            res[f"vader_gt_{stem}_binary_accuracy"] = round(
                sum((s.compound >= 0) == (y > 0) for s, (_, y) in zip(scored, rows)) / len(rows), 4)
            res[f"vader_gt_{stem}_n"] = len(rows)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        out[name] = res
    return out


# -- translation ------------------------------------------------------------------------------------
def bench_translation(engine, sample: int, workers: int, max_s: float, seq2seq: dict, seed: int = 0) -> dict:
    import sacrebleu

    from bot.tools.translate import ChatModelBackend, Seq2SeqBackend, resolve_language

    pairs = ("fr", "es", "pt")
    rng = random.Random(seed)
    items = []
    for tgt in pairs:
        rows = [r for r in _read_tsv(DATA / "translation" / f"tico19_en-{tgt}.tsv")[1:] if len(r) >= 3]
        for r in rng.sample(rows, sample // len(pairs)):
            items.append((tgt, r[1], r[2]))
    rng.shuffle(items)  # interleave the pairs so a time cap cuts all of them alike
    en = resolve_language("en")
    backends = {}
    if engine is not None:
        backends["chat model"] = ChatModelBackend(engine, max_new_tokens=160)
    for key, model in seq2seq.items():
        backends[f"seq2seq {model}"] = (key, Seq2SeqBackend(model, pair=key))
    out = {"sample_requested": len(items), "pairs": list(pairs), "backends": {}}
    for name, backend in backends.items():
        pair_key = None
        if isinstance(backend, tuple):
            pair_key, backend = backend
        todo = [it for it in items if pair_key is None or pair_key == f"en-{it[0]}"]
        deadline = time.perf_counter() + max_s
        results: dict[int, str] = {}

        def work(i):
            if time.perf_counter() > deadline:
                return
            tgt, src, _ref = todo[i]
            try:
                results[i] = backend.translate([src], en, resolve_language(tgt), None)[0]
            except Exception as exc:  # a failed sentence counts as an empty output
                results[i] = ""
                print(f"  {name}: sentence {i} failed: {exc}", file=sys.stderr)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, range(len(todo))))
        elapsed = time.perf_counter() - t0
        done = sorted(results)
        row = {"sentences": len(done), "seconds": round(elapsed, 1), "workers": workers}
        for tgt in pairs + ("all",):
            idx = [i for i in done if tgt == "all" or todo[i][0] == tgt]
            if not idx:
                continue
            hyps = [results[i] for i in idx]
            refs = [todo[i][2] for i in idx]
            copy = [todo[i][1] for i in idx]
            row[f"chrf_{tgt}"] = round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2)
            row[f"copy_source_chrf_{tgt}"] = round(sacrebleu.corpus_chrf(copy, [refs]).score, 2)
            row[f"n_{tgt}"] = len(idx)
        if done:
            row["examples"] = [{"en": todo[i][1], "ref": todo[i][2], "out": results[i]} for i in done[:3]]
        out["backends"][name] = row
    return out


# -- search and the first token ---------------------------------------------------------------------
class _TimingEmbedder:
    """MiniLM's name, dimension, tokenizer and query encoder, but cheap hashed chunk vectors.

    Embedding ~10k chunks with MiniLM takes far longer than this shared 2-core machine allows, and
    the *time* a search adds does not depend on what the chunk vectors hold: it is the query
    encode (real MiniLM here), the faiss and BM25 searches over 10k entries (real sizes) and the
    longer prompt (real passages). Rankings from this index are meaningless; timings are not.
    When the index is reopened by name, Parley loads the real MiniLM for queries.
    """

    def __init__(self):
        from retrieval import DEFAULT_EMBEDDER, get_embedder

        self.real = get_embedder()
        self.name = DEFAULT_EMBEDDER

    @property
    def dim(self) -> int:
        return self.real.dim

    @property
    def max_tokens(self) -> int:
        return self.real.max_tokens

    def token_spans(self, text):
        return self.real.token_spans(text)

    def encode(self, texts, show_progress=False):
        import hashlib

        import numpy as np

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out

    def encode_query(self, text):
        return self.real.encode_query(text)


def build_10k_index(index_dir: Path, target_chunks: int = 10_000) -> dict:
    from retrieval import ChunkingConfig, Document, open_index

    index_dir = Path(index_dir)
    if (index_dir / "indexes" / "default").is_dir():
        try:
            index = open_index(index_dir / "indexes" / "default", create=False)
            if len(index) >= target_chunks * 0.8:
                return {"chunks": len(index), "built_s": None, "chunk_vectors": "hashed (timing only)"}
        except Exception:
            pass
    docs = []
    with gzip.open(DATA / "retrieval" / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            text = f"{row['title']}\n\n{row['text']}"
            docs.append(Document(doc_id=f"scifact-{row['_id']}", source=f"scifact/{row['_id']}", title=row["title"],
                                 text=text, content_hash=str(hash(text)), origin=f"scifact/{row['_id']}", kind="text"))
    t0 = time.perf_counter()
    index = open_index(index_dir / "indexes" / "default", embedder=_TimingEmbedder(),
                       chunking=ChunkingConfig())  # the default chunking users get
    index.add_documents(docs, show_progress=False)
    return {"chunks": len(index), "built_s": round(time.perf_counter() - t0, 1), "chunk_vectors": "hashed (timing only)"}


def bench_search_ttft(engine, index_dir: Path, queries: int) -> dict:
    from bot.assistant import Assistant, TurnOptions
    from bot.engine import GenerationParams
    from bot.events import Done, TextDelta, ToolFinished
    from bot.tools.runner import build_tool_runner

    info = build_10k_index(index_dir)
    runner = build_tool_runner(engine, index_dir)
    runner.warm()
    claims = [json.loads(l)["text"] for l in open(DATA / "retrieval" / "scifact" / "queries_train.jsonl")][:queries]
    params = GenerationParams(max_new_tokens=2, temperature=0)
    plain = Assistant(engine, system_prompt="You are Parley, a helpful assistant.")
    tooled = Assistant(engine, system_prompt="You are Parley, a helpful assistant.", tools=runner)

    prompt_tokens = {"plain": [], "search": []}

    def first_token(assistant, text, **opts):
        t = time.perf_counter()
        tool_s = None
        first = None
        for ev in assistant.respond([{"role": "user", "content": f"Is this true? {text}"}],
                                    TurnOptions(params=params, **opts)):
            if isinstance(ev, ToolFinished) and tool_s is None:
                tool_s = time.perf_counter() - t
            if isinstance(ev, TextDelta) and first is None:
                first = time.perf_counter() - t
            if isinstance(ev, Done):
                prompt_tokens["search" if opts else "plain"].append(ev.usage.prompt_tokens)
        return first, tool_s

    first_token(plain, "warm up")
    first_token(tooled, "warm up", always_search=True)
    base, with_search, tool_times = [], [], []
    for claim in claims:
        b, _ = first_token(plain, claim)
        s, tool_s = first_token(tooled, claim, always_search=True)
        if b is not None and s is not None:
            base.append(b)
            with_search.append(s)
            tool_times.append(tool_s or 0.0)
    added = [s - b for s, b in zip(with_search, base)]
    return {**info, "queries": len(base),
            "ttft_no_search_ms_p50": round(statistics.median(base) * 1000, 1),
            "ttft_with_search_ms_p50": round(statistics.median(with_search) * 1000, 1),
            "added_ms_p50": round(statistics.median(added) * 1000, 1),
            "route_and_search_ms_p50": round(statistics.median(tool_times) * 1000, 1),
            "prompt_tokens_p50": {k: statistics.median(v) if v else None for k, v in prompt_tokens.items()},
            "search_k": runner.settings.search_k,
            "load_avg_1m": round(load_avg(), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", default=os.environ.get("PARLEY_HOME", str(Path.home() / ".parley")))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--classifier", action="append", default=[], help="a sentiment classifier folder (repeatable)")
    ap.add_argument("--translation-model", action="append", default=[], help="PAIR=MODEL, e.g. en-fr=/models/opus-mt-en-fr")
    ap.add_argument("--translation-sample", type=int, default=200)
    ap.add_argument("--translation-workers", type=int, default=8)
    ap.add_argument("--translation-max-s", type=float, default=900.0)
    ap.add_argument("--max-generation-s", type=float, default=1800.0)
    ap.add_argument("--index-dir", default="/tmp/parley-bench-tools")
    ap.add_argument("--search-queries", type=int, default=10)
    ap.add_argument("--skip-routing", action="store_true")
    ap.add_argument("--skip-sentiment", action="store_true")
    ap.add_argument("--skip-translation", action="store_true")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tools.json"))
    args = ap.parse_args()
    home = Path(args.home).expanduser()
    results: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                 "load_avg_1m_start": round(load_avg(), 2)},
                     "command": "python " + " ".join(sys.argv)}
    if not args.skip_routing:
        print("routing ...", file=sys.stderr)
        results["routing"] = bench_routing()
    if not args.skip_sentiment:
        print("sentiment ...", file=sys.stderr)
        from bot.tools.sentiment import ClassifierBackend, VaderBackend

        backends = {"vader": VaderBackend()}
        folders = list(args.classifier) + [str(p) for p in sorted((home / "classifiers").glob("*"))
                                           if (p / "config.json").is_file()]
        for folder in dict.fromkeys(folders):
            backends[f"classifier {Path(folder).name}"] = ClassifierBackend(folder)
        results["sentiment"] = bench_sentiment(backends)
    engine = None
    if not (args.skip_translation and args.skip_search):
        from bot.engine import Engine
        from bot.models import load_model

        # A long per-request time cap: on a busy CPU the default (120 s) cuts translations short.
        engine = Engine(load_model(args.model, home, progress=False), max_time_s=args.max_generation_s)
    if not args.skip_translation:
        print("translation ...", file=sys.stderr)
        seq2seq = dict(item.split("=", 1) for item in args.translation_model)
        results["translation"] = bench_translation(engine, args.translation_sample, args.translation_workers,
                                                   args.translation_max_s, seq2seq)
    if not args.skip_search:
        print("search ...", file=sys.stderr)
        results["search"] = bench_search_ttft(engine, Path(args.index_dir), args.search_queries)
    if engine is not None:
        engine.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print_table(results)


def print_table(r: dict) -> None:
    lines = []
    if "routing" in r:
        ro = r["routing"]
        lines.append(f"Routing (held-out {ro['test_examples']} msgs, router built from {ro['train_examples']}): "
                     f"accuracy {ro['accuracy']:.3f}")
        for c, v in ro["per_class"].items():
            lines.append(f"  {c:<10} {v['correct']:>3}/{v['n']:<3} {v['accuracy']:.3f}")
        lat = ro["latency_ms"]
        lines.append(f"  latency p50 {lat['p50']} ms, p95 {lat['p95']} ms (MiniLM encode p50 {lat['encode_p50']} ms; "
                     f"load avg {ro['load_avg_1m']})")
    if "sentiment" in r:
        lines.append("Sentiment            SST-2 dev  TweetEval acc  TweetEval mRec  VADER-GT tweets/amazon/movies/nyt")
        for name, v in r["sentiment"].items():
            gt = "/".join(f"{v.get(f'vader_gt_{k}_binary_accuracy', float('nan')):.3f}" for k in
                          ("tweets", "amazonReviewSnippets", "movieReviewSnippets", "nytEditorialSnippets"))
            lines.append(f"  {name:<18} {v['sst2_dev_binary_accuracy']:.3f}      {v['tweeteval_val_accuracy']:.3f}"
                         f"          {v['tweeteval_val_macro_recall']:.3f}           {gt}")
    if "translation" in r:
        lines.append("Translation chrF (TICO-19 sample)   fr      es      pt      all    | copy-source all")
        for name, v in r["translation"]["backends"].items():
            cells = "  ".join(f"{v.get(f'chrf_{k}', float('nan')):6.2f}" for k in ("fr", "es", "pt", "all"))
            lines.append(f"  {name:<32} {cells} | {v.get('copy_source_chrf_all', float('nan')):.2f}"
                         f"  ({v['sentences']} sentences, {v['seconds']} s)")
    if "search" in r:
        s = r["search"]
        lines.append(f"Search at {s['chunks']} chunks: first token {s['ttft_no_search_ms_p50']} ms -> "
                     f"{s['ttft_with_search_ms_p50']} ms with always_search (+{s['added_ms_p50']} ms; route+search "
                     f"{s['route_and_search_ms_p50']} ms; prompt tokens {s['prompt_tokens_p50']['plain']} -> "
                     f"{s['prompt_tokens_p50']['search']}; {s['queries']} queries; load avg {s['load_avg_1m']})")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
