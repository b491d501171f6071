"""`parley finetune {lora,dpo,classify,merge,eval}`: flags -> typed configs -> the recipes. Thin.

Settings come from, lowest first: the config dataclass defaults, ``--config recipe.toml`` (flat
keys, or a ``[lora]`` / ``[classify]`` table), ``--set NAME=VALUE`` (any field), the flags below.
``--output NAME`` without a slash saves to PARLEY_HOME/adapters/NAME (LoRA) or
PARLEY_HOME/classifiers/NAME (classifiers); a path is used as given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

VERBS = ("lora", "dpo", "classify", "merge", "eval")


def add_parser(subparsers) -> None:
    """Add the `finetune` verb and its sub-commands to the main CLI's argparse subparsers."""
    ft = subparsers.add_parser("finetune", help="train LoRA adapters and classifiers",
                               description="Train LoRA chat adapters and text classifiers; merge and "
                                           "evaluate adapters.")
    sub = ft.add_subparsers(dest="finetune_verb", required=True, metavar="{lora,dpo,classify,merge,eval}")

    lora = sub.add_parser("lora", help="LoRA fine-tune a chat model on conversations",
                          description="LoRA fine-tune a chat model. Data: OpenAI messages, ShareGPT, Alpaca, "
                                      "prompt/completion or text rows (JSONL, JSON, a datasets folder), or "
                                      "`--data feedback` for the ratings and corrections given in the chat.")
    lora.add_argument("--data", nargs="+", metavar="FILE", help="training files, or `feedback`")
    lora.add_argument("--from-feedback", action="store_true",
                      help="train on the chat's feedback (PARLEY_HOME/parley.db); same as --data feedback")
    lora.add_argument("--eval-data", nargs="+", metavar="FILE", help="evaluation files (default: hold out 5%%)")
    lora.add_argument("--output", "-o", help="output folder, or a bare NAME for PARLEY_HOME/adapters/NAME "
                                             "(default with feedback: feedback-DATE)")
    lora.add_argument("--model", help="base model (default smollm2-135m): embedded name, folder, .gguf or HF id")
    lora.add_argument("--format", help="auto (default), messages, sharegpt, alpaca, prompt_completion, text")
    lora.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    lora.add_argument("--alpha", type=int, help="LoRA alpha (default 32)")
    lora.add_argument("--dropout", type=float, help="LoRA dropout (default 0.05)")
    lora.add_argument("--target-modules", help="all-linear (default) or a comma list like q_proj,v_proj")
    lora.add_argument("--dora", dest="use_dora", action="store_true", default=None, help="use DoRA")
    lora.add_argument("--rslora", dest="use_rslora", action="store_true", default=None, help="use rsLoRA scaling")
    lora.add_argument("--lr", dest="learning_rate", type=float, help="peak learning rate (default 2e-4)")
    lora.add_argument("--batch-size", type=int, help="rows per device per micro-batch (default 4)")
    lora.add_argument("--grad-accum", type=int, help="micro-batches per step (default 4)")
    lora.add_argument("--max-steps", type=int, help="optimizer steps (default: one epoch)")
    lora.add_argument("--epochs", type=int, help="passes over the data when --max-steps is not set (default 1)")
    lora.add_argument("--max-length", type=int, help="longest row in tokens (default 1024)")
    lora.add_argument("--gradient-checkpointing", action="store_true", default=None,
                      help="trade ~30%% speed for much less activation memory")
    lora.add_argument("--precision", help="auto (default), bf16 or fp32")
    lora.add_argument("--eval-every", type=int, help="evaluate every N steps (default 50)")
    lora.add_argument("--nan-policy", help="abort (default) or skip steps with NaN/Inf loss or gradients")
    _common(lora)
    lora.set_defaults(func=run_lora)

    dpo = sub.add_parser("dpo", help="DPO: train a LoRA adapter on preference pairs (better vs worse reply)",
                         description="Direct Preference Optimization with TRL's DPOTrainer and a LoRA adapter. "
                                     "Data: JSONL/JSON/CSV rows with prompt (messages or a string), chosen and "
                                     "rejected (TRL's preference format), or `--data preferences` for the "
                                     "votes and corrections stored by the chat.")
    dpo.add_argument("--data", nargs="+", metavar="FILE", help="preference pair files, or `preferences`")
    dpo.add_argument("--eval-data", nargs="+", metavar="FILE", help="evaluation pairs (default: hold out 10%%)")
    dpo.add_argument("--output", "-o", help="output folder, or a bare NAME for PARLEY_HOME/adapters/NAME")
    dpo.add_argument("--model", help="base model (default smollm2-135m)")
    dpo.add_argument("--init-adapter", help="start from this LoRA adapter (SFT then DPO); it is also the reference")
    dpo.add_argument("--beta", type=float, help="DPO beta (default 0.1)")
    dpo.add_argument("--loss-type", help="sigmoid (default), ipo or hinge")
    dpo.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    dpo.add_argument("--alpha", type=int, help="LoRA alpha (default 32)")
    dpo.add_argument("--lr", dest="learning_rate", type=float, help="peak learning rate (default 5e-5)")
    dpo.add_argument("--batch-size", type=int, help="pairs per micro-batch (default 2)")
    dpo.add_argument("--grad-accum", type=int, help="micro-batches per step (default 4)")
    dpo.add_argument("--max-steps", type=int, help="optimizer steps (default: one epoch)")
    dpo.add_argument("--epochs", type=int, help="passes over the pairs when --max-steps is not set (default 1)")
    dpo.add_argument("--max-length", type=int, help="longest prompt + reply in tokens (default 1024)")
    dpo.add_argument("--precision", help="auto (default), bf16 or fp32")
    dpo.add_argument("--eval-every", type=int, help="evaluate every N steps (default: start and end)")
    dpo.add_argument("--export", metavar="FILE", help="only write the checked pairs as TRL JSONL to FILE, no training")
    _common(dpo)
    dpo.set_defaults(func=run_dpo)

    cls = sub.add_parser("classify", help="fine-tune a small encoder for text classification",
                         description="Fine-tune a pretrained encoder (the embedded MiniLM by default) to "
                                     "classify text; loads with transformers.pipeline('text-classification').")
    cls.add_argument("--data", nargs="+", metavar="FILE", help="training files (TSV/CSV with a header, JSONL, JSON)")
    cls.add_argument("--eval-data", nargs="+", metavar="FILE", help="evaluation files (default: hold out 10%%)")
    cls.add_argument("--text-column", help="column with the text (default: text)")
    cls.add_argument("--label-column", help="column with the label (default: label)")
    cls.add_argument("--labels", help="label names in id order, e.g. negative,positive; numeric labels map "
                                      "to them (default: the sorted distinct labels)")
    cls.add_argument("--output", "-o", help="output folder, or a bare NAME for PARLEY_HOME/classifiers/NAME")
    cls.add_argument("--model", help="encoder (default: the embedded all-MiniLM-L6-v2), a folder or HF id")
    cls.add_argument("--lr", dest="learning_rate", type=float, help="peak learning rate (default 5e-5)")
    cls.add_argument("--batch-size", type=int, help="rows per step (default 32)")
    cls.add_argument("--epochs", type=int, help="passes over the data (default 2)")
    cls.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    cls.add_argument("--max-rows", type=int, help="use at most N training rows (a seeded sample)")
    cls.add_argument("--max-length", type=int, help="longest text in tokens; longer texts are cut (default 128)")
    cls.add_argument("--eval-every", type=int, help="evaluate every N steps (default 200)")
    _common(cls)
    cls.set_defaults(func=run_classify)

    merge = sub.add_parser("merge", help="merge a LoRA adapter into its base model",
                           description="Write base + adapter as one ordinary model folder (safetensors).")
    merge.add_argument("adapter", help="adapter folder, or a NAME under PARLEY_HOME/adapters")
    merge.add_argument("--output", "-o", required=True, help="folder for the merged model")
    merge.add_argument("--model", help="base model (default: the one the adapter records)")
    merge.add_argument("--dtype", default="auto", help="auto (as trained), float32 or bfloat16")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    merge.set_defaults(func=run_merge)

    ev = sub.add_parser("eval", help="compare a base model and an adapter on an eval file",
                        description="Loss, perplexity and a few generations of base vs adapter, side by side.")
    ev.add_argument("adapter", help="adapter folder, or a NAME under PARLEY_HOME/adapters")
    ev.add_argument("--data", nargs="+", required=True, metavar="FILE", help="evaluation files")
    ev.add_argument("--model", help="base model (default: the one the adapter records)")
    ev.add_argument("--format", default="auto", help="data format (default auto)")
    ev.add_argument("--max-rows", type=int, default=200, help="rows used for loss (default 200)")
    ev.add_argument("--samples", type=int, default=3, help="generations shown side by side (default 3)")
    ev.add_argument("--max-new-tokens", type=int, default=128, help="tokens per generation (default 128)")
    ev.add_argument("--max-length", type=int, default=1024, help="longest row in tokens (default 1024)")
    ev.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ev.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    ev.set_defaults(func=run_eval)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a TOML file with settings (flat, or under [lora]/[classify])")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="any setting, e.g. --set warmup_ratio=0.1")
    p.add_argument("--seed", type=int, help="training seed (default 42)")
    p.add_argument("--data-seed", type=int, help="train/eval split seed (default 42)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept (default 2)")
    p.add_argument("--max-reject-share", type=float, help="abort above this share of rejected rows (default 0.05)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the newest checkpoint")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the run already in the output folder (lora: only once the new adapter is "
                        "complete)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def setup_logging() -> None:
    import warnings

    # peft 0.21 calls a transformers 5 property that warns on every run; nothing for the user to do.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    logger = logging.getLogger("finetune")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


_NOT_SETTINGS = {"func", "finetune_verb", "verb", "home", "config", "set", "from_feedback", "command",
                 "settings", "settings_file", "build_assistant", "verbose"}  # added by the main CLI


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from finetune.runs import parse_set_args

    flags = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS and v is not None}
    return {**parse_set_args(args.set), **flags}


