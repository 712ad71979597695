"""Calibration for the forecast: a few real optimizer steps of the chosen base on this device.

    ltm-tui estimate --base micro --preset small --pages 1,10,100,1000

`calibrate` loads the base exactly as a worker does (timed), attaches the same LoRA adapter for
a Hugging Face base, and runs `backend.compute.train.train_model` (the project's own recipe, nothing
re-implemented) for `warm + steps` optimizer steps on real text tokenized by the base's own
tokenizer. It records the steady-state tokens/s, the extra time of the first steps, the peak
memory, a pass over the batteries (timed on a few scenes of each) and tokens per word; then a
FLOP model gives the achieved MFU against a matmul ceiling measured on the same device in the
same precision:

    FLOPs a token = 6 × trainable matmul weights + 4 × frozen ones + 12 × layers × width × block

(a frozen weight costs its forward and the gradient of its input, 2 + 2 FLOPs a weight; a
trained one also the gradient of the weight; attention as in PaLM's appendix B). The result is
cached in `<workspace>/forecast/calib-<key>.json`, the key being the device, the base and the
settings that change speed (see `backend.studies.forecast.settings_key`). This module imports torch;
`backend.studies.forecast`, which reads the cache, does not.
"""

from __future__ import annotations

import resource
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from backend.core.events import write_json_atomic
from backend.core.workspace import PROJECT_ROOT, default_scenes_dir
from backend.ingest.corpora import inspect_corpus, iter_text
from backend.ingest.packing import TOKEN_DTYPE
from backend.studies import forecast

