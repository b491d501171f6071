"""Training jobs: data and settings in, an adapter the chat serves at once out.

A job is a background process that outlives the browser tab and the server that started it:

    server ── start ──> python -m bot.jobs run RUN_DIR        (the runner: lowest CPU priority, own session)
                            └─ parley finetune lora ...       (stage 1: SFT, or the only stage)
                            └─ parley finetune dpo ...        (stage 2 of "SFT then DPO", or the only stage)

The runner starts each stage as a child, forwards Stop and save (SIGUSR1: the recipe finishes its
step, checkpoints and saves a usable adapter) and Cancel (SIGTERM), samples the trainer's memory and
CPU, and writes every outcome into the run folder. The server keeps nothing the run folder does not
hold: after a restart ``TrainingJobs`` reads each PARLEY_HOME/runs/NAME/job.json, reattaches to runs
whose runner is still alive, and marks the others interrupted (Resume continues them from their
newest checkpoint). One job runs at a time; one writer per adapter folder is enforced by the recipes
(finetune/runs.py ``run_lock``).

Run folder, PARLEY_HOME/runs/NAME/::

    job.json          the job: kind, data, settings, and each stage's command and outcome
    train.log         the stages' output
    resources.jsonl   the trainer's memory (RSS, MB) and CPU (%), every 2 seconds

Each stage writes its adapter to PARLEY_HOME/adapters/STAGE_NAME (metrics.jsonl, checkpoints/,
parley_adapter.json): NAME for the last stage, NAME-sft for the SFT stage of "SFT then DPO".
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bot.errors import NotFoundError, RequestError

if TYPE_CHECKING:
    from bot.engine import Engine

log = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
KINDS = ("sft", "dpo", "sft+dpo")
FEEDBACK, PREFERENCES = "feedback", "preferences"
"""Data sources that are not files: the chat's 👍 and corrections (SFT), its votes and corrections (DPO)."""
FINISHED = ("succeeded", "stopped", "failed", "cancelled", "interrupted")
USABLE = ("succeeded", "stopped")
"""Outcomes that leave an adapter the chat can serve ("stopped": Stop and save, resumable)."""
SAMPLE_EVERY_S = 2.0


def _lowest_priority() -> None:  # runs in the child before exec
    try:
        os.nice(19)
    except OSError:
        pass


def _ignore_stop_signal() -> None:  # a trainer ignores Stop until its recipe installs the handler
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _runner_preexec() -> None:
    _lowest_priority()
    _ignore_stop_signal()  # a Stop sent while the runner starts must not end it (the request file stays)


STOP_FILE = "stop-requested"
"""Written by ``stop``: the runner polls it, so a Stop sent before its signal handler exists still counts."""


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written right now
            continue
    return out


def _alive(pid: int | None, marker: str | None = None) -> bool:
    """True when process ``pid`` runs (and, with ``marker``, its command line contains it: a pid
    reused by another program after a reboot does not count)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if marker is None:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust the pid
    return marker in cmdline and ") Z" not in stat  # a zombie has finished


def _error_from_log(log_path: Path, code: int | None) -> str:
    text = Job.read_tail(log_path, 60)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    if errors:
        return errors[-1][len("error:"):].strip()
    return f"training exited with code {code}; see {log_path}"


# ------------------------------------------------------------------------------------------------
# A job, as the server sees it
# ------------------------------------------------------------------------------------------------
@dataclass
class Job:
    name: str
    command: list[str]
    """The first stage's command line."""
    log_path: Path
    adapter_path: Path
    """The adapter the job ends with (its last stage's)."""
    run_dir: Path | None = None
    kind: str = "sft"
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    status: str = "running"  # running, succeeded, stopped, failed, cancelled, interrupted
    error: str | None = None
    process: subprocess.Popen | None = None
    pid: int | None = None
    """The runner's pid (also for a runner another server process started)."""
    stop_requested: bool = False

    @staticmethod
    def read_tail(path: Path, lines: int) -> str:
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - 256 * 1024))
                text = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        # Progress bars rewrite one line with carriage returns; keep the latest state of each.
        return "\n".join(part.split("\r")[-1] for part in text.splitlines()[-lines:])

    def tail(self, lines: int = 15) -> str:
        return self.read_tail(self.log_path, lines)

    @property
    def spec(self) -> dict[str, Any]:
        """job.json as the runner last wrote it ({} for a job without a run folder)."""
        return (_read_json(self.run_dir / "job.json") or {}) if self.run_dir else {}

    def to_dict(self) -> dict[str, Any]:
        spec = self.spec
        return {"name": self.name, "kind": self.kind, "status": self.status, "error": self.error,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "adapter_path": str(self.adapter_path), "log": self.tail(),
                "stages": [{k: s.get(k) for k in ("name", "kind", "status", "error")} for s in spec.get("stages", [])]}