def run_lora(args: argparse.Namespace) -> int:
    from finetune.errors import FinetuneError
    from finetune.lora import LoraConfig, train_lora
    from finetune.runs import config_from_sources

    setup_logging()
    if getattr(args, "from_feedback", False):
        if args.data and args.data != ["feedback"]:
            raise FinetuneError("give either --from-feedback or --data FILE, not both")
        args.data = ["feedback"]
    cfg = config_from_sources(LoraConfig, args.config, _overrides(args), "lora")
    result = train_lora(cfg, Path(args.home))
    if not result.get("main_process", True):
        return 0
    if result.get("stopped_early"):
        print(f"stopped after step {result['step']} of {result['total_steps']}; continue with "
              f"{result.get('resume_with', '--resume')}")
    else:
        print(f"adapter: {result['output']}")
    return 0


def run_dpo(args: argparse.Namespace) -> int:
    from finetune.dpo import DpoConfig, export_pairs, load_pairs, train_dpo
    from finetune.runs import config_from_sources

    setup_logging()
    export = getattr(args, "export", None)
    args.export = None
    cfg = config_from_sources(DpoConfig, args.config, _overrides(args), "dpo")
    if export:
        pairs, report = load_pairs(cfg.data, Path(args.home))
        for line in report.lines():
            print(line, file=sys.stderr)
        print(f"{export_pairs(pairs, Path(export))} pairs written to {export}")
        return 0
    result = train_dpo(cfg, Path(args.home))
    margin = result.get("eval_reward_margin")
    print(f"adapter: {result['output']}" + (f"  reward margin {margin:.4f}" if isinstance(margin, float) else "")
          + (f"  (stopped at step {result['step']} of {result['total_steps']}; continue with --resume)"
             if result.get("stopped") else ""))
    return 0


def run_classify(args: argparse.Namespace) -> int:
    from finetune.classify import ClassifyConfig, train_classifier
    from finetune.runs import config_from_sources

    setup_logging()
    cfg = config_from_sources(ClassifyConfig, args.config, _overrides(args), "classify")
    result = train_classifier(cfg, Path(args.home))
    print(f"classifier: {result['output']}  accuracy {result.get('accuracy', float('nan')):.4f}  "
          f"macro-F1 {result.get('macro_f1', float('nan')):.4f}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from finetune.merge import merge_adapter

    setup_logging()
    out = merge_adapter(args.adapter, args.output, home=Path(args.home), model=args.model, dtype=args.dtype,
                        overwrite=args.overwrite)
    print(f"merged model: {out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from finetune.evaluate import compare, format_comparison

    setup_logging()
    result = compare(args.adapter, args.data, home=Path(args.home), model=args.model, fmt=args.format,
                     max_rows=args.max_rows, samples=args.samples, max_new_tokens=args.max_new_tokens,
                     max_length=args.max_length, device=args.device)
    print(format_comparison(result))
    if args.json_out:
        import json

        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0
