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
import fcntl
import json
import os
import queue
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from backend.errors import JobError, LtmError
from backend.jobs import JobManager, JobSettings, detect_slots
from backend.store import Store
from backend.workspace import Workspace

PROTOCOL_VERSION = 1
TICK_SECONDS = 0.25
WARM_LINGER_SECONDS = 20.0  # a worker with nothing left waits this long for more on its base


class ServiceBusy(LtmError):
    title = "service"


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True


class Service:
    def __init__(self, workspace: Workspace, *, slots_per_gpu: int = 1, idle_exit: float = 0) -> None:
        self.workspace = workspace.ensure()
        self._lock_fh = self._take_lock()
        self.store = Store(workspace.db_path)
        self.manager = JobManager(
            workspace, self.store, slots=detect_slots(slots_per_gpu), linger=WARM_LINGER_SECONDS
        )
        self.lock = threading.RLock()  # one thread at a time touches the manager
        self.progress: dict[str, dict] = {}  # run_id -> last progress event
        self.subscribers: list[queue.Queue] = []
        self.stopping = threading.Event()
        self.stop_workers = False
        self.idle_exit = idle_exit
        self._last_busy = time.monotonic()
        self.server: _Server | None = None

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
        path = self.workspace.socket_path
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
            self.manager.reattach(self.broadcast)
        threading.Thread(target=self.server.serve_forever, name="socket", daemon=True).start()
        self.log(f"serving {self.workspace.root} on {self.workspace.socket_path} (pid {os.getpid()})")
        try:
            while not self.stopping.is_set():
                with self.lock:
                    self.manager.tick(self.broadcast)
                    busy = not self.manager.idle()
                if busy or self.subscribers:
                    self._last_busy = time.monotonic()
                elif self.idle_exit and time.monotonic() - self._last_busy > self.idle_exit:
                    self.log(f"idle for {self.idle_exit:.0f}s: exiting")
                    break
                self.stopping.wait(TICK_SECONDS)
        finally:
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        if self.stop_workers:
            with self.lock:
                self.manager.shutdown_workers(self.broadcast, reason="stopped with the service")
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
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", flush=True)

    # -- events ------------------------------------------------------------------------------

    def broadcast(self, event: dict) -> None:
        if event.get("type") == "progress":
            self.progress[event["run_id"]] = event
        for q in list(self.subscribers):
            q.put(event)

    # -- requests ----------------------------------------------------------------------------

    def handle(self, op: str, args: dict[str, Any]) -> Any:
        if op == "ping":
            return {"pid": os.getpid(), "workspace": str(self.workspace.root), "protocol": PROTOCOL_VERSION}
        if op == "submit":
            settings = JobSettings(**args["settings"])
            with self.lock:
                sub = self.manager.submit(
                    args["paths"], settings, seeds=args.get("seeds", [0]), priority=args.get("priority", 0)
                )
            return {
                "run_ids": sub.run_ids,
                "baseline_ids": sub.baseline_ids,
                "errors": [e.one_line() for e in sub.errors],
            }
        if op == "jobs":
            return self.jobs(args.get("runs"))
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
            return str(self.store.export_csv(args["path"], sort=args.get("sort", "overall")))
        if op == "cancel":
            with self.lock:
                self.manager.cancel(args["run_id"])
            return {"run_id": args["run_id"], "status": "cancelled"}
        if op == "retry":
            with self.lock:
                self.manager.retry(args["run_id"])
            return {"run_id": args["run_id"], "status": "queued"}
        if op == "run":
            return self.run_detail(args["run_id"])
        if op == "log":
            return self.log_tail(args["run_id"], int(args.get("lines", 200)))
        if op == "probes":
            return self.store.probes(args["run_id"])  # shape: docs/probes.md
        if op in ("attribute", "attribution"):  # attribution studies: shapes in docs/attribution.md
            from backend.attribution_study import handle as attribution_op

            return attribution_op(self, op, args)
        if op == "search":  # search studies for the dashboard: shape in docs/search.md
            return self.store.search(args.get("study"))
        if op == "search_save":  # `ltm-tui search` records its study's summary (backend/search.py)
            self.store.save_search(args["study"], args.get("trials") or [])
            return {"study": args["study"]["study"]}
        if op == "stop":
            self.stop_workers = bool(args.get("workers"))
            self.stopping.set()
            return {"pid": os.getpid()}
        raise JobError(f"unknown request {op!r}")

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
        }

    def log_tail(self, run_id: str, lines: int) -> dict:
        """The last lines of a run's train.log (the worker's own words), for the log view."""
        path = self.workspace.run_dir(run_id) / "train.log"
        if not path.exists():
            return {"path": str(path), "lines": []}
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
        return {"path": str(path), "lines": text.splitlines()[-max(1, min(lines, 2000)):]}

    def jobs(self, runs: list[str] | None = None) -> list[dict]:
        """The status rows: one per run, with live progress where a worker reports it."""
        wanted = set(runs) if runs else None
        with self.lock:
            pids = {r: w.pid for w in self.manager.live.values() for r in w.run_ids}
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
                    "status": run["status"],
                    "step": live.get("step", run.get("steps")),
                    "total": live.get("total"),
                    "loss": live.get("loss"),
                    "tokens_per_s": live.get("tokens_per_s"),
                    "pid": pids.get(run_id) if run["status"] not in ("done", "failed", "cancelled", "interrupted") else None,
                    "eta_s": live.get("eta_s") if run["status"] == "training" else None,
                    "error": run.get("error"),
                }
            )
        return rows


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return struct.unpack("3i", creds)[1]


