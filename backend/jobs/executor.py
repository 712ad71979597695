"""How workers are started and stopped: the executor is the only code that knows.

The job manager asks an executor to `start` a worker on a session file and a slot, to `adopt`
one that a previous service started, and talks to the returned handle (`exit_code`,
`terminate`, `kill`). `LocalExecutor` runs workers as local processes; a cluster executor
(Ray) implements the same three calls.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Protocol

from backend.core.devices import SLOT_ENV
from backend.core.workspace import PROJECT_ROOT


class WorkerHandle(Protocol):
    pid: int
    start_ticks: int | None

    def exit_code(self) -> int | None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None:
        """Kill it and wait a bounded time (`KILL_WAIT_SECONDS`) for it to go: a process the
        kernel holds (a GPU driver fault) outlives SIGKILL, and `exit_code()` then stays None."""
        ...

    def why_stuck(self) -> str:
        """After a kill it outlived: why, in one line (the process, its state, where to look)."""
        ...


class Executor(Protocol):
    def start(self, session_path: Path, slot: str | None, *, tied: bool = False) -> WorkerHandle:
        """A worker on the session (or task) file in the slot; `tied`: it ends with this process
        (a task, whose client waits on the service), where a run's worker outlives it."""
        ...

    def adopt(self, pid: int, start_ticks: int | None) -> WorkerHandle | None: ...


class LocalProcess:
    """A worker process: our child (`proc`), or one adopted from a service that died."""

    def __init__(self, pid: int, start_ticks: int | None, proc: subprocess.Popen | None = None) -> None:
        self.pid = pid
        self.start_ticks = start_ticks
        self.proc = proc

    def exit_code(self) -> int | None:
        """None while it runs; its exit code (our child), or -1 (an adopted one that is gone)."""
        if self.proc is not None:
            return self.proc.poll()
        return None if process_alive(self.pid, self.start_ticks) else -1

    def wait(self, timeout: float | None = None) -> int:
        if self.proc is not None:
            return self.proc.wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.exit_code() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.1)
        return -1

    def terminate(self) -> None:
        """SIGTERM to the worker's process group: it saves a checkpoint and exits."""
        signal_group(self.pid, signal.SIGTERM)

    def kill(self, wait: float | None = None) -> None:
        if self.exit_code() is None:
            signal_group(self.pid, signal.SIGKILL)
            try:
                self.wait(KILL_WAIT_SECONDS if wait is None else wait)
            except subprocess.TimeoutExpired:
                pass  # stuck in the kernel: the caller sees `exit_code()` still None

    def why_stuck(self) -> str:
        """Why it outlived SIGKILL, in words (`stuck_line`)."""
        return stuck_line(self.pid)


# SIGKILL ends a process as soon as the kernel lets go of it: at once, or after its memory is
# freed (seconds, for a worker holding a 13B base). One the kernel does not let go of (an
# uninterruptible wait in a GPU driver that faulted, a hung network file system) may never end.
KILL_WAIT_SECONDS = 10.0


def stuck_line(pid: int) -> str:
    """Why a process outlived SIGKILL, in words, from /proc: its state, and the kernel function
    it waits in (`wchan`), which names a GPU driver (nv_..., os_..., uvm_...) when one holds it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        state = stat[stat.rfind(")") + 2 :].split()[0]
    except (OSError, IndexError):
        return f"process {pid} did not exit after SIGKILL"
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
    except OSError:
        wchan = ""
    where = f", waiting in {wchan}" if wchan and wchan != "0" else ""
    kind = " uninterruptible sleep" if state == "D" else ""
    return (f"process {pid} did not exit after SIGKILL: the kernel holds it (state {state}{kind}{where}), "
            "most often a GPU driver fault: see `nvidia-smi` and `dmesg`")


def worker_env(base: Mapping[str, str], slot: str | None) -> dict[str, str]:
    """A worker's environment: this project on its path, unbuffered output, quiet libraries,
    its GPU slot, and CUDA's allocator with expandable segments (fewer out-of-memory errors
    from fragmentation when block sizes change, as packed batches and evaluation's do) unless
    the user chose an allocator setting of their own."""
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not any(env.get(name) for name in ALLOC_CONF_NAMES):
        env[alloc_conf_name()] = "expandable_segments:True"
    # CUDA numbers cards fastest first unless told otherwise, NVML (which names the slots and
    # the panel's cards) by PCI bus: the same order, so slot 1 is the card the panel calls GPU1
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
        env[SLOT_ENV] = slot  # the worker sees its slot's card alone (models.pick_device)
    return env


# torch reads PYTORCH_ALLOC_CONF from 2.9 on (PYTORCH_CUDA_ALLOC_CONF before, now a deprecated alias)
ALLOC_CONF_NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def alloc_conf_name() -> str:
    """The allocator variable the installed torch reads (its version from the package's metadata:
    the service never imports torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(part) for part in version("torch").split("+")[0].split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return ALLOC_CONF_NAMES[0]
    return ALLOC_CONF_NAMES[0] if (major, minor) >= (2, 9) else ALLOC_CONF_NAMES[1]


class LocalExecutor:
    """Workers as local processes, each in its own session (setsid) with its own log, so a
    client's exit or a dropped terminal does not reach it and it outlives the service."""

    def start(self, session_path: Path, slot: str | None, *, tied: bool = False) -> LocalProcess:
        env = worker_env(os.environ, slot)
        with open(session_path.with_suffix(".log"), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "backend.compute.worker", str(session_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=not tied,
                preexec_fn=own_session_tied_to_parent if tied else None,
                env=env,
            )
        return LocalProcess(proc.pid, process_start_ticks(proc.pid), proc)

    def adopt(self, pid: int, start_ticks: int | None) -> LocalProcess | None:
        return LocalProcess(pid, start_ticks) if process_alive(pid, start_ticks) else None


def own_session_tied_to_parent() -> None:
    """In a child before it runs: its own session (signals go to its group), and SIGKILL when
    its parent dies (Linux's PR_SET_PDEATHSIG): a task whose service died has no one to report
    to, and would hold its card beside the next service's workers; a Ray actor's worker could
    bring nothing back."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def recorded_exit(session_path: Path | None, default: int) -> int:
    """The exit code a worker left beside its session (`worker.record_exit`), else `default`."""
    try:
        return int(session_path.with_suffix(".exit").read_text().strip())
    except (AttributeError, OSError, ValueError):
        return default


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None if
    there is no such live process. With the pid it names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # a zombie has finished
        return None
    return int(fields[19])


def process_alive(pid: int | None, start_ticks: int | None) -> bool:
    if not pid:
        return False
    ticks = process_start_ticks(pid)
    return ticks is not None and (start_ticks is None or ticks == start_ticks)
