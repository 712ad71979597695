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


def memory_available(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes this process may still fill: the host's available memory, or less where the
    process's cgroup (v2, as containers set it) has a limit. The page cache counts against a
    container's limit, which the host's figure does not show."""
    import psutil

    free = int(psutil.virtual_memory().available)
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            # in use: what the cgroup holds less the cache it would drop first (its working set)
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines() if " " in line)
            used = int((cgroup / "memory.current").read_text()) - int(stat.get("inactive_file", 0))
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass  # no cgroup v2 here, or none we may read
    return max(free, 0)


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
