"""Retrieval benchmark: quality, indexing throughput, query latency, approximate-index recall.

Quality: BEIR SciFact (5,183 abstracts; train queries and qrels), document-level nDCG@10 and
recall@100 for lexical, dense and hybrid search through the public `retrieval` API (chunks are
ranked, then each document takes the rank of its best chunk).
Throughput: building the SciFact index (load -> chunk -> embed -> BM25 -> atomic save), and the
embedding step alone against plain `SentenceTransformer.encode` with default settings on the
same chunk texts.
Latency: per query on the SciFact index and on a synthetic 100k-chunk index (real query
embedding; synthetic chunk texts and vectors), median and p99, with and without embedding.
ANN: HNSW recall@10 against exact search and latency on synthetic 384-d vectors drawn around
real SciFact chunk vectors (noise added), at the sizes given.

Prints a table and writes JSON (default bench/results/retrieval.json). Not a test.

    nice -n 10 python bench/retrieval.py                       # everything (long)
    python bench/retrieval.py --queries 100 --skip-ann --skip-100k   # quick look
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from retrieval import Document, open_index  # noqa: E402
from retrieval.dense import DenseConfig, DenseIndex  # noqa: E402
from retrieval.embedder import SentenceTransformerEmbedder, default_model_dir, get_embedder  # noqa: E402

DATA = Path("/work/shared/data/retrieval/scifact")


def load_scifact(folder: Path):
    corpus = []
    with gzip.open(folder / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            corpus.append(json.loads(line))
    queries = {}
    with open(folder / "queries_train.jsonl", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            queries[r["_id"]] = r["text"]
    qrels: dict[str, dict[str, int]] = {}
    with open(folder / "qrels_train.tsv", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            parts = line.rstrip("\n").split("\t")
            if i == 0 and not parts[-1].strip().lstrip("-").isdigit():
                continue  # header
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return corpus, queries, qrels


def to_documents(corpus) -> list[Document]:
    import hashlib

    docs = []
    for r in corpus:
        # Same convention as the JSONL loader: title, blank line, text.
        text = f"{r['title']}\n\n{r['text']}" if r.get("title") else r["text"]
        docs.append(Document(doc_id=r["_id"], source=f"scifact#{r['_id']}", title=r.get("title") or r["_id"],
                             text=text, content_hash=hashlib.sha256(text.encode()).hexdigest(),
                             origin="scifact", kind="jsonl"))
    return docs


def ndcg_at(ranked: list[str], rel: dict[str, int], k: int = 10) -> float:
    dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(rel.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at(ranked: list[str], rel: dict[str, int], k: int = 100) -> float:
    wanted = {d for d, g in rel.items() if g > 0}
    return len(wanted & set(ranked[:k])) / len(wanted) if wanted else 0.0


def doc_ranking(passages) -> list[str]:
    seen, out = set(), []
    for p in passages:
        if p.doc_id not in seen:
            seen.add(p.doc_id)
            out.append(p.doc_id)
    return out


def pct(values, q):
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def timed_queries(index, texts, mode, vectors=None, k=10):
    total, search_only = [], []
    for i, q in enumerate(texts):
        t0 = time.perf_counter()
        index.search(q, k=k, mode=mode)
        total.append(time.perf_counter() - t0)
        if vectors is not None and mode != "lexical":
            t0 = time.perf_counter()
            index.search(q, k=k, mode=mode, query_vector=vectors[i])
            search_only.append(time.perf_counter() - t0)
    out = {"median_ms": pct(total, 50), "p99_ms": pct(total, 99)}
    if search_only:
        out.update({"search_only_median_ms": pct(search_only, 50), "search_only_p99_ms": pct(search_only, 99)})
    return out


class SyntheticEmbedder:
    """Real tokenizer and real query embeddings; chunk vectors drawn around real ones.

    Lets the 100k-chunk latency test build its index in seconds instead of hours.
    """

    def __init__(self, real, base_vectors: np.ndarray, noise: float, seed: int = 0):
        self.real = real
        self.name = real.name
        self.base = base_vectors
        self.noise = noise
        self.rng = np.random.default_rng(seed)

    @property
    def dim(self):
        return self.real.dim

    @property
    def max_tokens(self):
        return self.real.max_tokens

    def token_spans(self, text):
        return self.real.token_spans(text)

    def encode(self, texts, show_progress=False):
        return synthetic_vectors(self.base, len(texts), self.noise, self.rng)

    def encode_query(self, text):
        return self.real.encode_query(text)


def synthetic_vectors(base: np.ndarray, n: int, noise: float, rng) -> np.ndarray:
    pick = rng.integers(0, base.shape[0], size=n)
    v = base[pick] + rng.normal(0.0, noise, size=(n, base.shape[1])).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v.astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--queries", type=int, default=0, help="use the first N train queries (0 = all 809)")
    ap.add_argument("--index-dir", type=Path, default=None, help="keep the SciFact index here and reuse it")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--baseline-sample", type=int, default=400, help="chunks encoded by both embedders (0 = skip)")
    ap.add_argument("--skip-100k", action="store_true", help="skip the 100k-chunk latency index")
    ap.add_argument("--chunks-100k", type=int, default=100_000)
    ap.add_argument("--skip-ann", action="store_true")
    ap.add_argument("--ann-sizes", default="100000,1000000")
    ap.add_argument("--ann-queries", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "retrieval.json")
    args = ap.parse_args()

    import torch

    results: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                 "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                 "python": platform.python_version()},
                     "args": {k: str(v) for k, v in vars(args).items()}}
    rows: list[tuple[str, str]] = []

    def checkpoint() -> None:
        # Partial results survive an interrupted run (the full run takes long on 2 cores).
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(results, table=rows), indent=2))

    corpus, queries, qrels = load_scifact(args.data)
    qids = sorted(qrels)
    if args.queries:
        qids = qids[: args.queries]
    qtexts = [queries[q] for q in qids]
    print(f"SciFact: {len(corpus)} abstracts, {len(qids)} train queries", flush=True)

    embedder = SentenceTransformerEmbedder(None, precision=args.precision)
    tmp = None
    folder = args.index_dir
    if folder is None:
        tmp = tempfile.mkdtemp(prefix="parley-bench-")
        folder = Path(tmp) / "scifact"

    # -- build (or reuse) the SciFact index --------------------------------------------------
    fresh = not (folder / "CURRENT").exists()
    index = open_index(folder, embedder=embedder)
    if fresh:
        t0 = time.perf_counter()
        rep = index.add_documents(to_documents(corpus), show_progress=sys.stderr.isatty())
        build_s = time.perf_counter() - t0
        n_chunks = len(index)
        results["build"] = {"documents": len(corpus), "chunks": n_chunks, "seconds": build_s,
                            "chunks_per_s": n_chunks / build_s, "docs_per_s": len(corpus) / build_s,
                            "precision": embedder.precision}
        rows.append(("index build (load+chunk+embed+BM25+save)",
                     f"{n_chunks} chunks in {build_s:.0f}s = {n_chunks / build_s:.1f} chunks/s ({len(corpus) / build_s:.1f} docs/s)"))
        print(rows[-1], flush=True)
        checkpoint()
    else:
        print(f"reusing index at {folder} ({len(index)} chunks)", flush=True)

    # -- embedding throughput vs plain SentenceTransformer.encode -----------------------------
    if args.baseline_sample:
        from sentence_transformers import SentenceTransformer

        with index._rw.read():
            all_texts = [r.text for r in index._chunks.values()]
        sample = random.Random(0).sample(all_texts, min(args.baseline_sample, len(all_texts)))
        plain = SentenceTransformer(str(default_model_dir()), device="cpu")
        plain.encode(sample[:8])
        t0 = time.perf_counter()
        base = plain.encode(sample, normalize_embeddings=True)
        plain_s = time.perf_counter() - t0
        embedder.encode(sample[:8])
        t0 = time.perf_counter()
        ours = embedder.encode(sample)
        ours_s = time.perf_counter() - t0
        cos = (base * ours).sum(axis=1)
        results["encode"] = {"sample_chunks": len(sample), "plain_encode_chunks_per_s": len(sample) / plain_s,
                             "ours_chunks_per_s": len(sample) / ours_s, "speedup": plain_s / ours_s,
                             "cosine_vs_plain_min": float(cos.min()), "precision": embedder.precision}
        rows.append(("embedding: plain ST encode vs ours",
                     f"{len(sample) / plain_s:.1f} vs {len(sample) / ours_s:.1f} chunks/s (x{plain_s / ours_s:.2f}, "
                     f"min cos {cos.min():.4f}, {embedder.precision})"))
        print(rows[-1], flush=True)
        checkpoint()
        del plain

    # -- quality ------------------------------------------------------------------------------
    qvecs = embedder.encode(qtexts)
    results["quality"] = {}
    for mode in ("lexical", "dense", "hybrid"):
        nd, rc = [], []
        for qid, q, v in zip(qids, qtexts, qvecs):
            hits = index.search(q, k=300, mode=mode, candidates=300, query_vector=v if mode != "lexical" else None)
            ranked = doc_ranking(hits)
            nd.append(ndcg_at(ranked, qrels[qid]))
            rc.append(recall_at(ranked, qrels[qid]))
        results["quality"][mode] = {"ndcg@10": float(np.mean(nd)), "recall@100": float(np.mean(rc))}
        rows.append((f"SciFact train {mode}", f"nDCG@10 {np.mean(nd):.4f}  recall@100 {np.mean(rc):.4f}"))
        print(rows[-1], flush=True)
        checkpoint()

    # -- latency on SciFact -------------------------------------------------------------------
    lat_q = qtexts[:200]
    lat_v = qvecs[:200]
    t_embed = []
    for q in lat_q:
        t0 = time.perf_counter()
        embedder.encode_query(q)
        t_embed.append(time.perf_counter() - t0)
    results["latency_scifact"] = {"chunks": len(index), "embed_median_ms": pct(t_embed, 50), "embed_p99_ms": pct(t_embed, 99)}
    for mode in ("lexical", "dense", "hybrid"):
        results["latency_scifact"][mode] = timed_queries(index, lat_q, mode, lat_v)
    h = results["latency_scifact"]["hybrid"]
    rows.append((f"latency hybrid k=10 @ {len(index)} chunks",
                 f"median {h['median_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms (search only {h['search_only_median_ms']:.1f} / "
                 f"{h['search_only_p99_ms']:.1f}; query embedding {pct(t_embed, 50):.1f} ms)"))
    print(rows[-1], flush=True)
    checkpoint()

    base_vectors = index._dense.index.index.reconstruct_n(0, index._dense.index.ntotal)
    with index._rw.read():
        sentences = [s for r in index._chunks.values() for s in r.text.split(". ") if len(s) > 20]

    # -- latency at 100k chunks ---------------------------------------------------------------
    if not args.skip_100k:
        rng = random.Random(1)
        n = args.chunks_100k
        docs = []
        for i in range(n):
            text = ". ".join(rng.choice(sentences) for _ in range(4)) + "."
            docs.append(Document(doc_id=f"s{i}", source=f"synthetic#{i}", title=f"synthetic {i}", text=text,
                                 content_hash=str(i), origin="synthetic", kind="text"))
        syn = SyntheticEmbedder(embedder, base_vectors, noise=0.05)
        big_dir = Path(tmp or tempfile.mkdtemp(prefix="parley-bench-")) / "big"
        big = open_index(big_dir, embedder=syn)
        t0 = time.perf_counter()
        big.add_documents(docs)
        b_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        big2 = open_index(big_dir, embedder=syn)
        open_s = time.perf_counter() - t0
        lat = {"chunks": len(big2), "build_s_without_embedding": b_s, "open_s": open_s}
        for mode in ("lexical", "dense", "hybrid"):
            lat[mode] = timed_queries(big2, lat_q, mode, lat_v)
        results["latency_100k"] = lat
        h = lat["hybrid"]
        rows.append((f"latency hybrid k=10 @ {len(big2)} chunks",
                     f"median {h['median_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms incl. embedding "
                     f"(search only {h['search_only_median_ms']:.1f} / {h['search_only_p99_ms']:.1f}); "
                     f"lexical {lat['lexical']['median_ms']:.1f}, dense {lat['dense']['search_only_median_ms']:.1f} ms"))
        print(rows[-1], flush=True)
        checkpoint()
        rows.append(("100k index: build w/o embedding, open", f"{b_s:.1f}s, {open_s:.1f}s"))
        del big, big2
        shutil.rmtree(big_dir, ignore_errors=True)

    # -- approximate index --------------------------------------------------------------------
    if not args.skip_ann:
        results["ann"] = []
        rng = np.random.default_rng(2)
        qv = np.asarray(qvecs[: args.ann_queries], dtype=np.float32)
        for size in [int(s) for s in args.ann_sizes.split(",") if s]:
            vecs = synthetic_vectors(base_vectors, size, 0.05, rng)
            ids = np.arange(size, dtype=np.int64)
            entry = {"vectors": size}
            for kind in ("flat", "hnsw"):
                d = DenseIndex(vecs.shape[1], DenseConfig(index_type=kind))
                t0 = time.perf_counter()
                for s in range(0, size, 50_000):
                    d.add(vecs[s:s + 50_000], ids[s:s + 50_000])
                entry[f"{kind}_build_s"] = time.perf_counter() - t0
                res, times = [], []
                for q in qv:
                    t0 = time.perf_counter()
                    res.append([i for i, _ in d.search(q, 10)])
                    times.append(time.perf_counter() - t0)
                entry[f"{kind}_median_ms"] = pct(times, 50)
                entry[f"{kind}_p99_ms"] = pct(times, 99)
                entry[f"{kind}_results"] = res
                del d
            entry["hnsw_recall@10"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in
                                                     zip(entry.pop("flat_results"), entry.pop("hnsw_results"))]))
            results["ann"].append(entry)
            rows.append((f"ANN HNSW @ {size:,} vectors",
                         f"recall@10 {entry['hnsw_recall@10']:.3f}; {entry['hnsw_median_ms']:.2f} ms vs exact "
                         f"{entry['flat_median_ms']:.2f} ms (p99 {entry['hnsw_p99_ms']:.2f} / {entry['flat_p99_ms']:.2f}); "
                         f"build {entry['hnsw_build_s']:.0f}s"))
            print(rows[-1], flush=True)
            checkpoint()
            del vecs

    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    width = max(len(r[0]) for r in rows)
    print("\n" + "\n".join(f"{a:<{width}}  {b}" for a, b in rows))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
