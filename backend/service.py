"""The job service: owns the queue and the one read-write DuckDB connection of a workspace.

    python -m backend.service --workspace DIR      (or `ltm-tui serve`)

Clients (the dashboard, `ltm-tui run/status/results/…`) talk to it over a Unix socket in the
workspace (mode 0600, and peers of another user are refused) with JSON lines: a request
`{"id": 1, "op": "jobs", ...}` gets one response `{"id": 1, "ok": true, "result": ...}` or
`{"id": 1, "ok": false, "error": {"title": ..., "message": ...}}`; the `subscribe` op turns the
connection into a stream of `{"event": {...}}` lines. Workers are not its children in any way
that matters: they run in their own sessions, so the service can stop or die and a new one
re-attaches to them.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import queue
import re
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from backend.core.errors import JobError, LtmError
from backend.core.events import read_tail
from backend.core.states import JobState
from backend.core.workspace import Workspace, keep_private
from backend.jobs.manager import JobManager, detect_slots, inspect_files
from backend.jobs.protocol import PROTOCOL_VERSION
from backend.jobs.settings import JobSettings
from backend.jobs.store import Store

TICK_SECONDS = 0.25
TROUBLE_PAUSE_SECONDS = 2.0  # after a failed tick (a full disk), before the next try
PROGRESS_TAIL_BYTES = 64 * 1024  # the end of an adopted run's events file, for its newest progress
# The longest request line read: a submit of thousands of paths or a judge's rescore fits; a line
# past this is refused and its connection closed, so no client can make the service hold more.
MAX_REQUEST_BYTES = 8 << 20
# A run id names a folder under runs/: letters, digits, '.', '_', '-', never a path.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# How far a subscriber may fall behind (events queued for it) before it is dropped, and how long
# one write to it may block: a night of progress events is millions, a stopped reader's must not
# pile up in the service
SUBSCRIBER_BACKLOG = 10_000
STREAM_SEND_TIMEOUT = 120.0
WARM_LINGER_SECONDS = 20.0  # a worker with nothing left waits this long for more on its base


class ServiceBusy(LtmError):
    title = "service"


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # many clients connecting at once wait in the backlog, not refused


class Service:
    def __init__(self, workspace: Workspace, *, slots_per_gpu: int = 1, idle_exit: float = 0,
                 executor: str | None = None, address: str | None = None, max_retries: int = 1) -> None:
        self.workspace = workspace.ensure()
        self._lock_fh = self._take_lock()
        self.executor_name, self.address = choose_executor(self.workspace, executor, address)
        self.executor = None
        slots = None
        if self.executor_name == "ray":
            from backend.jobs.ray_executor import RayExecutor

            try:
                self.executor = RayExecutor(self.workspace.root, self.address, slots_per_gpu=slots_per_gpu)
            except LtmError:
                self._lock_fh.close()
                raise
            slots = self.executor.slots()
        if executor is not None:  # chosen on the command line, and it works: the workspace keeps it
            remember_executor(self.workspace, self.executor_name, self.address)
        self.store = Store(workspace.db_path)
        self.manager = JobManager(
            workspace, self.store, slots=slots or detect_slots(slots_per_gpu), linger=WARM_LINGER_SECONDS,
            executor=self.executor, max_retries=max_retries,
        )
        self.lock = threading.RLock()  # one thread at a time touches the manager
        self.progress: dict[str, dict] = {}  # run_id -> last progress event
        self.subscribers: list[queue.Queue] = []
        self.stopping = threading.Event()
        self.stop_workers = False
        self.idle_exit = idle_exit
        self.trouble: str | None = None  # why the last tick failed, until one succeeds
        self._last_busy = time.monotonic()
        self.server: _Server | None = None
        from backend.studies.searches import Searches

        self.searches = Searches(self)  # search studies, each a thread: backend/studies/search_study.py

    # -- lifecycle ----------------------------------------------------------------------------

    def _take_lock(self):
        """One service per workspace: an exclusive lock on service.pid, held for our lifetime."""
        fh = open(self.workspace.pid_path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            other = fh.read().strip() or "?"
            fh.close()
            raise ServiceBusy(
                f"a service already runs on {self.workspace.root} (pid {other}); "
                "use it, or stop it with `ltm-tui stop`"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        return fh

    def _bind(self) -> None:
        path = self.workspace.checked_socket_path()
        path.unlink(missing_ok=True)  # we hold the lock: any socket file left here is stale
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            self.server = _Server(str(path), _handler_for(self))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    def serve(self) -> int:
        self._bind()
        with self.lock:
            for name in self.manager.reattach(self.broadcast):
                self.log(f"ended {name}: a worker no run needs any more (its service had left)")
            self._seed_progress()
        self.searches.resume_all()
        threading.Thread(target=self.server.serve_forever, name="socket", daemon=True).start()
        busy = self._tick()
        self.log(f"serving {self.workspace.root} on {self.workspace.socket_path} (pid {os.getpid()})")
        try:
            while not self.stopping.is_set():
                if busy is None:  # in trouble: wait, then try again
                    self.stopping.wait(TROUBLE_PAUSE_SECONDS)
                else:
                    if busy or self.subscribers:
                        self._last_busy = time.monotonic()
                    elif self.idle_exit and time.monotonic() - self._last_busy > self.idle_exit:
                        self.log(f"idle for {self.idle_exit:.0f}s: exiting")
                        break
                    self.stopping.wait(TICK_SECONDS)
                if not self.stopping.is_set():
                    busy = self._tick()
        finally:
            self.shutdown()
        return 0

    def _seed_progress(self) -> None:
        """Each adopted run's newest progress, read from the end of its events file: the ticks
        replay the file from its start (a night of events can take minutes to apply), and until
        they are through, the first `status` after a restart would show where its log begins."""
        for worker in self.manager.live.values():
            for run_id in worker.run_ids:
                attempt = self.store.get_run(run_id).get("attempt")
                tail = read_tail(self.workspace.run_dir(run_id) / "events.jsonl", PROGRESS_TAIL_BYTES)
                for line in reversed(tail.splitlines()[1:] or tail.splitlines()):  # the first may be cut
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if event.get("type") == "progress" and event.get("attempt", attempt) == attempt:
                        self.progress[run_id] = {**event, "run_id": run_id}
                        break

    def _tick(self) -> bool | None:
        """One pass of the scheduler: whether work goes on, or None when it failed (in trouble)."""
        try:
            with self.lock:
                self.manager.tick(self.broadcast)
                busy = not self.manager.idle() or self.searches.busy()
            self.trouble = None
            return busy
        except Exception as exc:  # noqa: BLE001 - a full disk or a bug must not end the queue
            self._in_trouble(exc)
            return None

    def shutdown(self) -> None:
        self.searches.stop_all()  # first: their loops use the store and the manager
        with self.lock:
            self.manager.tasks.stop_all()  # their clients wait on this service: they are told it stopped
            if self.stop_workers:
                self.manager.shutdown_workers(self.broadcast, reason="stopped with the service")
            else:  # the rest go on without us; one with no run left would wait for nothing
                self.manager.end_lingering(self.broadcast)
        self.broadcast({"type": "service", "status": "stopped"})
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        # The database is released before the socket goes, so a client that sees no socket can
        # open it; the lock goes last, so no new service binds a socket we then remove.
        self.store.close()
        self.workspace.socket_path.unlink(missing_ok=True)
        self._lock_fh.close()
        self.log("stopped")

    def log(self, line: str) -> None:
        try:
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", flush=True)
        except OSError:
            pass  # service.log is on the full disk too: the broadcast still says it

    def _in_trouble(self, exc: Exception) -> None:
        """A tick failed (the disk is full, the database cannot be written): say so once, keep
        every worker running, and try again shortly. Events not yet applied are read again."""
        if _disk_full(exc):
            message = f"disk full under {self.workspace.root}: free space; the queue goes on by itself"
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            message = f"the queue stalled on {type(exc).__name__}: {first[:200]}; see service.log"
        if message != self.trouble:
            self.trouble = message
            self.log(f"{message}\n{traceback.format_exc()}")
            self.broadcast({"type": "service", "status": "trouble", "message": message})

    # -- events ------------------------------------------------------------------------------

    def broadcast(self, event: dict) -> None:
        if event.get("type") == "progress":
            old = self.progress.get(event["run_id"])
            # a replay after a restart goes through a run's old steps again: the newest stays
            if not (old and old.get("attempt") == event.get("attempt") and (event.get("step") or 0) < (old.get("step") or 0)):
                self.progress[event["run_id"]] = event
        elif event.get("type") == "worker" and (line := event.get("stuck") or event.get("freed")):
            self.log(line)  # a worker the kernel holds (a GPU driver fault) belongs in service.log
        for q in list(self.subscribers):
            try:
                q.put_nowait(event)
            except queue.Full:  # a client that stopped reading (a suspended terminal, a pager)
                self._drop(q)

    def _drop(self, q: queue.Queue) -> None:
        """A subscriber SUBSCRIBER_BACKLOG events behind is dropped, not followed into the night's
        memory: its stream ends, and the dashboard reconnects and reads everything afresh."""
        try:
            self.subscribers.remove(q)  # its stream sees it gone (`_stream`)
        except ValueError:
            return
        self.log(f"a subscriber fell {SUBSCRIBER_BACKLOG} events behind (it stopped reading): dropped")

    # -- requests ----------------------------------------------------------------------------

    def handle(self, op: str, args: dict[str, Any]) -> Any:
        run_id = args.get("run_id")
        if run_id is not None and not (isinstance(run_id, str) and _RUN_ID.fullmatch(run_id)):
            raise JobError(f"{run_id!r} is not a run id; `ltm-tui status` lists them")
        if op == "ping":
            return {"pid": os.getpid(), "workspace": str(self.workspace.root), "protocol": PROTOCOL_VERSION,
                    "trouble": self.trouble, "searches": self.searches.running(),
                    "stuck": self.manager.stuck_lines(),
                    "executor": self.executor_name, "address": self.address,
                    "nodes": self.executor.nodes() if self.executor is not None else None}
        if op == "submit":
            settings = JobSettings(**args["settings"])
            paths = args["paths"]
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise JobError("submit: paths must be a list of file or folder names")
            inspected = inspect_files(paths)  # reads every file: outside the lock, status stays quick
            with self.lock:
                sub = self.manager.enqueue(
                    inspected, settings, seeds=args.get("seeds", [0]), priority=args.get("priority", 0)
                )
            return {
                "run_ids": sub.run_ids,
                "baseline_ids": sub.baseline_ids,
                "new_baseline_ids": sub.new_baseline_ids,
                "errors": [e.one_line() for e in sub.errors],
            }
        if op == "jobs":
            return self.jobs(args.get("runs"))
        if op == "devices":  # each cluster node's devices, for the dashboard's panel (local: None)
            return self.node_devices()
        if op == "workers":  # the live workers (a fit check counts the memory they hold as the queue's)
            return [{"pid": w.pid, "slot": w.slot, "runs": list(w.run_ids), "node": getattr(w.process, "node", None)}
                    for w in list(self.manager.live.values())]
        if op == "cards":  # the GPUs the slots name, in order: what `--device cuda:N` counts
            return self.manager.cards()
        if op == "results":
            return self.store.results(
                sort=args.get("sort", "overall"), descending=args.get("descending", True)
            )
        if op == "scene_results":  # per-scene results of runs: compare, weak scenes, the judge
            return {run_id: self.store.scene_results(run_id) for run_id in args["runs"]}
        if op == "rescore":  # a judge graded a run's generations: its new scene results and scores
            self.store.rescore_run(args["run_id"], args["scene_results"], args["scores"], args.get("overall"))
            return {"run_id": args["run_id"]}
        if op == "export":
            order = {"sort": args.get("sort", "overall"), "descending": bool(args.get("descending", True)),
                     "baselines_first": bool(args.get("baselines_first", False))}
            if args.get("path") == "-":  # the table itself, for the client to print
                return {"csv": self.store.csv_text(**order)}
            mode = args.get("mode", 0o644)
            if not isinstance(mode, int) or not 0 <= mode <= 0o777:
                raise JobError("export: mode is a file mode such as 420 (0o644)")
            return str(self.store.export_csv(args["path"], mode=mode, **order))
        if op == "cancel":
            with self.lock:
                self.manager.cancel(args["run_id"], self.broadcast)
            return {"run_id": args["run_id"], "status": "cancelled"}
        if op == "retry":
            with self.lock:
                self.manager.retry(args["run_id"], self.broadcast)
            return {"run_id": args["run_id"], "status": "queued"}
        if op == "run":
            return self.run_detail(args["run_id"])
        if op == "log":
            return self.log_tail(args["run_id"], int(args.get("lines", 200)))
        if op == "probes":
            return self.store.probes(args["run_id"])  # shape: docs/probes.md
        if op in ("attribute", "attribution"):  # attribution studies: shapes in docs/attribution.md
            from backend.studies.attribution_study import handle as attribution_op

            return attribution_op(self, op, args)
        if op == "search":  # search studies for the dashboard: shape in docs/search.md
            found = self.store.search(args.get("study"))
            running = set(self.searches.running())
            for study in [*found["studies"], *([found["study"]] if found["study"] else [])]:
                study["running"] = study["study"] in running
            return found
        if op == "search_start":  # run a study here, or find it running (backend/studies/search_study.py)
            return self.searches.start(args)
        if op == "search_stop":
            return self.searches.stop(str(args.get("study")))
        if op in ("task", "task_cancel", "tasks"):  # calibrations and judges: backend/jobs/tasks.py
            return self.task_op(op, args)
        if op == "stop":
            self.stop_workers = bool(args.get("workers"))
            self.stopping.set()
            return {"pid": os.getpid()}
        raise JobError(f"unknown request {op!r}")

    def task_op(self, op: str, args: dict[str, Any]) -> Any:
        if op == "tasks":
            with self.lock:
                return [t.row() for t in self.manager.tasks.tasks.values()]
        if op == "task_cancel":
            with self.lock:
                return self.manager.tasks.cancel(str(args.get("task_id")), self.broadcast).row()
        kind, skipped = args.get("kind"), []
        if kind == "calibrate":
            spec = {k: args.get(k) for k in ("base", "train", "lora", "steps", "scenes", "sample")}
            if not isinstance(spec["base"], dict) or not isinstance(spec["base"].get("base"), str):
                raise JobError("task calibrate: base must be a base spec such as {\"base\": \"micro\"}")
            what = f"calibrate {JobSettings(base=spec['base'], scenes='').base_label()}"
        elif kind == "judge":
            runs, model = args.get("runs"), args.get("model")
            if not isinstance(runs, list) or not all(isinstance(r, str) and _RUN_ID.fullmatch(r) for r in runs):
                raise JobError("task judge: runs must be a list of run ids")
            if not isinstance(model, str) or not model:
                raise JobError("task judge: model must be a local model folder")
            found = {r: self.store.scene_results(r) for r in runs}
            skipped = [r for r in runs if not found[r]]
            spec = {"model": model, "device": args.get("device"), "runs": {r: v for r, v in found.items() if v}}
            what = f"judge {len(spec['runs'])} run(s) with {model}"
        else:
            raise JobError(f"task: kind must be calibrate or judge, not {kind!r}")
        with self.lock:
            if kind == "judge" and not spec["runs"]:
                return {"task_id": None, "status": "done", "result": [], "skipped": skipped}
            task = self.manager.submit_task(kind, spec, what)
            return {**task.row(), "waiting": self.manager.task_wait(task), "skipped": skipped}

    def run_detail(self, run_id: str) -> dict:
        """One run for the detail screen: every column, its corpus, curve and scene results."""
        run = self.store.get_run(run_id)
        if run is None:
            raise JobError(f"no run {run_id}; `ltm-tui status` lists them")
        corpus = self.store.get_corpus(run["corpus_id"]) if run.get("corpus_id") else None
        scores = self.store.run_scores(run_id)
        return {
            "run": run,
            "corpus": corpus,
            "scores": scores,
            "curve": self.store.curve(run_id),
            "scenes": self.store.scene_results(run_id),
            "progress": self.progress.get(run_id),
            "attempts": self.store.attempts(run_id),  # how each earlier attempt ended
        }

    def log_tail(self, run_id: str, lines: int) -> dict:
        """The last lines of a run's train.log (the worker's own words), for the log view."""
        path = self.workspace.run_dir(run_id) / "train.log"
        text = read_tail(path, 64 * 1024)
        return {"path": str(path), "lines": text.splitlines()[-max(1, min(int(lines), 2000)):]}

    def node_devices(self) -> list[dict] | None:
        """One entry a node of the Ray cluster: its devices as last read (at most every 2 s, never
        waited for: a tick goes on meanwhile) and `workers`, its worker processes' pids on the
        node -> their ids in `jobs`, so the panel names the run that holds each GPU."""
        if self.executor is None or not hasattr(self.executor, "node_devices"):
            return None
        workers: dict[str, dict[str, int]] = {}
        for w in list(self.manager.live.values()):  # no lock: as `jobs`, a copy of the live ones
            node, node_pid = getattr(w.process, "node", None), getattr(w.process, "node_pid", None)
            if node and node_pid:
                workers.setdefault(node, {})[str(node_pid)] = w.pid
        return [{**n, "workers": workers.get(n["node"], {})} for n in self.executor.node_devices()]

    def jobs(self, runs: list[str] | None = None) -> list[dict]:
        """The status rows: one per run, with live progress where a worker reports it."""
        wanted = set(runs) if runs else None
        # no lock: a submission of thousands of files holds it while it stores their rows, and
        # status must answer meanwhile; copying the live workers and their runs is atomic enough
        pids = {r: w.pid for w in list(self.manager.live.values()) for r in list(w.run_ids)}
        rows = []
        for run in self.store.list_runs():
            run_id = run["run_id"]
            if wanted is not None and run_id not in wanted:
                continue
            live = self.progress.get(run_id, {})
            rows.append(
                {
                    "run_id": run_id,
                    "corpus": Path(run["corpus_path"]).name if run.get("corpus_path") else None,
                    "kind": run["kind"],
                    "base": run["base"],
                    # what tells two jobs of one corpus apart: the seed, the micro preset, the battery
                    "seed": run.get("seed"),
                    "preset": ((run.get("settings") or {}).get("base") or {}).get("preset"),
                    "scenes": (run.get("settings") or {}).get("scenes"),
                    "status": run["status"],
                    "step": live.get("step", run.get("steps")),
                    "total": live.get("total"),
                    "loss": live.get("loss"),
                    "tokens_per_s": live.get("tokens_per_s"),
                    "pid": None if JobState(run["status"]).is_terminal() else pids.get(run_id),
                    "eta_s": live.get("eta_s") if run["status"] == "training" else None,
                    "error": run.get("error"),
                    # the cluster node (Ray) it runs or ran on; none while queued, nor for local runs
                    "node": None if run["status"] == "queued" else self.manager.nodes.get(run_id),
                }
            )
        return rows


EXECUTORS = ("local", "ray")


def choose_executor(workspace: Workspace, executor: str | None, address: str | None) -> tuple[str, str | None]:
    """The workspace's executor: the flag, else LTM_EXECUTOR, else what `serve --executor` chose
    last time (WORKSPACE/executor.json, so a service started on demand keeps it), else local.
    The address likewise: flag, RAY_ADDRESS, the file, `auto`."""
    path = workspace.root / "executor.json"
    try:
        remembered = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        remembered = {}
    name = executor or os.environ.get("LTM_EXECUTOR") or remembered.get("executor") or "local"
    if name not in EXECUTORS:
        raise JobError(f"executor {name!r}: choose one of {', '.join(EXECUTORS)} (--executor or LTM_EXECUTOR)")
    if name == "local":
        address = None
    else:
        address = address or os.environ.get("RAY_ADDRESS") or remembered.get("address") or "auto"
    return name, address


def remember_executor(workspace: Workspace, name: str, address: str | None) -> None:
    """`serve --executor`: the workspace keeps the choice (WORKSPACE/executor.json)."""
    (workspace.root / "executor.json").write_text(json.dumps({"executor": name, "address": address}) + "\n")


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return struct.unpack("3i", creds)[1]


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC, raised by Python or reported inside a DuckDB error (a WAL that could not grow)."""
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc)


