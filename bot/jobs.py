"""Fine-tuning jobs started from the running chat: feedback in, an adapter the chat uses at once.

Training runs in a separate process (`parley finetune lora`), so a crash or an out-of-memory in
training never takes the chat server down, and one job runs at a time. When the job succeeds the
new adapter is loaded into the engine under its name, and the next message can use it.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bot.engine import Engine
from bot.errors import RequestError

log = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def _lowest_priority() -> None:  # runs in the child before exec
    try:
        os.nice(19)
    except OSError:
        pass


@dataclass
class Job:
    name: str
    command: list[str]
    log_path: Path
    adapter_path: Path
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    status: str = "running"  # running, succeeded, failed, cancelled
    error: str | None = None
    process: subprocess.Popen | None = None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        # Progress bars rewrite one line with carriage returns; keep the latest state of each.
        return "\n".join(part.split("\r")[-1] for part in text.splitlines()[-lines:])

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "error": self.error, "started_at": self.started_at,
                "finished_at": self.finished_at, "adapter_path": str(self.adapter_path), "log": self.tail()}


class TrainingJobs:
    """Starts and watches fine-tuning runs for one server; at most one runs at a time."""

    def __init__(self, engine: Engine, home: Path, model: str):
        self.engine = engine
        self.home = Path(home)
        self.model = model
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def running(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.status == "running"), None)

    def start_from_feedback(self, name: str | None = None, *, max_steps: int | None = None,
                            extra_args: list[str] | None = None) -> Job:
        """Train a LoRA adapter on the chat's rated turns; returns at once, the job runs in the background."""
        name = name or time.strftime("feedback-%Y%m%d-%H%M%S")
        if not NAME.match(name) or name == "base":
            raise RequestError(f"adapter name {name!r}: use letters, digits, - and _ (not 'base')")
        target = self.home / "adapters" / name
        loaded = self.engine.adapters.get(name)
        if loaded is not None and Path(loaded).resolve() != target.resolve():
            # Replacing it would swap, for everyone, an adapter someone loaded from elsewhere.
            raise RequestError(f"an adapter named {name!r} is already loaded from {loaded}: pick another name")
        with self._lock:
            if self.running():
                raise RequestError(f"training job {self.running().name!r} is still running: wait for it to finish "
                                   f"or cancel it (DELETE /v1/train/{self.running().name})")
            runs = self.home / "runs"
            runs.mkdir(parents=True, exist_ok=True)
            log_path = runs / f"{name}.log"
            command = [sys.executable, "-m", "bot.cli", "--home", str(self.home), "finetune", "lora",
                       "--data", "feedback", "--output", name, "--model", self.model]
            if max_steps:
                command += ["--max-steps", str(int(max_steps))]
            command += extra_args or []
            job = Job(name=name, command=command, log_path=log_path, adapter_path=self.home / "adapters" / name)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            with open(log_path, "wb") as out:
                # The chat comes first: on a machine that serves and trains at once, the trainer runs
                # at the lowest CPU priority so people's replies keep their speed (it takes the
                # cores the chat leaves idle, which between turns is nearly all of them).
                job.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                               stdin=subprocess.DEVNULL, preexec_fn=_lowest_priority)
            self.jobs[name] = job
        threading.Thread(target=self._watch, args=(job,), name=f"train-{name}", daemon=True).start()
        return job

    def cancel(self, name: str) -> None:
        job = self.jobs.get(name)
        if job is None or job.status != "running" or job.process is None:
            raise RequestError(f"no running training job named {name!r}")
        job.status = "cancelled"
        job.process.terminate()

    def _watch(self, job: Job) -> None:
        code = job.process.wait()
        try:
            if job.status == "cancelled":
                return
            if code != 0:
                errors = [line for line in job.tail(40).splitlines() if line.startswith("error:")]
                job.error = (errors[-1][len("error:"):].strip() if errors
                             else f"training exited with code {code}; see {job.log_path}")
                job.status = "failed"
                return
            try:
                self.engine.load_adapter(job.name, str(job.adapter_path))
                job.status = "succeeded"
            except Exception as exc:  # the run finished but its output is unusable: say so
                job.error = f"trained, but the adapter could not be loaded: {exc}"
                job.status = "failed"
                log.exception("loading the trained adapter failed")
        finally:
            job.finished_at = time.time()

    def wait(self, name: str, timeout: float | None = None) -> Job:
        job = self.jobs[name]
        deadline = None if timeout is None else time.time() + timeout
        while job.finished_at is None and (deadline is None or time.time() < deadline):
            time.sleep(0.2)
        return job
