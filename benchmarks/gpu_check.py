"""One GPU, no internet, at most 8 minutes: our training against the arithmetic limit and the peer.

    bash benchmarks/gpu_check.sh            # on the GPU box; prints one JSON object last
    LTM_GPU_CHECK_SMALL=1 bash benchmarks/gpu_check.sh   # the same code path, CPU-sized shapes

For a 1B-shaped and a 7B-shaped Llama (random weights from a config, so nothing is downloaded):
LoRA in bf16 and QLoRA (nf4 base, through the project's own loader) tokens/s of our training
loop, MFU against a bf16 matmul ceiling measured on the same GPU, peak memory, and the ratio
against transformers.Trainer + PEFT on the same model, data, order and settings (with both
losses). A case that would not finish inside the time budget is reported as skipped.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from benchmarks import peers  # noqa: E402

SMALL = os.environ.get("LTM_GPU_CHECK_SMALL") == "1"
BUDGET_S = float(os.environ.get("LTM_GPU_CHECK_BUDGET_S", "420"))  # the shell script allows 480

# Llama 3.2 1B and Llama 2 7B shapes; SMALL keeps the proportions at CPU size.
SHAPES = {
    "1b": {"hidden": 2048, "layers": 16, "heads": 32, "kv": 8, "ffn": 8192, "vocab": 128256, "context": 4096},
    "7b": {"hidden": 4096, "layers": 32, "heads": 32, "kv": 32, "ffn": 11008, "vocab": 32000, "context": 4096},
}
RUN = {  # block, micro-batch, grad-accum, steps
    "1b": (2048, 8, 1, 12),
    "7b": (2048, 4, 1, 10),
}
if SMALL:
    SHAPES = {
        "1b": {"hidden": 128, "layers": 2, "heads": 4, "kv": 1, "ffn": 512, "vocab": 4096, "context": 512},
        "7b": {"hidden": 256, "layers": 2, "heads": 4, "kv": 4, "ffn": 688, "vocab": 2048, "context": 512},
    }
    RUN = {"1b": (128, 4, 1, 4), "7b": (128, 2, 1, 4)}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def case(name: str, quant: bool, device, dtype, ceiling: float, started: float) -> dict:
    """One shape × (LoRA | QLoRA): ours alone (tokens/s, MFU, peak memory), then the ratio."""
    if time.perf_counter() - started > BUDGET_S * (0.55 if name == "7b" and quant else 0.8):
        return {"skipped": "time budget"}
    shape = SHAPES[name]
    block, micro_batch, accum, steps = RUN[name]
    cfg = peers.train_config(steps, block, micro_batch, accum)
    out: dict = {"shape": shape, "block": block, "micro_batch": micro_batch, "grad_accum": accum, "steps": steps,
                 "dtype": str(dtype).replace("torch.", ""), "quant": "nf4" if quant else None}
    with tempfile.TemporaryDirectory() as tmp:
        tokens = peers.demo_tokens(Path(tmp), steps * micro_batch * accum * block + block + 1, shape["vocab"])

        def build(peer=False):
            t0 = time.perf_counter()
            m = (peers.quantized_lora_model(shape, device=device, peer=peer) if quant
                 else peers.lora_model(shape, dtype=dtype, device=device, peer=peer))
            out.setdefault("build_seconds", round(time.perf_counter() - t0, 1))
            return m

        model = build()
        out["flops_per_token"] = peers.flops_per_token(model, block)
        _peak_reset(device)
        ours = peers.train_ours(model, tokens, cfg, device)
        out["peak_memory_bytes"] = _peak(device)
        del model
        _free()
        out["tokens_per_s"] = round(ours["steady_tokens_per_s"], 1)
        out["mfu"] = round(out["flops_per_token"] * ours["steady_tokens_per_s"] / ceiling, 4)
        if time.perf_counter() - started > BUDGET_S * 0.85:
            out["hf_trainer"] = {"skipped": "time budget"}
            return out
        model = build(peer=True)
        peer = peers.train_hf_trainer(model, tokens, cfg, device, bf16=dtype == torch.bfloat16)
        del model
        _free()
    out["hf_trainer_tokens_per_s"] = round(peer["tokens_per_s"], 1)
    out["ours_end_to_end_tokens_per_s"] = round(ours["tokens_per_s"], 1)
    out["ratio_vs_hf_trainer"] = round(ours["tokens_per_s"] / peer["tokens_per_s"], 3)  # same span both
    out["losses"] = {"ours": [ours["first_loss"], ours["final_loss"]], "hf_trainer": [peer["first_loss"], peer["final_loss"]]}
    return out


def main() -> int:
    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not SMALL
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    result: dict = {
        "machine": torch.cuda.get_device_name(0) if cuda else f"{platform.machine()} CPU ×{os.cpu_count()}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "small": SMALL,
        "torch": torch.__version__,
    }
    ceiling = peers.mfu_ceiling(device, dtype)
    result["matmul_ceiling_tflops"] = round(ceiling / 1e12, 2)
    print(f"matmul ceiling {ceiling / 1e12:.1f} TFLOP/s ({dtype})", file=sys.stderr, flush=True)
    for name in ("1b", "7b"):
        for quant in (False, True):
            key = f"{name}_{'qlora' if quant else 'lora'}"
            try:
                result[key] = case(name, quant, device, dtype, ceiling, started)
            except Exception as exc:  # one failed case must not cost the others their numbers
                result[key] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                _free()
            print(f"{key}: {json.dumps(result[key])}", file=sys.stderr, flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
