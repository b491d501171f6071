"""`python -m finetune ...` and `accelerate launch -m finetune ...`: the `parley finetune` verbs alone."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    from bot.config import default_home
    from bot.errors import ParleyError
    from finetune.cli import add_parser

    parser = argparse.ArgumentParser(prog="python -m finetune")
    parser.add_argument("--home", type=Path, default=None, help="PARLEY_HOME (default: $PARLEY_HOME or ~/.parley)")
    sub = parser.add_subparsers(dest="verb", required=True)
    add_parser(sub)
    # `python -m finetune lora ...` reads better than `python -m finetune finetune lora ...`.
    from finetune.cli import VERBS

    argv = list(sys.argv[1:] if argv is None else argv)
    if "finetune" not in argv:
        at = next((i for i, a in enumerate(argv) if a in VERBS), len(argv))
        argv.insert(at, "finetune")
    args = parser.parse_args(argv)
    args.home = (args.home or default_home()).expanduser()
    try:
        return int(args.func(args) or 0)
    except ParleyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