def _handler_for(service: Service):
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            uid = _peer_uid(self.request)
            if uid is not None and uid != os.getuid():
                self._send({"ok": False, "error": {"title": "service", "message": "this workspace belongs to another user"}})
                return
            for raw in self.rfile:
                try:
                    req = json.loads(raw)
                    op, rid = req.get("op"), req.get("id")
                except (ValueError, AttributeError):
                    self._send({"ok": False, "error": {"title": "protocol", "message": "a request is one JSON object a line"}})
                    continue
                if op == "subscribe":
                    self._stream(rid)
                    return
                try:
                    result = service.handle(op, req.get("args") or {})
                    reply = {"id": rid, "ok": True, "result": result}
                except LtmError as exc:
                    reply = {"id": rid, "ok": False, "error": {"title": exc.title, "message": exc.message}}
                except (ValueError, KeyError, TypeError) as exc:
                    reply = {"id": rid, "ok": False, "error": {"title": "request", "message": str(exc)}}
                if not self._send(reply):
                    return

        def _send(self, obj: dict) -> bool:
            try:
                self.wfile.write((json.dumps(obj, ensure_ascii=False, default=str) + "\n").encode())
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
            q: queue.Queue = queue.Queue()
            service.subscribers.append(q)
            try:
                if not self._send({"id": rid, "ok": True, "result": "subscribed"}):
                    return
                while not service.stopping.is_set():
                    try:
                        event = q.get(timeout=1.0)
                    except queue.Empty:
                        if self._peer_gone():
                            return  # a client that left must not keep the service busy
                        continue
                    if not self._send({"event": event}):
                        return
                self._send({"event": {"type": "service", "status": "stopped"}})
            finally:
                service.subscribers.remove(q)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.service")
    parser.add_argument("--workspace")
    parser.add_argument("--slots-per-gpu", type=int, default=1, help="workers per GPU (default 1)")
    parser.add_argument("--idle-exit", type=float, default=float(os.environ.get("LTM_SERVICE_IDLE_EXIT", 0)),
                        help="exit after this many seconds with nothing queued, running or watching (0: never)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        service = Service(Workspace.resolve(args.workspace), slots_per_gpu=args.slots_per_gpu, idle_exit=args.idle_exit)
    except LtmError as exc:
        print(f"ltm-tui: {exc.one_line()}", file=sys.stderr)
        return 2

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
