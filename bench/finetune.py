"""Fine-tuning benchmark: Parley's LoRA loop vs transformers.Trainer + peft, and GSM8K base vs adapter.

    python bench/finetune.py                      # CPU, a few minutes per arm
    python bench/finetune.py --device cuda --rows 512 --steps 40 --batch-size 16   # on a GPU
    python bench/finetune.py --skip-gsm8k         # throughput table only

Part 1 (throughput): the same model, data (GSM8K train rows, tokenized once by finetune.data so both
arms see identical ids and assistant-only labels), LoRA config, batch size, max length, steps, LR
schedule and seed. Each arm runs in its own subprocess so peak memory is its own. Reported:
tokens/s over optimizer-step time (non-padding tokens; padding excluded), labelled tokens/s,
padding share, peak memory (CUDA allocator peak, or max RSS on a CPU), and the eval loss of both
results on the same held-out rows, measured by the same function.
The baseline is Trainer with its defaults for batching (random order, padding to the longest row of
each batch through DataCollatorForSeq2Seq); Parley groups rows of similar length.

Part 2 (GSM8K): a LoRA run on GSM8K train rows, then greedy answers for held-out GSM8K questions
(rows after the training rows) from the base model and from base + adapter: the share of answers
that end in `#### <number>`, and the share whose number equals the reference.

Writes bench/results/finetune.json (or --out). Not a test: it never fails on a number.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GSM8K = Path(os.environ.get("PARLEY_DATA", "/work/shared/data")) / "instruct" / "gsm8k_train.messages.jsonl"


# ---------------------------------------------------------------------------------------------
# Shared setup
# ---------------------------------------------------------------------------------------------
def gsm8k_rows(start: int, n: int) -> list[dict]:
    rows = []
    with open(GSM8K) as fh:
        for i, line in enumerate(fh):
            if i >= start:
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def encoded_split(tokenizer, args):
    from finetune import data as D

    def enc(rows):
        exs = [D.normalize(r, "messages", r["id"]) for r in rows]
        return D.encode_all(tokenizer, exs, D.DataReport(), max_length=args.max_length)

    return enc(gsm8k_rows(0, args.rows)), enc(gsm8k_rows(args.rows, args.eval_rows))


def write_jsonl(rows, path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    return path


def peak_memory_mb(device: str) -> float:
    from finetune.runs import peak_memory_mb as peak

    return peak("cuda" if device.startswith("cuda") else "cpu")


# ---------------------------------------------------------------------------------------------
# Part 1 arms (each runs in a subprocess: `--arm parley|trainer`)
# ---------------------------------------------------------------------------------------------
def arm_parley(args) -> dict:
    from finetune.lora import LoraConfig, train_lora

    work = Path(args.work)
    train_file = write_jsonl(gsm8k_rows(0, args.rows), work / "train.jsonl")
    eval_file = write_jsonl(gsm8k_rows(args.rows, args.eval_rows), work / "eval.jsonl")
    cfg = LoraConfig(data=[str(train_file)], eval_data=[str(eval_file)], output=str(work / "parley-adapter"),
                     model=args.model, rank=args.rank, alpha=2 * args.rank, dropout=0.05, learning_rate=args.lr,
                     batch_size=args.batch_size, grad_accum=1, max_steps=args.steps, warmup_steps=1,
                     max_length=args.max_length, max_reject_share=1.0, eval_every=0, eval_at_start=False,
                     save_every=0, progress=False, device=args.device, overwrite=True, threads=args.threads,
                     seed=args.seed, max_eval_rows=args.eval_rows)
    result = train_lora(cfg, Path(args.home))
    return {"arm": "parley", "tokens_per_s": result["tokens_per_s"],
            "trained_tokens_per_s": result["trained_tokens_per_s"], "tokens": result["tokens"],
            "step_seconds": result["step_seconds"], "eval_loss": result["eval_loss"],
            "peak_memory_mb": peak_memory_mb(args.device)}


def arm_trainer(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from bot.models import resolve_model
    from finetune.evaluate import mean_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    source = resolve_model(args.model, Path(args.home), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    cuda = args.device.startswith("cuda")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16 if cuda else torch.float32)
    model.config.use_cache = False
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    train, held = encoded_split(tokenizer, args)
    dataset = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in train]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    counts = {"real": 0, "padded": 0, "labelled": 0}

    def counting_collator(features):
        batch = collator(features)
        counts["real"] += int(batch["attention_mask"].sum())
        counts["padded"] += batch["input_ids"].numel()
        counts["labelled"] += int((batch["labels"][:, 1:] != -100).sum())
        return batch

    class StepTimer(TrainerCallback):
        seconds = 0.0

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            StepTimer.seconds += time.perf_counter() - self.t0

    targs = TrainingArguments(output_dir=str(Path(args.work) / "trainer-out"), per_device_train_batch_size=args.batch_size,
                              gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr,
                              lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1, save_strategy="no",
                              report_to=[], seed=args.seed, use_cpu=not cuda, bf16=cuda,
                              remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=counting_collator,
                      callbacks=[StepTimer()])
    # Trainer fetches and collates each batch before on_step_begin, so its step time leaves out
    # collation, while Parley's includes it: a small edge for the baseline.
    trainer.train()
    model.eval()
    eval_loss = mean_loss(model, tokenizer, held)
    seconds = StepTimer.seconds
    return {"arm": "trainer", "tokens_per_s": round(counts["real"] / seconds, 1),
            "trained_tokens_per_s": round(counts["labelled"] / seconds, 1), "tokens": counts["real"],
            "padded_tokens": counts["padded"], "step_seconds": round(seconds, 2), "eval_loss": eval_loss,
            "peak_memory_mb": peak_memory_mb(args.device)}


def parley_padding(args) -> int:
    """Padded tokens Parley's length-grouped batches compute for the same steps."""
    from transformers import AutoTokenizer

    from bot.models import resolve_model
    from finetune import data as D

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model, Path(args.home), progress=False))
    train, _ = encoded_split(tokenizer, args)
    lengths = [len(e.input_ids) for e in train]
    per_epoch = -(-len(train) // args.batch_size)
    padded = 0
    for step in range(args.steps):
        epoch, pos = divmod(step, per_epoch)
        batch = D.length_grouped_batches(lengths, args.batch_size, seed=args.seed, epoch=epoch)[pos]
        padded += max(lengths[i] for i in batch) * len(batch)
    return padded


def run_arm(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--arm", name, *sys.argv[1:]]
    cmd = [c for c in cmd if c != "--skip-gsm8k"] + ["--skip-gsm8k"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"arm {name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = round(time.time() - t0, 1)
    return result


# ---------------------------------------------------------------------------------------------
# Part 2: GSM8K format and accuracy, base vs adapter
# ---------------------------------------------------------------------------------------------
ANSWER_RE = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


def gsm8k_eval(args) -> dict:
    import torch
    from peft import PeftModel

    from bot.models import load_model
    from finetune.lora import LoraConfig, train_lora

    work = Path(args.work)
    train_file = write_jsonl(gsm8k_rows(0, args.gsm8k_rows), work / "gsm8k-train.jsonl")
    out = work / "gsm8k-adapter"
    t0 = time.time()
    result = train_lora(LoraConfig(
        data=[str(train_file)], output=str(out), model=args.model, rank=16, alpha=32, learning_rate=args.gsm8k_lr,
        batch_size=args.batch_size, grad_accum=1, max_steps=args.gsm8k_steps, warmup_ratio=0.05,
        max_length=args.max_length, max_reject_share=1.0, eval_every=0, save_every=0, progress=False,
        device=args.device, overwrite=True, threads=args.threads, seed=args.seed, eval_fraction=0.05,
        max_eval_rows=16), Path(args.home))
    train_seconds = time.time() - t0
    held = gsm8k_rows(7473 - args.gsm8k_eval, args.gsm8k_eval)  # the file's last rows, never trained on
    loaded = load_model(args.model, Path(args.home), device=args.device, progress=False)
    tok = loaded.tokenizer
    tok.padding_side = "left"
    model = PeftModel.from_pretrained(loaded.model, str(out), adapter_name="gsm8k").eval()

    def answers(use_adapter: bool) -> list[str]:
        texts = []
        for b in range(0, len(held), args.gen_batch):
            chunk = held[b: b + args.gen_batch]
            prompts = [tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False)
                       for r in chunk]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(loaded.device)
            ctx = model.disable_adapter() if not use_adapter else _null()
            with ctx, torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=args.gen_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            texts += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return texts

    def score(texts):
        fmt = correct = 0
        for text, row in zip(texts, held):
            m = ANSWER_RE.search(text.strip())
            if m:
                fmt += 1
                correct += m.group(1).replace(",", "") == str(row["final_answer"]).replace(",", "")
        return {"format_share": fmt / len(held), "accuracy": correct / len(held)}

    t1 = time.time()
    base_texts, adapter_texts = answers(False), answers(True)
    return {"train_rows": args.gsm8k_rows, "steps": args.gsm8k_steps, "batch_size": args.batch_size,
            "lr": args.gsm8k_lr, "train_seconds": round(train_seconds, 1), "eval_questions": len(held),
            "max_new_tokens": args.gen_tokens, "base": score(base_texts), "adapter": score(adapter_texts),
            "adapter_eval_loss": result.get("eval_loss"), "generation_seconds": round(time.time() - t1, 1),
            "examples": [{"question": held[i]["messages"][0]["content"][:200], "reference": held[i]["final_answer"],
                          "base": base_texts[i][-200:], "adapter": adapter_texts[i][-200:]} for i in range(2)]}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------------------------------------
# Part 3: the classifier recipe on sentiment data
# ---------------------------------------------------------------------------------------------
SENTIMENT = GSM8K.parents[1] / "sentiment"


def prepare_sentiment3(work: Path, held_back: int, seed: int, repeat: int = 2,
                       vader: tuple[str, ...] = ("tweets",)) -> tuple[Path, Path]:
    """3-class rows: TweetEval validation minus `held_back` rows kept for evaluation (the rest
    repeated `repeat` times: it is the in-domain part), plus VADER ground-truth files (mean human
    score in [-4, 4]: <= -0.5 negative, > 0.5 positive, else neutral)."""
    import csv
    import random

    with open(SENTIMENT / "tweeteval_val.tsv") as fh:
        tweets = [(r["text"], r["label"]) for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
    order = list(range(len(tweets)))
    random.Random(seed).shuffle(order)
    held = [tweets[i] for i in order[:held_back]]
    train = [tweets[i] for i in order[held_back:]] * repeat
    for f in sorted((SENTIMENT / "vader_ground_truth").glob("*.tsv")):
        if not any(f.name.startswith(v) for v in vader):
            continue
        with open(f) as fh:
            for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
                score = float(r["score"])
                train.append((r["text"], "negative" if score <= -0.5 else "positive" if score > 0.5 else "neutral"))
    paths = []
    for name, rows in (("sentiment3-train.jsonl", train), ("tweeteval-heldback.jsonl", held)):
        path = work / name
        path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
        paths.append(path)
    return paths[0], paths[1]


def classifier_runs(args) -> dict:
    from finetune.classify import ClassifyConfig, train_classifier

    work = Path(args.work)
    out = {}
    t0 = time.time()
    r = train_classifier(ClassifyConfig(
        data=[str(SENTIMENT / "sst2_train.tsv")], eval_data=[str(SENTIMENT / "sst2_dev_from_train.tsv")],
        output=str(work / "sst2-binary"), text_column="sentence", label_column="label",
        labels=["negative", "positive"], max_rows=args.sst2_rows, epochs=1, batch_size=32, learning_rate=1e-4,
        max_eval_rows=10_000, eval_every=0, save_every=200, progress=False, device=args.device,
        threads=args.threads, overwrite=True), Path(args.home))
    out["sst2_binary"] = {"train_rows": args.sst2_rows, "eval": "sst2_dev_from_train.tsv (all rows)",
                          "accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "seconds": round(time.time() - t0, 1)}
    train, held = prepare_sentiment3(work, args.sent3_heldback, seed=13, repeat=args.sent3_repeat,
                                     vader=tuple(args.sent3_vader.split(",")))
    t0 = time.time()
    r = train_classifier(ClassifyConfig(
        data=[str(train)], eval_data=[str(held)], output=str(work / "sentiment3"),
        labels=["negative", "neutral", "positive"], epochs=args.sent3_epochs, batch_size=32, learning_rate=1e-4,
        class_weights="balanced", max_eval_rows=10_000, eval_every=0, save_every=200, progress=False,
        device=args.device, threads=args.threads, overwrite=True), Path(args.home))
    out["sentiment3"] = {"train_rows": sum(1 for _ in open(train)), "eval": f"{args.sent3_heldback} held-back "
                         f"TweetEval validation rows", "accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
                         "macro_recall": r["macro_recall"], "recall": r["recall"],
                         "seconds": round(time.time() - t0, 1)}
    return out


# ---------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arm", choices=["parley", "trainer"], help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--home", default=os.environ.get("PARLEY_HOME", str(Path.home() / ".parley")))
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=96, help="GSM8K training rows for the throughput part")
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in every arm (0: torch default)")
    p.add_argument("--skip-gsm8k", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--gsm8k-rows", type=int, default=400)
    p.add_argument("--gsm8k-steps", type=int, default=40)
    p.add_argument("--gsm8k-lr", type=float, default=1e-3)
    p.add_argument("--gsm8k-eval", type=int, default=24, help="held-out questions answered by base and adapter")
    p.add_argument("--gen-tokens", type=int, default=192)
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--classifiers", action="store_true", help="also train the SST-2 and 3-class sentiment classifiers")
    p.add_argument("--sst2-rows", type=int, default=12000)
    p.add_argument("--sent3-heldback", type=int, default=600)
    p.add_argument("--sent3-epochs", type=int, default=2)
    p.add_argument("--sent3-repeat", type=int, default=2, help="times the in-domain TweetEval rows are repeated")
    p.add_argument("--sent3-vader", default="tweets", help="VADER files to add (comma list of name prefixes)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "parley-bench-finetune"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    import logging

    logging.getLogger("finetune").setLevel(logging.WARNING)
    if args.arm:
        result = arm_parley(args) if args.arm == "parley" else arm_trainer(args)
        print(json.dumps(result))
        return

    import torch

    report: dict = {"device": args.device, "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
                    "model": args.model, "config": {k: v for k, v in vars(args).items() if k not in ("arm",)}}
    if args.device.startswith("cuda") and torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
    if not args.skip_throughput:
        trainer = run_arm("trainer", args)
        parley = run_arm("parley", args)
        parley["padded_tokens"] = parley_padding(args)
        for r in (trainer, parley):
            r["padding_share"] = round(1 - r["tokens"] / r["padded_tokens"], 3)
        report["throughput"] = {"trainer": trainer, "parley": parley,
                                "speedup": round(parley["tokens_per_s"] / trainer["tokens_per_s"], 2)}
        print(f"\nLoRA throughput: {args.model}, {args.rows} GSM8K rows, batch {args.batch_size}, max_length "
              f"{args.max_length}, rank {args.rank}, {args.steps} steps, {args.device}")
        print(f"{'arm':<22}{'tok/s':>9}{'labelled tok/s':>16}{'padding':>9}{'peak MB':>9}{'eval loss':>11}")
        for name, r in (("transformers.Trainer", trainer), ("parley finetune", parley)):
            print(f"{name:<22}{r['tokens_per_s']:>9.1f}{r['trained_tokens_per_s']:>16.1f}{r['padding_share']:>9.1%}"
                  f"{r['peak_memory_mb']:>9.0f}{r['eval_loss']:>11.4f}")
        print(f"speedup (tokens/s): {report['throughput']['speedup']}x")
    if not args.skip_gsm8k:
        g = gsm8k_eval(args)
        report["gsm8k"] = g
        print(f"\nGSM8K: LoRA on {g['train_rows']} train rows, {g['steps']} steps of {g['batch_size']} "
              f"({g['train_seconds']} s); {g['eval_questions']} held-out questions, greedy, "
              f"{g['max_new_tokens']} new tokens")
        print(f"{'model':<16}{'ends in #### N':>16}{'accuracy':>10}")
        for name in ("base", "adapter"):
            print(f"{name:<16}{g[name]['format_share']:>16.1%}{g[name]['accuracy']:>10.1%}")
    if args.classifiers:
        c = report["classifiers"] = classifier_runs(args)
        print("\nClassifiers (MiniLM fine-tuned):")
        print(f"  SST-2 binary, {c['sst2_binary']['train_rows']} train rows: accuracy "
              f"{c['sst2_binary']['accuracy']:.4f}, macro-F1 {c['sst2_binary']['macro_f1']:.4f} on {c['sst2_binary']['eval']}")
        s3 = c["sentiment3"]
        print(f"  3-class, {s3['train_rows']} train rows: macro-recall {s3['macro_recall']:.4f}, accuracy "
              f"{s3['accuracy']:.4f}, macro-F1 {s3['macro_f1']:.4f} on {s3['eval']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file() and (args.skip_gsm8k or args.skip_throughput or args.classifiers):  # keep other parts
        previous = json.loads(out.read_text())
        for key in ("throughput", "gsm8k", "classifiers"):
            if key not in report and key in previous:
                report[key] = previous[key]
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
