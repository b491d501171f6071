"""Hugging Face Spaces entry point (`app_file: ui/space.py`, written by `parley space export`).

On a Space the model may come from the Hub (Spaces have network access), so the default here is
the Hub copy of the embedded model; storage lives where PARLEY_HOME points (Spaces no longer offer
a persistent /data disk: mount a bucket or accept that history resets on restart).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the Space runs this file directly

SPACE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def create():
    """Build the runtime and the Gradio app from PARLEY_* variables (Space secrets/variables)."""
    from bot.config import load_settings
    from bot.runtime import build_runtime
    from ui.app import build_ui

    os.environ.setdefault("HF_HUB_OFFLINE", "0")  # a Space may download the model once
    flags = {} if os.environ.get("PARLEY_MODEL") else {"model": SPACE_MODEL}
    # A Space is public: visitors without a login each get their own browser-scoped data and no
    # admin actions (training, adapters); set PARLEY_AUTH (a Space secret) to log in as an admin.
    flags.update(host="0.0.0.0", insecure_public=True)
    settings = load_settings(flags)
    runtime = build_runtime(settings, progress=False)
    # hf_oauth: true in the Space's README makes Hugging Face set OAUTH_CLIENT_ID: sign-in is on.
    runtime.access.oauth = bool(os.environ.get("OAUTH_CLIENT_ID"))
    return runtime, build_ui(runtime)


if __name__ == "__main__":
    runtime, demo = create()
    auth = runtime.access.check_login if runtime.access.login_required else None
    demo.launch(server_name="0.0.0.0", server_port=int(os.environ.get("PORT", 7860)), auth=auth,
                show_error=False)
