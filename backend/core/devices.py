"""Device readings: NVML per GPU, or the host's CPU and RAM, for the dashboard's device panel
and, on a Ray cluster, for each node (backend/jobs/ray_executor.py reads them on the node).

NVML (the `pynvml` module of the nvidia-ml-py distribution) is initialised once, by the first
`DeviceMonitor`; every reading that fails shows as None ("n/a" on screen) and never raises. Where
NVML is absent — no package, no driver, no GPU — the monitor reads CPU and RAM with psutil and
says so. No textual here, no torch: `ltm_tui/widgets.py` renders these readings.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

HISTORY = 60  # samples kept per device: one minute at the panel's one-second poll
# Set in a worker's environment when the service started it in a slot (the slot's GPU id), or
# to "ray" in a Ray actor: the process sees its one card alone, as cuda:0.
SLOT_ENV = "LTM_WORKER_SLOT"


def cuda_entries(visible: str) -> list[str]:
    """The entries of a CUDA_VISIBLE_DEVICES value as CUDA parses it, before any card is asked:
    where the first is a UUID (GPU-… or MIG-…), the entries up to the first of another kind;
    else card numbers, each read from its entry's leading digits as strtoul reads them (`1a` is
    1), up to the first entry without (empty, -1, a name). A repeated entry shows no card at all."""
    entries: list[str] = []
    if visible.startswith(("GPU-", "MIG-")):
        for entry in visible.split(","):
            if entry in entries:
                return []
            if not entry.startswith(visible[:4]):
                break
            entries.append(entry)
        return entries
    for entry in visible.split(","):
        digits = re.match(r"\+?\d+", entry.strip())
        if digits is None:
            break
        number = str(int(digits.group()))
        if number in entries:
            return []
        entries.append(number)
    return entries


def visible_cards(pynvml, entries: list[str] | None = None) -> list[tuple[str, Any]]:
    """(entry, NVML handle) of each card CUDA shows this process, in CUDA's order: the entries of
    CUDA_VISIBLE_DEVICES (`cuda_entries`) up to the first that names no card here (a number past
    the last card, a UUID or a prefix of one that matches no card or several), as CUDA stops
    there; every card where it is unset. `entries` read another process's view instead (the job
    service's cards, which its workers get). NVML must be initialised; its errors pass to the caller."""
    count = pynvml.nvmlDeviceGetCount()
    visible = ",".join(entries) if entries is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [(str(i), pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
    entries = cuda_entries(visible)
    if not entries or not entries[0].startswith(("GPU-", "MIG-")):
        cards = []
        for entry in entries:
            if int(entry) >= count:
                break
            cards.append((entry, pynvml.nvmlDeviceGetHandleByIndex(int(entry))))
        return cards
    whole = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    uuids = [(nvml_text(pynvml.nvmlDeviceGetUUID(h)), i) for i, h in enumerate(whole)]
    cards, seen = [], set()
    for entry in entries:
        if entry.startswith("MIG-"):  # a MIG instance is named by its whole UUID
            try:
                handle, key = pynvml.nvmlDeviceGetHandleByUUID(entry), entry
            except Exception:
                break
        else:
            found = [i for uuid, i in uuids if uuid.startswith(entry)]
            if len(found) != 1:
                break
            handle, key = whole[found[0]], found[0]
        if key in seen:  # two prefixes of one card
            return []
        seen.add(key)
        cards.append((entry, handle))
    return cards


def nvml_text(value: str | bytes) -> str:
    """A name or UUID as NVML gives it: bytes from older nvidia-ml-py releases, str from newer."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass
class DeviceReading:
    """One device at one moment. `kind` is "gpu" or "host"; any number may be None (n/a)."""

    index: int
    kind: str
    name: str
    memory_used: int | None = None  # bytes
    memory_total: int | None = None
    utilization: float | None = None  # percent
    temperature: float | None = None  # degrees C
    processes: dict[int, int | None] = field(default_factory=dict)  # pid -> bytes on the device

    @property
    def memory_share(self) -> float | None:
        if self.memory_used is None or not self.memory_total:
            return None
        return self.memory_used / self.memory_total


@dataclass
class Snapshot:
    devices: list[DeviceReading]
    source: str  # "nvml" or "psutil"
    note: str  # why NVML is not used, or ""
    at: float


def reading_of(data: dict) -> DeviceReading:
    """A reading as it came through the socket (a cluster node's): JSON keys are strings."""
    procs = {int(pid): used for pid, used in (data.get("processes") or {}).items()}
    return DeviceReading(**{**data, "processes": procs})


def _reading(read: Callable[[], Any]) -> Any:
    """One reading, or None (n/a) when it fails: every NVML or psutil call may fail on its own
    (not supported, a lost device, a sandboxed /proc), and none may take the panel down."""
    try:
        return read()
    except Exception:
        return None


class DeviceMonitor:
    """Reads every GPU through NVML when it can, else the host; keeps a memory history per device."""

    def __init__(self) -> None:
        self.nvml = None
        self.note = ""
        self.history: dict[int, deque[float | None]] = {}
        self._init_nvml()

    def _init_nvml(self) -> None:
        try:
            import pynvml
        except ImportError:
            self.note = "no GPU readings: showing CPU and RAM (the nvidia-ml-py package is not installed)"
            return
        try:
            pynvml.nvmlInit()
            self.count = pynvml.nvmlDeviceGetCount()
        except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            self.note = f"no GPU driver found: showing CPU and RAM (NVML: {_nvml_reason(exc)})"
            return
        if self.count == 0:
            self.note = "no GPU found: showing CPU and RAM"
            _reading(pynvml.nvmlShutdown)
            return
        self.nvml = pynvml

    @property
    def source(self) -> str:
        return "nvml" if self.nvml is not None else "psutil"

    def read(self) -> Snapshot:
        devices = self._read_gpus() if self.nvml is not None else [_read_host()]
        for d in devices:
            self.history.setdefault(d.index, deque(maxlen=HISTORY)).append(
                d.utilization / 100 if d.kind == "host" and d.utilization is not None else d.memory_share
            )
        return Snapshot(devices=devices, source=self.source, note=self.note, at=time.time())

    def _read_gpus(self) -> list[DeviceReading]:
        nv = self.nvml
        out = []
        for i in range(self.count):
            handle = _reading(lambda: nv.nvmlDeviceGetHandleByIndex(i))
            if handle is None:
                out.append(DeviceReading(index=i, kind="gpu", name=f"GPU {i} (n/a)"))
                continue
            name = _reading(lambda: nv.nvmlDeviceGetName(handle))
            if name is not None:
                name = nvml_text(name)
            mem = _reading(lambda: nv.nvmlDeviceGetMemoryInfo(handle))
            util = _reading(lambda: nv.nvmlDeviceGetUtilizationRates(handle))
            temp = _reading(lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
            procs = _reading(lambda: nv.nvmlDeviceGetComputeRunningProcesses(handle)) or []
            out.append(
                DeviceReading(
                    index=i,
                    kind="gpu",
                    name=name or "n/a",
                    memory_used=getattr(mem, "used", None),
                    memory_total=getattr(mem, "total", None),
                    utilization=getattr(util, "gpu", None),
                    temperature=temp,
                    processes={p.pid: getattr(p, "usedGpuMemory", None) for p in procs},
                )
            )
        return out

    def close(self) -> None:
        if self.nvml is not None:
            _reading(self.nvml.nvmlShutdown)
            self.nvml = None


def _nvml_reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.rstrip(".").lower() if len(text) < 80 else type(exc).__name__


def _read_host() -> DeviceReading:
    """CPU use and RAM of this machine (psutil), for a box without NVML."""
    try:
        import psutil
    except ImportError:
        return DeviceReading(index=0, kind="host", name="host (psutil missing)")
    cpu = _reading(lambda: psutil.cpu_percent(interval=None))
    mem = _reading(psutil.virtual_memory)
    cores = _reading(psutil.cpu_count) or "?"
    return DeviceReading(
        index=0,
        kind="host",
        name=f"host · {cores} cores",
        memory_used=None if mem is None else mem.total - mem.available,
        memory_total=None if mem is None else mem.total,
        utilization=cpu,
    )
