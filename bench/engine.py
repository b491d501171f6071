"""Inference benchmark: Parley's engine next to plain `transformers.generate` on the same prompts.

Measures, for the default model: time to first token, decode tokens/s at batch 1, aggregate
tokens/s with 1, 4, 8 and 16 concurrent chats, peak memory, and cold start of `parley serve` to a
ready /health; llama-cpp-python on the same GGUF when it is installed. Each system runs in its own
process so peak memory is its own. Prints a table, writes bench/results/engine.json.

    python bench/engine.py                 # full run (~10 min on 2 cores)
    python bench/engine.py --quick         # fewer tokens and concurrency levels
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "Tell me a short story about a lighthouse keeper.",
    "Explain how photosynthesis works.",
    "Write a poem about autumn leaves.",
    "What are the benefits of regular exercise?",
    "Describe the water cycle in simple terms.",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Summarize the plot of a heist movie you invent.",
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompts_for(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def part_engine(args) -> dict:
    from bot.engine import Engine, GenerationParams
    from bot.models import load_model

    loaded = load_model("smollm2-135m", Path(args.home), dtype=args.dtype, progress=False)
    engine = Engine(loaded, max_batch_size=16)
    params = GenerationParams(temperature=0, max_new_tokens=args.tokens)
    engine.generate([{"role": "user", "content": "warm up"}], GenerationParams(temperature=0, max_new_tokens=4))
    ttfts, rates = [], []
    for prompt in PROMPTS[:args.single]:
        _, done = engine.generate([{"role": "user", "content": prompt}], params)
        ttfts.append(done.usage.time_to_first_token_s)
        rates.append(done.usage.tokens_per_second)
    out = {"ttft_s": statistics.median(ttfts), "decode_tps_batch1": statistics.median(rates), "aggregate": {}}
    for n in args.concurrency:
        results = [None] * n

        def run(i):
            results[i] = engine.generate([{"role": "user", "content": prompts_for(n)[i]}], params)[1]

        started = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        tokens = sum(d.usage.completion_tokens for d in results)
        out["aggregate"][str(n)] = {"tokens": tokens, "seconds": elapsed, "tps": tokens / elapsed,
                                    "median_ttft_s": statistics.median(d.usage.time_to_first_token_s for d in results)}
    engine.close()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def part_hf(args) -> dict:
    """Plain transformers: generate() one prompt at a time, and a padded static batch of N."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bot.models import pick_dtype, resolve_model

    folder = resolve_model("smollm2-135m", Path(args.home), progress=False)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=pick_dtype(args.dtype, "cpu")).eval()

    def encode(prompts):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                 for p in prompts]
        return tok(texts, return_tensors="pt", padding=True)

    def timed_generate(prompts, max_new):
        enc = encode(prompts)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        elapsed = time.perf_counter() - started
        new = out[:, enc["input_ids"].shape[1]:]
        produced = int(sum(int((row != tok.pad_token_id).sum()) for row in new))
        return elapsed, produced

    timed_generate(["warm up"], 4)
    ttfts, rates = [], []
    for prompt in PROMPTS[:args.single]:
        first, _ = timed_generate([prompt], 1)
        total, produced = timed_generate([prompt], args.tokens)
        ttfts.append(first)
        if produced > 1:
            rates.append((produced - 1) / max(total - first, 1e-6))
    out = {"ttft_s": statistics.median(ttfts), "decode_tps_batch1": statistics.median(rates), "aggregate": {}}
    for n in args.concurrency:
        elapsed, produced = timed_generate(prompts_for(n), args.tokens)
        out["aggregate"][str(n)] = {"tokens": produced, "seconds": elapsed, "tps": produced / elapsed}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def part_llamacpp(args) -> dict:
    from llama_cpp import Llama  # noqa: F401  (only when installed)

    from bot.models import embedded_gguf

    llm = Llama(model_path=str(embedded_gguf("smollm2-135m")), n_ctx=2048, verbose=False)
    rates, ttfts = [], []
    for prompt in PROMPTS[:args.single]:
        started = time.perf_counter()
        first, count = None, 0
        for _ in llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=args.tokens,
                                            temperature=0, stream=True):
            count += 1
            first = first or time.perf_counter()
        end = time.perf_counter()
        ttfts.append(first - started)
        rates.append((count - 1) / max(end - first, 1e-6))
    return {"ttft_s": statistics.median(ttfts), "decode_tps_batch1": statistics.median(rates), "aggregate": {},
            "peak_rss_mb": peak_rss_mb()}


def cold_start(args) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PARLEY_HOME": args.home, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx
    try:
        while time.perf_counter() - started < 300:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                time.sleep(0.1)
        return float("nan")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_part(name: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--part", name, "--home", args.home, "--tokens", str(args.tokens),
           "--dtype", args.dtype, "--single", str(args.single), "--concurrency", *map(str, args.concurrency)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"[{name}] failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["engine", "hf", "llamacpp"])
    parser.add_argument("--home", default=os.environ.get("PARLEY_HOME") or str(Path.home() / ".parley"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--single", type=int, default=4, help="prompts for the batch-1 measurements")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine.json"))
    args = parser.parse_args()
    if args.part:
        fn = {"engine": part_engine, "hf": part_hf, "llamacpp": part_llamacpp}[args.part]
        print(json.dumps(fn(args)))
        return
    if args.quick:
        args.tokens, args.single, args.concurrency = 32, 2, [1, 4, 8]

    from bot.models import resolve_model

    resolve_model("smollm2-135m", Path(args.home))  # convert once, outside the timings
    results = {"engine": run_part("engine", args), "hf_generate": run_part("hf", args)}
    try:
        import llama_cpp  # noqa: F401
        results["llama_cpp"] = run_part("llamacpp", args)
    except ImportError:
        results["llama_cpp"] = None
    results["cold_start_s"] = cold_start(args)
    results["config"] = {"tokens": args.tokens, "dtype": args.dtype, "cpu_count": os.cpu_count(),
                         "concurrency": args.concurrency}

    eng, hf = results["engine"], results["hf_generate"]
    rows = [("time to first token (s)", "ttft_s"), ("decode tok/s, batch 1", "decode_tps_batch1"),
            ("peak RSS (MB)", "peak_rss_mb")]
    print(f"\n{'metric':38} {'parley':>10} {'hf generate':>12} {'ratio':>7}")
    for label, key in rows:
        a, b = (eng or {}).get(key), (hf or {}).get(key)
        ratio = f"{a / b:.2f}x" if a and b else "-"
        print(f"{label:38} {a if a is None else round(a, 3):>10} {b if b is None else round(b, 3):>12} {ratio:>7}")
    for n in args.concurrency:
        a = (eng or {}).get("aggregate", {}).get(str(n), {}).get("tps")
        b = (hf or {}).get("aggregate", {}).get(str(n), {}).get("tps")
        ratio = f"{a / b:.2f}x" if a and b else "-"
        print(f"{'aggregate tok/s, ' + str(n) + ' concurrent':38} {round(a, 1) if a else '-':>10} "
              f"{round(b, 1) if b else '-':>12} {ratio:>7}")
    if eng and eng["aggregate"].get("8"):
        print(f"\naggregate at 8 concurrent / batch-1 decode: {eng['aggregate']['8']['tps'] / eng['decode_tps_batch1']:.2f}x (target 4x)")
    if results.get("llama_cpp"):
        print(f"llama.cpp batch-1 decode tok/s: {results['llama_cpp']['decode_tps_batch1']:.1f}")
    print(f"cold start of `parley serve` to ready /health: {results['cold_start_s']:.1f} s (target < 10 s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
