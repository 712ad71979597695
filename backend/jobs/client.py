"""A client of the job service: JSON lines over the workspace's Unix socket.

`connect(workspace)` finds the running service or starts one detached (its own session, its own
log, `service.log`), so no client's exit — a closed dashboard, a dropped SSH connection —
reaches the queue.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

from backend.core.errors import LtmError
from backend.core.workspace import PROJECT_ROOT, Workspace
from backend.jobs.protocol import PROTOCOL_VERSION, ServiceError, event_of, is_stop, reply_result, request_line

START_TIMEOUT = 120.0  # a loaded machine imports slowly; a start that fails says so at once
# A service a client started on demand exits after this long with nothing queued, running or
# watching; the next client starts it again. `ltm-tui serve` in the foreground never does.
ON_DEMAND_IDLE_EXIT = 600


class Client:
    def __init__(self, workspace: Workspace, timeout: float | None = 60.0) -> None:
        self.workspace = workspace
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # a blocking connect waits for a place in a busy service's backlog; with a timeout set
        # first, a Unix socket fails at once with EAGAIN (thousands of clients at once)
        self.sock.connect(str(workspace.socket_path))
        self.sock.settimeout(timeout)
        self.rfile = self.sock.makefile("rb")
        self._ids = itertools.count(1)

    def close(self) -> None:
        try:
            self.rfile.close()
        finally:
            self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, op: str, **args: Any) -> Any:
        self.sock.sendall(request_line(next(self._ids), op, args))
        return reply_result(self.rfile.readline(), op, str(self.workspace.root))

    def subscribe(self) -> Iterator[dict]:
        """Every event the service sees from now on, in order, until it stops. The subscription
        is made before this returns, so no event falls between it and a later request."""
        self.sock.settimeout(None)
        self.call("subscribe")
        return self._events()

    def _events(self) -> Iterator[dict]:
        while True:
            raw = self.rfile.readline()
            if not raw:
                raise ServiceError(f"the service on {self.workspace.root} closed the connection; see its service.log")
            event = event_of(raw)
            if event is None:
                continue
            yield event
            if is_stop(event):
                return


def try_connect(workspace: Workspace) -> Client | None:
    """A client of the running service, or None when no service answers on this workspace."""
    if not workspace.socket_path.exists():
        return None
    try:
        client = Client(workspace)
        pong = client.call("ping")
    except (OSError, LtmError, ValueError):
        return None
    if pong.get("protocol") != PROTOCOL_VERSION:
        client.close()
        raise ServiceError(
            f"the service on {workspace.root} (pid {pong.get('pid')}) speaks protocol "
            f"{pong.get('protocol')} and this ltm-tui {PROTOCOL_VERSION}: stop it with `ltm-tui stop` "
            "(its workers go on and the new service adopts them), then run the command again"
        )
    return client


def start_service(workspace: Workspace, adopt_only: bool = False) -> subprocess.Popen:
    workspace.checked_socket_path()  # a path too long for a socket is said here, not by a service that died
    if workspace.root.exists() and not os.access(workspace.root, os.W_OK | os.X_OK):
        raise LtmError(f"{workspace.root} is not writable by you, and its service (which keeps the results) "
                       "writes its socket and log there; ask its owner to run the command, or copy the folder",
                       title="workspace")
    workspace.ensure()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    with workspace.open_log() as log:
        return subprocess.Popen(
            [sys.executable, "-m", "backend.service", "--workspace", str(workspace.root),
             "--idle-exit", str(ON_DEMAND_IDLE_EXIT), *(["--adopt-only"] if adopt_only else [])],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )


def connect(workspace: Workspace, *, start: bool = True, adopt_only: bool = False) -> Client:
    """The running service's client; starts the service first when none answers (`adopt_only`:
    one that adopts the workers there are and starts none)."""
    client = try_connect(workspace)
    if client is not None:
        return client
    if not start:
        raise ServiceError(f"no service runs on {workspace.root}; `ltm-tui serve` starts one")
    proc = start_service(workspace, adopt_only)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        client = try_connect(workspace)
        if client is not None:
            return client
        code = proc.poll()
        if code is not None:
            client = try_connect(workspace)  # another client may have started one just now
            if client is not None:
                return client
            if _other_service(workspace, proc.pid):
                time.sleep(0.1)  # it holds the lock and is still opening the store: wait for its socket
                continue
            tail = workspace.log_path.read_text(errors="replace").strip().splitlines()[-1:] if workspace.log_path.exists() else []
            raise ServiceError(f"the service did not start (exit {code}): {' '.join(tail)}")
        time.sleep(0.1)
    raise ServiceError(f"the service did not answer within {START_TIMEOUT:.0f}s; see {workspace.log_path}")


def _other_service(workspace: Workspace, mine: int) -> bool:
    """Whether another live process than ours wrote the service's pid file (it won the lock)."""
    from backend.jobs.executor import process_alive

    try:
        pid = int(workspace.pid_path.read_text().strip())
    except (OSError, ValueError):
        return False
    return pid != mine and process_alive(pid, None)


def run_task(workspace: Workspace, kind: str, say: Callable[[str], None], **args: Any) -> dict:
    """Ask the service for a task (a calibration or a judge: backend/jobs/tasks.py), report its lines
    through `say` and return its finished row, result included. It waits for a worker slot like
    a run. Ctrl-C cancels the task; a task that fails raises its one line."""
    with connect(workspace) as watch:
        events = watch.subscribe()  # before the task exists: none of its events can be missed
        with connect(workspace) as client:
            task = client.call("task", kind=kind, **args)
        if task["task_id"] is None:
            return task
        if task.get("waiting"):
            say(f"waiting: {task['waiting']}")
        try:
            for event in events:
                if is_stop(event):
                    raise ServiceError(f"the service stopped before {task['what']} finished; run the command again")
                if event.get("type") != "task" or event.get("task_id") != task["task_id"]:
                    continue
                if event.get("message"):
                    say(event["message"])
                status = event.get("status")
                if status == "done":
                    return {**task, "status": status, "result": event.get("result")}
                if status in ("failed", "cancelled"):
                    raise LtmError(f"{task['what']}: {event.get('error') or status}", title=kind)
        except KeyboardInterrupt:
            with connect(workspace) as client:
                client.call("task_cancel", task_id=task["task_id"])
            raise
    raise ServiceError(f"the service closed the connection before {task['what']} finished")
