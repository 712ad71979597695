"""The memory plan against the bytes real training steps hold, on the CPU.

    python benchmarks/memory_plan_check.py            # CPU shapes and a Llama-3.2-1B shape: JSON
    python benchmarks/memory_plan_check.py --quick    # the CPU shapes only (what the test runs)

Each case builds a randomly initialised Llama from a config (no download) as the benchmarks do
(`benchmarks.peers`: LoRA through `attach_lora`, QLoRA through the project's own 4-bit loader),
runs two optimizer steps of `backend.compute.train.train_model` (the worker's recipe: the second
step has AdamW's state, the first step's gradients already dropped, as every later step) and
compares the peak bytes with `backend.studies.memory_plan.plan` for the same config and settings,
in fp32 and in bf16 mixed precision (a bf16 base, fp32 adapters, the forward pass under autocast:
the path a card takes, here through the CPU's autocast).

How the peak is measured: the CPU has no `max_memory_allocated`, so the allocator is asked
directly. With `torch.profiler.profile(profile_memory=True)` every allocation and free that goes
through c10's CPU allocator (every tensor's storage, the temporaries inside kernels included)
is recorded with its size and time; summed in time order from the moment profiling starts
(before the model is built, so its weights are counted too) they give the bytes live at each
moment, and the peak is their maximum inside the training. That is the quantity the plan
predicts. Process RSS is not: it adds the Python heap, the torch and MKL libraries, and
whatever glibc keeps after a free (the worker asks glibc to keep freed memory, see
`train.keep_freed_memory`), all of which depend on the machine rather than on the model. A
TorchDispatchMode tracker would miss the temporaries a kernel allocates inside itself.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from backend.studies import memory_plan  # noqa: E402
from benchmarks import peers  # noqa: E402

# CPU-sized shapes that differ where the plan's terms differ: width, depth, vocabulary (the
# logits' share), GQA, and a 4-bit base; one case with gradient checkpointing.
QUICK_CASES = [
    {"name": "mha-256x3", "shape": {"hidden": 256, "layers": 3, "heads": 8, "kv": 8, "ffn": 688, "vocab": 4096},
     "micro_batch": 4, "block": 64},
    # GQA and a 32k vocabulary (the logits' share of a Llama-2 step), blocks of documents; bf16
    # mixed precision as on a card (a bf16 base, fp32 adapters, the forward under autocast)
    {"name": "gqa-384x2-vocab32k-documents-bf16", "shape": {"hidden": 384, "layers": 2, "heads": 6, "kv": 2,
                                                            "ffn": 1024, "vocab": 32000},
     "micro_batch": 2, "block": 64, "documents": 24, "precision": "bf16"},
    # a wide SwiGLU and a small vocabulary: the peak is in the last layer's backward, not the loss
    {"name": "ffn-heavy-checkpointed-bf16", "shape": {"hidden": 256, "layers": 3, "heads": 4, "kv": 4,
                                                      "ffn": 2048, "vocab": 512}, "micro_batch": 4, "block": 64,
     "grad_checkpointing": True, "precision": "bf16"},
    {"name": "qlora-512x2", "shape": {"hidden": 512, "layers": 2, "heads": 8, "kv": 4, "ffn": 1376, "vocab": 8192},
     "micro_batch": 2, "block": 64, "quant": "4bit"},
]
# Llama 3.2 1B's shape (1.24B parameters, GQA 32/8, a 128k vocabulary), a short block so that
# two steps take about a minute on two cores.
LLAMA_3_2_1B = {"hidden": 2048, "layers": 16, "heads": 32, "kv": 8, "ffn": 8192, "vocab": 128256}
LARGE_CASES = [
    {"name": "llama-3.2-1b", "shape": LLAMA_3_2_1B, "micro_batch": 2, "block": 128},
    # the same with blocks of documents (the mask, keys repeated for GQA) and checkpointing
    {"name": "llama-3.2-1b-documents-checkpointed", "shape": LLAMA_3_2_1B, "micro_batch": 4, "block": 128,
     "documents": 48, "grad_checkpointing": True},
]


def _checkpointing(model) -> None:
    """Per-layer activation checkpointing, non-reentrant (no input needs a gradient), as the
    worker turns it on."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers 5.x's name
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _live_bytes(prof, region: str) -> tuple[int, int]:
    """(bytes live when `region` began, the most live inside it), from the profile's allocator
    events summed in time order."""
    events = list(prof.profiler.kineto_results.events())
    marks = [e for e in events if e.name() == region]
    start, end = marks[0].start_ns(), marks[0].start_ns() + marks[0].duration_ns()
    memory = sorted((e.start_ns(), i, e.nbytes()) for i, e in enumerate(events) if e.name() == "[memory]")
    level, at_start, peak = 0, None, 0
    for t, _, n in memory:
        if t >= start and at_start is None:
            at_start = level
        level += n
        if start <= t <= end:
            peak = max(peak, level)
    return at_start or level, peak


