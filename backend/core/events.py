"""`events.jsonl`: the one channel from a worker to whoever watches its run folder.

One JSON object a line with `ts`, `run_id`, `attempt`, `type` in {phase, progress, eval_progress,
metric, log, error, result}. The worker only appends; readers tail the file by byte offset and ignore a last
line that is not finished yet. One file holds every attempt of a run (a retry appends to it), so
a reader keeps only the events of the attempt it watches (`of_attempt`).
"""

from __future__ import annotations

import json
import os
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
