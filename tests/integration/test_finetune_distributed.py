"""The distributed path for real: 2 CPU processes under `accelerate launch` (DDP over gloo).

Two processes with batch 2 must train exactly what one process with batch 4 trains: the global
batch is split between processes and the loss is normalized over the whole global batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.unit.finetune_fixtures import losses, write_chat_jsonl


def test_two_cpu_processes_match_one(tiny_model_dir, tmp_path):
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    data = write_chat_jsonl(tmp_path / "chat.jsonl", 32, seed=5)
    home = tmp_path / "home"
    common = ["lora", "--data", str(data), "--model", str(tiny_model_dir), "--max-steps", "6", "--rank", "4",
              "--alpha", "8", "--lr", "1e-2", "--grad-accum", "2", "--max-length", "256", "--eval-every", "3",
              "--save-every", "3", "--no-progress", "--device", "cpu", "--threads", "1",
              "--set", "eval_fraction=0.125", "--set", "dropout=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    single = subprocess.run([sys.executable, "-m", "finetune", "--home", str(home), *common, "--batch-size", "4",
                             "--output", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    # --multi_gpu selects accelerate's torchrun launcher; with --device cpu each process joins a
    # gloo process group on the CPU (`--cpu` alone would start independent processes via mpirun).
    double = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "finetune",
                             "--home", str(home), *common, "--batch-size", "2", "--output", str(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("adapter:") == 1  # only the main process reports

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    assert [one[s] for s in one] == pytest.approx([two[s] for s in one], rel=1e-4)
    facts = json.loads((tmp_path / "two" / "parley_adapter.json").read_text())
    assert facts["hyperparameters"]["processes"] == 2 and facts["hyperparameters"]["effective_batch"] == 8
    rng_files = sorted(p.name for p in (tmp_path / "two" / "checkpoints").glob("checkpoint-000006/rng-rank*.pt"))
    assert rng_files == ["rng-rank0.pt", "rng-rank1.pt"]
