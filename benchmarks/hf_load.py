"""What a Hugging Face base costs before its first step: a ~1B-shaped Llama saved as a user's
folder (bf16 safetensors and a tokenizer), taken to its first optimizer step by the project's
own worker against plain transformers + PEFT, each side a fresh process.

Used by `benchmarks/run.py` (`hf_load_ratio`, and the folder `warm_worker_speedup_hf` trains
on). Nothing is downloaded: the weights are random, from a config, and the tokenizer is a
word-level one trained on the demo texts, the scenes and the general text.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from backend.core.workspace import PROJECT_ROOT

# Llama-3.2-1B's shape: hidden 2048, 16 layers, GQA 32/8, SwiGLU 8192, a 128k vocabulary, tied
# embeddings; 1.24B parameters, 2.5 GB in bf16.
LLAMA_1B = {"hidden": 2048, "layers": 16, "heads": 32, "kv": 8, "ffn": 8192, "vocab": 128256, "context": 2048}


def params(shape: dict[str, int]) -> int:
    """Parameters of a Llama of `shape` with tied embeddings."""
    d, f, L = shape["hidden"], shape["ffn"], shape["layers"]
    kv = d // shape["heads"] * shape["kv"]
    return shape["vocab"] * d + L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d


def save_llama_folder(folder: Path, shape: dict[str, int], seed: int = 0) -> Path:
    """A random Llama of `shape` saved in bf16 as safetensors, with its config and a word-level
    tokenizer: what a user's `--base FOLDER` holds. The weights are drawn from N(0, 0.02) once,
    16M values reused across tensors (norms are ones): their values do not matter to a load,
    and drawing 1.2B of them took 40 s of the 55 s that `save_pretrained` of an initialised
    model took here."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.peers import word_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    texts = [p.read_text(encoding="utf-8") for sub, pattern in (("data/demo", "*.md"), ("data/general", "*.md"),
                                                               ("scenes", "*.yaml"))
             for p in sorted((PROJECT_ROOT / sub).glob(pattern))]
    tok = word_tokenizer(folder, texts)
    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"],
        max_position_embeddings=shape["context"], tie_word_embeddings=True, rope_theta=500000.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    pool = torch.randn(1 << 24, generator=torch.Generator().manual_seed(seed)).mul_(0.02).to(torch.bfloat16)
    tensors, at = {}, 0
    for name, meta in skeleton.state_dict().items():
        if name == "lm_head.weight":  # tied to the embeddings: not stored, as save_pretrained does
            continue
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(meta.shape, dtype=torch.bfloat16)
            continue
        n = meta.numel()
        reps = -(-(at + n) // pool.numel())
        flat = pool.repeat(reps)[at : at + n] if reps > 1 else pool[at : at + n]
        tensors[name] = flat.clone().view(meta.shape)
        at = (at + n) % pool.numel()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    return folder


def _one_page(words: int = 500) -> str:
    text = " ".join(" ".join(p.read_text(encoding="utf-8").split()) for p in
                    sorted((PROJECT_ROOT / "data" / "demo").glob("*.md")))
    return " ".join(text.split()[:words])


def one_job_session(folder: Path, work: Path, tag: str, *, train: dict[str, Any], scenes: Path, quant: str | None = None,
                    device: str = "cpu", probes: bool = False) -> tuple[Path, Path]:
    """(session file, run folder) of one adapter job on the base in `folder`, as the service
    writes them for its worker: a one-page corpus, a fresh LoRA adapter with `LoraSettings()`."""
    corpus = work / f"page-{tag}.txt"
    corpus.write_text(_one_page(), encoding="utf-8")
    run_dir = work / f"run-{tag}"
    session = work / f"session-{tag}.json"
    session.write_text(json.dumps({
        "base": {"base": str(folder), "quant": quant, "trust_remote_code": False, "device": device},
        "scenes": str(scenes),
        "jobs": [{"run_id": tag, "kind": "adapter", "corpus_path": str(corpus), "run_dir": str(run_dir),
                  "seed": 0, "train": train, "lora": {}, "probes": probes}],
    }))
    return session, run_dir


def first_step_ours(folder: Path, work: Path, block: int, micro_batch: int, timeout: float = 900,
                    device: str = "cpu") -> dict[str, Any]:
    """Seconds from starting the project's worker on `folder` (one job: a one-page corpus, a
    fresh LoRA adapter, `max_steps` 1) to its first `progress` event, which the worker writes
    after the first optimizer step; then the worker is killed (its evaluation is not this
    key's). Phases from the events' timestamps and the worker's own `load_seconds` line."""
    from backend.jobs.executor import LocalExecutor

    scenes = work / "scenes.yaml"
    scenes.write_text(TINY_BATTERY, encoding="utf-8")
    train = {"block_size": block, "micro_batch": micro_batch, "grad_accum": 1, "lr": 2e-4, "warmup_frac": 0.0,
             "min_train_tokens": 0, "epochs": 1, "max_steps": 1, "checkpoint_every": 0, "log_every": 1}
    session, run_dir = one_job_session(folder, work, f"first-step-{time.time_ns()}", train=train, scenes=scenes,
                                       device=device)
    events = run_dir / "events.jsonl"
    t0 = time.time()
    worker = LocalExecutor().start(session, None)
    try:
        while True:
            # whole lines only: the worker may be writing the last one
            found = [json.loads(line) for line in events.read_text().split("\n")[:-1]] if events.exists() else []
            step = next((e for e in found if e["type"] == "progress"), None)
            if step is not None:
                break
            if worker.exit_code() is not None or time.time() - t0 > timeout:
                log = session.with_suffix(".log")
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                raise RuntimeError(f"our worker gave no progress event (exit {worker.exit_code()}): {tail}")
            time.sleep(0.05)
    finally:
        worker.kill()
    phases = {e.get("phase"): e["ts"] for e in found if e["type"] == "phase"}
    return {
        "seconds": step["ts"] - t0,
        "start_s": phases["starting"] - t0,  # interpreter, imports, the battery
        "load_lora_s": phases["training"] - phases["starting"],  # base, tokenizer, tokens, LoRA
        "step_s": step["ts"] - phases["training"],  # optimizer setup and the first step
        "loss": step["loss"],
    }


TINY_BATTERY = """\
battery: tiny
description: Two one-step chains, so a job's evaluation costs little next to its load.
metric: reasoning_depth
scenes:
  - id: d1-glim
    kind: choice
    lang: en
    depth: 1
    context: All glims are zents.
    prompt: So every glim is a
    choices: [zent, fenn, humb]
    answer: zent
  - id: d1-dask
    kind: choice
    lang: en
    depth: 1
    context: All dasks are fenns.
    prompt: So every dask is a
    choices: [zent, fenn, humb]
    answer: fenn
"""

# The peer, as a competent user writes it: the tokenizer and the model from the folder in the
# dtype our worker trains in on this device, `.to(device)`, PEFT with the same LoRA settings,
# fused AdamW with our betas and weight decay, one step of the same shape on the same page.
# It starts with the worker's allocator setting (`keep_freed_memory`) and prints a timestamp
# after each phase.
PEER = """
import json, sys, time
spec = json.loads(sys.argv[1])
import torch
from backend.compute.train import keep_freed_memory
keep_freed_memory()
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
marks = {"imports": time.time()}
tok = AutoTokenizer.from_pretrained(spec["folder"])
ids = tok(open(spec["corpus"], encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
device = torch.device(spec["device"])
model = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=getattr(torch, spec["dtype"])).to(device)
model.config.use_cache = False
lora = spec["lora"]
model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=lora["r"], lora_alpha=lora["alpha"],
                                         lora_dropout=lora["dropout"], target_modules=lora["target_modules"]))
if device.type == "cuda":
    torch.cuda.synchronize()
marks["loaded"] = time.time()
torch.manual_seed(0)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
n = spec["micro_batch"] * spec["block"]
x = torch.tensor(([tok.bos_token_id] + ids)[:n], device=device).view(spec["micro_batch"], spec["block"])
model.train()
loss = model(input_ids=x, labels=x).loss
loss.backward()
torch.nn.utils.clip_grad_norm_(params, 1.0)
optimizer.step()
optimizer.zero_grad(set_to_none=True)
if device.type == "cuda":  # as our worker, which reads the loss back before its progress event
    torch.cuda.synchronize()
marks["step"] = time.time()
print(json.dumps({**marks, "loss": float(loss)}), flush=True)
"""


def first_step_peer(folder: Path, work: Path, block: int, micro_batch: int, dtype: str, lora: dict,
                    timeout: float = 900, device: str = "cpu") -> dict[str, Any]:
    """Seconds from starting the peer's process to its first optimizer step done, in the
    environment our worker gets (`backend.jobs.executor.worker_env`)."""
    from backend.jobs.executor import worker_env

    corpus = work / "page.txt"
    corpus.write_text(_one_page(), encoding="utf-8")
    spec = {"folder": str(folder), "corpus": str(corpus), "block": block, "micro_batch": micro_batch,
            "device": device, "dtype": dtype, "lora": lora}
    t0 = time.time()
    done = subprocess.run([sys.executable, "-c", PEER, json.dumps(spec)], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, env=worker_env(os.environ, None), timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the peer failed: {done.stderr.strip()[-1500:]}")
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "seconds": marks["step"] - t0,
        "start_s": marks["imports"] - t0,
        "load_lora_s": marks["loaded"] - marks["imports"],
        "step_s": marks["step"] - marks["loaded"],
        "loss": marks["loss"],
    }


def set_cache(folder: Path, cache: str) -> float | None:
    """Put the folder's files in the page cache ("warm": read once, as right after another
    load) or out of it ("cold": `POSIX_FADV_DONTNEED`, which drops a file's clean pages for
    any user that can read it, as a base meets its first load of the day, or any load after
    other work filled the memory; a 13B base is 26 GB). Returns the share of the folder's bytes
    still in the cache after a "cold" one (`cached_share`): some file systems keep their pages
    (tmpfs, some overlays), and a "cold" measurement there is a warm one."""
    for path in sorted(folder.iterdir()):
        with open(path, "rb", buffering=0) as fh:
            if cache == "cold":
                os.fsync(fh.fileno())  # pages not yet written back (a folder just saved) cannot be dropped
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while fh.read(16 << 20):
                    pass
    return cached_share(folder) if cache == "cold" else None


def cached_share(folder: Path, probes: int = 64) -> float | None:
    """The share of `probes` evenly spaced 4 KiB pages of the folder's files that a read which may
    not wait for the disk (RWF_NOWAIT) finds in the page cache; None where the system cannot tell."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.stat().st_size]
    total = sum(p.stat().st_size for p in files)
    if not files or not hasattr(os, "RWF_NOWAIT"):
        return None
    found = seen = 0
    buf = bytearray(4096)
    for path in files:
        size = path.stat().st_size
        count = max(1, round(probes * size / total))
        fd = os.open(path, os.O_RDONLY)
        try:
            for k in range(count):
                seen += 1
                try:
                    found += os.preadv(fd, [buf], (size * k // count) & ~4095, os.RWF_NOWAIT) > 0
                except BlockingIOError:
                    pass
        except OSError:  # no RWF_NOWAIT on this file system
            return None
        finally:
            os.close(fd)
    return round(found / seen, 3)


def load_ratio(folder: Path, shape: dict[str, int], *, repeats: int = 2, block: int = 64,
               micro_batch: int = 1, cache: str = "cold", device: str = "cpu") -> dict[str, Any]:
    """Peer seconds ÷ our seconds from the folder to the first optimizer step, the two sides
    alternating `repeats` times, each in a fresh process that meets the folder's files
    `cache` (see `set_cache`); the median of the pairs' ratios. On "cuda" (gpu_check.sh) ours
    loads straight onto the card and the peer through host memory and `.to("cuda")`, each in
    the dtype our worker trains in there."""
    import torch

    from backend.compute.models import train_dtype
    from backend.core.config import LoraSettings

    lora = LoraSettings().to_dict()
    dtype = str(train_dtype(torch.device(device))).replace("torch.", "")
    ours, peer, left = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            left.append(set_cache(folder, cache))
            ours.append(first_step_ours(folder, Path(tmp), block, micro_batch, device=device))
            left.append(set_cache(folder, cache))
            peer.append(first_step_peer(folder, Path(tmp), block, micro_batch, dtype, lora, device=device))
    ratios = [p["seconds"] / o["seconds"] for o, p in zip(ours, peer)]

    def median(side: list[dict], key: str) -> float:
        return round(statistics.median(x[key] for x in side), 2)

    keys = ("seconds", "start_s", "load_lora_s", "step_s")
    return {
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "ours": {k: median(ours, k) for k in keys},
        "peer": {k: median(peer, k) for k in keys},
        "settings": {"shape": shape, "params": params(shape), "checkpoint": "bf16 safetensors, one file",
                     "dtype": dtype, "device": device, "block": block, "micro_batch": micro_batch, "lora": lora,
                     "repeats": repeats, "each_side": "own process, alternating", "page_cache": cache,
                     # after each drop, the largest share of the folder the cache still held
                     **({"cached_after_drop": max(left) if None not in left else None} if cache == "cold" else {})},
    }
