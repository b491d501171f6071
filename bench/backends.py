"""Inference backends side by side on the embedded SmolLM2-135M-Instruct (Q4_1 GGUF), greedy.

Systems (each in its own process, so peak memory is its own):
  llama.cpp alone     llama-cpp-python's Llama on the GGUF, the same prompt ids, streaming (the anchor;
                      it serves one request at a time, so its "aggregate" runs the chats one after another)
  parley llama.cpp    Parley's llama.cpp backend (one context, one sequence id per chat, batched)
  parley llama.cpp q4_0  the same on a Q4_0 copy of the file (llama.cpp has batched kernels for Q4_0;
                      for Q4_1 it multiplies row by row), to show what the batch API gives when it can
  parley transformers Parley's transformers backend (float32, continuous batching)
  plain generate      transformers model.generate, one prompt at a time / a padded static batch
  parley openai       Parley's openai backend against `python -m llama_cpp.server` on the same GGUF;
                      its time to first token is compared with calling that server directly
Measures: time to first token, decode tokens/s at batch 1, aggregate tokens/s at 1/4/8/16 concurrent
chats, peak RSS, and cold start of `parley serve --backend X` to a ready /health.

    python bench/backends.py            # full run (~15 min on 2 cores)
    python bench/backends.py --quick    # fewer tokens and concurrency levels

Prints a table, writes bench/results/backends.json. The machine's load average is recorded with each
part: on a shared machine the figures move a lot; rerun before trusting a ratio.
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

SYSTEM = "You are Parley, a helpful assistant. Answer clearly and concisely."
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


def messages(i: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- measuring an engine (any backend: the same interface) -------------------------------------------
def measure_engine(engine, args) -> dict:
    from bot.engine import GenerationParams

    params = GenerationParams(temperature=0, max_new_tokens=args.tokens)
    engine.generate(messages(0), GenerationParams(temperature=0, max_new_tokens=4))  # warm up
    ttfts, rates = [], []
    for i in range(args.single):
        _, done = engine.generate(messages(i), params)
        ttfts.append(done.usage.time_to_first_token_s)
        rates.append(done.usage.tokens_per_second)
    out = {"ttft_s": statistics.median(ttfts), "decode_tps_batch1": statistics.median(rates), "aggregate": {}}
    for n in args.concurrency:
        results = [None] * n

        def run(i):
            results[i] = engine.generate(messages(i), params)[1]

        started = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        tokens = sum(d.usage.completion_tokens for d in results)
        out["aggregate"][str(n)] = {"tokens": tokens, "seconds": round(elapsed, 3), "tps": tokens / elapsed,
                                    "median_ttft_s": statistics.median(d.usage.time_to_first_token_s or 0
                                                                       for d in results)}
    return out


def settings(args, **overrides):
    from bot.config import Settings

    return Settings(home=Path(args.home), max_batch_size=16, **overrides)


def part_parley_llamacpp(args) -> dict:
    from bot.backends import create_engine

    started = time.perf_counter()
    engine = create_engine(settings(args, backend="llama.cpp", model=args.gguf or "smollm2-135m"), progress=False)
    ready = time.perf_counter() - started
    out = measure_engine(engine, args)
    out["engine_ready_s"] = ready
    engine.close()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def part_parley_transformers(args) -> dict:
    from bot.backends import create_engine

    started = time.perf_counter()
    engine = create_engine(settings(args, backend="transformers"), progress=False)
    ready = time.perf_counter() - started
    out = measure_engine(engine, args)
    out["engine_ready_s"] = ready
    engine.close()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def part_llamacpp_direct(args) -> dict:
    """llama-cpp-python alone: the same prompt ids (Parley's tokenizer), greedy, streaming."""
    from llama_cpp import Llama

    from bot.backends import load_gguf_tokenizer
    from bot.backends.llamacpp import cpu_threads
    from bot.models import embedded_gguf

    gguf = embedded_gguf("smollm2-135m")
    tokenizer = load_gguf_tokenizer(gguf, Path(args.home), spec="smollm2-135m")
    started = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_ctx=4096, n_threads=cpu_threads(), n_threads_batch=cpu_threads(),
                verbose=False)
    ready = time.perf_counter() - started

    def one(i):
        ids = tokenizer.apply_chat_template(messages(i), add_generation_prompt=True, tokenize=True)["input_ids"]
        llm.reset()
        begin = time.perf_counter()
        first, count = None, 0
        for _ in llm.create_completion(ids, max_tokens=args.tokens, temperature=0, stream=True):
            count += 1
            first = first or time.perf_counter()
        end = time.perf_counter()
        return first - begin, (count - 1) / max(end - first, 1e-9), count, end - begin

    one(0)
    runs = [one(i) for i in range(args.single)]
    out = {"ttft_s": statistics.median(r[0] for r in runs), "decode_tps_batch1": statistics.median(r[1] for r in runs),
           "aggregate": {}, "engine_ready_s": ready}
    for n in args.concurrency:  # one request at a time: what a single Llama object can do
        started = time.perf_counter()
        tokens = sum(one(i)[2] for i in range(n))
        elapsed = time.perf_counter() - started
        out["aggregate"][str(n)] = {"tokens": tokens, "seconds": round(elapsed, 3), "tps": tokens / elapsed,
                                    "note": "serial"}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def part_hf(args) -> dict:
    """Plain transformers: generate() one prompt at a time, and a padded static batch of N."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bot.models import resolve_model

    folder = resolve_model("smollm2-135m", Path(args.home), progress=False)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def timed_generate(indices, max_new):
        texts = [tok.apply_chat_template(messages(i), add_generation_prompt=True, tokenize=False) for i in indices]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        elapsed = time.perf_counter() - started
        new = out[:, enc["input_ids"].shape[1]:]
        return elapsed, int(sum(int((row != tok.pad_token_id).sum()) for row in new))

    timed_generate([0], 4)
    ttfts, rates = [], []
    for i in range(args.single):
        first, _ = timed_generate([i], 1)
        total, produced = timed_generate([i], args.tokens)
        ttfts.append(first)
        if produced > 1:
            rates.append((produced - 1) / max(total - first, 1e-6))
    out = {"ttft_s": statistics.median(ttfts), "decode_tps_batch1": statistics.median(rates), "aggregate": {}}
    for n in args.concurrency:
        elapsed, produced = timed_generate(list(range(n)), args.tokens)
        out["aggregate"][str(n)] = {"tokens": produced, "seconds": round(elapsed, 3), "tps": produced / elapsed,
                                    "note": "static padded batch"}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def server_peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def start_llama_server(gguf: str, folder: Path):
    """python -m llama_cpp.server on loopback; returns (process, base URL)."""
    import httpx

    from bot.backends.llamacpp import cpu_threads

    port = free_port()
    config = folder / "server.json"
    config.write_text(json.dumps({"host": "127.0.0.1", "port": port, "interrupt_requests": False, "models": [
        {"model": gguf, "model_alias": "smollm2", "n_ctx": 4096, "n_threads": cpu_threads(),
         "n_threads_batch": cpu_threads(), "verbose": False}]}))
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--config_file", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            if httpx.get(url + "/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("llama_cpp.server did not start")


def part_parley_openai(args) -> dict:
    """The openai backend against llama_cpp.server, and the same server called directly."""
    import httpx

    from bot.backends import load_gguf_tokenizer
    from bot.backends.openai_remote import OpenAIEngine
    from bot.engine import GenerationParams
    from bot.models import embedded_gguf

    gguf = embedded_gguf("smollm2-135m")
    tokenizer = load_gguf_tokenizer(gguf, Path(args.home), spec="smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_llama_server(str(gguf), Path(tmp))
        try:
            engine = OpenAIEngine(url, tokenizer=tokenizer, max_batch_size=16, context_window=4096)
            out = measure_engine(engine, args)
            # Time to first token: the server directly (httpx, SSE) vs through the backend, alternating,
            # the same body, max_tokens=1 so the server's own work is prefill only.
            client = httpx.Client(timeout=60)

            def direct(i):
                body = {"model": "smollm2", "messages": messages(i), "stream": True, "max_tokens": 8, "temperature": 0}
                begin = time.perf_counter()
                with client.stream("POST", url + "/chat/completions", json=body) as response:
                    for line in response.iter_lines():
                        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                            continue
                        for choice in json.loads(line[5:]).get("choices") or []:
                            if (choice.get("delta") or {}).get("content"):  # the first piece of text
                                return time.perf_counter() - begin
                return float("nan")

            def through(i):
                _, done = engine.generate(messages(i), GenerationParams(temperature=0, max_new_tokens=8))
                return done.usage.time_to_first_token_s

            pairs = [(direct(i % 4), through(i % 4)) for i in range(args.overhead_repeats)]
            d, p = statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)
            out["direct_ttft_s"], out["backend_ttft_s"] = d, p
            out["ttft_overhead_pct"] = 100 * (p - d) / d
            engine.close()
            out["peak_rss_mb"] = peak_rss_mb()  # Parley's side; the server's is its own
            out["server_peak_rss_mb"] = server_peak_rss_mb(proc.pid)
        finally:
            proc.kill()
            proc.wait()
    return out


PARTS = {"llamacpp_direct": part_llamacpp_direct, "parley_llamacpp": part_parley_llamacpp,
         "parley_transformers": part_parley_transformers, "hf_generate": part_hf, "parley_openai": part_parley_openai}


def run_part(name: str, args, **extra) -> dict | None:
    cmd = [sys.executable, __file__, "--part", name, "--home", args.home, "--tokens", str(args.tokens),
           "--single", str(args.single), "--overhead-repeats", str(args.overhead_repeats),
           "--concurrency", *map(str, args.concurrency)]
    if extra.get("gguf"):
        cmd += ["--gguf", extra["gguf"]]
    before = load()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"[{name}] failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["load_avg_before_after"] = [before, load()]
    print(f"[{name}] done (load {before} -> {load()})", file=sys.stderr)
    return out


def cold_start(args, backend: str, *extra: str) -> float:
    """`parley serve --backend X` (UI included) from process start to a 200 from /health."""
    import httpx

    port = free_port()
    env = {**os.environ, "PARLEY_HOME": args.home, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve", "--port", str(port), "--backend", backend,
                             *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - started < 300:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                time.sleep(0.05)
        return float("nan")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def requantize(src: Path, dst: Path, kind: str = "q4_0") -> Path:
    import ctypes

    import llama_cpp

    if dst.is_file():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_0": 2, "q8_0": 7}[kind]
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"could not requantize {src}")
    return dst


def fmt(value, digits=2):
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=sorted(PARTS))
    parser.add_argument("--home", default=os.environ.get("PARLEY_HOME") or str(Path.home() / ".parley"))
    parser.add_argument("--gguf", default=None, help="(parley_llamacpp) serve this GGUF instead of the embedded one")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--single", type=int, default=4, help="prompts for the batch-1 measurements")
    parser.add_argument("--overhead-repeats", type=int, default=12)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--skip", nargs="*", default=[], help="systems to leave out, e.g. parley_transformers")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "backends.json"))
    args = parser.parse_args()
    if args.part:
        print(json.dumps(PARTS[args.part](args)))
        return
    if args.quick:
        args.tokens, args.single, args.concurrency, args.overhead_repeats = 32, 2, [1, 4, 8], 6

    from bot.backends import load_gguf_tokenizer
    from bot.models import embedded_gguf, resolve_model

    home = Path(args.home)
    resolve_model("smollm2-135m", home)  # convert once for transformers, outside the timings
    load_gguf_tokenizer(embedded_gguf("smollm2-135m"), home, spec="smollm2-135m")
    q4_0 = requantize(embedded_gguf("smollm2-135m"), home / "models" / "SmolLM2-135M-Instruct.Q4_0.gguf")

    results: dict = {}
    plan = [("llamacpp_direct", {}), ("parley_llamacpp", {}), ("parley_llamacpp_q4_0", {"gguf": str(q4_0)}),
            ("parley_transformers", {}), ("hf_generate", {}), ("parley_openai", {})]
    for name, extra in plan:
        if name in args.skip:
            continue
        results[name] = run_part("parley_llamacpp" if name.startswith("parley_llamacpp") else name, args, **extra)
    results["cold_start_s"] = {"llama.cpp": cold_start(args, "llama.cpp"),
                               "transformers": cold_start(args, "transformers")}
    results["config"] = {"tokens": args.tokens, "cpu_count": os.cpu_count(), "concurrency": args.concurrency,
                         "model": "SmolLM2-135M-Instruct Q4_1 (embedded)", "greedy": True}

    names = [n for n, _ in plan if results.get(n)]
    width = 14
    print("\n" + f"{'metric':34}" + "".join(f"{n.replace('parley_', 'P:'):>{width}}" for n in names))

    def row(label, getter, digits=2):
        cells = []
        for n in names:
            try:
                cells.append(fmt(getter(results[n]), digits))
            except (KeyError, TypeError):
                cells.append("-")
        print(f"{label:34}" + "".join(f"{c:>{width}}" for c in cells))

    row("time to first token (s)", lambda r: r["ttft_s"], 3)
    row("decode tok/s, batch 1", lambda r: r["decode_tps_batch1"], 1)
    for n in args.concurrency:
        row(f"aggregate tok/s, {n} concurrent", lambda r, n=n: r["aggregate"][str(n)]["tps"], 1)
    row("peak RSS (MB)", lambda r: r["peak_rss_mb"], 0)
    row("engine ready in-process (s)", lambda r: r["engine_ready_s"], 2)

    anchor, ours = results.get("llamacpp_direct"), results.get("parley_llamacpp")
    print()
    if anchor and ours:
        print(f"Parley llama.cpp / llama.cpp alone, batch-1 decode: "
              f"{ours['decode_tps_batch1'] / anchor['decode_tps_batch1']:.2f}x (target >= 0.95x)")
    for name in ("parley_llamacpp", "parley_llamacpp_q4_0"):
        r = results.get(name)
        if r and r["aggregate"].get("8"):
            print(f"{name}: aggregate at 8 / its batch-1 decode: {r['aggregate']['8']['tps'] / r['decode_tps_batch1']:.2f}x "
                  f"(target >= 3x)")
    r = results.get("parley_openai")
    if r:
        print(f"openai backend time to first token: {r['backend_ttft_s']:.3f} s vs the server directly "
              f"{r['direct_ttft_s']:.3f} s: overhead {r['ttft_overhead_pct']:+.1f}% (target < 5%)")
    for backend, seconds in results["cold_start_s"].items():
        print(f"cold start of `parley serve --backend {backend}` to a ready /health: {seconds:.1f} s (target < 5 s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
