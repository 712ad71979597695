"""A worker's first second: what it starts before it imports torch.

A cold worker spends 5–7 s importing torch, transformers and PEFT before it can load a base
(two cores here; the imports are Python, one core's work whatever the machine). Two things
shorten the way to the first step, and `benchmarks/run.py`'s `hf_load_ratio` measures them:

- `read_ahead`: the disk reads the base's weights while the imports run, so the load finds them
  in the page cache. On a card the weights of a 13B base are 26 GB; read at 2–3 GB/s they take
  as long as the imports, or longer from network storage.
- `leave_out_bitsandbytes`: PEFT imports bitsandbytes whenever it is installed, and with it
  torch's compiler (1.4 s here). A base that is neither loaded in 4-bit nor saved quantized
  nor run on its own code never needs it (`needs_bitsandbytes`).

Nothing here imports torch or transformers.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

MICRO = "micro"  # backend.compute.models.MICRO, which would import torch
CHUNK = 16 << 20  # bytes a read asks for


def weight_files(base: str) -> list[Path]:
    """The safetensors files a load of the base reads (its folder, or its snapshot in the
    Hugging Face cache): the shards its index names, else `model.safetensors`, else every
    `.safetensors` file; none for micro or a base that is not here. Some repositories ship the
    same weights twice (Mistral's `consolidated.safetensors` beside the shards), and reading
    both would double the disk's work."""
    import json

    from backend.core.workspace import model_folder

    if base == MICRO:
        return []
    folder = model_folder(base)
    if folder is None:
        return []
    index = folder / "model.safetensors.index.json"
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        return sorted(folder / name for name in shards if (folder / name).is_file())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no index, or one the load will complain of itself
    single = folder / "model.safetensors"
    return [single] if single.is_file() else sorted(folder.glob("*.safetensors"))


def read_ahead(base: str, share: float = 0.5) -> threading.Thread | None:
    """Start reading the base's weight files in a background thread; None where there is
    nothing to read, or where the files exceed `share` of the memory available now (the page
    cache would drop the first files before the load reached them, and the disk would read
    them twice). A read releases the interpreter lock, so the imports go on meanwhile; an
    error ends the thread quietly (the load itself says what is wrong with a file)."""
    files = weight_files(base)
    try:
        size = sum(f.stat().st_size for f in files)
    except OSError:
        return None
    if not files or size > share * memory_available():
        return None
    thread = threading.Thread(target=_read_all, args=(files,), name="ltm-read-ahead", daemon=True)
    thread.start()
    return thread


def memory_available(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes this process may still fill: the host's available memory, or less where a cgroup it
    is in has a memory limit (a container, a systemd unit with MemoryMax, a Slurm job): the page
    cache counts against the limit, which the host's figure does not show."""
    import psutil

    free = int(psutil.virtual_memory().available)
    try:
        left = _cgroup_left(proc.read_text(encoding="utf-8"), root)
    except (OSError, ValueError):
        left = None  # no cgroups here, or none we may read
    return max(min(free, left) if left is not None else free, 0)


def _cgroup_left(table: str, root: Path) -> int | None:
    """The least room under any memory limit of the process's cgroup and the cgroups above it:
    a limit (cgroup v2: memory.max or memory.high; v1: memory.limit_in_bytes) less what that
    cgroup holds, not counting the inactive page cache it would drop first; None where no limit
    is set. `table` is /proc/self/cgroup."""
    for line in table.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:  # v2, one tree
            base, names, held, cache = root, ("memory.max", "memory.high"), "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):  # v1, the memory controller's tree
            base, names, held, cache = root / "memory", ("memory.limit_in_bytes",), "memory.usage_in_bytes", \
                "total_inactive_file"
        else:
            continue
        left, folder = None, base / path.strip("/")
        while True:
            limits = [int(text) for name in names if (f := folder / name).is_file()
                      and (text := f.read_text().strip()).isdigit() and int(text) < 1 << 60]  # v1 writes "no limit" as ~2^63
            if limits:
                stat = dict(row.split() for row in (folder / "memory.stat").read_text().splitlines() if " " in row)
                used = int((folder / held).read_text()) - int(stat.get(cache, 0))
                left = min(left, min(limits) - used) if left is not None else min(limits) - used
            if folder == base:
                return left
            folder = folder.parent
    return None


def _read_all(files: list[Path]) -> None:
    view = memoryview(bytearray(CHUNK))
    for path in files:
        try:
            with open(path, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass
        except OSError:
            return


def needs_bitsandbytes(base: str, quant: str | None, trust_remote_code: bool = False) -> bool:
    """Whether loading the base may need bitsandbytes: a 4-bit load, weights saved quantized (a
    `quantization_config` in its config.json: transformers checks the library is installed
    before it loads them), or a model's own code (transformers imports whatever its files
    import). A base whose config.json is not here counts as needing it."""
    import json

    from backend.core.workspace import model_folder

    if quant == "4bit" or trust_remote_code:
        return True
    if base == MICRO:
        return False
    folder = model_folder(base)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8")) if folder else None
    except (OSError, ValueError):
        return True
    return not isinstance(config, dict) or "quantization_config" in config


def leave_out_bitsandbytes(needed: bool) -> bool:
    """For a process whose base does not need it (`needs_bitsandbytes`): make bitsandbytes look
    absent (an entry of None in `sys.modules`, which `importlib.util.find_spec` reads as not
    installed, as PEFT and transformers ask). True where it did; False where the base needs it
    or the library is imported already."""
    if needed or "bitsandbytes" in sys.modules:
        return False
    sys.modules["bitsandbytes"] = None
    return True