DEMO_TEXTS = sorted((PROJECT_ROOT / "data" / "demo").glob("*.md"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """FLOP/s of large square matmuls on this device in this precision: the denominator of MFU.
    Measured, not taken from a data sheet, so the ratio says what the training loop leaves on
    the table on this very machine."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        for _ in range(10 if device.type == "cuda" else 1):
            torch.mm(a, b)
            reps += 1
        _sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    return 2.0 * n**3 * reps / elapsed


def flop_model(model, block_size: int) -> dict[str, Any]:
    """The parts of FLOPs a trained token (see the module docstring)."""
    trainable = frozen = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            n = module.in_features * module.out_features  # packed 4-bit weights count in full
            if module.weight.requires_grad:
                trainable += n
            else:
                frozen += n
    cfg = getattr(model, "config", None)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    head_dim = getattr(cfg, "head_dim", None) or (int(getattr(cfg, "hidden_size", 0) or 0) // max(1, heads))
    width = heads * int(head_dim)
    attention = 12 * layers * width * block_size
    return {
        "trainable_matmul_params": trainable,
        "frozen_matmul_params": frozen,
        "attention_flops": attention,
        "flops_per_token": 6 * trainable + 4 * frozen + attention,
    }


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        # What the caching allocator held at its peak: what the driver (and NVML) saw taken.
        return int(torch.cuda.max_memory_reserved(device)), "CUDA allocator peak (reserved)"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


def _sample_text(sample: Sequence[Path] | None) -> tuple[str, int, str]:
    """(text, words, where from): the user's sample files, else the demo corpora."""
    paths = [Path(p) for p in sample] if sample else DEMO_TEXTS
    text = "\n\n".join("".join(iter_text(p)) for p in paths)
    words = sum(inspect_corpus(p).words for p in paths)
    where = ", ".join(p.name for p in paths) if sample else "data/demo"
    return text, words, where


def _time_batteries(model, tok, batteries, device, log, per_battery: int = 4) -> float:
    """Seconds for one pass over the batteries, from the first `per_battery` scenes of each,
    scaled by the scene count: a battery of 40 generation scenes would otherwise make the
    calibration longer than a short training run. The samples go through one evaluation, as a
    run's batteries do (their completions decode in one batch), and the general text, which
    does not grow with the batteries, is timed once unscaled. Finished runs replace it with
    measured times."""
    import dataclasses

    from backend.compute.evaluate import evaluate_all

    sample = [dataclasses.replace(b, scenes=tuple(b.scenes[:per_battery])) for b in batteries]
    n_all, n_sample = sum(len(b.scenes) for b in batteries), sum(len(b.scenes) for b in sample)
    _, _, scenes_seconds = evaluate_all(model, tok, sample, device=device, general=[])
    _, _, general_seconds = evaluate_all(model, tok, [], device=device)
    total = scenes_seconds * n_all / max(1, n_sample) + general_seconds
    log(f"one pass over {len(batteries)} batteries: {total:.2f} s (from {per_battery} scenes each)")
    return total


def _time_steps(model, ids: list[int], cfg, block: int, device, *, warm: int, steps: int, log,
                precision: str = "auto") -> dict[str, Any]:
    """`warm` + `steps` real optimizer steps on these tokens (repeated to fill them) through
    the worker's own training loop: the steady steps' speed (median step, tokens a second), what
    the first steps cost on top, and the peak memory."""
    from backend.compute.train import train_model

    total_steps = warm + steps
    need = total_steps * cfg.micro_batch * cfg.grad_accum * block + block
    tokens = np.resize(np.asarray(ids, dtype=TOKEN_DTYPE), max(need, len(ids)))
    run_cfg = forecast.TrainConfig.from_dict({
        **cfg.to_dict(), "max_steps": total_steps, "epochs": 1e6, "min_train_tokens": 0,
        "checkpoint_every": 0, "log_every": 1, "seed": 0,
    })
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    progress: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ltm-calibrate-") as tmp:
        path = Path(tmp) / "tokens.bin"
        tokens.tofile(path)
        log(f"training {total_steps} steps of {cfg.micro_batch} × {cfg.grad_accum} × {block} tokens")
        t0 = time.perf_counter()
        train_model(model, path, Path(tmp), run_cfg, device=device,
                    emit=lambda kind, **p: progress.append(p) if kind == "progress" else None,
                    log=lambda s: None, precision=precision)
        wall = time.perf_counter() - t0
    peak, peak_kind = _peak_memory(device)
    step_tokens = cfg.micro_batch * cfg.grad_accum * block
    times = [step_tokens / max(p["tokens_per_s"], 1e-9) for p in progress]
    steady = times[warm:] or times
    step_seconds = sorted(steady)[len(steady) // 2]
    return {
        "tokens_per_s": step_tokens * len(steady) / sum(steady),
        "step_seconds": step_seconds,
        "warmup_seconds": max(0.0, sum(times[:warm]) - warm * step_seconds),
        "wall_seconds": wall,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
    }


def calibrate(
    workspace,
    base_spec: Mapping[str, Any],
    train: Mapping[str, Any] | None = None,
    lora: Mapping[str, Any] | None = None,
    *,
    steps: int = 8,
    warm: int = 2,
    scenes: str | Path | None = None,
    sample: Sequence[Path] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Measure, cache and return the calibration for this device, base and settings."""
    from backend.compute.models import BaseSpec, attach_lora, count_params, load_base, train_dtype, use_kernels
    from backend.compute.train import done_training, ready_to_train
    from backend.core.config import LoraSettings
    from backend.scoring.scenes import load_batteries

    spec = BaseSpec(**{k: base_spec.get(k) for k in ("base", "preset", "quant", "device", "precision", "attn",
                                                        "kernels", "compile")
                       if base_spec.get(k) is not None},
                    trust_remote_code=bool(base_spec.get("trust_remote_code")))
    cfg = forecast.resolved_train(base_spec, train)

    # 1. the base, as a worker's first job loads it (an HF base with its fresh adapter)
    t0 = time.perf_counter()
    model, tok, device = load_base(spec, seed=0)
    log(use_kernels(model, spec, device))
    adapter = None
    if not spec.is_micro:
        adapter = LoraSettings.from_dict(lora)
        model = attach_lora(model, adapter, 0)
    _sync(device)
    load_seconds = time.perf_counter() - t0
    log(f"loaded {spec.base} on {device} in {load_seconds:.2f} s ({count_params(model):,} parameters)")

    # 2. the tokenizer on real text: its speed, and how many tokens a word makes
    text, words, sample_from = _sample_text(sample)
    t0 = time.perf_counter()
    ids = tok.encode(text)
    tokenize_rate = len(ids) / max(time.perf_counter() - t0, 1e-9)

    # 3. real optimizer steps with these settings, and 4. one pass over the batteries
    context = int(getattr(model.config, "max_position_embeddings", cfg.block_size) or cfg.block_size)
    block = min(cfg.block_size, context)
    fitted, checkpointing = ready_to_train(model, spec, cfg, adapter, device, log)  # as the worker would
    try:
        timing = _time_steps(model, ids, fitted, block, device, warm=warm, steps=steps, log=log,
                             precision=spec.precision)
    finally:
        done_training(model, spec)
    eval_seconds = _time_batteries(model, tok, load_batteries(scenes or default_scenes_dir()), device, log)
    tokens_per_s = timing["tokens_per_s"]

    flops = flop_model(model, block)
    ceiling = matmul_ceiling(device, train_dtype(device, spec.precision))  # measured with each calibration, same load
    achieved = flops["flops_per_token"] * tokens_per_s
    result = {
        "version": forecast.CALIBRATION_VERSION,
        "device_tag": forecast.device_tag(base_spec),
        "torch_device": str(device),
        "dtype": str(train_dtype(device, spec.precision)).replace("torch.", ""),
        "key": forecast.settings_key(base_spec, train),
        "base": spec.to_dict(),
        "train": {k: getattr(cfg, k) for k in ("block_size", "micro_batch", "grad_accum")},
        # what the steps ran with: the memory plan may fit a larger micro-batch to the card
        "micro_batch_used": fitted.micro_batch,
        "grad_accum_used": fitted.grad_accum,
        "grad_checkpointing_used": checkpointing,
        "block_size": block,
        "steps": steps,
        "warm_steps": warm,
        "params": count_params(model),
        "trainable_params": count_params(model, trainable_only=True),
        "tokens_per_s": round(tokens_per_s, 2),
        "step_seconds": round(timing["step_seconds"], 5),
        "warmup_seconds": round(timing["warmup_seconds"], 4),
        "calibration_wall_seconds": round(timing["wall_seconds"], 3),
        "load_seconds": round(load_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "tokenize_tokens_per_s": round(tokenize_rate, 1),
        "tokens_per_word": round(len(ids) / max(1, words), 4),
        "tokens_per_word_source": sample_from,
        "peak_memory_bytes": timing["peak_memory_bytes"],
        "peak_memory_kind": timing["peak_memory_kind"],
        **flops,
        "achieved_flops_per_s": achieved,
        "matmul_ceiling_flops_per_s": ceiling,
        "mfu": round(achieved / ceiling, 4) if ceiling else None,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = forecast.calibration_path(workspace, base_spec, train)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    return result


def ensure_calibration(workspace, base_spec, train=None, lora=None, *, force: bool = False, **kw) -> tuple[dict, bool]:
    """(calibration, whether it was measured now): the cached one unless `force` or none yet."""
    if not force:
        cached = forecast.load_calibration(workspace, base_spec, train)
        if cached is not None:
            return cached, False
    return calibrate(workspace, base_spec, train, lora, **kw), True
