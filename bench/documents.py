"""Documents benchmark: time from upload to searchable, through the DocumentLibrary path with MiniLM.

Two inputs:
- a 50-page PDF (written here: each page holds three SciFact abstracts, about 4,000 characters);
- the BEIR SciFact corpus as one JSONL file (5,183 abstracts, 8 MB), the same data bench/retrieval.py
  indexes through the bare retrieval API.

Each is uploaded into a fresh collection with `DocumentLibrary.upload` (what the Documents tab and
POST /v1/collections/NAME/files call), and the clock runs until a search returns one of its
passages. The per-file stage times (loaded, chunked, embedded, saved) come from the job itself.
The embedding model is loaded before the clock starts (a server loads it at start-up); its load
time is reported on its own.

Prints a table and writes JSON (default bench/results/documents.json). Not a test.

    nice -n 10 python bench/documents.py
    python bench/documents.py --skip-scifact        # the PDF only (about a minute)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bot.documents import DocumentLibrary  # noqa: E402
from bot.owners import LOCAL_ADMIN  # noqa: E402
from tests.doc_fixtures import make_pdf  # noqa: E402

DATA = Path(os.environ.get("PARLEY_DATA", "/work/shared/data")) / "retrieval" / "scifact"


def scifact_records() -> list[dict]:
    with gzip.open(DATA / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def queries(n: int) -> list[str]:
    out = []
    with open(DATA / "queries_train.jsonl", encoding="utf-8") as fh:
        for line in fh:
            out.append(json.loads(line)["text"])
            if len(out) >= n:
                break
    return out


def run_one(lib: DocumentLibrary, collection: str, name: str, path: Path, probe: str, *, expect_source: str) -> dict:
    """Upload one file, wait until a search finds it; returns timings (seconds) and counts."""
    t0 = time.perf_counter()
    wall0 = time.time()
    job = lib.upload(LOCAL_ADMIN, collection, [(name, path)])
    accepted = time.perf_counter() - t0
    job = lib.wait(LOCAL_ADMIN.owner, job.id, timeout=3600)
    done = time.perf_counter() - t0
    hits = []
    while not hits:  # searchable: a search returns a passage of this file
        hits = [h for h in lib.search(LOCAL_ADMIN.owner, [collection], probe, k=5) if h["source"].startswith(expect_source)]
        if not hits:
            time.sleep(0.01)
    searchable = time.perf_counter() - t0
    [f] = job.files
    if f.stage != "saved":
        raise RuntimeError(f"{name} was not indexed: {f.reason}")
    stages = {s: round(f.times[s] - wall0, 3) for s in ("loaded", "chunked", "embedded", "saved") if s in f.times}
    info = lib.collection(LOCAL_ADMIN.owner, collection)
    return {"file": name, "bytes": path.stat().st_size, "records": f.records, "chunks": f.chunks,
            "upload_call_s": round(accepted, 3), "job_done_s": round(done, 3), "searchable_s": round(searchable, 3),
            "stage_reached_at_s": stages, "chunks_per_s": round(f.chunks / done, 1),
            "index_bytes": info.bytes}


def search_latency(lib: DocumentLibrary, collection: str, texts: list[str]) -> dict:
    times = []
    for q in texts:
        t = time.perf_counter()
        lib.search(LOCAL_ADMIN.owner, [collection], q, k=5)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"queries": len(times), "median_ms": round(statistics.median(times), 1),
            "p95_ms": round(times[int(0.95 * (len(times) - 1))], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=50)
    parser.add_argument("--skip-scifact", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "documents.json"))
    args = parser.parse_args()

    from retrieval import get_embedder

    work = Path(tempfile.mkdtemp(prefix="parley-bench-docs-"))
    # The load average says how busy the (shared) machine was: timings scale with it.
    results: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                 "platform": platform.platform(), "load_avg_at_start": os.getloadavg()},
                     "embedder": "sentence-transformers/all-MiniLM-L6-v2"}
    rows = []
    try:
        t = time.perf_counter()
        emb = get_embedder(None)
        emb.encode(["warm up"])
        results["embedder_load_s"] = round(time.perf_counter() - t, 2)
        rows.append(("embedder load (once per process)", f"{results['embedder_load_s']:.1f} s", ""))
        lib = DocumentLibrary(work / "home", max_upload_bytes=200_000_000)
        corpus = scifact_records()

        # -- a 50-page PDF --------------------------------------------------------------------------
        pages = []
        for i in range(args.pages):
            chunk = corpus[3 * i: 3 * i + 3]
            pages.append("\n".join(f"{r['title']}. {r['text']}" for r in chunk))
        pdf = make_pdf(work / "paper.pdf", pages, title="Fifty pages of SciFact abstracts")
        probe = corpus[3 * (args.pages - 1)]["title"]  # something on the last page
        pdf_run = run_one(lib, "pdf", "paper.pdf", pdf, probe, expect_source="paper.pdf")
        pdf_run["pages"] = args.pages
        results["pdf_50_pages"] = pdf_run
        rows.append((f"{args.pages}-page PDF ({pdf_run['bytes'] / 1e3:.0f} KB, {pdf_run['chunks']} chunks)",
                     f"{pdf_run['searchable_s']:.1f} s", _stages(pdf_run)))

        # -- SciFact as one JSONL file --------------------------------------------------------------------
        if not args.skip_scifact:
            jsonl = work / "scifact.jsonl"
            with open(jsonl, "w", encoding="utf-8") as fh:
                for r in corpus:
                    fh.write(json.dumps(r) + "\n")
            probe = corpus[-1]["title"]
            sci = run_one(lib, "scifact", "scifact.jsonl", jsonl, probe, expect_source="scifact.jsonl")
            results["scifact"] = sci
            rows.append((f"SciFact JSONL ({sci['records']:,} abstracts, {sci['bytes'] / 1e6:.1f} MB, "
                         f"{sci['chunks']:,} chunks)", f"{sci['searchable_s']:.1f} s", _stages(sci)))
            lat = search_latency(lib, "scifact", queries(50))
            results["scifact_search"] = lat
            rows.append(("search on SciFact (hybrid, k=5, 50 claims)", f"{lat['median_ms']:.0f} ms median",
                         f"p95 {lat['p95_ms']:.0f} ms"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_avg_at_end"] = os.getloadavg()

    width = max(len(r[0]) for r in rows)
    print(f"\n{'what'.ljust(width)}  {'upload -> searchable':>22}  stages (s after upload)")
    for what, value, extra in rows:
        print(f"{what.ljust(width)}  {value:>22}  {extra}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nload average (1/5/15 min) at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs")
    print(f"wrote {out}")
    return 0


def _stages(run: dict) -> str:
    s = run["stage_reached_at_s"]
    return " ".join(f"{k} {v:.1f}" for k, v in s.items()) + f"; {run['chunks_per_s']:.0f} chunks/s"


if __name__ == "__main__":
    raise SystemExit(main())
