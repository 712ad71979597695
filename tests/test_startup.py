"""A worker's first second (backend.compute.startup): the base's weights are read while the
imports run, and a session without a 4-bit base does without bitsandbytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.compute.startup import needs_bitsandbytes, read_ahead, weight_files
from backend.core.workspace import PROJECT_ROOT
from benchmarks.hf_load import cached_share, set_cache

# Its module-scoped fixture is built once: the file's tests run in one process (`-n auto`
# with `--dist loadgroup`, pyproject.toml).
pytestmark = pytest.mark.xdist_group("startup")


def test_a_bases_weights_are_in_the_page_cache_after_reading_ahead(tmp_path):
    """The page cache is read with hf_load's probes (reads that may not wait for the disk)."""
    folder = tmp_path / "base"  # the weights alone: every byte probed below is one the thread should read
    folder.mkdir()
    shards = [folder / f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for shard in shards:
        shard.write_bytes(os.urandom(6 << 20))
    left = set_cache(folder, "cold")  # written back, then dropped
    if left is None:
        pytest.skip("this system cannot tell what is in the page cache (no RWF_NOWAIT reads)")
    if left > 0.1:
        pytest.skip("this file system keeps its files in memory (tmpfs): nothing to read ahead")
    assert weight_files(str(folder)) == shards

    thread = read_ahead(str(folder))
    assert thread is not None
    thread.join(timeout=60)
    assert cached_share(folder) == 1.0


def test_only_the_files_a_load_reads_are_read_ahead(tmp_path):
    """The shards the index names (not a consolidated copy of the same weights beside them),
    else model.safetensors, else whatever safetensors the folder holds."""
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for name in ("consolidated.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (folder / name).write_bytes(b"\0" * 64)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "embed.weight": "model-00001-of-00002.safetensors", "norm.weight": "model-00002-of-00002.safetensors",
        "head.weight": "model-00002-of-00002.safetensors"}}))
    assert [p.name for p in weight_files(str(folder))] == ["model-00001-of-00002.safetensors",
                                                           "model-00002-of-00002.safetensors"]
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    assert [p.name for p in weight_files(str(folder))] == ["model.safetensors"]
    (folder / "model.safetensors").unlink()
    assert len(weight_files(str(folder))) == 3