# ------------------------------------------------------------------------------------------------
# The server's side: start, watch, stop, cancel, resume, delete, read
# ------------------------------------------------------------------------------------------------
class TrainingJobs:
    """Starts, watches and lists fine-tuning runs for one server; at most one runs at a time."""

    def __init__(self, engine: "Engine", home: Path, model: str):
        self.engine = engine
        self.home = Path(home)
        self.model = model
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._probing = False
        self._listeners: list[Callable[[Job], None]] = []
        self._reattach()

    # -- where things are ---------------------------------------------------------------------
    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    def run_dir(self, name: str) -> Path:
        return self.runs_dir / name

    def adapter_dir(self, name: str) -> Path:
        return self.home / "adapters" / name

    def running(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.status == "running"), None)

    def add_listener(self, callback: Callable[[Job], None]) -> None:
        """Call ``callback(job)`` when a job ends with a usable adapter, after it is loaded (the
        Compare tab can put the new adapter against the current one)."""
        self._listeners.append(callback)

    # -- start ---------------------------------------------------------------------------------
    def start_from_feedback(self, name: str | None = None, *, max_steps: int | None = None,
                            extra_args: list[str] | None = None) -> Job:
        """Train a LoRA adapter on the chat's rated turns; returns at once, the job runs in the background."""
        settings = {"max_steps": int(max_steps)} if max_steps else {}
        return self.start(name or time.strftime("feedback-%Y%m%d-%H%M%S"), kind="sft", data=FEEDBACK,
                          settings=settings, extra_args=extra_args)

    def start(self, name: str, *, kind: str = "sft", data: str | Path = FEEDBACK,
              dpo_data: str | Path = PREFERENCES, settings: dict[str, Any] | None = None,
              dpo_settings: dict[str, Any] | None = None, eval_data: str | Path | None = None,
              extra_args: list[str] | None = None) -> Job:
        """Start a job; returns at once, the job runs in the background.

        ``kind``: "sft" (LoRA on ``data``: a file, or "feedback"), "dpo" (DPO on ``dpo_data``: a
        pairs file, or "preferences"), or "sft+dpo" (SFT on ``data``, then DPO on ``dpo_data``
        starting from the SFT adapter). ``settings`` are finetune.lora.LoraConfig fields,
        ``dpo_settings`` finetune.dpo.DpoConfig fields; both are checked before anything starts.
        """
        if kind not in KINDS:
            raise RequestError(f"kind {kind!r}: use one of {', '.join(KINDS)}")
        self._check_name(name)
        stages = []
        if kind in ("sft", "sft+dpo"):
            stage_name = f"{name}-sft" if kind == "sft+dpo" else name
            self._check_name(stage_name, what="the SFT stage's adapter name")
            stages.append(self._stage("sft", stage_name, data, settings or {}, eval_data, extra_args))
        if kind in ("dpo", "sft+dpo"):
            init = stages[0]["output"] if stages else None
            stages.append(self._stage("dpo", name, dpo_data, dpo_settings or {},
                                      eval_data if kind == "dpo" else None, extra_args if kind == "dpo" else None,
                                      init_adapter=init))
        spec = {"name": name, "kind": kind, "model": self.model, "created_at": time.time(),
                "data": {"sft": str(data) if kind != "dpo" else None, "dpo": str(dpo_data) if kind != "sft" else None},
                "settings": settings or {}, "dpo_settings": dpo_settings or {}, "status": "running",
                "stages": stages, "resumes": 0}
        with self._lock:
            self._check_free()
            run_dir = self.run_dir(name)
            if run_dir.exists():
                raise RequestError(f"a run named {name!r} already exists: resume it, delete it, or pick another name")
            run_dir.mkdir(parents=True)
            _write_json(run_dir / "job.json", spec)
            job = self._job_from_spec(spec, run_dir)
            self._launch(job)
        return job

    def _check_name(self, name: str, what: str = "adapter name") -> None:
        if not isinstance(name, str) or not NAME.match(name) or name == "base":
            raise RequestError(f"{what} {name!r}: use letters, digits, - and _ (at most 64, not 'base')")
        target = self.adapter_dir(name)
        loaded = self.engine.adapters.get(name)
        if loaded is not None and Path(loaded).resolve() != target.resolve():
            # Replacing it would swap, for everyone, an adapter someone loaded from elsewhere.
            raise RequestError(f"an adapter named {name!r} is already loaded from {loaded}: pick another name")
        if target.exists() or self.run_dir(name).exists():
            raise RequestError(f"a run or adapter named {name!r} already exists: resume it, delete it in the "
                               f"run history, or pick another name")

    def _check_free(self) -> None:
        job = self.running()
        if job is not None:
            raise RequestError(f"training job {job.name!r} is still running: wait for it to finish, stop it "
                               f"or cancel it (DELETE /v1/train/{job.name})")
        if self._probing:
            raise RequestError("a pre-flight estimate is measuring this machine right now: start when it is done")

    def _stage(self, kind: str, name: str, data, settings: dict[str, Any], eval_data, extra_args,
               init_adapter: str | None = None) -> dict[str, Any]:
        """One stage's command, after checking its settings with the recipe's own config class."""
        from finetune.errors import FinetuneError

        data = str(data)
        if kind == "sft":
            from finetune.lora import LoraConfig as Config
        else:
            from finetune.dpo import DpoConfig as Config
        allowed = set(Config.__dataclass_fields__) - {"data", "output", "model", "eval_data", "resume",
                                                      "overwrite", "init_adapter", "progress"}
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise RequestError(f"unknown {kind} setting(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
        try:
            Config(data=[data], output=name, model=self.model, **settings)
        except (FinetuneError, TypeError) as exc:
            raise RequestError(str(exc)) from None
        if data not in (FEEDBACK, PREFERENCES) and not Path(data).expanduser().exists():
            raise RequestError(f"data file {data} does not exist")
        output = self.adapter_dir(name)
        command = [sys.executable, "-m", "bot.cli", "--home", str(self.home), "finetune",
                   "lora" if kind == "sft" else "dpo", "--data", data, "--output", str(output), "--model", self.model]
        if eval_data:
            command += ["--eval-data", str(eval_data)]
        if init_adapter:
            command += ["--init-adapter", str(init_adapter)]
        for key, value in settings.items():
            command += ["--set", f"{key}={value}"]
        command += extra_args or []
        return {"kind": kind, "name": name, "output": str(output), "command": command, "status": "pending"}

    def _job_from_spec(self, spec: dict[str, Any], run_dir: Path) -> Job:
        stages = spec.get("stages") or [{}]
        return Job(name=spec["name"], command=stages[0].get("command", []), log_path=run_dir / "train.log",
                   adapter_path=Path(stages[-1].get("output", self.adapter_dir(spec["name"]))), run_dir=run_dir,
                   kind=spec.get("kind", "sft"), started_at=spec.get("started_at") or spec.get("created_at", time.time()),
                   finished_at=spec.get("finished_at"), status=spec.get("status", "interrupted"),
                   error=spec.get("error"), pid=spec.get("runner_pid"))

    def _launch(self, job: Job, resume: bool = False) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "bot.jobs", "run", str(job.run_dir)] + (["--resume"] if resume else [])
        (job.run_dir / STOP_FILE).unlink(missing_ok=True)
        # The chat comes first: on a machine that serves and trains at once, the trainer runs at the
        # lowest CPU priority so people's replies keep their speed. Its own session: stopping the
        # server (Ctrl-C included) does not stop the run; a restarted server reattaches to it.
        job.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                       stdin=subprocess.DEVNULL, preexec_fn=_runner_preexec, start_new_session=True)
        job.pid = job.process.pid
        job.status, job.error, job.finished_at, job.stop_requested = "running", None, None, False
        self.jobs[job.name] = job
        threading.Thread(target=self._watch, args=(job,), name=f"train-{job.name}", daemon=True).start()

    # -- watch ---------------------------------------------------------------------------------
    def _watch(self, job: Job) -> None:
        if job.process is not None:
            job.process.wait()
        else:  # reattached: the runner is not our child
            while _alive(job.pid, str(job.run_dir)):
                time.sleep(1.0)
        spec = job.spec
        cancelled = job.status == "cancelled"
        if spec.get("status") == "running":  # the runner died without writing its outcome (kill -9, or a
            spec = self._mark_interrupted(job.run_dir, spec, cancelled)  # Cancel while it was starting)
        job.status = "cancelled" if cancelled and spec.get("status") not in USABLE else spec.get("status", "failed")
        job.error = spec.get("error")
        try:
            if job.status in USABLE:
                for stage in spec.get("stages", []):
                    if stage.get("status") in USABLE and _complete_adapter(Path(stage["output"])):
                        try:
                            self.engine.load_adapter(stage["name"], stage["output"])
                        except Exception as exc:  # the run finished but its output is unusable: say so
                            job.error = f"trained, but the adapter could not be loaded: {exc}"
                            job.status = "failed"
                            log.exception("loading the trained adapter failed")
                            return
                for callback in self._listeners:
                    try:
                        callback(job)
                    except Exception:
                        log.exception("a training listener failed")
        finally:
            job.finished_at = spec.get("finished_at") or time.time()

    def _mark_interrupted(self, run_dir: Path, spec: dict[str, Any], cancelled: bool = False) -> dict[str, Any]:
        status = "cancelled" if cancelled else "interrupted"
        for stage in spec.get("stages", []):
            if stage.get("status") == "running":
                stage["status"] = status
        spec.update(status=status, finished_at=time.time(),
                    error=None if cancelled else "the run stopped without finishing (the machine or its runner was "
                                                 "stopped); Resume continues it from its newest checkpoint")
        _write_json(run_dir / "job.json", spec)
        return spec

    def _reattach(self) -> None:
        """Read every run folder: runs whose runner is alive get a watcher, the rest are history."""
        if not self.runs_dir.is_dir():
            return
        for run_dir in sorted(self.runs_dir.iterdir()):
            spec = _read_json(run_dir / "job.json") if run_dir.is_dir() else None
            if not spec or run_dir.name.startswith(".") or spec.get("name") != run_dir.name:
                continue
            job = self._job_from_spec(spec, run_dir)
            if spec.get("status") == "running":
                if _alive(spec.get("runner_pid"), str(run_dir)):
                    job.status = "running"
                    self.jobs[job.name] = job
                    threading.Thread(target=self._watch, args=(job,), name=f"train-{job.name}", daemon=True).start()
                    continue
                spec = self._mark_interrupted(run_dir, spec)
                job = self._job_from_spec(spec, run_dir)
            self.jobs[job.name] = job

    def wait(self, name: str, timeout: float | None = None) -> Job:
        job = self.get(name)
        deadline = None if timeout is None else time.time() + timeout
        while job.finished_at is None and (deadline is None or time.time() < deadline):
            time.sleep(0.2)
        return job

    # -- control -------------------------------------------------------------------------------
    def get(self, name: str) -> Job:
        job = self.jobs.get(name)
        if job is None:
            raise NotFoundError(f"no training run named {str(name)[:64]!r}")
        return job

    def _running_job(self, name: str) -> Job:
        job = self.jobs.get(name)
        if job is None or job.status != "running" or not job.pid:
            raise RequestError(f"no running training job named {str(name)[:64]!r}")
        return job

    def stop(self, name: str) -> Job:
        """Stop and save: the trainer finishes its step, writes a checkpoint and saves the adapter,
        which the chat then serves (status ``stopped``; Resume continues the planned run)."""
        job = self._running_job(name)
        job.stop_requested = True
        (job.run_dir / STOP_FILE).touch()
        os.kill(job.pid, signal.SIGUSR1)
        return job

    def cancel(self, name: str) -> None:
        """Cancel: end the run now; nothing new is saved (checkpoints already written stay, for Resume)."""
        job = self._running_job(name)
        job.status = "cancelled"
        os.kill(job.pid, signal.SIGTERM)

    def resume(self, name: str) -> Job:
        """Continue a stopped, cancelled, failed or interrupted run from its newest checkpoint (a
        stage without one starts again); finished stages are kept."""
        job = self.get(name)
        if job.run_dir is None or not (job.run_dir / "job.json").is_file():
            raise RequestError(f"run {name!r} has no run folder to resume from")
        with self._lock:
            self._check_free()
            spec = job.spec
            if spec.get("status") == "succeeded":
                raise RequestError(f"run {name!r} finished its plan: there is nothing to resume")
            if not any(_checkpoints(Path(s["output"])) for s in spec["stages"] if s.get("status") != "succeeded"):
                if spec.get("status") == "stopped":
                    raise RequestError(f"run {name!r} has no checkpoint to continue from")
            spec.update(status="running", error=None, finished_at=None, resumes=spec.get("resumes", 0) + 1)
            _write_json(job.run_dir / "job.json", spec)
            self._launch(job, resume=True)
        return job

    def delete(self, name: str) -> None:
        """Remove a run: its run folder and its adapters (unloaded first); other runs are untouched."""
        job = self.get(name)
        if job.status == "running":
            raise RequestError(f"run {name!r} is still running: stop or cancel it first")
        stages = job.spec.get("stages") or [{"name": name, "output": str(self.adapter_dir(name))}]
        for stage in stages:
            folder = Path(stage["output"])
            loaded = self.engine.adapters.get(stage["name"])
            if loaded is not None and Path(loaded).resolve() == folder.resolve():
                self.engine.unload_adapter(stage["name"])
            for path in (folder, *(folder.with_name(f".{folder.name}.{k}") for k in ("staging", "old", "lock"))):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists():
                    path.unlink()
        if job.run_dir is not None:
            shutil.rmtree(job.run_dir, ignore_errors=True)
        self.jobs.pop(name, None)

    # -- read: what the Fine-tune tab shows ----------------------------------------------------------
    def metrics(self, name: str) -> list[dict[str, Any]]:
        """Every stage's metrics.jsonl records, in order, each with its ``stage`` kind."""
        job = self.get(name)
        out = []
        for stage in job.spec.get("stages") or [{"kind": job.kind, "output": str(job.adapter_path)}]:
            for record in _read_jsonl(Path(stage["output"]) / "metrics.jsonl"):
                out.append({**record, "stage": stage["kind"]})
        return out

    def resources(self, name: str) -> list[dict[str, Any]]:
        job = self.get(name)
        return _read_jsonl(job.run_dir / "resources.jsonl") if job.run_dir else []

    def revision(self, name: str) -> tuple:
        """Changes whenever anything a viewer of the run would see changes (cheap: file sizes)."""
        job = self.get(name)
        paths = [job.log_path]
        if job.run_dir is not None:
            paths += [job.run_dir / "job.json", job.run_dir / "resources.jsonl"]
        paths += [Path(s["output"]) / "metrics.jsonl" for s in job.spec.get("stages", [])]
        out = []
        for path in paths:
            try:
                st = path.stat()
                out.append((st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    def progress(self, name: str) -> dict[str, Any]:
        """Where a run is: stage, step of total, the recent seconds per step and the ETA."""
        job = self.get(name)
        spec = job.spec
        stages = spec.get("stages", [])
        current = next((s for s in stages if s.get("status") == "running"), None) or (stages[-1] if stages else {})
        records = [r for r in self.metrics(name) if r.get("stage") == current.get("kind")]
        steps = [r for r in records if "loss" in r and "total_steps" in r]
        step = steps[-1]["step"] if steps else 0
        total = steps[-1]["total_steps"] if steps else None
        sec_per_step = recent_seconds_per_step(steps)
        eta = (total - step) * sec_per_step if total and sec_per_step else None
        later = [s["kind"] for s in stages[stages.index(current) + 1:]] if current in stages else []
        elapsed = ((job.finished_at or time.time()) - job.started_at) if job.started_at else None
        return {"status": job.status, "stage": current.get("kind"), "step": step, "total_steps": total,
                "sec_per_step": sec_per_step, "eta_s": eta, "stages_after": later, "elapsed_s": elapsed,
                "stop_requested": job.stop_requested}

    def history(self) -> list[dict[str, Any]]:
        """One row per run, newest first: status, data, settings, final eval loss, duration."""
        rows = []
        for job in sorted(self.jobs.values(), key=lambda j: j.started_at or 0, reverse=True):
            spec = job.spec
            last = (spec.get("stages") or [{}])[-1]
            facts = _read_json(Path(last.get("output", job.adapter_path)) / "parley_adapter.json") or {}
            final = facts.get("metrics", {})
            data = spec.get("data") or {}
            duration = spec.get("active_s", 0.0)
            if job.status == "running" and spec.get("runner_started_at"):
                duration += time.time() - spec["runner_started_at"]
            rows.append({"name": job.name, "kind": job.kind, "status": job.status,
                         "data": ", ".join(Path(v).name if v not in (FEEDBACK, PREFERENCES) else v
                                           for v in data.values() if v),
                         "steps": final.get("step"), "final_eval_loss": final.get("eval_loss"),
                         "reward_margin": final.get("eval_reward_margin"),
                         "duration_s": round(duration, 1) if duration is not None else None,
                         "started_at": job.started_at, "usable": self.usable_adapters(job.name, spec),
                         "resumable": job.status in ("stopped", "failed", "cancelled", "interrupted"),
                         "settings": {**spec.get("settings", {}), **{f"dpo.{k}": v for k, v in spec.get("dpo_settings", {}).items()}}})
        return rows

    def usable_adapters(self, name: str, spec: dict[str, Any] | None = None) -> list[str]:
        """The adapters of a run the chat can serve now (complete, from a stage that succeeded or
        was stopped and saved), last stage first."""
        spec = spec if spec is not None else self.get(name).spec
        return [s["name"] for s in reversed(spec.get("stages", []))
                if s.get("status") in USABLE and _complete_adapter(Path(s["output"]))]

    def effective_settings(self, name: str) -> dict[str, Any]:
        """Every setting a run used: the recipe's defaults overlaid with the job's own."""
        from dataclasses import fields

        spec = self.get(name).spec
        out: dict[str, Any] = {"kind": spec.get("kind"), "model": spec.get("model")}
        for key, value in (spec.get("data") or {}).items():
            out[f"data.{key}"] = value
        for stage in spec.get("stages", []):
            if stage["kind"] == "sft":
                from finetune.lora import LoraConfig as Config
                own = spec.get("settings", {})
            else:
                from finetune.dpo import DpoConfig as Config
                own = spec.get("dpo_settings", {})
            prefix = "" if stage["kind"] == "sft" else "dpo."
            for f in fields(Config):
                if f.name in ("data", "output", "model", "eval_data", "resume", "overwrite", "progress"):
                    continue
                default = f.default if not callable(f.default_factory) else f.default_factory()  # type: ignore[misc]
                out[prefix + f.name] = own.get(f.name, default)
        return out

    # -- pre-flight ----------------------------------------------------------------------------------
    def estimate(self, *, kind: str = "sft", data: str | Path = FEEDBACK, settings: dict[str, Any] | None = None,
                 probe_steps: int = 4, timeout: float = 600) -> dict[str, Any]:
        """Measure a few steps of this data with these settings on this machine, then extrapolate.

        Runs the recipe itself (``parley finetune lora|dpo``) for ``probe_steps`` steps in a
        throw-away folder, at the lowest CPU priority, and blocks until it is done. Returns
        ``estimate_from_probe``'s figures. Refused while a job runs (the two would share the CPU
        and the figures would be wrong).
        """
        import tempfile

        if kind not in ("sft", "dpo"):
            raise RequestError("estimate one recipe at a time: kind sft or dpo")
        probe_steps = max(3, int(probe_steps))
        with self._lock:
            self._check_free()
            self._probing = True
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=".probe-", dir=self.runs_dir))
        try:
            probe = {"stop_after_steps": probe_steps, "eval_at_start": "false", "save_every": 0, "eval_every": 0}
            stage = self._stage(kind, "probe", data, {**(settings or {}), **probe}, None, ["--no-progress"])
            stage["command"][stage["command"].index("--output") + 1] = str(folder / "adapter")
            log_path = folder / "probe.log"
            started = time.time()
            with open(log_path, "wb") as out:
                process = subprocess.Popen(stage["command"], stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, preexec_fn=_lowest_priority,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
            rss_mb = _wait_with_peak_rss(process, timeout)
            records = _read_jsonl(folder / "adapter" / "metrics.jsonl")
            if process.returncode != 0 or not [r for r in records if "loss" in r]:
                raise RequestError("the estimate could not run a training step: "
                                   + _error_from_log(log_path, process.returncode))
            return {**estimate_from_probe(records, peak_rss_mb=rss_mb, probe_wall_s=time.time() - started),
                    "kind": kind}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            with self._lock:
                self._probing = False


def _complete_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()


def _checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints of either recipe (the LoRA recipe's state.json, Trainer's trainer_state.json)."""
    root = folder / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if re.match(r"^checkpoint-\d+$", p.name)
                  and ((p / "state.json").is_file() or (p / "trainer_state.json").is_file()))


def _wait_with_peak_rss(process: subprocess.Popen, timeout: float) -> float | None:
    """Wait for a child and return its peak resident memory in MB (from the kernel's rusage)."""
    deadline = time.time() + timeout
    while True:
        try:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        except ChildProcessError:
            process.wait()
            return None
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2 ** 20
        if time.time() > deadline:
            process.kill()
            process.wait()
            raise RequestError(f"the estimate took more than {timeout:.0f} s: lower max_length or batch_size")
        time.sleep(0.2)


def recent_seconds_per_step(step_records: list[dict[str, Any]], window: int = 5) -> float | None:
    """Median seconds per optimizer step over the last ``window`` steps (from ``elapsed_s``).

    A step's time is the gap to the previous record's, so evaluations and checkpoints between
    steps count (they are part of the time left). The first step of a process is left out: it
    also holds the model load.
    """
    timed = [r for r in step_records if isinstance(r.get("elapsed_s"), (int, float))]
    gaps = [(b["elapsed_s"] - a["elapsed_s"]) / max(1, b["step"] - a["step"])
            for a, b in zip(timed, timed[1:]) if b["step"] > a["step"] and b["elapsed_s"] >= a["elapsed_s"]]
    gaps = gaps[-window:]
    if not gaps:
        return None
    gaps.sort()
    mid = len(gaps) // 2
    return gaps[mid] if len(gaps) % 2 else (gaps[mid - 1] + gaps[mid]) / 2


def estimate_from_probe(records: list[dict[str, Any]], *, planned_steps: int | None = None,
                        peak_rss_mb: float | None = None, probe_wall_s: float | None = None) -> dict[str, Any]:
    """Extrapolate a whole run from a probe's metrics.jsonl records.

    ``records`` are the probe's step records (``step``, ``elapsed_s``, ``total_steps``,
    ``tokens_per_s``). Seconds per step is the median gap between consecutive steps after the
    first; start-up is the first step's ``elapsed_s`` minus one step (reading data, loading the
    model). Total = start-up + planned steps x seconds per step; evaluations add about a third
    of a step per evaluated batch, which the estimate does not know and leaves out (it says so).
    Peak memory is the probe process's peak resident memory.
    """
    steps = sorted((r for r in records if "loss" in r and isinstance(r.get("elapsed_s"), (int, float))),
                   key=lambda r: r["step"])
    if not steps:
        raise RequestError("the probe recorded no training step")
    per_step = recent_seconds_per_step(steps, window=len(steps))
    if per_step is None:  # one step only: the best we have is that step, start-up included
        per_step = steps[0]["elapsed_s"]
    planned = planned_steps or steps[-1].get("total_steps") or steps[-1]["step"]
    startup = max(0.0, steps[0]["elapsed_s"] - per_step)
    total = startup + planned * per_step
    return {"probe_steps": len(steps), "sec_per_step": round(per_step, 3), "planned_steps": int(planned),
            "startup_s": round(startup, 1), "train_s": round(planned * per_step, 1), "total_s": round(total, 1),
            "tokens_per_s": steps[-1].get("tokens_per_s"), "peak_memory_mb": round(peak_rss_mb, 1) if peak_rss_mb else None,
            "probe_wall_s": round(probe_wall_s, 1) if probe_wall_s else None}


# ------------------------------------------------------------------------------------------------
# The runner: `python -m bot.jobs run RUN_DIR [--resume]`, a process of its own
# ------------------------------------------------------------------------------------------------
class _Runner:
    """Runs a job's stages in order and is the only writer of job.json while it lives."""

    def __init__(self, run_dir: Path, resume: bool):
        self.run_dir, self.resume = run_dir, resume
        self.spec = json.loads((run_dir / "job.json").read_text())
        self.child: subprocess.Popen | None = None
        self.stop = threading.Event()
        self.cancel = threading.Event()

    def save(self) -> None:
        _write_json(self.run_dir / "job.json", self.spec)

    def on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGUSR1:
            self.stop.set()
        else:
            self.cancel.set()
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGUSR1 if signum == signal.SIGUSR1 else signal.SIGTERM)

    def run(self) -> int:
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_signal)
        now = time.time()
        self.spec.update(status="running", runner_pid=os.getpid(), error=None, finished_at=None,
                         runner_started_at=now)
        if not self.spec.get("started_at"):
            self.spec["started_at"] = now
        self.save()
        status, error = "succeeded", None
        with open(self.run_dir / "train.log", "ab") as log_file, \
                open(self.run_dir / "resources.jsonl", "a") as resources:
            for stage in self.spec["stages"]:
                if stage.get("status") == "succeeded":
                    continue
                status, error = self.run_stage(stage, log_file, resources)
                if status != "succeeded":
                    break
        end = time.time()
        self.spec.update(status=status, error=error, finished_at=end,
                         active_s=round(self.spec.get("active_s", 0.0) + end - now, 1))
        self.save()
        return 0 if status in USABLE else 1

    def run_stage(self, stage: dict[str, Any], log_file, resources) -> tuple[str, str | None]:
        output = Path(stage["output"])
        command = list(stage["command"])
        if self.resume and _checkpoints(output):
            command.append("--resume")
        elif not _complete_adapter(output) and output.exists():
            # A stage that ran before and left no checkpoint starts again in a clean folder.
            shutil.rmtree(output, ignore_errors=True)
        stage.update(status="running", started_at=time.time(), error=None, last_command=command)
        self.save()
        # The command itself is in job.json ("last_command"); the log says what starts and whether it resumes.
        log_file.write(f"\n=== {stage['kind']} -> {stage['name']}{' (resumed)' if '--resume' in command else ''}\n"
                       .encode())
        log_file.flush()
        if self.cancel.is_set():
            stage["status"] = "cancelled"
            return "cancelled", None
        self.child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      preexec_fn=_ignore_stop_signal,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.watch(stage, resources)
        code = self.child.returncode
        if self.cancel.is_set():
            outcome, error = "cancelled", None
        elif self.stop.is_set() and code != 0 and not _checkpoints(output):
            outcome, error = "cancelled", "stopped before the first training step: there was nothing to save"
        elif code != 0:
            outcome, error = "failed", _error_from_log(self.run_dir / "train.log", code)
        elif not _complete_adapter(output):
            outcome, error = "failed", f"the recipe ended without writing an adapter to {output}; see the log"
        else:
            facts = _read_json(output / "parley_adapter.json") or {}
            outcome = "stopped" if (facts.get("metrics") or {}).get("stopped_at_step") else "succeeded"
            error = None
        stage.update(status=outcome, exit_code=code, finished_at=time.time(), error=error)
        self.save()
        return outcome, error

    def watch(self, stage: dict[str, Any], resources) -> None:
        """Wait for the stage's trainer; sample its memory and CPU; repeat a Stop request until the
        recipe has its handler installed (it ignores SIGUSR1 until then)."""
        pid = self.child.pid
        last_cpu, last_t = _cpu_seconds(pid), time.time()
        started = time.time()
        while self.child.poll() is None:
            time.sleep(0.25)
            if not self.stop.is_set() and (self.run_dir / STOP_FILE).exists():
                self.on_signal(signal.SIGUSR1, None)
            now = time.time()
            if now - last_t < SAMPLE_EVERY_S:
                continue
            if self.stop.is_set():
                try:
                    self.child.send_signal(signal.SIGUSR1)
                except ProcessLookupError:
                    pass
            cpu = _cpu_seconds(pid)
            rss = _rss_mb(pid)
            if rss is not None:
                sample = {"t": round(now, 2), "elapsed_s": round(now - started, 1), "stage": stage["kind"],
                          "rss_mb": rss}
                if cpu is not None and last_cpu is not None:
                    sample["cpu_pct"] = round(100 * (cpu - last_cpu) / (now - last_t), 1)
                resources.write(json.dumps(sample) + "\n")
                resources.flush()
            last_cpu, last_t = cpu, now


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bot.jobs", description="Run a training job's stages "
                                     "(started by the server; not meant to be called by hand)")
    sub = parser.add_subparsers(dest="verb", required=True)
    run = sub.add_parser("run")
    run.add_argument("run_dir", type=Path)
    run.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    return _Runner(args.run_dir, args.resume).run()


if __name__ == "__main__":
    sys.exit(main())
