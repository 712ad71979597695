"""`events.jsonl`: the one channel from a worker to whoever watches its run folder.

One JSON object a line with `ts`, `run_id`, `attempt`, `type` in {phase, progress, eval_progress,
metric, log, error, result}. The worker only appends; readers tail the file by byte offset and ignore a last
line that is not finished yet. One file holds every attempt of a run (a retry appends to it), so
a reader keeps only the events of the attempt it watches (`of_attempt`). `LoadWatch` writes
signs of life while a base loads, which the service's stall limit reads.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

EVENT_TYPES = frozenset({"phase", "progress", "eval_progress", "metric", "log", "error", "result"})


class EventLog:
    """Appends events for one run; each line is flushed so a tailing reader sees it at once."""

    def __init__(self, path: Path, run_id: str, attempt: int = 0) -> None:
        self.path = path
        self.run_id = run_id
        self.attempt = attempt
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")

    def emit(self, type: str, **payload: Any) -> dict:
        if type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type!r}")
        event = {"ts": round(time.time(), 3), "run_id": self.run_id, "attempt": self.attempt, "type": type, **payload}
        self._fh.write(json.dumps(event, ensure_ascii=False) + "\n")
        self._fh.flush()
        return event

    def close(self) -> None:
        self._fh.close()


def read_events(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Complete events written after byte `offset`, and the offset to read from next time."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for line in data[: end + 1].splitlines():
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line from a killed writer: skip it, keep the rest
    return events, offset + end + 1


def of_attempt(event: dict, attempt: int) -> bool:
    """Whether an event belongs to this attempt of its run (events written before attempts were
    numbered count as the first)."""
    return event.get("attempt", 0) == attempt


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp name in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_tail(path: Path, max_bytes: int) -> str:
    """The last `max_bytes` of a text file, decoded leniently; "" when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def log_tail(path: Path, lines: int = 3, max_chars: int = 400) -> str:
    """The last non-empty lines of a log in one line, for an error message."""
    tail = [ln.strip() for ln in read_tail(path, 8192).strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(tail)[-max_chars:]


class LoadWatch:
    """Signs of life while a base loads. A load writes no event (13B from a slow disk takes
    minutes; a first download from the hub can take longer than the service's stall limit,
    which would stop the worker as hung). While it runs, a thread writes a `log` event every
    `every` seconds in which the process moved at least a megabyte (its /proc/self/io counters:
    a download, the weights coming off disk; the watch's own reads and lines are bytes too, a
    few hundred). A load that hangs (a file system that stopped answering) moves none and stays
    silent, so the stall limit still catches it."""

    MOVING = 2**20  # bytes an interval: less is the watch itself, not the load

    def __init__(self, events, what: str, every: float = 60.0) -> None:
        self.events, self.what, self.every = events, what, every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-watch", daemon=True)

    def __enter__(self) -> "LoadWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        first = last = io_bytes()
        while not self._done.wait(self.every):
            now = io_bytes()
            if now is not None and last is not None and now - last >= self.MOVING:
                self.events.emit("log", message=f"loading {self.what}: {(now - first) / 1e9:.1f} GB moved so far")
            last = now


def io_bytes() -> int | None:
    """Bytes this process has read and written (read()/write() calls, and storage reads such as
    a memory-mapped file's pages), or None where /proc does not say."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/io").read_text().splitlines())
        return sum(int(fields[k]) for k in ("rchar", "wchar", "read_bytes"))
    except (OSError, KeyError, ValueError):
        return None
