"""Tasks: work that loads a model but trains no run, queued for the same worker slots as runs.

`ltm-tui estimate`'s calibration and `ltm-tui judge --model` each load a model onto the device.
Run in the CLI process they would sit beside a worker that trains a 13B base on the same card;
as tasks, the job service starts them in a worker slot (`python -m backend.compute.worker TASK.json`,
the same executor and environment as a run's worker) when one is free, and holds back new
hand-overs to warm workers while a task waits, so it waits for one session at most.

A task lives in `tasks/<id>/`: `task.json` (what to do), `events.jsonl` (its `log`, `error`
and `result` events, read by the manager as a run's are), `result.json` and `task.log` (the worker's output).
Tasks are not kept in the database: the client that asked waits for the answer, and a service
that stops ends its tasks (their outputs, a calibration cached or a run re-scored, stay).
The worker side is `backend.compute.task_worker`.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from backend.core.errors import JobError
from backend.core.events import log_tail, read_events
from backend.core.workspace import Workspace
from backend.jobs.executor import Executor, WorkerHandle, stuck_line

KINDS = ("calibrate", "judge")
WAITING, RUNNING, DONE, FAILED, CANCELLED = "waiting", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
KEEP_FINISHED = 50  # finished tasks remembered for `tasks`; their folders stay on disk
STOP_GRACE_SECONDS = 10.0


@dataclass
class Task:
    task_id: str
    kind: str
    what: str  # one line for people: "calibrate micro:tiny on the default device"
    folder: Path
    status: str = WAITING
    slot: int | None = None
    card: str | None = None  # the slot's GPU, None for the CPU slot
    process: WorkerHandle | None = None
    offset: int = 0
    created: float = field(default_factory=time.time)
    error: str | None = None
    result: Any = None
    stop_asked: float | None = None
    killed: bool = False  # SIGKILL sent: if it is still there, the kernel holds it
    last_sign: float | None = None  # when it last wrote an event (or started)
    stalled: str | None = None  # why the service stopped it as hung

    def row(self) -> dict:
        return {"task_id": self.task_id, "kind": self.kind, "what": self.what, "status": self.status,
                "pid": self.process.pid if self.process is not None and self.status == RUNNING else None,
                "error": self.error, "created": self.created}


class Tasks:
    """The manager's task queue: FIFO, a slot each, ahead of sessions for free slots."""

    def __init__(self, workspace: Workspace, executor: Executor) -> None:
        self.workspace = workspace
        self.executor = executor
        self.tasks: dict[str, Task] = {}
        self.stuck: list[Task] = []  # ended tasks whose process outlived SIGKILL (the manager's `stuck`)
        self.stall_seconds = 0.0  # the manager's stall limit: a task silent this long is stopped (0: never)

    @property
    def folder(self) -> Path:
        return self.workspace.root / "tasks"

    def add(self, kind: str, spec: dict[str, Any], what: str) -> Task:
        if kind not in KINDS:
            raise JobError(f"unknown task {kind!r}; tasks are {', '.join(KINDS)}")
        task_id = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        folder = self.folder / task_id
        folder.mkdir(parents=True)
        body = {**spec, "task": kind, "task_id": task_id, "task_dir": str(folder),
                "workspace": str(self.workspace.root)}
        (folder / "task.json").write_text(json.dumps(body, ensure_ascii=False, indent=1), encoding="utf-8")
        task = Task(task_id, kind, what, folder)
        self.tasks[task_id] = task
        self._forget_old()
        return task

    def get(self, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise JobError(f"no task {task_id!r} in this service (a task ends with the service that ran it)")
        return task

    def waiting(self) -> list[Task]:
        return sorted((t for t in self.tasks.values() if t.status == WAITING), key=lambda t: t.created)

    def running(self) -> list[Task]:
        return [t for t in self.tasks.values() if t.status == RUNNING]

    def held_back(self) -> bool:
        """Whether a task waits: for a slot, or in its executor's queue for a card (a Ray task
        whose actor is not placed yet). Warm workers end with their session meanwhile."""
        return bool(self.waiting()) or any(not getattr(t.process, "started", True) for t in self.running())

    def used_slots(self) -> set[int]:
        """The slots of running tasks (a stuck task's card is the manager's `free_slots` to hold)."""
        return {t.slot for t in self.running() if t.slot is not None}

    def start(self, task: Task, slot_index: int, slot: str | None, on_event: Callable[[dict], None]) -> None:
        task.process = self.executor.start(task.folder / "task.json", slot, tied=True)  # it ends with the service
        task.slot, task.card, task.status = slot_index, slot, RUNNING
        task.last_sign = time.monotonic()
        on_event({"type": "task", "task_id": task.task_id, "status": RUNNING, "pid": task.process.pid})

    def cancel(self, task_id: str, on_event: Callable[[dict], None]) -> Task:
        task = self.get(task_id)
        if task.status == WAITING:
            self._end(task, CANCELLED, on_event, error="cancelled by the user")
        elif task.status == RUNNING and task.stop_asked is None:
            task.stop_asked = time.monotonic()
            task.process.terminate()
        return task

    def tick(self, apply: Callable[[Task, Any], Any], on_event: Callable[[dict], None]) -> None:
        """Read the running tasks' events; settle the ones whose worker exited. `apply` turns a
        finished task's result.json into what its client gets (the judge's rows are stored)."""
        self.stuck = [t for t in self.stuck if t.process.exit_code() is None]
        for task in self.running():
            self._pump(task, on_event)
            self._enforce_stall(task, on_event)
            if task.stop_asked is not None and not task.killed and time.monotonic() - task.stop_asked > STOP_GRACE_SECONDS:
                task.killed = True
                task.process.kill()
            code = task.process.exit_code()
            if code is None:
                if task.killed:
                    self.stuck.append(task)
                    self._end(task, FAILED, on_event, error=stuck_line(task.process.pid))
                continue
            self._pump(task, on_event)
            if task.stalled is not None:
                self._end(task, FAILED, on_event, error=task.stalled)
                continue
            if task.stop_asked is not None:
                self._end(task, CANCELLED, on_event, error="cancelled by the user")
                continue
            path = task.folder / "result.json"
            if code == 0 and path.exists():
                try:
                    result = apply(task, json.loads(path.read_text(encoding="utf-8")))
                except Exception as exc:  # noqa: BLE001 - a full disk, say: the task's client gets the line
                    self._end(task, FAILED, on_event, error=f"its result could not be stored: {exc}")
                    continue
                self._end(task, DONE, on_event, result=result)
            else:
                why = task.error or f"its worker exited with code {code}"
                tail = "" if task.error else log_tail(task.folder / "task.log")
                self._end(task, FAILED, on_event, error=f"{why}; last log: {tail}" if tail else why)

    def stop_all(self) -> None:
        """The service stops: its tasks end (their clients are told the service stopped)."""
        for task in self.running():
            task.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while any(t.process.exit_code() is None for t in self.running()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for task in self.running():
            task.process.kill()
            task.status = CANCELLED

    def _enforce_stall(self, task: Task, on_event: Callable[[dict], None]) -> None:
        """A task (a calibration, a judge) that wrote no event for the stall limit is hung as a
        run's worker would be (a card or file system that stopped answering): it is stopped,
        and fails with the reason, rather than hold its slot, and its client, until morning.
        One still waiting for Ray to place it (`started` False) is not silent, just queued."""
        if not self.stall_seconds or task.stop_asked is not None or task.last_sign is None:
            return
        if not getattr(task.process, "started", True):
            task.last_sign = time.monotonic()
            return
        silent = time.monotonic() - task.last_sign
        if silent >= self.stall_seconds:
            task.stalled = (f"no sign of life from its worker for {silent / 60:.0f} min (a card, driver or file "
                            "system that stopped answering?): it was stopped")
            on_event({"type": "task", "task_id": task.task_id, "status": RUNNING, "message": task.stalled})
            task.stop_asked = time.monotonic()
            task.process.terminate()

    def _pump(self, task: Task, on_event: Callable[[dict], None]) -> None:
        events, task.offset = read_events(task.folder / "events.jsonl", task.offset)
        if events:
            task.last_sign = time.monotonic()
        for e in events:
            if e.get("type") == "log":
                on_event({"type": "task", "task_id": task.task_id, "status": RUNNING, "message": e.get("message")})
            elif e.get("type") == "error":
                task.error = e.get("message")

    def _end(self, task: Task, status: str, on_event, *, error: str | None = None, result: Any = None) -> None:
        task.status, task.error, task.result = status, error if status != DONE else None, result
        on_event({"type": "task", "task_id": task.task_id, "status": status, "error": task.error,
                  "result": result})

    def _forget_old(self) -> None:
        done = sorted((t for t in self.tasks.values() if t.status in FINISHED), key=lambda t: t.created)
        for task in done[:-KEEP_FINISHED] if len(done) > KEEP_FINISHED else []:
            del self.tasks[task.task_id]
