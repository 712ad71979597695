"""The job manager: corpora in, runs queued, workers started, their events turned into states.

This is the part of the service that owns the queue. `ltm-tui run` drives it in-process for
now; the job service will host the same object behind its socket. It never imports torch:
training happens in worker subprocesses (`python -m backend.worker`), started in their own
session with their own log file, which write only their run folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from backend.corpora import expand_paths, inspect_corpus
from backend.errors import CorpusError, JobError, LtmError
from backend.events import read_events
from backend.states import JobState
from backend.store import Store
from backend.workspace import PROJECT_ROOT, Workspace

EventHook = Callable[[dict], None]
STOP_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class JobSettings:
    """What a batch of jobs shares: the base, the battery and the training knobs."""

    base: dict[str, Any]  # BaseSpec fields: base, preset, quant, trust_remote_code, device
    scenes: str  # folder or file of batteries
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    lora: dict[str, Any] = field(default_factory=dict)  # LoraSettings overrides (HF bases)

    def base_label(self) -> str:
        b = self.base
        if b.get("base") == "micro":
            return f"micro:{b.get('preset', 'small')}"
        return b["base"] + (f" ({b['quant']})" if b.get("quant") else "")

    def baseline_key(self, seed: int) -> str:
        """Runs with the same key share one baseline: same base, same batteries, same seed."""
        battery_hash = _battery_fingerprint(Path(self.scenes))
        blob = json.dumps([self.base, battery_hash, seed], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _battery_fingerprint(path: Path) -> str:
    files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Submission:
    run_ids: list[str]
    baseline_ids: list[str]
    errors: list[CorpusError]


def new_run_id(label: str, seed: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()[:24] or "run"
    return f"{stem}-s{seed}-{secrets.token_hex(3)}"


class JobManager:
    def __init__(self, workspace: Workspace, store: Store) -> None:
        self.workspace = workspace.ensure()
        self.store = store
        self._cancelled: set[str] = set()  # runs whose worker must be stopped

    # -- queueing ---------------------------------------------------------------------------

    def submit(
        self,
        paths: Iterable[str | os.PathLike],
        settings: JobSettings,
        *,
        seeds: Iterable[int] = (0,),
        priority: int = 0,
    ) -> Submission:
        """Inspect each corpus and queue one run per corpus and seed, plus the baselines the
        batch needs. A bad file becomes an error in the result; the good ones are queued."""
        files, errors = expand_paths(paths)
        infos = []
        for path in files:
            try:
                infos.append(inspect_corpus(path))
            except CorpusError as exc:
                errors.append(exc)
        seeds = list(seeds)
        baselines = [self._ensure_baseline(settings, seed, priority) for seed in seeds] if infos else []
        run_ids = []
        for info in infos:
            corpus_id = self.store.add_corpus(info.to_dict())
            for seed in seeds:
                run_id = new_run_id(Path(info.name).stem, seed)
                run_dir = self.workspace.run_dir(run_id)
                self.store.create_run(
                    run_id,
                    kind="adapter",
                    base=settings.base_label(),
                    settings=self._settings_record(settings, seed),
                    corpus_id=corpus_id,
                    corpus_path=str(info.path),
                    seed=seed,
                    priority=priority,
                    run_dir=str(run_dir),
                )
                run_ids.append(run_id)
        return Submission(run_ids, [b for b in baselines if b], errors)

    def _settings_record(self, settings: JobSettings, seed: int) -> dict:
        return {
            "base": settings.base,
            "scenes": settings.scenes,
            "train": settings.train,
            "lora": settings.lora,
            "baseline_key": settings.baseline_key(seed),
        }

    def _ensure_baseline(self, settings: JobSettings, seed: int, priority: int) -> str | None:
        """The base evaluated once per battery: reuse a live or finished one, else queue one."""
        key = settings.baseline_key(seed)
        for run in self.store.list_runs():
            if run["kind"] != "baseline" or run["settings"].get("baseline_key") != key:
                continue
            if run["status"] in ("failed", "cancelled", "interrupted"):
                continue
            return run["run_id"]
        run_id = new_run_id(f"base-{settings.base_label()}", seed)
        self.store.create_run(
            run_id,
            kind="baseline",
            base=settings.base_label(),
            settings=self._settings_record(settings, seed),
            seed=seed,
            priority=priority + 1,  # the comparison row comes first
            run_dir=str(self.workspace.run_dir(run_id)),
        )
        return run_id

    def cancel(self, run_id: str) -> None:
        run = self._run(run_id)
        self.store.transition(run_id, JobState.CANCELLED, error="cancelled by the user")
        # A running job's worker is stopped by whoever holds its process (run_queue).
        self._cancelled.add(run["run_id"])

    def retry(self, run_id: str) -> None:
        """Back to the queue; the worker resumes from the newest checkpoint in the run folder."""
        self._run(run_id)
        self.store.transition(run_id, JobState.QUEUED)

    def _run(self, run_id: str) -> dict:
        run = self.store.get_run(run_id)
        if run is None:
            raise JobError(f"no run {run_id!r} in {self.workspace.root}; `ltm-tui status` lists them")
        return run

    # -- running ----------------------------------------------------------------------------

    def sessions(self) -> list[list[dict]]:
        """Queued runs grouped so that each group shares one loaded base (baselines first)."""
        groups: dict[str, list[dict]] = {}
        for run in self.store.list_runs(status=["queued"]):
            s = run["settings"]
            key = json.dumps([s["base"], s["scenes"], s.get("train"), s.get("lora")], sort_keys=True)
            groups.setdefault(key, []).append(run)
        for runs in groups.values():
            runs.sort(key=lambda r: (r["kind"] != "baseline", -r["priority"], r["created_at"]))
        return list(groups.values())

    def run_queue(self, on_event: EventHook | None = None, poll_seconds: float = 0.25) -> bool:
        """Run every queued job to a terminal state; True when all of them ended `done`."""
        all_ok = True
        while True:
            groups = self.sessions()
            if not groups:
                return all_ok
            all_ok &= self._run_session(groups[0], on_event or (lambda e: None), poll_seconds)

    def _write_session(self, runs: list[dict]) -> Path:
        s = runs[0]["settings"]
        session = {
            "base": s["base"],
            "scenes": s["scenes"],
            "jobs": [
                {
                    "run_id": r["run_id"],
                    "kind": r["kind"],
                    "corpus_path": r["corpus_path"],
                    "run_dir": r["run_dir"],
                    "seed": r["seed"],
                    "train": s.get("train") or {},
                    "lora": s.get("lora") or {},
                }
                for r in runs
            ],
        }
        for r in runs:
            Path(r["run_dir"]).mkdir(parents=True, exist_ok=True)
            (Path(r["run_dir"]) / "job.json").write_text(json.dumps(r, default=str, indent=1))
        path = self.workspace.sessions_dir / f"session-{int(time.time())}-{secrets.token_hex(3)}.json"
        path.write_text(json.dumps(session, indent=1))
        return path

    def start_worker(self, session_path: Path) -> subprocess.Popen:
        """A worker in its own session (setsid) with its own log: a client's exit or a dropped
        terminal does not reach it."""
        log_path = session_path.with_suffix(".log")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "backend.worker", str(session_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )

    def _run_session(self, runs: list[dict], on_event: EventHook, poll: float) -> bool:
        session_path = self._write_session(runs)
        proc = self.start_worker(session_path)
        offsets = {r["run_id"]: 0 for r in runs}
        dirs = {r["run_id"]: Path(r["run_dir"]) for r in runs}
        on_event({"type": "worker", "pid": proc.pid, "runs": list(offsets)})
        try:
            while True:
                exited = proc.poll() is not None
                for run_id in offsets:
                    events, offsets[run_id] = read_events(dirs[run_id] / "events.jsonl", offsets[run_id])
                    for event in events:
                        self._apply(run_id, event, on_event)
                if any(r in self._cancelled for r in offsets) and not exited:
                    self.stop_worker(proc)
                    continue
                if exited:
                    break
                time.sleep(poll)
        except KeyboardInterrupt:
            self.stop_worker(proc)
            self._settle(runs, proc, session_path, on_event, reason="stopped by Ctrl-C")
            raise
        return self._settle(runs, proc, session_path, on_event, reason=None)

    def stop_worker(self, proc: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM to the worker's process group (it checkpoints), a grace period, then SIGKILL."""
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _settle(self, runs, proc, session_path: Path, on_event: EventHook, reason: str | None) -> bool:
        """After the worker exits, every run it held is settled: a run it had started ends
        `interrupted` (retry resumes it), one it never reached stays queued after a Ctrl-C
        and fails after a crash, each with the tail of its log."""
        ok = True
        for r in runs:
            state = JobState(self.store.get_run(r["run_id"])["status"])
            ok &= state is JobState.DONE
            if state.is_terminal() or (state is JobState.QUEUED and reason):
                continue
            why = reason or f"worker exited with code {proc.returncode}"
            tail = log_tail(Path(r["run_dir"]) / "train.log") or log_tail(session_path.with_suffix(".log"))
            message = f"{why}; last log: {tail}" if tail else why
            target = JobState.FAILED if state is JobState.QUEUED else JobState.INTERRUPTED
            self.store.transition(r["run_id"], target, error=message)
            on_event({"type": "state", "run_id": r["run_id"], "status": target.value, "error": message})
        self._cancelled.difference_update(r["run_id"] for r in runs)
        return ok

    def _apply(self, run_id: str, event: dict, on_event: EventHook) -> None:
        """One event from a worker → the run's state (guarded) and the caller's hook."""
        kind = event.get("type")
        run = self.store.get_run(run_id)
        state = JobState(run["status"])
        if state.is_terminal():
            return  # a cancelled run's late events change nothing
        try:
            if kind == "phase":
                target = {
                    "starting": JobState.STARTING,
                    "training": JobState.TRAINING,
                    "evaluating": JobState.EVALUATING,
                }.get(event.get("phase"))
                if target is not None and target is not state:
                    self._to(run_id, state, target)
                    on_event({"type": "state", "run_id": run_id, "status": target.value, **event})
            elif kind == "progress":
                self.store.add_curve_points(run_id, [event])
                on_event(event)
            elif kind == "error":
                self.store.transition(run_id, JobState.FAILED, error=event.get("message"))
                on_event({"type": "state", "run_id": run_id, "status": "failed", "error": event.get("message")})
            elif kind == "result":
                self.ingest(run_id)
                on_event({"type": "state", "run_id": run_id, "status": "done", **event})
            else:
                on_event(event)
        except LtmError as exc:
            on_event({"type": "log", "run_id": run_id, "message": exc.one_line()})

    def _to(self, run_id: str, state: JobState, target: JobState) -> None:
        if state is JobState.QUEUED and target is not JobState.STARTING:
            self.store.transition(run_id, JobState.STARTING)
        self.store.transition(run_id, target)

    def ingest(self, run_id: str) -> bool:
        """Read result.json into the store once, then mark the run done."""
        run = self._run(run_id)
        path = Path(run["run_dir"]) / "result.json"
        result = json.loads(path.read_text(encoding="utf-8"))
        fresh = self.store.ingest_result(run_id, result)
        state = JobState(self.store.get_run(run_id)["status"])
        if state is not JobState.DONE:
            if state is JobState.QUEUED or state is JobState.STARTING:
                self._to(run_id, state, JobState.EVALUATING)
            elif state is not JobState.EVALUATING:
                self.store.transition(run_id, JobState.EVALUATING)
            self.store.transition(run_id, JobState.DONE)
        return fresh


def log_tail(path: Path, lines: int = 3, max_chars: int = 400) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 8192))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    tail = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(tail)[-max_chars:]
