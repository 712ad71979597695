"""Workers on a Ray cluster: the same worker code, on any node, with no shared disk.

    ltm-tui serve --executor ray --address auto|HOST:PORT      (docs/cluster.md)

`RayExecutor` is the job manager's executor (`start`, `adopt`, and a handle with `exit_code`,
`terminate`, `kill`) for a Ray cluster. Each worker session runs in a named, detached Ray actor
(`SessionActor`) placed where the resources it asks for are free. The actor starts the ordinary
worker (`python -m backend.compute.worker SESSION.json`) as a process of its node, in a scratch
folder of that node, so training, checkpoints, cancel and SIGTERM behave exactly as on one box.

Nothing assumes a shared disk. What a job needs travels with it: the battery files, the corpus's
text (through Ray's object store) and, for a resumed run, its token file, newest checkpoint,
events and log. What it writes comes back: the service-side handle (`RayWorker.sync`, called by
the manager before it reads a run's events) asks the actor for what changed since the last call
and writes it into the workspace's run folder: whole files first (checkpoints in one piece, the
adapter, result.json), then the new lines of `events.jsonl` and `train.log`. So the manager,
which only ever reads the workspace, cannot tell a remote run from a local one.

A dead actor or a lost node ends the worker with `lost` set to the reason (which node, what Ray
said); the manager then requeues its runs (`max_retries`), and the next attempt resumes from the
newest checkpoint that came back. A restarted service finds live actors by name in the
workspace's namespace (`adopt`): their pids are ids of ours, and their start marker is
`RAY_TICKS`, which no local process has.

Ray is imported only here and only when this executor is chosen (`pip install -e ".[ray]"`).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from backend.core.devices import SLOT_ENV
from backend.core.errors import LtmError
from backend.core.workspace import model_folder
from backend.jobs import executor as local_executor
from backend.jobs.executor import LocalExecutor, LocalProcess, own_session_tied_to_parent, stuck_line, worker_env

RAY_MISSING = 'the Ray executor needs ray: pip install -e ".[ray]"'
# The start marker of a Ray worker in the `runs.worker_start` column: no /proc start time is
# negative, so a local executor never adopts a Ray worker's id as a process, nor the reverse.
RAY_TICKS = -1
APPEND_FILES = ("events.jsonl", "train.log")  # grow by lines: only the new bytes travel
SYNC_TIMEOUT = 60.0  # a final sync (after a kill) waits at most this long for the actor
PROBE_TIMEOUT = 5.0  # after a failed call: is the actor still there?
QUIET_WAIT = 0.5  # a poll with nothing to bring waits this long on the node for news or the exit
WATCH_SECONDS = 0.05  # how often a waiting poll looks at the worker's files (a stat each)
ACTOR_NAME = "ltm-worker-{pid}"
READ_SECONDS = 2.0  # each node's devices are read at most this often, and only while a client asks


class ExecutorError(LtmError):
    title = "executor"


def import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError(RAY_MISSING) from None
    return ray


def namespace_of(workspace_root: Path) -> str:
    """One Ray namespace a workspace: its actors' names never meet another workspace's."""
    return "ltm-" + hashlib.sha1(str(Path(workspace_root).resolve()).encode()).hexdigest()[:12]


# -- the node side ------------------------------------------------------------------------------


class SessionActor:
    """One worker session on a node: its inputs in a scratch folder of the node, the worker as a
    process of its own session there, and what it writes handed back by `poll`."""

    def __init__(self, namespace: str, name: str) -> None:
        self.root = Path(tempfile.gettempdir()) / "ltm-ray" / namespace / name
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.proc: subprocess.Popen | None = None
        self.session_path: Path | None = None
        self._listed: dict[str, tuple] = {}  # run -> (its events file's size and mtime, its files)

    def where(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "host": os.uname().nodename, "pid": os.getpid(), "gpus": [str(g) for g in ray.get_gpu_ids()],
                "scratch": str(self.root), "session": str(self.session_path or ""),
                "worker_pid": self.proc.pid if self.proc is not None else None,
                "runs": sorted(p.name for p in (self.root / "runs").glob("*"))}

    def start(self, session: dict, payload: dict) -> dict:
        """Write the session and its inputs here, start the worker; the node's identity back."""
        stem = payload["stem"]
        session = dict(session)
        session["scenes"] = str(self._put_scenes(payload["scenes"], payload["scenes_file"]))
        session["jobs"] = self._take_jobs(session["jobs"], payload)
        sessions = self.root / "sessions"
        sessions.mkdir(exist_ok=True)
        self.session_path = sessions / f"{stem}.json"
        self.session_path.write_text(json.dumps(session, indent=1))
        env = worker_env(os.environ, None)  # Ray chose the node's GPUs: CUDA_VISIBLE_DEVICES is set
        env[SLOT_ENV] = "ray"  # so a run asked for cuda:N trains on the card Ray gave it
        with open(self.session_path.with_suffix(".log"), "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "backend.compute.worker", str(self.session_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=str(self.root), preexec_fn=own_session_tied_to_parent,
            )
        return self.where()

    def _put_scenes(self, files: dict[str, bytes], single: str | None) -> Path:
        folder = self.root / "scenes"
        folder.mkdir(exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        return folder / single if single else folder

    def _take_jobs(self, jobs: list[dict], payload: dict) -> list[dict]:
        """The jobs with this node's paths, their run files and corpus text written here."""
        import ray

        out = []
        for job in jobs:
            run_id = job["run_id"]
            run_dir = self.root / "runs" / run_id
            run_dir.mkdir(parents=True, exist_ok=True)
            for rel, data in payload["files"].get(run_id, {}).items():
                target = run_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            job = {**job, "run_dir": str(run_dir)}
            ref = payload["corpora"].get(run_id)
            if ref is not None:
                corpus = self.root / "corpora" / f"{run_id}.txt"
                corpus.parent.mkdir(exist_ok=True)
                corpus.write_bytes(ray.get(ref[0]))  # the text, from the object store
                job["corpus_path"] = str(corpus)
            out.append(job)
        return out

    def poll(self, offsets: dict[str, int], have: dict[str, list], cancels: list[str], more: list[dict]) -> dict:
        """Hand over cancel markers and more jobs, then return what changed: the worker's exit
        code (read first, so that the files of an exited worker are complete), the new bytes of
        each append-only file past the caller's offset, and every other file the caller lacks.

        With nothing new, the call waits on the node (up to QUIET_WAIT) until the worker writes
        or exits: an event then reaches the service one hop after it is written, not one poll
        later (the service never waits on a poll; only this actor's own calls queue)."""
        for rel in cancels:
            target = self.root / "runs" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        for hand in more:
            jobs = self._take_jobs(hand["jobs"], hand)
            name = self.session_path.with_name(f"{self.session_path.stem}.more-{hand['tag']}.json")
            tmp = name.with_suffix(".tmp")
            tmp.write_text(json.dumps({"jobs": jobs}))
            tmp.replace(name)  # the worker claims only whole files
        deadline = time.monotonic() + QUIET_WAIT
        while True:
            answer = self._changes(offsets, have)
            quiet = not (answer["appends"] or answer["files"] or cancels or more)
            if answer["code"] is not None or self.proc is None or not quiet or time.monotonic() >= deadline:
                return answer
            marks = self._marks()
            while time.monotonic() < deadline and self.proc.poll() is None and self._marks() == marks:
                time.sleep(WATCH_SECONDS)

    def _changes(self, offsets: dict[str, int], have: dict[str, list]) -> dict:
        code = None if self.proc is None else self.proc.poll()
        appends: dict[str, bytes] = {}
        files: dict[str, list] = {}
        checkpoints: dict[str, list[str]] = {}
        log_rel = "session.log"
        appends[log_rel] = _read_from(self.session_path.with_suffix(".log"), offsets.get(log_rel, 0), code is not None)
        runs = self.root / "runs"
        for run_dir in sorted(runs.iterdir()) if runs.is_dir() else []:
            run_id = run_dir.name
            for name in APPEND_FILES:
                rel = f"{run_id}/{name}"
                appends[rel] = _read_from(run_dir / name, offsets.get(rel, 0), code is not None)
            listing = self._listing(run_dir, fresh=code is not None)
            checkpoints[run_id] = sorted({rel.split("/")[1] for rel in listing if rel.startswith("checkpoints/")})
            for rel_in, sig in listing.items():
                rel = f"{run_id}/{rel_in}"
                if have.get(rel) != sig:
                    try:
                        files[rel] = [(run_dir / rel_in).read_bytes(), *sig]
                    except FileNotFoundError:  # gone since it was listed: the next call lists again
                        self._listed.pop(run_id, None)
        appends = {k: v for k, v in appends.items() if v}
        return {"code": code, "appends": appends, "files": files, "checkpoints": checkpoints}

    def _marks(self) -> list[int]:
        """The sizes of what the worker appends to (its session log, each run's events and log):
        the worker appends an event after every file it writes, so these grow with any news."""
        paths = [self.session_path.with_suffix(".log")]
        runs = self.root / "runs"
        for run_dir in sorted(runs.iterdir()) if runs.is_dir() else []:
            paths += [run_dir / name for name in APPEND_FILES]
        return [_size(p) for p in paths]

    def _listing(self, run_dir: Path, fresh: bool) -> dict[str, list[int]]:
        """A run's files that travel back, each with [size, mtime]. The worker appends an event
        after every file it writes (a checkpoint, the model, result.json), so while a run's
        events.jsonl stands still its listing is the last one, and a finished run costs no stat."""
        try:
            st = (run_dir / "events.jsonl").stat()
            mark = (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            mark = None
        known = self._listed.get(run_dir.name)
        if known is not None and mark is not None and known[0] == mark and not fresh:
            return known[1]
        listing = {}
        for path in sorted(run_dir.rglob("*")):
            rel_in = path.relative_to(run_dir)
            if path.is_file() and not _skipped(rel_in):
                st = path.stat()
                listing[rel_in.as_posix()] = [st.st_size, st.st_mtime_ns]
        self._listed[run_dir.name] = (mark, listing)
        return listing

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def reap(self, wait: float) -> str | None:
        """SIGKILL to the worker, and up to `wait` seconds for it to go. None once it is gone;
        else why not, read on this node (`executor.stuck_line`): a process the kernel holds (a
        GPU driver fault) outlives SIGKILL, and this actor, alive, keeps holding its card."""
        self.signal(signal.SIGKILL)
        if self.proc is None:
            return None
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            return self.why_stuck()
        return None

    def why_stuck(self) -> str | None:
        """Why the worker is still here after SIGKILL, naming this node; None once it is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        return f"{stuck_line(self.proc.pid)} (on {os.uname().nodename})"

    def close(self) -> str | None:
        """The worker gone and the node's scratch folder removed (everything came back). A
        worker stuck past SIGKILL keeps its scratch folder and its actor: the line says why."""
        stuck = self.reap(local_executor.KILL_WAIT_SECONDS)
        if stuck is None:
            shutil.rmtree(self.root, ignore_errors=True)
        return stuck


_node_monitor = None  # on a node: one per Ray worker process, so NVML is initialised once there


def read_node_devices() -> dict:
    """This node's devices, read on the node (a Ray task pinned to it): each GPU through NVML,
    or its CPU and RAM with psutil, as the dashboard reads its own box (`backend.core.devices`, which
    imports neither textual nor torch)."""
    global _node_monitor
    from backend.core.devices import DeviceMonitor

    if _node_monitor is None:
        _node_monitor = DeviceMonitor()
    snap = _node_monitor.read()
    return {"source": snap.source, "note": snap.note, "devices": [asdict(d) for d in snap.devices]}


class TaskActor:
    """A task (a calibration, a judge) on the service's own host. Ray reserves what it needs
    there: a share of one of the host's cards, as a session's actor gets, so that it never lands
    on a card a training actor holds; no CPU, since the task's process shares the host's CPUs
    with the service as a local task does. The actor starts the task's ordinary worker process
    on the workspace's own files (the same host: nothing to copy), seeing the card Ray gave it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self, task_path: str) -> dict:
        import ray

        from backend.jobs.executor import process_start_ticks

        env = worker_env(os.environ, None)  # Ray chose the card: CUDA_VISIBLE_DEVICES is set
        env[SLOT_ENV] = "ray"  # so a task asked for cuda:N runs on the card Ray gave it
        with open(Path(task_path).with_suffix(".log"), "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "backend.compute.worker", task_path],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, preexec_fn=own_session_tied_to_parent,
            )
        return {"pid": self.proc.pid, "start_ticks": process_start_ticks(self.proc.pid),
                "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


def _read_from(path: Path, offset: int, whole: bool) -> bytes:
    """An append-only file's bytes past `offset`, up to its last newline (a line being written
    waits for the next call), or to its end once the worker has exited."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return b""
    if whole:
        return data
    cut = data.rfind(b"\n")
    return data[: cut + 1] if cut >= 0 else b""


def _skipped(rel: Path) -> bool:
    """What does not travel back: the growing logs (sent by offset), cancel markers (they came
    from the service), and checkpoints still being written or set aside."""
    parts = rel.parts
    if len(parts) == 1 and (parts[0] in APPEND_FILES or parts[0].startswith("cancel.") or parts[0].endswith(".tmp")):
        return True
    return parts[0] == "checkpoints" and (len(parts) < 3 or not parts[1].startswith("step-") or parts[1].endswith(".tmp"))


# -- the service side ---------------------------------------------------------------------------


class RayWorker:
    """The service's handle on one session actor. `sync()` brings the node's files into the
    workspace; `exit_code()` is the worker's once everything it wrote has come back."""

    def __init__(self, executor: "RayExecutor", pid: int, actor, session_path: Path | None) -> None:
        self.executor = executor
        self.pid = pid
        self.start_ticks = RAY_TICKS
        self.actor = actor
        self.session_path = session_path
        self.node: str | None = None  # "host (node id)" once the actor has started
        self.node_pid: int | None = None  # the worker process's pid on its node (NVML lists it)
        self.lost: str | None = None  # why the worker ended without an exit code of its own
        self.stuck: str | None = None  # why the worker outlived SIGKILL on its node (`kill`)
        self._look = None  # while stuck: the question in flight, is it still there?
        self._code: int | None = None
        self._have: dict[str, list] = {}
        self._pending = None  # the poll in flight
        self._started = None  # the actor's start call, until it answers
        self._closed = False

    # the WorkerHandle calls

    def exit_code(self) -> int | None:
        if self.stuck is not None and self._code is None:
            self._watch_stuck()
        else:
            self.sync()  # never waits: takes a poll's answer if one came (a stop awaits this too)
        return self._code

    def terminate(self) -> None:
        """SIGTERM to the remote worker: it checkpoints and exits; its files come back."""
        if self._code is None:
            self.actor.signal.remote(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the remote worker, what it wrote brought back, the actor ended. A worker
        that outlives SIGKILL on its node (the kernel holds it: a GPU driver fault) is left
        with its actor, which keeps holding the node's card so Ray places no other work on it;
        `exit_code()` stays None until the process is gone, then the actor ends."""
        if self._code is not None:
            return
        ray = import_ray()
        try:
            wait = local_executor.KILL_WAIT_SECONDS  # read now: a test shortens it
            self.stuck = ray.get(self.actor.reap.remote(wait), timeout=SYNC_TIMEOUT + wait)
            if self.stuck is not None:
                return
            deadline = time.monotonic() + SYNC_TIMEOUT
            while self._code is None and time.monotonic() < deadline:
                self.sync(block=True)
        except Exception:  # noqa: BLE001 - an actor that cannot answer is ended anyway (stopped, not lost)
            pass
        if self._code is None:
            self._code = -signal.SIGKILL
        self._close()

    def why_stuck(self) -> str:
        """Why the worker outlived SIGKILL, as its node read it (asked of the actor for one a
        restarted service adopted from `stuck.json`). From here on this handle only watches for
        the process to go (`exit_code`): what a stuck worker left on its node belongs to runs
        already settled, and is never brought into their folders."""
        if self.stuck is None:
            where = self.node or "a Ray node"
            try:
                line = import_ray().get(self.actor.why_stuck.remote(), timeout=PROBE_TIMEOUT)
                self.stuck = line or f"worker {self.pid} on {where} did not exit after SIGKILL, and is gone now"
            except Exception:  # noqa: BLE001 - an actor that cannot answer: the watch finds out
                self.stuck = f"worker {self.pid} on {where} did not exit after SIGKILL (its node does not answer)"
        return self.stuck

    def _watch_stuck(self) -> None:
        """Never waits: takes the answer of the last look (is the process still there?) and
        sends the next. Once it is gone (or its actor is, with its node), the actor ends and
        with it the card share it held."""
        ray = import_ray()
        if self._look is None:
            self._look = self.actor.why_stuck.remote()
            return
        ready, _ = ray.wait([self._look], timeout=0)
        if not ready:
            return
        try:
            still = ray.get(self._look)
        except ray.exceptions.ActorDiedError:
            still = None  # the actor died, and the process with its node
        except ray.exceptions.RayError:
            self._look = None  # out of reach for now (a network blip): asked again next tick
            return
        self._look = None
        if still is None:
            self._code = -signal.SIGKILL
            self._close()

    # the node's files

    def sync(self, block: bool = False) -> None:
        """Bring in what the node wrote since the last call. Without `block`, this never waits:
        it takes the answer of the poll sent last time (if it came) and sends the next."""
        if self._code is not None:
            return
        ray = import_ray()
        try:
            if self._started is not None:
                ready, _ = ray.wait([self._started], timeout=SYNC_TIMEOUT if block else 0)
                if not ready:
                    return  # still waiting for a node with the resources it asked for
                where = ray.get(self._started)
                self.node, self.node_pid = _node_label(where), where.get("worker_pid")
                self._started = None
            if self._pending is None:
                if self.stuck is not None:
                    return  # quarantined: nothing more is asked of its node (no jobs, no files)
                self._pending = self._poll()
                if not block:
                    return
            ready, _ = ray.wait([self._pending], timeout=SYNC_TIMEOUT if block else 0)
            if not ready:
                return
            answer = ray.get(self._pending)
            self._pending = None
            self._write(answer)
            self.executor.held.setdefault(self.pid, set()).update(answer["checkpoints"])  # its runs
            if answer["code"] is not None:
                self._code = answer["code"]
                self._close()
            elif self.stuck is None:
                self._pending = self._poll()
        except ray.exceptions.RayError as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """A call that failed: ask the actor once more. Alive, the answer was lost on the way and
        is asked again; dead, what Ray says of its death is the reason the runs end with."""
        ray = import_ray()
        try:
            ray.get(self.actor.where.remote(), timeout=PROBE_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            return  # busy or out of reach for now: the next tick asks again
        except ray.exceptions.RayError as died:
            exc = died
        else:
            self._pending = None
            return
        self._lose(exc)

    def _poll(self):
        cancels, more = self._to_send()
        return self.actor.poll.remote(self._offsets_now(), self._have, cancels, more)

    def _offsets_now(self) -> dict[str, int]:
        """The node's append-only files begin as the workspace's copies (sent with each job), so
        the workspace file's size is where the node's new bytes begin, after a restart too."""
        out = {"session.log": _size(self._session_log())}
        for run_id in self.executor.held.get(self.pid, ()):
            for name in APPEND_FILES:
                out[f"{run_id}/{name}"] = _size(self.executor.runs_dir / run_id / name)
        return out

    def _session_log(self) -> Path:
        return (self.session_path or Path(os.devnull)).with_suffix(".log")

    def _to_send(self) -> tuple[list[str], list[dict]]:
        """Cancel markers of this worker's runs, and jobs the manager handed over to it (the
        `.more-*.json` files a local worker would claim), with their inputs."""
        cancels = []
        for run_id in self.executor.held.get(self.pid, ()):
            for marker in (self.executor.runs_dir / run_id).glob("cancel.*"):
                cancels.append(f"{run_id}/{marker.name}")
        more = []
        if self.session_path is not None:
            for path in sorted(self.session_path.parent.glob(f"{self.session_path.stem}.more-*.json")):
                jobs = json.loads(path.read_text(encoding="utf-8"))["jobs"]
                sent = path.with_suffix(".sent")
                path.rename(sent)
                more.append({"tag": sent.stem.rsplit("more-", 1)[-1], "jobs": jobs, **self.executor.job_inputs(jobs)})
                self.executor.held.setdefault(self.pid, set()).update(j["run_id"] for j in jobs)
        return cancels, more

    def _write(self, answer: dict) -> None:
        """Whole files first (a checkpoint lands in one piece, result.json by rename), then the
        appended lines: the manager reads an event only after the files it speaks of."""
        runs = self.executor.runs_dir
        steps: dict[Path, list[tuple[Path, bytes]]] = {}
        for rel, (data, size, mtime) in answer["files"].items():
            run_id, inner = rel.split("/", 1)
            parts = Path(inner).parts
            if parts[0] == "checkpoints":
                steps.setdefault(runs / run_id / "checkpoints" / parts[1], []).append((Path(*parts[2:]), data))
            else:
                if inner == "result.json":
                    data = _workspace_result(runs / run_id, data)
                _write_atomic(runs / run_id / inner, data)
            self._have[rel] = [size, mtime]
        for final, items in steps.items():
            incoming = final.with_name(f".incoming-{final.name}")
            if final.exists():  # a checkpoint already here gets only its changed files
                incoming = final
            for inner, data in items:
                _write_atomic(incoming / inner, data)
            if incoming != final:
                incoming.rename(final)
        for run_id, names in answer["checkpoints"].items():
            folder = runs / run_id / "checkpoints"
            for old in folder.glob("step-*") if names else ():
                if old.name not in names and old.name < max(names):
                    shutil.rmtree(old, ignore_errors=True)  # the node's trainer let it go
        for rel, data in answer["appends"].items():
            path = self._session_log() if rel == "session.log" else runs / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as fh:
                fh.write(data)

    def _lose(self, exc: Exception) -> None:
        """The worker is gone with its actor. Once it had started on a node, or when its node
        died, its runs are `lost` (the manager requeues them); an actor that never started for
        another reason (it could not import this project on its node, say) says why in the
        session log, and its first run fails."""
        said = _ray_said(exc)
        if self.node is not None or "node" in said.lower():  # its node died, perhaps as it started
            self.lost = f"node {self.node or 'unknown'} lost ({said})"
        else:
            log = self._session_log()
            if self.session_path is not None:
                with open(log, "a", encoding="utf-8") as fh:
                    fh.write(f"the Ray actor did not start: {said}\n")
        self._code = -1
        self._close()

    def _close(self) -> None:
        """The actor ended, and with it its share of the node. One whose worker outlives
        SIGKILL (`SessionActor.close` says so) is kept instead, and this handle watches it."""
        if self._closed:
            return
        ray = import_ray()
        try:
            if self.lost is None:
                stuck = ray.get(self.actor.close.remote(), timeout=SYNC_TIMEOUT + local_executor.KILL_WAIT_SECONDS)
                if stuck is not None:
                    self.stuck, self._code = stuck, None
                    return
        except Exception:  # noqa: BLE001 - it is killed below either way
            pass
        self._closed = True
        self.executor.held.pop(self.pid, None)
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass


def _actor_id() -> int:
    """An id for a worker or task actor in the place of a pid (the same id no list of local pids
    shows, as before; a Ray worker is told from a local process by its start marker, RAY_TICKS)."""
    return secrets.randbelow(2**31 - 2**20) + 2**20


class RayTask:
    """The service's handle on a task's actor (`TaskActor`): `exit_code`, `terminate` and `kill`
    of the task's process, a local one once the actor has started it. Until then (Ray holds the
    actor back while no card share is free on this host) `pid` is an id of ours and the task is
    still running as far as the manager is concerned; stopping it then just ends the actor."""

    def __init__(self, actor, started, pid: int) -> None:
        self.actor = actor
        self._started = started
        self.pid = pid
        self.start_ticks: int | None = None
        self.gpus: list[str] = []  # the cards Ray gave it, once started
        self.process: LocalProcess | None = None
        self._code: int | None = None

    def _take_start(self) -> None:
        if self.process is not None or self._code is not None:
            return
        ray = import_ray()
        ready, _ = ray.wait([self._started], timeout=0)
        if not ready:
            return
        try:
            info = ray.get(self._started)
        except ray.exceptions.RayError:  # the actor could not start the process: a failed task
            self._end(-1)
            return
        self.process = LocalProcess(info["pid"], info["start_ticks"])
        self.pid, self.start_ticks, self.gpus = info["pid"], info["start_ticks"], info["gpus"]

    @property
    def started(self) -> bool:
        """False while Ray holds the actor back (no card share free on this host yet)."""
        self._take_start()
        return self.process is not None or self._code is not None

    def exit_code(self) -> int | None:
        self._take_start()
        if self._code is not None or self.process is None or self.process.exit_code() is None:
            return self._code
        ray = import_ray()
        try:  # the process is gone: its exit code is the actor's to read (it is the parent)
            code = ray.get(self.actor.code.remote(), timeout=SYNC_TIMEOUT)
        except Exception:  # noqa: BLE001 - the actor went with it
            code = -1
        self._end(-1 if code is None else code)
        return self._code

    def terminate(self) -> None:
        self._take_start()
        if self.process is not None:
            self.process.terminate()
        elif self._code is None:
            self._end(-1)  # never started: ending the actor gives its place in Ray's queue up

    def kill(self, wait: float | None = None) -> None:
        self._take_start()
        if self.process is not None:
            self.process.kill(wait)
        elif self._code is None:
            self._end(-1)

    def _end(self, code: int) -> None:
        """The task is over: its code kept, its actor ended (its card share back to Ray)."""
        self._code = code
        try:
            import_ray().kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


class RayExecutor:
    """Worker sessions as Ray actors, placed by the resources each asks for."""

    # A slot is a share Ray places (`slots`), and a stuck worker's actor keeps its share: the
    # manager keeps its slot too, or one session too many would wait on Ray for good.
    stuck_keeps_slot = True

    def __init__(self, workspace_root: Path, address: str | None = "auto", *, slots_per_gpu: int = 1,
                 gpu_memory_gib: float | None = None) -> None:
        ray = import_ray()
        self.root = Path(workspace_root)
        self.runs_dir = self.root / "runs"
        self.namespace = namespace_of(self.root)
        self.address = address or "auto"
        self.slots_per_gpu = max(1, slots_per_gpu)
        self.gpu_memory = (gpu_memory_gib or float(os.environ.get("LTM_RAY_GPU_MEMORY_GIB", 24))) * 2**30
        self.held: dict[int, set[str]] = {}  # worker id -> runs it was given (cancel markers go to it)
        self._nodes: tuple[float, list[dict]] = (-1e9, [])
        self.local = LocalExecutor()  # workers from before a switch to Ray
        self._readings: dict[str, dict] = {}  # node id -> its last device reading
        self._reading: dict = {}  # a reading task in flight -> its node
        self._read_at = -1e9
        self._read_lock = threading.Lock()  # the socket's threads ask at once
        if not ray.is_initialized():
            _reachable(self.address)
            try:
                ray.init(address=self.address, namespace=self.namespace, log_to_driver=False,
                         logging_level="warning", configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ExecutorError(
                    f"no Ray cluster at {self.address} ({str(exc).strip().splitlines()[0][:160]}): "
                    "start one with `ray start --head` (docs/cluster.md)"
                ) from None
        self._actor_class = ray.remote(SessionActor)
        self._task_class = ray.remote(TaskActor)
        self._read_task = ray.remote(num_cpus=0, max_retries=0)(read_node_devices)  # holds no CPU

    def slots(self) -> list[str | None]:
        """How many workers run at once: one per CPU of the cluster, or `slots_per_gpu` per GPU.
        Ray places each; a slot names no device (Ray sets the actor's CUDA_VISIBLE_DEVICES)."""
        ray = import_ray()
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        count = gpus * self.slots_per_gpu if gpus else int(res.get("CPU", 1))
        return [None] * max(1, count)

    def nodes(self) -> list[dict]:
        """The cluster's live nodes: host, id, CPUs and GPUs (for `status` and the device panel),
        asked of Ray at most every few seconds."""
        if time.monotonic() - self._nodes[0] < 5:
            return self._nodes[1]
        ray = import_ray()
        out = []
        for n in ray.nodes():
            if not n.get("Alive"):
                continue
            res = n.get("Resources", {})
            out.append({"node": _node_label({"host": n.get("NodeManagerHostname"), "node_id": n["NodeID"]}),
                        "node_id": n["NodeID"], "cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0)})
        self._nodes = (time.monotonic(), out)
        return out

    def node_devices(self) -> list[dict]:
        """Each live node's devices as last read, one entry a node: {node, node_id, source, note,
        devices, at}. Never waits: it takes the readings that came since the last call and, at
        most every READ_SECONDS, sends a reading task pinned to each node; a node whose first
        reading has not come yet is absent."""
        ray = import_ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        with self._read_lock:
            if self._reading:
                ready, _ = ray.wait(list(self._reading), num_returns=len(self._reading), timeout=0)
                for ref in ready:
                    node = self._reading.pop(ref)
                    try:
                        self._readings[node["node_id"]] = {**node, **ray.get(ref), "at": time.time()}
                    except ray.exceptions.RayError as exc:  # its node went as it read
                        self._readings[node["node_id"]] = {**node, "source": None, "devices": [],
                                                          "note": f"no reading: {_ray_said(exc)}", "at": time.time()}
            alive = self.nodes()
            if time.monotonic() - self._read_at >= READ_SECONDS:
                self._read_at = time.monotonic()
                busy = {n["node_id"] for n in self._reading.values()}
                for node in alive:
                    if node["node_id"] not in busy:
                        strategy = NodeAffinitySchedulingStrategy(node["node_id"], soft=False)
                        self._reading[self._read_task.options(scheduling_strategy=strategy).remote()] = node
            return [self._readings[n["node_id"]] for n in alive if n["node_id"] in self._readings]

    def resources(self, session: dict) -> dict[str, float]:
        """One CPU; on a cluster with GPUs, the share of a card its base needs (a quarter for a
        micro model, so four share a card), never more than one card: a worker trains on the
        one device it is given, so more would leave cards idle, and an actor asking for more
        cards than any node has would wait for ever. A base too large for its card is the
        memory plan's to fit (checkpointing, the micro-batch) or to refuse with its fix."""
        ray = import_ray()
        if not ray.cluster_resources().get("GPU"):
            return {"num_cpus": 1, "num_gpus": 0}
        return {"num_cpus": 1, "num_gpus": gpu_share(base_memory_bytes(session.get("base") or {}), self.gpu_memory,
                                                     self.slots_per_gpu)}

    def start(self, session_path: Path, slot: str | None, *, tied: bool = False):
        session = json.loads(Path(session_path).read_text(encoding="utf-8"))
        if "task" in session:
            return self._start_task(Path(session_path), session)
        pid = _actor_id()
        name = ACTOR_NAME.format(pid=pid)
        actor = self._actor_class.options(
            name=name, namespace=self.namespace, lifetime="detached", max_restarts=0, **self.resources(session)
        ).remote(self.namespace, name)
        payload = {"stem": Path(session_path).stem, **self.scenes_payload(session["scenes"]),
                   **self.job_inputs(session["jobs"])}
        handle = RayWorker(self, pid, actor, Path(session_path))
        handle._started = actor.start.remote(session, payload)
        self.held[pid] = {j["run_id"] for j in session["jobs"]}
        return handle

    def _start_task(self, path: Path, task: dict) -> RayTask:
        """A calibration or a judge on this host (its files are the workspace's), in an actor
        pinned here that holds the card share the task's model needs where this host has cards
        (`task_resources`)."""
        ray = import_ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        actor = self._task_class.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False), max_restarts=0,
            **self.task_resources(task, here),
        ).remote()
        pid = _actor_id()
        return RayTask(actor, actor.start.remote(str(path)), pid)

    def task_resources(self, task: dict, node_id: str) -> dict[str, float]:
        """No CPU (the task's process shares this host's CPUs with the service, as a local task
        does), and where this host has cards and the task may use one, the share its model
        needs, as a session's actor asks (`gpu_share`)."""
        cards = next((n["gpus"] for n in self.nodes() if n["node_id"] == node_id), 0)
        if task.get("task") == "judge":
            device, spec = task.get("device"), {"base": task.get("model")}
        else:
            spec = task.get("base") or {}
            device = spec.get("device")
        if not cards or str(device or "").lower().startswith("cpu"):
            return {"num_cpus": 0, "num_gpus": 0}
        return {"num_cpus": 0, "num_gpus": gpu_share(base_memory_bytes(spec), self.gpu_memory, self.slots_per_gpu)}

    def adopt(self, pid: int, start_ticks: int | None):
        if start_ticks != RAY_TICKS:
            return self.local.adopt(pid, start_ticks)
        ray = import_ray()
        try:
            actor = ray.get_actor(ACTOR_NAME.format(pid=pid), namespace=self.namespace)
            where = ray.get(actor.where.remote(), timeout=SYNC_TIMEOUT)
        except (ValueError, ray.exceptions.RayError):
            return None
        session = self.root / "sessions"
        found = sorted(session.glob("session-*.json"))
        handle = RayWorker(self, pid, actor, None)
        stem = Path(where.get("session") or "").stem
        handle.session_path = next((p for p in found if p.stem == stem), None)
        handle.node, handle.node_pid = _node_label(where), where.get("worker_pid")
        self.held[pid] = set(where["runs"])
        return handle

    def sweep(self, keep: set[int]) -> tuple[list[str], list[RayWorker]]:
        """End this workspace's actors whose ids are not in `keep` (the workers a restarted service
        adopted): a session whose runs have all ended has nothing more to bring back, and its
        actor would hold its CPU or GPU share until killed. Their names back, and handles of
        those whose worker outlived SIGKILL (kept, holding their share, for the manager's
        `stuck`: a service that could not write `stuck.json` did not name them)."""
        ray = import_ray()
        ended, kept = [], []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            if entry["namespace"] != self.namespace or not name.startswith(ACTOR_NAME.format(pid="")):
                continue
            if int(name.rsplit("-", 1)[1]) in keep:
                continue
            try:
                actor = ray.get_actor(name, namespace=self.namespace)
            except ValueError:  # gone meanwhile
                continue
            try:  # its node's scratch folder too
                stuck = ray.get(actor.close.remote(), timeout=PROBE_TIMEOUT + local_executor.KILL_WAIT_SECONDS)
            except Exception:  # noqa: BLE001 - killed below either way
                stuck = None
            if stuck is not None:  # its worker outlived SIGKILL: the actor keeps its share
                handle = self.adopt(int(name.rsplit("-", 1)[1]), RAY_TICKS)
                if handle is not None:
                    handle.stuck = stuck
                    kept.append(handle)
                    continue
            ray.kill(actor, no_restart=True)
            ended.append(name)
        return ended, kept

    def scenes_payload(self, scenes: str) -> dict:
        path = Path(scenes)
        if path.is_dir():
            files = {p.name: p.read_bytes() for p in sorted(path.iterdir())
                     if p.suffix in (".yaml", ".yml") and p.is_file() and not p.name.startswith(".")}
            return {"scenes": files, "scenes_file": None}
        return {"scenes": {path.name: path.read_bytes()}, "scenes_file": path.name}

    def job_inputs(self, jobs: list[dict]) -> dict:
        """What each job needs on a node with nothing of ours: the corpus's text, in the object
        store (extracted here, so PDFs, EPUBs and corpus sets arrive as plain text), and what an
        earlier attempt left (tokens, newest checkpoint, events, log, result, cancel markers)."""
        from backend.ingest.corpora import iter_text

        ray = import_ray()
        corpora, files = {}, {}
        for job in jobs:
            run_id, run_dir = job["run_id"], Path(job["run_dir"])
            if job.get("corpus_path"):  # to tokenize, and for evaluation's novelty against it
                text = "".join(iter_text(Path(job["corpus_path"])))
                corpora[run_id] = [ray.put(text.encode("utf-8"))]
            files[run_id] = _resume_files(run_dir)
        return {"corpora": corpora, "files": files}


def _resume_files(run_dir: Path) -> dict[str, bytes]:
    out = {}
    for name in ("tokens.bin", "result.json", *APPEND_FILES):
        if (run_dir / name).is_file():
            out[name] = (run_dir / name).read_bytes()
    for marker in run_dir.glob("cancel.*"):
        out[marker.name] = b""
    steps = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())
    if steps:
        for path in steps[-1].rglob("*"):
            if path.is_file():
                out[f"checkpoints/{steps[-1].name}/{path.relative_to(steps[-1]).as_posix()}"] = path.read_bytes()
    return out


def gpu_share(need: float | None, card_bytes: float, slots_per_gpu: int) -> float:
    """The share of a card an actor asks Ray for: what its base needs (`base_memory_bytes`) of
    the card, rounded up to quarters, at most the whole card; a card's slot share where the
    need is not known here."""
    if need is None:
        return 1.0 / max(1, slots_per_gpu)
    return min(1.0, max(0.25, -(-need / card_bytes * 4 // 1) / 4))


def base_memory_bytes(base: dict) -> float | None:
    """What training an adapter on this base holds on a card, roughly: the weights (a quarter in
    4-bit) and as much again for activations, adapter and optimizer. None when the weights are
    not on this host to measure (the whole card is asked for then)."""
    name = base.get("base")
    if not name or name == "micro":
        return 0.5 * 2**30
    folder = model_folder(name)
    if folder is None:
        return None
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    if not weights:
        return None
    if base.get("quant") in ("4bit", "nf4"):
        weights /= 4
    return 2.0 * weights + 2 * 2**30


def _workspace_result(run_dir: Path, data: bytes) -> bytes:
    """result.json as a local run's: it names the corpus file the user gave, not the node's copy."""
    try:
        result = json.loads(data)
        job = json.loads((run_dir / "job.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return data
    if result.get("corpus_path"):
        result["corpus_path"] = job.get("corpus_path")
    return json.dumps(result, ensure_ascii=False, indent=1).encode()


def _reachable(address: str) -> None:
    """A HOST:PORT that does not answer fails in one line at once (Ray itself waits minutes)."""
    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ExecutorError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}): start one there with "
            "`ray start --head`, or pass --address auto on its head node (docs/cluster.md)"
        ) from None


def _node_label(where: dict) -> str:
    return f"{where.get('host') or where.get('ip') or '?'} ({str(where.get('node_id', ''))[:8]})"


def _ray_said(exc: Exception) -> str:
    """Ray's own reason in one line: the sentence that says why the actor died, if there is one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "died because" in line or "node" in line.lower() and "died" in line:
            return line[:300]
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.incoming")
    tmp.write_bytes(data)
    tmp.replace(path)