def _error(rid, title: str, message: str) -> dict:
    return {"id": rid, "ok": False, "error": {"title": title, "message": message}}


def _handler_for(service: Service):
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            uid = _peer_uid(self.request)
            if uid is not None and uid != os.getuid():
                self._send({"ok": False, "error": {"title": "service", "message": "this workspace belongs to another user"}})
                return
            while True:
                raw = self.rfile.readline(MAX_REQUEST_BYTES + 1)
                if not raw:
                    return
                if len(raw) > MAX_REQUEST_BYTES:
                    self._send(_error(None, "protocol", f"a request line is at most {MAX_REQUEST_BYTES >> 20} MiB"))
                    return  # the rest of the line cannot be told from the next request
                try:
                    req = json.loads(raw)
                except ValueError:
                    req = None
                if not isinstance(req, dict) or not isinstance(req.get("op"), str) or not isinstance(req.get("args") or {}, dict):
                    self._send(_error(None, "protocol", 'a request is one JSON object a line: {"id": 1, "op": "jobs", "args": {}}'))
                    continue
                rid = req.get("id")
                if req["op"] == "subscribe":
                    self._stream(rid)
                    return
                if not self._send(self._answer(rid, req["op"], req.get("args") or {})):
                    return

        def _answer(self, rid, op: str, args: dict) -> dict:
            """Every request gets a reply: its result, or one line saying what was wrong."""
            try:
                return {"id": rid, "ok": True, "result": service.handle(op, args)}
            except LtmError as exc:
                return _error(rid, exc.title, exc.message)
            except KeyError as exc:
                return _error(rid, "request", f"{op}: missing argument {exc}")
            except (ValueError, TypeError, AttributeError, ArithmeticError) as exc:
                what = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                return _error(rid, "request", f"{op}: {what}")
            except Exception as exc:  # noqa: BLE001 - a bug must not cost the client its reply
                if _disk_full(exc):
                    return _error(rid, "disk full", f"{op}: no space left under {service.workspace.root}; "
                                  "free space and try again (nothing was half-stored)")
                if isinstance(exc, OSError):
                    return _error(rid, "service", f"{op}: {exc.strerror or exc} ({exc.filename or 'workspace'})")
                service.log(f"request {op!r} failed:\n{traceback.format_exc()}")
                return _error(rid, "service", f"{op} failed: {type(exc).__name__}; see service.log")

        def _send(self, obj: dict) -> bool:
            try:
                line = json.dumps(obj, ensure_ascii=False, default=str) + "\n"
                self.wfile.write(line.encode("utf-8", "replace"))  # a lone surrogate (a bad file name) as "?"
                self.wfile.flush()
                return True
            except OSError:
                return False

        def _peer_gone(self) -> bool:
            readable, _, _ = select.select([self.request], [], [], 0)
            if not readable:
                return False
            try:
                return self.request.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def _stream(self, rid) -> None:
            q: queue.Queue = queue.Queue(maxsize=SUBSCRIBER_BACKLOG)
            # a client that stops reading blocks a write once its socket's buffer is full: that
            # long, and its stream ends (its backlog is bounded too: `Service._drop`)
            self.request.settimeout(STREAM_SEND_TIMEOUT)
            service.subscribers.append(q)
            try:
                if not self._send({"id": rid, "ok": True, "result": "subscribed"}):
                    return
                while not service.stopping.is_set():
                    try:
                        event = q.get(timeout=1.0)
                    except queue.Empty:
                        if q not in service.subscribers or self._peer_gone():
                            return  # a client that left or fell behind must not keep the service busy
                        continue
                    if not self._send({"event": event}):
                        return
                self._send({"event": {"type": "service", "status": "stopped"}})
            finally:
                try:
                    service.subscribers.remove(q)
                except ValueError:  # dropped by `Service._drop`
                    pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.service")
    parser.add_argument("--workspace")
    parser.add_argument("--slots-per-gpu", type=int, default=1, help="workers per GPU (default 1)")
    parser.add_argument("--idle-exit", type=float, default=float(os.environ.get("LTM_SERVICE_IDLE_EXIT", 0)),
                        help="exit after this many seconds with nothing queued, running or watching (0: never)")
    parser.add_argument("--executor", choices=EXECUTORS, help="where workers run (default: LTM_EXECUTOR, "
                        "else the workspace's last choice, else local)")
    parser.add_argument("--address", help="the Ray cluster: auto or HOST:PORT (default RAY_ADDRESS, else auto)")
    parser.add_argument("--adopt-only", action="store_true",
                        help="adopt and watch the workers there are, start none (`ltm-tui stop --all` uses it)")
    parser.add_argument("--max-retries", type=int, default=1,
                        help="times a run whose node was lost, or whose worker hung, is queued again by itself (default 1)")
    args = parser.parse_args(argv)
    keep_private()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        service = Service(Workspace.resolve(args.workspace), slots_per_gpu=args.slots_per_gpu, idle_exit=args.idle_exit,
                          executor=args.executor, address=args.address, max_retries=args.max_retries)
    except LtmError as exc:
        print(f"ltm-tui: {exc.one_line()}", file=sys.stderr)
        return 2
    service.manager.adopt_only = args.adopt_only

    def on_term(signum, frame):  # noqa: ARG001
        service.stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    code = service.serve()
    # Everything is closed and logged; leave now, so that no client connection still open in
    # a handler thread can keep the process (and the workspace's lock file) alive.
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