def _model(shape: dict[str, int], quant: str | None, r: int, dropout: float | None, dtype):
    if quant:
        return peers.quantized_lora_model(shape, device="cpu", r=r)
    if dropout is None:
        return peers.lora_model(shape, r=r, dtype=dtype)
    from backend.compute.models import attach_lora
    from backend.core.config import LoraSettings

    return attach_lora(peers.llama(shape, dtype=dtype), LoraSettings(r=r, alpha=2 * r, dropout=dropout), 0)


def _train(model, tokens: Path, cfg, precision: str) -> None:
    """The worker's recipe; "bf16" runs the forward pass under bf16 autocast on the CPU, the
    path a card takes by default."""
    from backend.compute.train import train_model

    kwargs = {} if precision == "fp32" else {"precision": precision}
    with tempfile.TemporaryDirectory() as run_dir:
        train_model(model, tokens, Path(run_dir), cfg, device=torch.device("cpu"), emit=lambda kind, **p: None,
                    log=lambda s: None, **kwargs)


def _lora_dropout(model) -> float:
    """The adapters' dropout rate as built (LoraSettings' default, or the case's)."""
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            return float(getattr(next(iter(drops.values())), "p", 0.0))
    return 0.0


def _mark_documents(tokens: Path, eos_id: int, every: int) -> None:
    """Make the token file a run of documents of `every` tokens, each ending in EOS, recorded
    as the corpus loader records them: training then keeps the documents of a block apart."""
    import numpy as np

    from backend.ingest import packing

    ids = np.fromfile(tokens, dtype=packing.TOKEN_DTYPE)
    ids[every - 1 :: every] = eos_id
    ids.tofile(tokens)
    packing.documents_path(tokens).write_text(json.dumps({"eos_id": eos_id, "bos_id": None}))


def measure(case: dict[str, Any], steps: int = 2, r: int = 16) -> dict[str, Any]:
    """One case: the allocator's peak in `steps` real optimizer steps, and the plan's."""
    from torch.profiler import ProfilerActivity, profile, record_function

    shape = {**case["shape"], "context": max(512, case["block"])}
    quant, ckpt = case.get("quant"), bool(case.get("grad_checkpointing"))
    precision = case.get("precision", "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    mb, block = case["micro_batch"], case["block"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tokens = peers.demo_tokens(Path(tmp), steps * mb * block + block + 1, shape["vocab"])
        if case.get("documents"):
            _mark_documents(tokens, shape["vocab"] - 1, every=case["documents"])
        cfg = peers.train_config(steps, block, mb, 1)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model = _model(shape, quant, r, case.get("lora_dropout"), dtype)
            if ckpt:
                _checkpointing(model)
            config = model.get_base_model().config.to_dict()
            dropout = _lora_dropout(model)
            with record_function("ltm.train"):
                _train(model, tokens, cfg, precision)
            del model
    before, peak = _live_bytes(prof, "ltm.train")
    predicted = memory_plan.plan(config, quant=quant, lora_r=r, micro_batch=mb, block_size=block,
                                 dtype_bytes=2 if precision == "bf16" else 4,
                                 grad_checkpointing=ckpt, attention="sdpa", device="cpu", lora_dropout=dropout,
                                 packed_documents=bool(case.get("documents")))
    return {
        "case": case["name"],
        "params": predicted.params,
        "quant": quant,
        "grad_checkpointing": ckpt,
        "precision": precision,
        "lora_dropout": dropout,
        "documents": bool(case.get("documents")),
        "micro_batch": mb,
        "block": block,
        "measured_peak_bytes": peak,
        "measured_before_training_bytes": before,
        "plan_peak_bytes": predicted.peak,
        "plan_static_bytes": predicted.weights + predicted.quantized_weights + predicted.adapters + predicted.optimizer,
        "plan_stage": predicted.peak_stage,
        "plan_over_measured": round(predicted.peak / peak, 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cases = QUICK_CASES + ([] if "--quick" in argv else LARGE_CASES)
    rows = []
    for case in cases:
        rows.append(measure(case))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # a case at a time: a timeout loses nothing
    worst = max(abs(r["plan_over_measured"] - 1) for r in rows)
    print(json.dumps({"torch": torch.__version__, "cases": rows, "worst_relative_error": round(worst, 4)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