def test_nothing_is_read_for_micro_a_missing_base_or_weights_larger_than_memory_allows(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    assert read_ahead("micro") is None
    assert read_ahead(str(tmp_path / "no-such-folder")) is None
    assert read_ahead(str(folder), share=1e-15) is None  # the page cache would drop what it read first
    assert read_ahead(str(folder)) is not None


LORA_STEP = """
import importlib.util, json, sys
from backend.compute.startup import leave_out_bitsandbytes, needs_bitsandbytes
left_out = leave_out_bitsandbytes(needs_bitsandbytes(sys.argv[1], sys.argv[2] or None))
import torch
from backend.compute.models import BaseSpec, attach_lora, load_base
from backend.core.config import LoraSettings
model, tok, device = load_base(BaseSpec(base=sys.argv[1], device="cpu"))
model = attach_lora(model, LoraSettings(r=4), seed=0)
x = torch.tensor([tok.encode("All zents are blorps")])
model(input_ids=x, labels=x).loss.backward()
grads = [p.grad for p in model.parameters() if p.requires_grad]
print(json.dumps({"left_out": left_out, "found": importlib.util.find_spec("bitsandbytes") is not None,
                  "imported": sys.modules.get("bitsandbytes") is not None,
                  "trained": len(grads) > 0 and all(g is not None for g in grads)}))
"""


@pytest.fixture(scope="module")
def saved_4bit(tiny_hf_model, tmp_path_factory) -> Path:
    """The tiny model saved as a 4-bit checkpoint (its config.json carries the quantization)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    folder = tmp_path_factory.mktemp("tiny-llama-4bit")
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_model, device_map={"": "cpu"},
                                                 quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_hf_model).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["lora", "saved-4bit"])
def test_a_session_without_a_4bit_base_trains_its_adapter_without_bitsandbytes(tiny_hf_model, request, case):
    """A LoRA job trains with bitsandbytes out of sight; a job on weights saved in 4 bits that
    does not ask for --quant 4bit keeps it (transformers needs the library to load them), as a
    4-bit job does (`needs_bitsandbytes`, below)."""
    pytest.importorskip("bitsandbytes")
    base = request.getfixturevalue("saved_4bit") if case == "saved-4bit" else tiny_hf_model
    done = subprocess.run([sys.executable, "-c", LORA_STEP, str(base), ""], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if case == "lora":  # PEFT attached and trained the adapter with the library out of sight
        assert out == {"left_out": True, "found": False, "imported": False, "trained": True}
    else:
        assert out["left_out"] is False and out["found"] and out["trained"]


def test_a_base_saved_quantized_or_run_on_its_own_code_keeps_bitsandbytes(tmp_path):
    """transformers checks that bitsandbytes is installed before it loads weights saved in 4 or 8
    bits, and imports whatever a model's own code imports: such a base keeps the library even
    where the job does not ask for --quant 4bit."""
    plain, saved_4bit = tmp_path / "plain", tmp_path / "saved-4bit"
    for folder, config in ((plain, {"model_type": "llama"}),
                           (saved_4bit, {"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes",
                                                                                      "load_in_4bit": True}})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
    assert needs_bitsandbytes(str(plain), None) is False
    assert needs_bitsandbytes("micro", None) is False
    assert needs_bitsandbytes(str(plain), "4bit") is True
    assert needs_bitsandbytes(str(plain), None, trust_remote_code=True) is True
    assert needs_bitsandbytes(str(saved_4bit), None) is True
    assert needs_bitsandbytes("someone/not-downloaded-here", None) is True  # its config is not here to read


def test_a_hub_id_is_read_from_the_snapshot_its_load_reads(tmp_path, monkeypatch):
    """The Hugging Face cache may hold several revisions of a repository: a load reads the one
    refs/main names (not the last by name), and without refs the newest."""
    repo = tmp_path / "hub" / "models--org--base"
    for revision in ("1a2b", "f9e8"):
        (repo / "snapshots" / revision).mkdir(parents=True)
        (repo / "snapshots" / revision / "model.safetensors").write_bytes(b"\0" * 64)
    os.utime(repo / "snapshots" / "1a2b", (1, 1))  # the older one
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1a2b\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert weight_files("org/base") == [repo / "snapshots" / "1a2b" / "model.safetensors"]
    (repo / "refs" / "main").unlink()
    assert weight_files("org/base") == [repo / "snapshots" / "f9e8" / "model.safetensors"]
    assert weight_files("org/other") == []


def test_a_cgroups_memory_limit_bounds_what_is_read_ahead(tmp_path):
    """Under a memory limit on the process's cgroup or one above it (cgroup v2: memory.max or
    memory.high; v1: memory.limit_in_bytes), the memory left is the least of each limit less
    what that cgroup holds without its inactive page cache, when that is below the host's
    available memory; no limit, or no cgroup files, leaves the host's figure."""
    import psutil

    from backend.compute.startup import memory_available

    host = psutil.virtual_memory().available
    gib = 2**30

    def cgroup(folder: Path, current: int, inactive: int, **files: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "memory.current").write_text(f"{current}\n")
        (folder / "memory.stat").write_text(f"anon {current - inactive}\ninactive_file {inactive}\n")
        for name, value in files.items():
            (folder / name.replace("_", ".")).write_text(f"{value}\n")

    v2, proc = tmp_path / "v2", tmp_path / "cgroup"
    proc.write_text("0::/user.slice/ltm.service\n")
    cgroup(v2, 9 * gib, 0)  # the root: no limit files
    cgroup(v2 / "user.slice", 5 * gib, 1 * gib, memory_max=8 * gib)  # 8 - (5 - 1) = 4 left
    cgroup(v2 / "user.slice" / "ltm.service", 2 * gib, 0, memory_max=3 * gib, memory_high=6 * gib)  # 1 left
    if host > 6 * gib:  # the limits are the smaller
        assert memory_available(proc, v2) == 1 * gib
        (v2 / "user.slice" / "ltm.service" / "memory.max").write_text("max\n")
        assert memory_available(proc, v2) == 4 * gib  # memory.high (6 - 2) and the parent (8 - 4) both leave 4
        v1 = tmp_path / "v1"
        proc.write_text("12:pids:/docker/abc\n4:memory:/docker/abc\n")
        folder = v1 / "memory" / "docker" / "abc"
        folder.mkdir(parents=True)
        (folder / "memory.limit_in_bytes").write_text(f"{6 * gib}\n")
        (folder / "memory.usage_in_bytes").write_text(f"{5 * gib}\n")
        (folder / "memory.stat").write_text(f"cache {3 * gib}\ntotal_inactive_file {2 * gib}\n")
        (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{(1 << 63) - 4096}\n")  # no limit, as v1 writes it
        assert memory_available(proc, v1) == 3 * gib
    for limit in ("user.slice/memory.max", "user.slice/ltm.service/memory.max", "user.slice/ltm.service/memory.high"):
        (v2 / limit).write_text("max\n")
    proc.write_text("0::/user.slice/ltm.service\n")
    assert abs(memory_available(proc, v2) - host) < gib  # no limit left: the host's figure
    assert abs(memory_available(tmp_path / "none", v2) - host) < gib
