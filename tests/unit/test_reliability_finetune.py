"""Training reliability: checkpoints and adapter folders survive a SIGKILL at any moment, a bad
--overwrite run never costs the working adapter, one writer per run folder, and malformed rows or
gzip bombs are rejected without taking the whole load down."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from finetune import data as D
from finetune import lora, runs
from finetune.errors import DataError, FinetuneError
from tests.unit.finetune_fixtures import one_torch_thread, tiny_lora_config, write_chat_jsonl  # noqa: F401

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------
# A process killed with SIGKILL at every file-system step of a save, a rotation and a folder swap.
# ------------------------------------------------------------------------------------------------
# The driver prepares a starting state once, then for k = 1, 2, ... forks a child that performs
# the operation and kills itself with SIGKILL just before its k-th rename/unlink/rmdir, until a
# child gets through. The test then checks what each kill left behind, as the next run sees it.
DRIVER = r'''
import json, os, shutil, signal, sys
from pathlib import Path

from finetune import runs

scenarios, root = sys.argv[1].split(","), Path(sys.argv[2])
if "swap" not in scenarios:
    import torch
    torch.set_num_threads(1)  # no thread pool in a process that forks


def save(out, step, tag):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    runs.save_checkpoint(out, step, weights={"w": lin.weight.detach() * step}, optimizer=opt,
                         scheduler=sched, state={"tag": tag}, keep=2)


def prepare(scenario, template):
    if scenario == "swap":  # a finished run in staging replaces the adapter folder
        for name, content in (("out", "old"), (".out.staging", "new")):
            folder = template / name
            folder.mkdir(parents=True)
            for f in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
                (folder / f).write_text(f"{content} {f}")
        return lambda dest: runs.replace_dir(dest / ".out.staging", dest / "out")
    save(template, 10, "old")
    if scenario == "resave":  # the same step saved again (Ctrl-C right after a checkpoint)
        return lambda dest: save(dest, 10, "new")
    save(template, 20, "old")  # rotate: a new checkpoint, and the oldest of keep=2 goes
    return lambda dest: save(dest, 30, "new")


report = {}
for scenario in scenarios:
    template = root / scenario / "template"
    act = prepare(scenario, template)
    results = report[scenario] = []
    for k in range(1, 300):
        dest = root / scenario / f"k{k:03d}"
        shutil.copytree(template, dest)
        pid = os.fork()
        if pid == 0:
            calls = [0]

            def deadly(real):
                def wrapped(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == k:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)
                return wrapped

            for name in ("replace", "rename", "unlink", "rmdir"):
                setattr(os, name, deadly(getattr(os, name)))
            act(dest)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        results.append({"k": k, "dir": str(dest), "killed": killed, "status": status})
        if not killed:
            break
print(json.dumps(report))
'''


def kill_at_every_step(scenarios: str, root: Path) -> dict[str, list[dict]]:
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", DRIVER, scenarios, str(root)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for results in report.values():
        assert results[-1]["killed"] is False and results[-1]["status"] == 0, "the operation never completed"
        assert sum(r["killed"] for r in results) >= 3, results  # there were steps to die at
    return report


@pytest.fixture(scope="module")
def checkpoint_kills(tmp_path_factory):
    # One driver process for both checkpoint scenarios: importing torch is most of the cost.
    return kill_at_every_step("resave,rotate", tmp_path_factory.mktemp("sigkill"))


def load(path: Path):
    """Load a checkpoint the way resume does; returns its state (raises if it is incomplete)."""
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    rng = runs.rng_state()  # loading restores the checkpoint's RNG state: keep this process's
    try:
        weights, state = runs.load_checkpoint(path, optimizer=opt, scheduler=sched)
    finally:
        runs.set_rng_state(rng)
    assert set(weights) == {"w"}
    return state


def test_sigkill_while_saving_the_same_step_again_never_loses_it(checkpoint_kills):
    """Before the fix the old checkpoint was deleted before the new one was renamed in."""
    for r in checkpoint_kills["resave"]:
        out = Path(r["dir"])
        runs.clean_partial_checkpoints(out)  # what --resume does first
        found = runs.list_checkpoints(out)
        assert [s for s, _ in found] == [10], (r, sorted(p.name for p in runs.checkpoints_dir(out).iterdir()))
        assert load(found[0][1])["tag"] in ("old", "new"), r
        assert [p.name for p in runs.checkpoints_dir(out).iterdir()] == ["checkpoint-000010"], r


def test_sigkill_while_rotating_checkpoints_leaves_only_complete_ones(checkpoint_kills):
    for r in checkpoint_kills["rotate"]:
        out = Path(r["dir"])
        runs.clean_partial_checkpoints(out)
        found = runs.list_checkpoints(out)
        steps = [s for s, _ in found]
        assert steps[-1] in (20, 30) and set(steps) <= {10, 20, 30}, (r, steps)
        for _, path in found:  # every listed checkpoint really is complete
            load(path)
        assert not [p for p in runs.checkpoints_dir(out).iterdir() if p.name.startswith(".")], r


def test_sigkill_while_swapping_in_a_new_adapter_folder_leaves_old_or_new_whole(tmp_path):
    seen = set()
    for r in kill_at_every_step("swap", tmp_path)["swap"]:
        root = Path(r["dir"])
        runs.recover_dir(root / "out")  # what the next run does first
        contents = {p.name: p.read_text() for p in (root / "out").iterdir()}
        kinds = {text.split()[0] for text in contents.values()}
        assert len(contents) == 3 and len(kinds) == 1, (r, contents)
        seen |= kinds
        assert not (root / ".out.old").exists()
    assert seen == {"old", "new"}


# ------------------------------------------------------------------------------------------------
# --overwrite replaces the adapter only when the new one is complete; one writer per folder
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def chat_file(tmp_path):
    return write_chat_jsonl(tmp_path / "chat.jsonl", 24, seed=1)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def trained(tiny_model_dir, chat_file, tmp_path, parley_home):
    out = tmp_path / "adapters" / "support"
    lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, out, max_steps=3), parley_home)
    return out


def test_overwrite_with_bad_data_keeps_the_working_adapter(tiny_model_dir, trained, tmp_path, parley_home):
    before = snapshot(trained)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n{\"messages\": 3}\n")
    with pytest.raises(DataError):
        lora.train_lora(tiny_lora_config(tiny_model_dir, bad, trained, overwrite=True), parley_home)
    assert snapshot(trained) == before
    assert sorted(p.name for p in trained.parent.iterdir()) == [".support.lock", "support"]


def test_interrupted_overwrite_keeps_the_old_adapter_until_the_new_one_is_complete(
        tiny_model_dir, trained, tmp_path, parley_home):
    before = snapshot(trained)
    other = write_chat_jsonl(tmp_path / "other.jsonl", 24, seed=7)
    config = dict(max_steps=6, save_every=2, seed=3, overwrite=True)

    def interrupt(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(FinetuneError, match="continue with --resume --overwrite"):
        lora.train_lora(tiny_lora_config(tiny_model_dir, other, trained, **config), parley_home, on_step=interrupt)
    assert snapshot(trained) == before  # the working adapter is untouched...
    staging = runs.sibling(trained, "staging")
    assert [s for s, _ in runs.list_checkpoints(staging)] == [2, 3]  # ...and the new run can go on
    seen = []
    result = lora.train_lora(tiny_lora_config(tiny_model_dir, other, trained, resume=True, **config), parley_home,
                             on_step=lambda r: seen.append(r["step"]))
    assert seen[0] == 4 and result["output"] == str(trained)
    after = snapshot(trained)
    assert after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    facts = json.loads((trained / "parley_adapter.json").read_text())
    assert facts["data"][0]["path"] == str(other.resolve())
    assert not staging.exists() and not runs.sibling(trained, "old").exists()


def test_plain_overwrite_replaces_the_adapter_in_one_step(tiny_model_dir, trained, tmp_path, parley_home):
    other = write_chat_jsonl(tmp_path / "other.jsonl", 24, seed=7)
    before = snapshot(trained)
    lora.train_lora(tiny_lora_config(tiny_model_dir, other, trained, max_steps=3, overwrite=True), parley_home)
    after = snapshot(trained)
    assert after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    assert "metrics.jsonl" in after and not runs.sibling(trained, "staging").exists()


def test_a_second_run_into_the_same_folder_is_refused(tiny_model_dir, chat_file, tmp_path, parley_home):
    out = tmp_path / "shared"
    in_step, release = threading.Event(), threading.Event()
    outcome = {}

    def first_run():
        def hold(record):
            in_step.set()
            release.wait(30)

        try:
            outcome["first"] = lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, out, max_steps=2),
                                               parley_home, on_step=hold)
        except Exception as exc:  # pragma: no cover - reported by the assertion below
            outcome["first"] = exc

    thread = threading.Thread(target=first_run)
    thread.start()
    try:
        assert in_step.wait(60), "the first run never reached a step"
        files_during = snapshot(out)
        started = time.perf_counter()
        with pytest.raises(FinetuneError, match="another training run is writing to .*shared"):
            lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, out, max_steps=2, overwrite=True),
                            parley_home)
        assert time.perf_counter() - started < 5  # refused at once, not after waiting
        assert snapshot(out) == files_during  # the refused run touched nothing
    finally:
        release.set()
        thread.join(120)
    assert isinstance(outcome["first"], dict) and outcome["first"]["step"] == 2
    # Once the first run is over, the folder is free again (here: replaced, as asked).
    lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, out, max_steps=2, overwrite=True), parley_home)


def test_the_run_lock_is_released_when_its_process_is_killed(tmp_path):
    out = tmp_path / "adapters" / "x"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from finetune.runs import run_lock\n"
                               f"with run_lock(Path({str(out)!r})):\n    print('held', flush=True)\n"
                               "    sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FinetuneError, match="another training run"):
            with runs.run_lock(out):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with runs.run_lock(out):  # no stale lock after kill -9
            pass
    finally:
        holder.kill()


# ------------------------------------------------------------------------------------------------
# 15. Malformed rows are rejected alone; gzip is bounded while it inflates
# ------------------------------------------------------------------------------------------------
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_of_the_wrong_shape_are_rejected_alone(tmp_path):
    rows = [GOOD,
            {"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": {"r": 1}, "content": "hi"}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x",
                                                              "tool_calls": 5}]},
            GOOD]
    examples, report = D.load_examples([write_jsonl(tmp_path / "m.jsonl", rows)])
    assert len(examples) == 2 and report.rows_read == 5
    reasons = {r.source: r.reason for r in report.rejects}
    assert set(reasons) == {"m.jsonl:2", "m.jsonl:3", "m.jsonl:4"}
    assert "role must be a string" in reasons["m.jsonl:2"] and "tool_calls must be a list" in reasons["m.jsonl:4"]

    alpaca = [{"instruction": "say hi", "output": "hi"}, {"instruction": "say hi", "output": "hi", "history": 5},
              {"instruction": "say hi", "output": "hi", "history": {"a": 1}}]
    examples, report = D.load_examples([write_jsonl(tmp_path / "a.jsonl", alpaca)])
    assert len(examples) == 1 and [r.source for r in report.rejects] == ["a.jsonl:2", "a.jsonl:3"]
    assert all("history" in r.reason for r in report.rejects)


def test_an_unforeseen_shape_error_rejects_the_row_not_the_load(tmp_path, monkeypatch):
    """The safety net: whatever TypeError a future normalizer trips over stays with its row."""
    real = D.NORMALIZERS["messages"]

    def fragile(row):
        if row.get("boom"):
            return sum(row["boom"])  # TypeError: 'int' object is not iterable
        return real(row)

    monkeypatch.setitem(D.NORMALIZERS, "messages", fragile)
    examples, report = D.load_examples([write_jsonl(tmp_path / "m.jsonl", [GOOD, {**GOOD, "boom": 1}, GOOD])])
    assert len(examples) == 2
    assert report.rejects[0].source == "m.jsonl:2" and "malformed row" in report.rejects[0].reason


def gzip_bomb(path: Path, inflated_mb: int, head: bytes = b"") -> Path:
    """A gzip file of a few kilobytes that inflates to ``inflated_mb`` MB of zeros."""
    chunk = b"0" * (1 << 20)
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(head)
        for _ in range(inflated_mb):
            fh.write(chunk)
    return path


@pytest.mark.parametrize("name, head", [("bomb.jsonl.gz", b""), ("bomb.json.gz", b"["),
                                        ("bomb.csv.gz", b"text,label\n")])
def test_a_gzip_bomb_is_stopped_while_it_inflates(tmp_path, name, head):
    bomb = gzip_bomb(tmp_path / name, 48, head)
    assert bomb.stat().st_size < 200_000  # passes the size check on the compressed file
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="inflates to more than"):
            list(D.read_records(bomb, max_file_bytes=4_000_000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16_000_000, f"{peak / 1e6:.0f} MB held while reading"  # never the whole 48 MB


def test_ordinary_gzip_files_still_load(tmp_path):
    path = tmp_path / "chat.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        for _ in range(50):
            fh.write(json.dumps(GOOD) + "\n")
    examples, report = D.load_examples([path], max_file_bytes=1_000_000)
    assert len(examples) == 50 and not report.rejects


def test_a_csv_cell_above_the_csv_module_limit_is_a_data_error_naming_the_line(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("text,label\nfine,1\n\"" + "x" * 200_000 + "\",0\n")
    with pytest.raises(DataError, match=r"big.csv:\d+: field larger than field limit"):
        list(D.read_records(path))
