"""The job manager: corpora in, runs queued, workers started, their events turned into states.

The job service (`backend.service`) hosts one JobManager and calls `tick()` a few times a
second; tests and benchmarks can drive it in-process with `run_queue()`. It never imports torch:
training happens in workers (`python -m backend.compute.worker`) that an executor starts
(`backend.jobs.executor`), which write only their run folders; the manager reads their events.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from backend.core.devices import cuda_entries, visible_cards
from backend.core.errors import CorpusError, JobError, LtmError
from backend.core.events import log_tail, of_attempt, read_events, write_json_atomic
from backend.core.states import EXIT_DEVICE_LOST, EXIT_DISK_FULL, JobState
from backend.core.workspace import Workspace, cancel_marker
from backend.ingest.corpora import expand_paths, inspect_corpus
from backend.jobs.executor import Executor, LocalExecutor, WorkerHandle, recorded_exit, stuck_line
from backend.jobs.settings import JobSettings
from backend.jobs.store import Store
from backend.jobs.tasks import Task, Tasks

EventHook = Callable[[dict], None]
ENDS = ("result", "error")  # the events after which a worker is done with a run
STOP_GRACE_SECONDS = 30.0
# A cancelled run's worker stops it at the next training step, or after the evaluation in progress;
# a worker that has not let go of it by then is stopped whole (its other runs go back to the queue).
CANCEL_GRACE_SECONDS = 300.0
# A worker holding a run writes an event at least every step, every second of its evaluation and
# at each phase; one silent this long is hung (a card or driver that stopped answering, a file
# system that stopped reading) and is stopped, and its run queued again once by itself. A base's
# load speaks while it moves bytes (`events.LoadWatch`): a long download is not silent. 0: never.
STALL_SECONDS = 30 * 60.0
STALL_ENV = "LTM_STALL_SECONDS"


@dataclass
class Submission:
    run_ids: list[str]
    baseline_ids: list[str]  # the baseline each run is measured against, queued now or before
    errors: list[CorpusError]
    new_baseline_ids: list[str] = field(default_factory=list)  # those queued by this submission


Inspection = tuple[list, list[CorpusError]]  # (CorpusInfo of each good file, one error per bad one)


def inspect_files(paths: Iterable[str | os.PathLike]) -> Inspection:
    """Expand folders and inspect every file (streamed: bounded memory whatever its size)."""
    files, errors = expand_paths(paths)
    infos = []
    for path in files:
        try:
            infos.append(inspect_corpus(path))
        except CorpusError as exc:
            errors.append(exc)
        except (OSError, ValueError, RuntimeError, zlib.error) as exc:  # a reader library's own failure
            # one file that no reader foresaw must not stop the batch: its error names it
            errors.append(CorpusError(f"{path} could not be read ({type(exc).__name__}: {exc}); "
                                      "convert it to .txt or .md and queue that"))
    return infos, errors


def new_run_id(label: str, seed: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()[:24] or "run"
    return f"{stem}-s{seed}-{secrets.token_hex(3)}"


class JobManager:
    def __init__(
        self,
        workspace: Workspace,
        store: Store,
        slots: list[str | None] | None = None,
        linger: float = 0.0,
        executor: Executor | None = None,
        max_retries: int = 1,
    ) -> None:
        self.workspace = workspace.ensure()
        self.store = store
        self.executor = executor or LocalExecutor()
        self.adopt_only = False  # watch and settle the workers there are; start none (`stop --all`)
        self.slots = slots if slots is not None else detect_slots()
        # how long a worker that finished its jobs waits for more on the same base (warm worker)
        self.linger = linger
        self.live: dict[int, LiveWorker] = {}  # by pid
        # workers that outlived SIGKILL (the kernel holds them: a GPU driver fault), by pid: their
        # runs are settled, and a card's slot takes no new worker until its process is gone
        self.stuck: dict[int, LiveWorker] = {}
        # a run whose worker was lost with its node (a cluster executor's handle says `lost`) is
        # queued again this many times by itself, resuming from its newest checkpoint
        self.max_retries = max_retries
        self.auto_retries: dict[str, int] = {}
        self.nodes: dict[str, str] = {}  # run -> the cluster node its worker ran on (Ray)
        self.tasks = Tasks(self.workspace, self.executor)  # calibrations and judges, in the same slots
        self.stall_seconds = float(os.environ.get(STALL_ENV) or STALL_SECONDS)
        self.tasks.stall_seconds = self.stall_seconds
        self._load_stuck()  # after the tasks: a slot is picked among those free

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
        return self.enqueue(inspect_files(paths), settings, seeds=seeds, priority=priority)

    def enqueue(
        self,
        inspected: Inspection,
        settings: JobSettings,
        *,
        seeds: Iterable[int] = (0,),
        priority: int = 0,
    ) -> Submission:
        """Queue the inspected corpora (`inspect_files`, which reads every file and so runs
        outside the service's lock): all of the submission's rows are stored, or none."""
        infos, errors = inspected
        self._check_card(settings.base.get("device"))
        # one read of the battery files per submission, not one per corpus and seed
        keys = {seed: settings.baseline_key(seed) for seed in seeds}
        run_ids = []
        with self.store.batch():
            before = {r["run_id"] for r in self.store.list_runs() if r["kind"] == "baseline"} if infos else set()
            baselines = [self.ensure_baseline(settings, seed, keys[seed], priority) for seed in keys] if infos else []
            for info in infos:
                corpus_id = self.store.add_corpus(info.to_dict())
                for seed in keys:
                    run_id = new_run_id(Path(info.name).stem, seed)
                    self.store.create_run(
                        run_id,
                        kind="adapter",
                        base=settings.base_label(),
                        settings=self.settings_record(settings, keys[seed]),
                        corpus_id=corpus_id,
                        corpus_path=str(info.path),
                        seed=seed,
                        priority=priority,
                        run_dir=str(self.workspace.run_dir(run_id)),
                    )
                    run_ids.append(run_id)
        found = [b for b in baselines if b]
        return Submission(run_ids, found, list(errors), [b for b in found if b not in before])

    def settings_record(self, settings: JobSettings, baseline_key: str) -> dict:
        return {
            "base": settings.base,
            "scenes": settings.scenes,
            "train": settings.train,
            "lora": settings.lora,
            "probes": settings.probes,
            "baseline_key": baseline_key,
        }

    def ensure_baseline(self, settings: JobSettings, seed: int, key: str, priority: int) -> str | None:
        """The base evaluated once per battery: reuse a live or finished one, else queue one."""
        for run in self.store.list_runs():
            if run["kind"] != "baseline" or run["settings"].get("baseline_key") != key:
                continue
            if JobState(run["status"]).ended_without_result():
                continue
            return run["run_id"]
        run_id = new_run_id(f"base-{settings.base_label()}", seed)
        self.store.create_run(
            run_id,
            kind="baseline",
            base=settings.base_label(),
            settings=self.settings_record(settings, key),
            seed=seed,
            priority=priority + 1,  # the comparison row comes first
            run_dir=str(self.workspace.run_dir(run_id)),
        )
        return run_id

    def cancel(self, run_id: str, on_event: EventHook | None = None) -> None:
        """Cancel one run and nothing else. A worker holding it in its session skips it; a worker
        training or evaluating it checkpoints, lets go of it and goes on with its other runs."""
        run = self._run(run_id)
        was = JobState(run["status"])
        # the marker first: a worker that reads the new state from nowhere else must not miss it
        marker = cancel_marker(Path(run["run_dir"]), run["attempt"])
        if not was.is_terminal():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        self.store.transition(run_id, JobState.CANCELLED, error="cancelled by the user")
        for worker in self.live.values():
            if run_id not in worker.run_ids:
                continue
            if was is JobState.QUEUED:
                worker.run_ids.remove(run_id)  # it will skip the job: nothing more to watch
            else:
                worker.stopping[run_id] = time.monotonic()
        if on_event is not None:
            on_event({"type": "state", "run_id": run_id, "status": JobState.CANCELLED.value,
                      "error": "cancelled by the user"})

    def retry(self, run_id: str, on_event: EventHook | None = None) -> None:
        """Back to the queue as a new attempt; its worker resumes from the newest checkpoint. A
        worker still letting go of the old attempt keeps it until then (it is still held)."""
        self._run(run_id)
        self.store.transition(run_id, JobState.QUEUED)
        if on_event is not None:
            on_event({"type": "state", "run_id": run_id, "status": JobState.QUEUED.value})

    def _run(self, run_id: str) -> dict:
        run = self.store.get_run(run_id)
        if run is None:
            raise JobError(f"no run {run_id!r} in {self.workspace.root}; `ltm-tui status` lists them")
        return run

    # -- running ----------------------------------------------------------------------------

    def assigned(self) -> set[str]:
        return {r for w in self.live.values() for r in w.run_ids}

    def sessions(self) -> list[list[dict]]:
        """Queued runs no worker holds yet, grouped so that each group shares one loaded base
        (baselines first, then priority, then age: FIFO with priorities)."""
        held = self.assigned()
        groups: dict[str, list[dict]] = {}
        for run in self.store.list_runs(status=["queued"]):
            if run["run_id"] in held:
                continue
            groups.setdefault(_session_key(run["settings"]), []).append(run)
        for runs in groups.values():
            runs.sort(key=lambda r: (r["kind"] != "baseline", -r["priority"], r["created_at"]))
        return sorted(groups.values(), key=lambda g: (-max(r["priority"] for r in g), g[0]["created_at"]))

    def free_slots(self) -> list[int]:
        used = {w.slot for w in self.live.values()} | self.tasks.used_slots()
        # a stuck worker still holds its card's memory and maybe the card itself: every slot of
        # that card waits; on the CPU slot it holds some RAM, and the queue goes on beside it
        # rather than stop for the night
        held = {self.slots[w.slot] for w in self.stuck.values() if w.slot < len(self.slots)}  # a card gone: none
        held |= {t.card for t in self.tasks.stuck}
        used |= {i for i, card in enumerate(self.slots) if card is not None and card in held}
        if getattr(self.executor, "stuck_keeps_slot", False):  # Ray: its actor holds the share
            used |= {w.slot for w in self.stuck.values()}
        return [i for i in range(len(self.slots)) if i not in used]

    def cards(self) -> list[str]:
        """The GPUs the slots name, each once, in order: `--device cuda:N` means the N-th."""
        return list(dict.fromkeys(s for s in self.slots if s is not None))

    def _slot_for_group(self, group: list[dict], free: list[int]) -> int | None:
        """A free slot for a session: the first, or for runs asked onto one card (`--device
        cuda:N`) the first of that card's. A worker sees its slot's card alone, as cuda:0
        (`models.pick_device`)."""
        card = pinned_card(group[0]["settings"]["base"].get("device"))
        cards = self.cards()
        if card is None or card >= len(cards):  # not pinned, or queued under a service with more cards
            return free[0] if free else None
        return next((i for i in free if self.slots[i] == cards[card]), None)

    def _check_card(self, device: str | None) -> None:
        card, cards = pinned_card(device), self.cards()
        local = isinstance(self.executor, LocalExecutor)  # a Ray cluster's cards are on its nodes
        if local and not cards and (device or "").strip().startswith("cuda"):
            raise JobError(f"--device {device}: this machine shows no GPU (NVML finds none, or "
                           "CUDA_VISIBLE_DEVICES hides them); leave --device out to train on the CPU")
        if card is not None and cards and card >= len(cards):
            raise JobError(f"--device {device}: this service has {len(cards)} card(s), cuda:0 to "
                           f"cuda:{len(cards) - 1}; pick one of those or leave --device out")

    def _slot_for(self, slot: str | None) -> int:
        """The slot index for an adopted worker that ran on `slot` (its GPU, or None): a free
        index of that GPU, so that two workers adopted on one card (--slots-per-gpu 2, or Ray's
        actors, whose slots are all None) hold two indices and no third is started beside them;
        one already held only where the service now has fewer slots than the workers it finds."""
        same = [i for i, s in enumerate(self.slots) if s == slot]
        free = set(self.free_slots())
        return next((i for i in same if i in free), same[0] if same else 0)

    def tick(self, on_event: EventHook) -> None:
        """One pass of the scheduler: read every live worker's events, settle the ones that
        exited, and start workers for queued runs while slots are free."""
        for worker in list(self.live.values()):
            self._pump(worker, on_event)
            worker.enforce_cancel()
            worker.enforce_stop()
            self._enforce_stall(worker, on_event)
            code = worker.exit_code()
            if code is not None:
                self._pump(worker, on_event)
                self._settle(worker, on_event)
                del self.live[worker.pid]
            elif worker.killed:
                self._quarantine(worker, on_event)
        for worker in list(self.stuck.values()):
            if worker.exit_code() is not None:
                del self.stuck[worker.pid]
                self._save_stuck()
                on_event({"type": "worker", "pid": worker.pid, "runs": [],
                          "freed": f"stuck worker {worker.pid} is gone at last: its slot takes work again"})
        self.tasks.tick(self._task_result, on_event)
        if self.adopt_only:  # a service started to stop what an earlier one left: it starts nothing
            return
        free = self.free_slots()
        waiting = self.tasks.waiting()
        for task in waiting:  # a task is short: it takes a free slot before the queue's runs
            if not free:
                break
            index = free.pop(0)
            self.tasks.start(task, index, self.slots[index], on_event)
        tasks_wait = self.tasks.held_back()
        if tasks_wait and (idle := self._lingering_worker()) is not None:
            idle.request_stop()
        for group in self.sessions():
            # a free slot runs the group in parallel; with none, a worker already holding the
            # same base takes it next (a 13B base loads slower than it trains on one page),
            # unless a task waits for a slot: then the worker ends with its session
            if (index := self._slot_for_group(group, free)) is not None:
                free.remove(index)
                self.start_session(group, index, on_event)
            elif not tasks_wait and (warm := self._warm_worker_for(group)) is not None:
                self._hand_over(warm, group, on_event)
            elif (idle := self._lingering_worker()) is not None:
                # it only waits for work on its own base: its slot goes to this group, which
                # would otherwise wait out the linger (a search over micro presets, say)
                idle.request_stop()

    # -- tasks: calibrations and judges (backend.jobs.tasks) -------------------------------------

    def submit_task(self, kind: str, spec: dict[str, Any], what: str) -> Task:
        """Queue a task for the next free slot; its events reach the hook given to `tick`."""
        return self.tasks.add(kind, spec, what)

    def task_wait(self, task: Task) -> str | None:
        """Why a task has not started yet, in one line (None once it has)."""
        ahead = [t for t in self.tasks.waiting() if t.created < task.created]
        if task.status != "waiting" or len(self.free_slots()) > len(ahead):
            return None  # it starts at the next tick
        busy = [f"worker {w.pid} with {len(w.run_ids)} run(s)" for w in self.live.values()]
        busy += [f"task {t.task_id}" for t in self.tasks.running()]
        line = f"every worker slot is busy ({'; '.join(busy) or 'starting'})"
        if ahead:
            line += f"; {len(ahead)} task(s) ahead"
        return line + "; it starts when one frees, ahead of runs no worker holds yet"

    def _task_result(self, task: Task, result: dict) -> Any:
        """What a finished task's client gets; a judge's grades are stored first."""
        if task.kind != "judge":
            return result
        report = []
        for r in result["runs"]:
            self.store.rescore_run(r["run_id"], r["scene_results"], r["scores"], r["overall"])
            report.append({"run_id": r["run_id"], "judge": r["judge"], "overall": r["overall"], **r["counts"]})
        return report

    def _warm_worker_for(self, group: list[dict]) -> LiveWorker | None:
        """A live worker on the same base and settings, which takes these jobs next without
        loading its base again."""
        key = _session_key(group[0]["settings"])
        for worker in self.live.values():
            if worker.key == key and worker.stop_requested is None and not worker.adopted:
                return worker
        return None

    def _lingering_worker(self) -> LiveWorker | None:
        """A live worker whose runs have all ended: it waits for a hand-over it may never get."""
        for worker in self.live.values():
            if worker.stop_requested is None and self._all_ended(worker):
                return worker
        return None

    def _all_ended(self, worker: LiveWorker) -> bool:
        return all(JobState(self.store.get_run(r)["status"]).is_terminal() for r in worker.run_ids)

    def _hand_over(self, worker: LiveWorker, runs: list[dict], on_event: EventHook) -> None:
        path = worker.session_path.with_name(
            f"{worker.session_path.stem}.more-{time.time_ns()}.json"
        )
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"jobs": self._session_jobs(runs)}, indent=1))
        tmp.replace(path)  # the worker only ever sees a complete file
        for r in runs:
            worker.run_ids.append(r["run_id"])
            worker.offsets[r["run_id"]] = 0
            self.store.update_run(
                r["run_id"], worker_pid=worker.pid, worker_start=worker.start_ticks,
                session_path=str(worker.session_path),
            )
        on_event({"type": "worker", "pid": worker.pid, "runs": [r["run_id"] for r in runs], "warm": True})

    def idle(self) -> bool:
        return not self.live and not self.sessions() and not self.tasks.waiting() and not self.tasks.running()

    def run_queue(self, on_event: EventHook | None = None, poll_seconds: float = 0.25) -> bool:
        """Run every queued job to a terminal state in this process; True when all ended done."""
        hook = on_event or (lambda e: None)
        touched: set[str] = set()

        def track(event: dict) -> None:
            if event.get("type") == "worker":
                touched.update(event["runs"])
            hook(event)

        try:
            while True:
                self.tick(track)
                if self.idle():
                    break
                time.sleep(poll_seconds)
        except KeyboardInterrupt:
            self.shutdown_workers(track, reason="stopped by Ctrl-C")
            raise
        return all(self.store.get_run(r)["status"] == "done" for r in touched)

    def shutdown_workers(self, on_event: EventHook, reason: str, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop every live worker (they checkpoint) and settle their runs."""
        self._stop(list(self.live.values()), on_event, reason, grace)

    def end_lingering(self, on_event: EventHook, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop the workers whose runs have all ended, as a service leaves without stopping the
        rest: no later service adopts a worker with no run left to watch, so one lingering for a
        hand-over would outlive its service (a Ray actor would hold its node's CPU or GPU)."""
        lingering = [w for w in self.live.values() if self._all_ended(w)]
        self._stop(lingering, on_event, "stopped with the service", grace)

    def _stop(self, workers: list[LiveWorker], on_event: EventHook, reason: str, grace: float) -> None:
        for worker in workers:
            worker.request_stop()
        deadline = time.monotonic() + grace
        while workers and time.monotonic() < deadline:
            for worker in list(workers):
                if worker.exit_code() is not None:
                    self._pump(worker, on_event)
                    self._settle(worker, on_event, reason=reason)
                    del self.live[worker.pid]
                    workers.remove(worker)
            time.sleep(0.1)
        for worker in workers:
            worker.kill()
            if worker.exit_code() is None:
                self._quarantine(worker, on_event, reason)
                continue
            self._pump(worker, on_event)  # what it wrote in the grace period (a result) counts
            self._settle(worker, on_event, reason=reason)
            del self.live[worker.pid]

    def _quarantine(self, worker: LiveWorker, on_event: EventHook, why: str | None = None) -> None:
        """A worker that outlived SIGKILL: its runs are settled now (a hung one's are queued again
        once, as `_settle` does for a stall), no later service adopts it for them, and its slot
        waits in `stuck` until the process is gone (a reboot, or the driver letting go)."""
        line = worker.process.why_stuck()
        reason = "; ".join(filter(None, [why or worker.stalled or "it was stopped", line]))
        self._pump(worker, on_event)
        self._settle(worker, on_event, reason=reason)
        for run_id in worker.run_ids:
            self.store.update_run(run_id, worker_pid=None, worker_start=None)
        del self.live[worker.pid]
        self.stuck[worker.pid] = worker
        self._save_stuck()
        slot = self.slots[worker.slot] if worker.slot < len(self.slots) else None
        held = f"card {slot} takes no new worker until it is gone" if slot is not None else "the queue goes on"
        on_event({"type": "worker", "pid": worker.pid, "runs": list(worker.run_ids), "stuck": f"{line}; {held}"})

    @property
    def _stuck_path(self) -> Path:
        return self.workspace.root / "stuck.json"

    def _save_stuck(self) -> None:
        """The stuck workers, for the next service: it holds their cards as this one does (the
        process outlives any service; a reboot ends it)."""
        entries = [{"pid": w.pid, "start_ticks": w.start_ticks,
                    "card": self.slots[w.slot] if w.slot < len(self.slots) else None} for w in self.stuck.values()]
        try:
            write_json_atomic(self._stuck_path, entries)
        except OSError:
            pass  # a full disk: this service still holds the cards; a next one would not know

    def _load_stuck(self) -> None:
        """The stuck workers an earlier service left, those still there (pid and start time)."""
        try:
            entries = json.loads(self._stuck_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        for entry in entries if isinstance(entries, list) else []:
            try:
                handle = self.executor.adopt(int(entry["pid"]), entry.get("start_ticks"))
            except (KeyError, TypeError, ValueError):
                continue
            if handle is not None:
                card = entry.get("card")  # None: the CPU slot, or one of Ray's shares
                slot = self._slot_for(card) if card in self.slots else len(self.slots)  # a card gone: none
                handle.why_stuck()  # known as stuck: a Ray handle then only watches for the process to go
                self.stuck[handle.pid] = LiveWorker(handle, Path("."), [], slot, adopted=True)

    def stuck_lines(self) -> list[str]:
        """One line per worker that outlived SIGKILL and is still there (for `status`)."""
        def card(slot: int | None) -> str:
            name = self.slots[slot] if slot is not None and slot < len(self.slots) else None
            if name is not None:
                return f"card {name}"
            return "a share Ray placed" if getattr(self.executor, "stuck_keeps_slot", False) else "the CPU slot"

        lines = [f"worker {w.pid} ({card(w.slot)}): {w.process.why_stuck()}" for w in list(self.stuck.values())]
        return lines + [f"task {t.task_id} ({card(t.slot)}): {stuck_line(t.process.pid)}"
                        for t in list(self.tasks.stuck)]

    def _write_session(self, runs: list[dict], slot: str | None = None) -> Path:
        s = runs[0]["settings"]
        session = {
            "base": s["base"],
            "scenes": s["scenes"],
            "slot": slot,
            "linger": self.linger,
            "jobs": self._session_jobs(runs),
        }
        path = self.workspace.sessions_dir / f"session-{int(time.time())}-{secrets.token_hex(3)}.json"
        path.write_text(json.dumps(session, indent=1))
        return path

    def _session_jobs(self, runs: list[dict]) -> list[dict]:
        jobs = []
        for r in runs:
            s = r["settings"]
            Path(r["run_dir"]).mkdir(parents=True, exist_ok=True)
            (Path(r["run_dir"]) / "job.json").write_text(json.dumps(r, default=str, indent=1))
            jobs.append(
                {
                    "run_id": r["run_id"],
                    "kind": r["kind"],
                    "corpus_path": r["corpus_path"],
                    "sha256": r["corpus_id"],  # what was read when it was queued
                    "run_dir": r["run_dir"],
                    "seed": r["seed"],
                    "attempt": r["attempt"],
                    "train": s.get("train") or {},
                    "lora": s.get("lora") or {},
                    "probes": s.get("probes", True),
                }
            )
        return jobs

    def start_worker(self, session_path: Path, slot: str | None = None) -> WorkerHandle:
        return self.executor.start(session_path, slot)

    def start_session(self, runs: list[dict], slot_index: int, on_event: EventHook) -> LiveWorker:
        slot = self.slots[slot_index]
        session_path = self._write_session(runs, slot)
        worker = LiveWorker(
            process=self.start_worker(session_path, slot),
            session_path=session_path,
            run_ids=[r["run_id"] for r in runs],
            slot=slot_index,
            key=_session_key(runs[0]["settings"]),
        )
        worker.offsets = {r: 0 for r in worker.run_ids}
        for r in worker.run_ids:
            self.store.update_run(
                r, worker_pid=worker.pid, worker_start=worker.start_ticks, session_path=str(session_path)
            )
        self.live[worker.pid] = worker
        on_event({"type": "worker", "pid": worker.pid, "runs": list(worker.run_ids), "slot": slot})
        return worker

    def reattach(self, on_event: EventHook) -> list[str]:
        """After a restart: adopt workers still alive (pid and start time must both match), ingest
        what finished while no service watched, and settle runs whose worker died. An executor
        whose workers outlive their host (Ray's detached actors) then ends those no run names:
        what they list of their own went away with the service before."""
        active = ["queued", "starting", "training", "evaluating"]
        for run in self.store.list_runs(status=active):
            pid, ticks = run.get("worker_pid"), run.get("worker_start")
            if pid is None:
                continue
            run_id = run["run_id"]
            worker = self.live.get(pid)
            handle = worker.process if worker else self.executor.adopt(pid, ticks)
            if handle is not None:
                if worker is None:
                    session_path = Path(run["session_path"])
                    worker = LiveWorker(handle, session_path, [], self._slot_for(_session_slot(session_path)),
                                        adopted=True)
                    self.live[pid] = worker
                    on_event({"type": "worker", "pid": pid, "runs": [], "adopted": True})
                worker.run_ids.append(run_id)
                worker.offsets[run_id] = 0
            else:
                gone = _GoneProcess(pid, ticks)
                ghost = LiveWorker(gone, Path(run["session_path"] or "."), [run_id], 0)
                ghost.offsets[run_id] = 0
                self._pump(ghost, on_event)
                code = recorded_exit(ghost.session_path, None)
                why = "worker died" if code is None else self._exit_reason(code)
                self._settle(ghost, on_event, reason=f"{why} while no service watched it")
        sweep = getattr(self.executor, "sweep", None)
        if sweep is None:
            return []
        ended, stuck = sweep(set(self.live) | set(self.stuck))  # a stuck worker's actor holds its share
        for handle in stuck:
            self.stuck[handle.pid] = LiveWorker(handle, Path("."), [], self._slot_for(None), adopted=True)
        if stuck:
            self._save_stuck()
        return ended

    def _pump(self, worker: LiveWorker, on_event: EventHook) -> None:
        sync = getattr(worker.process, "sync", None)
        if sync is not None:  # a remote worker: what its node wrote comes into the run folders first
            sync()
            node = getattr(worker.process, "node", None)
            if node:
                self.nodes.update(dict.fromkeys(worker.run_ids, node))
        for run_id in list(worker.run_ids):
            path = self.workspace.run_dir(run_id) / "events.jsonl"
            events, end = read_events(path, worker.offsets.get(run_id, 0))
            if events:
                worker.seen_events = True
                worker.last_sign = time.monotonic()
            for event in events:
                if run_id in worker.stopping and (event.get("phase") == "cancelled" or event.get("type") in ENDS):
                    # it let go of the cancelled run, or finished it before it saw the cancel
                    del worker.stopping[run_id]
                    self._let_go(worker, run_id)
                    break
                # raises if the store cannot be written (a full disk): the offset stays, and the
                # events are read again next time (applying one twice changes nothing)
                self._apply(run_id, event, on_event)
            else:
                worker.offsets[run_id] = end
                ended = any(e.get("type") in ENDS for e in events)
                if ended and JobState(self.store.get_run(run_id)["status"]).is_terminal():
                    # no longer the worker's: a retry queues it for any slot, and a warm worker's
                    # list (which every tick walks) stays as long as its live runs
                    self._let_go(worker, run_id)

    @staticmethod
    def _let_go(worker: LiveWorker, run_id: str) -> None:
        worker.run_ids.remove(run_id)
        worker.offsets.pop(run_id, None)

    def _enforce_stall(self, worker: LiveWorker, on_event: EventHook) -> None:
        """Stop a worker that holds a run and has written no event for `stall_seconds`: hung, it
        would hold its slot, and the queue behind it, until morning. Its run ends `interrupted`
        with the reason and is queued again once by itself (`_settle`), resuming from its newest
        checkpoint; a worker that does not stop is killed after the stop's grace period."""
        if not self.stall_seconds or worker.stop_requested is not None:
            return
        silent = time.monotonic() - worker.last_sign
        if silent < self.stall_seconds:
            return
        runs = [self.store.get_run(r) for r in worker.run_ids]
        if all(run is None or JobState(run["status"]).is_terminal() for run in runs):
            return  # a worker lingering for more work has nothing to say
        worker.stalled = (f"no sign of life from its worker for {silent / 60:.0f} min (a card, driver or file "
                          "system that stopped answering?): it was stopped")
        for run_id in worker.run_ids:
            on_event({"type": "log", "run_id": run_id, "message": worker.stalled})
        worker.request_stop()

    def _settle(self, worker: LiveWorker, on_event: EventHook, reason: str | None = None) -> None:
        """After a worker exits, every run it held is settled: one it had started ends
        `interrupted` with the tail of its log (retry resumes it); one it never reached goes back
        to the queue, except the first when the worker died before doing anything at all (that
        one fails, so a worker that cannot start does not loop)."""
        code = worker.exit_code()
        for more in worker.session_path.parent.glob(f"{worker.session_path.stem}.more-*.json"):
            more.rename(more.with_suffix(".orphan"))  # handed over too late: back to the queue
        lost = getattr(worker.process, "lost", None)  # its node or actor died (a cluster executor)
        lost = lost or worker.stalled  # or it hung: either way its runs are queued again by themselves
        reason = reason or lost
        # a worker stopped on purpose, or one that got as far as an event, is no run's fault
        charged = bool(worker.stop_requested or reason or worker.seen_events)
        for run_id in worker.run_ids:
            run = self.store.get_run(run_id)
            state = JobState(run["status"])
            if state.is_terminal():
                continue
            if state is JobState.QUEUED:
                if charged:
                    continue  # never started: the next free worker takes it
                charged = True
            why = reason or self._exit_reason(code)
            tail = log_tail(self.workspace.run_dir(run_id) / "train.log") or log_tail(
                worker.session_path.with_suffix(".log")
            )
            message = f"{why}; last log: {tail}" if tail else why
            target = JobState.FAILED if state is JobState.QUEUED else JobState.INTERRUPTED
            self.store.transition(run_id, target, error=message)
            again = lost and target is JobState.INTERRUPTED and self.auto_retries.get(run_id, 0) < self.max_retries
            # `requeued`: a follower keeps following, the run is not over (`ltm-tui run`, `follow`)
            on_event({"type": "state", "run_id": run_id, "status": target.value, "error": message,
                      **({"requeued": True} if again else {})})
            if again:
                self.auto_retries[run_id] = self.auto_retries.get(run_id, 0) + 1
                self.retry(run_id, on_event)  # another node resumes it from its newest checkpoint

    def _exit_reason(self, code: int | None) -> str:
        if code == EXIT_DEVICE_LOST:
            return "the worker's device failed (a CUDA error that ends its process); retry runs it in a fresh worker"
        if code == EXIT_DISK_FULL:
            return (f"the disk under {self.workspace.root} filled up: free space and retry "
                    "(it resumes from its newest checkpoint)")
        return f"worker exited with code {code}"

    def _apply(self, run_id: str, event: dict, on_event: EventHook) -> None:
        """One event from a worker → the run's state (guarded) and the caller's hook. Replaying
        a file from the start (after a restart) changes nothing twice."""
        kind = event.get("type")
        run = self.store.get_run(run_id)
        if not of_attempt(event, run["attempt"]):
            return  # an earlier attempt's events (its error, its phases) are not this one's
        state = JobState(run["status"])
        if state.is_terminal():
            return  # a cancelled run's late events change nothing
        try:
            if kind == "phase":
                target = PHASES.get(event.get("phase"))
                if target is not None and ORDER[target] > ORDER[state]:
                    self._to(run_id, state, target)
                    on_event({**event, "type": "state", "run_id": run_id, "status": target.value})
            elif kind == "progress":
                if not event.get("timed"):  # between the curve's points: the bar's, not the curve's
                    self.store.add_curve_points(run_id, [event])
                on_event(event)
            elif kind == "eval_progress":  # scenes done of all: the queue's bar, no curve point
                on_event({**event, "run_id": run_id})
            elif kind == "error":
                self.store.transition(run_id, JobState.FAILED, error=event.get("message"))
                on_event({"type": "state", "run_id": run_id, "status": "failed", "error": event.get("message")})
            elif kind == "result":
                self.ingest(run_id)
                on_event({**event, "type": "state", "run_id": run_id, "status": "done"})
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
            if state is not JobState.EVALUATING:
                self._to(run_id, state, JobState.EVALUATING)
            self.store.transition(run_id, JobState.DONE)
        return fresh


PHASES = {"starting": JobState.STARTING, "training": JobState.TRAINING, "evaluating": JobState.EVALUATING}
ORDER = {JobState.QUEUED: 0, JobState.STARTING: 1, JobState.TRAINING: 2, JobState.EVALUATING: 3}


@dataclass
class LiveWorker:
    """A worker the manager watches, through its executor's handle."""

    process: WorkerHandle
    session_path: Path
    run_ids: list[str]
    slot: int
    offsets: dict[str, int] = field(default_factory=dict)
    stop_requested: float | None = None
    seen_events: bool = False
    key: str | None = None  # base and settings it serves, for handing it more jobs
    adopted: bool = False  # started by an earlier service
    stopping: dict[str, float] = field(default_factory=dict)  # cancelled run -> when it was asked
    last_sign: float = field(default_factory=time.monotonic)  # when it last wrote an event (or started)
    stalled: str | None = None  # why the service stopped it as hung
    killed: bool = False  # SIGKILL sent: if it is still there, the kernel holds it

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def start_ticks(self) -> int | None:
        return self.process.start_ticks

    def exit_code(self) -> int | None:
        code = self.process.exit_code()
        if code == -1 and (self.adopted or isinstance(self.process, _GoneProcess)):
            # not our child: its code is the one it left beside its session, if it could
            return recorded_exit(self.session_path, code)
        return code

    def request_stop(self) -> None:
        """Ask it to checkpoint and exit (SIGTERM for a local process)."""
        if self.stop_requested is None and self.exit_code() is None:
            self.stop_requested = time.monotonic()
            self.process.terminate()

    def enforce_cancel(self, grace: float = CANCEL_GRACE_SECONDS) -> None:
        """A worker that has not let go of a cancelled run within the grace period is stopped."""
        if any(time.monotonic() - asked > grace for asked in self.stopping.values()):
            self.request_stop()

    def enforce_stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        if self.stop_requested is not None and not self.killed and time.monotonic() - self.stop_requested > grace:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, and a bounded wait for it to go (`executor.KILL_WAIT_SECONDS`)."""
        self.killed = True
        self.process.kill()


@dataclass
class _GoneProcess:
    """The handle of a worker that died while no service watched it."""

    pid: int
    start_ticks: int | None

    def exit_code(self) -> int:
        return -1

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        pass


def _session_key(settings: dict) -> str:
    """Runs with the same key can share one worker and its loaded base: the same base and
    batteries. Training and LoRA settings travel with each job (a search's trials differ only
    in those, and a warm worker takes them one after another)."""
    s = settings
    return json.dumps([s["base"], s["scenes"]], sort_keys=True)


def pinned_card(device: str | None) -> int | None:
    """N for a device asked for as cuda:N, else None."""
    found = re.fullmatch(r"cuda:(\d+)", (device or "").strip())
    return int(found.group(1)) if found else None


def _session_slot(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("slot")
    except (OSError, ValueError):
        return None


def detect_slots(per_gpu: int = 1) -> list[str | None]:
    """One worker slot per GPU CUDA shows (`devices.visible_cards`: the CUDA_VISIBLE_DEVICES
    entries that name a card, or every card), `per_gpu` each; one CPU slot where there is none.
    Without NVML the entries are taken as given, up to the first empty one or -1. Read with
    NVML, not torch, so the service stays light."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            ids = [entry for entry, _ in visible_cards(pynvml)]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML, no driver, no GPU: the entries as given, or the CPU slot
        ids = cuda_entries(visible) if visible is not None else []
    if not ids:
        return [None]
    return [i for i in ids for _ in range(max(1, per_gpu))]
