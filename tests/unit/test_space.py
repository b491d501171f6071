"""The Hugging Face Space export: front matter, requirements, an app file that builds the chat."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bot.errors import ConfigError
from bot.space import export_space


def test_export_writes_a_gradio_space(tmp_path):
    out = export_space(tmp_path / "space")
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\n") and "sdk: gradio" in readme and "app_file: ui/space.py" in readme
    reqs = (out / "requirements.txt").read_text().split()
    assert "torch" in reqs and any(r.startswith("gradio") for r in reqs)
    assert (out / "ui" / "space.py").is_file() and (out / "bot" / "engine.py").is_file()
    with pytest.raises(ConfigError, match="not empty"):
        export_space(out)


def test_space_app_builds_the_chat_from_env(tiny_model_dir, tmp_path):
    code = ("import sys; sys.path.insert(0, '.');"
            "from ui.space import create; runtime, demo = create();"
            "print(type(demo).__name__, runtime.engine.model_name)")
    env = {"PARLEY_MODEL": str(tiny_model_dir), "PARLEY_HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Blocks" in result.stdout and str(tiny_model_dir) in result.stdout
