"""`parley space export DIR`: a folder ready to push as a Hugging Face Space (Gradio SDK)."""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

from bot.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "ui", "retrieval", "finetune")


def space_readme(title: str, gradio_version: str) -> str:
    return f"""---
title: {title}
emoji: 💬
colorFrom: indigo
colorTo: green
sdk: gradio
sdk_version: {gradio_version}
app_file: ui/space.py
python_version: "3.11"
pinned: false
hf_oauth: true
---

# {title}

Parley, a chat assistant you can train. Settings come from the Space's variables and secrets:
`PARLEY_MODEL` (default HuggingFaceTB/SmolLM2-135M-Instruct), `PARLEY_SYSTEM_PROMPT`, `PARLEY_AUTH`
(user:password), `PARLEY_HOME` (where conversations, indexes and adapters live), `PARLEY_ADMINS`
(Hugging Face user names who may train and manage adapters).

Visitors sign in with Hugging Face (the "Sign in" button); their chats and documents are their own.
Visitors who do not sign in still chat, with data kept per browser, and no admin actions.
"""


def export_space(target: Path, *, title: str = "Parley", overwrite: bool = False) -> Path:
    import gradio

    target = Path(target).expanduser()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"{target} is not empty: pick a new folder or pass --overwrite")
    target.mkdir(parents=True, exist_ok=True)
    for package in PACKAGES:
        shutil.rmtree(target / package, ignore_errors=True)
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [d for d in project["dependencies"] if not re.match(r"^torch\b", d)]
    # Spaces install requirements.txt, not pyproject; torch unpinned so the Space picks its build.
    (target / "requirements.txt").write_text("\n".join(["torch", *deps]) + "\n")
    (target / "README.md").write_text(space_readme(title, gradio.__version__), encoding="utf-8")
    return target


def add_parser(subparsers) -> None:
    space = subparsers.add_parser("space", help="export a Hugging Face Space folder")
    verbs = space.add_subparsers(dest="space_verb", required=True)
    export = verbs.add_parser("export", help="write a folder to push as a Gradio Space")
    export.add_argument("target", type=Path)
    export.add_argument("--title", default="Parley")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(func=lambda args: print(export_space(args.target, title=args.title,
                                                             overwrite=args.overwrite)) or 0)
