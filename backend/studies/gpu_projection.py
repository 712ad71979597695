"""Memory and time on a card that is not here: `ltm-tui estimate --base FOLDER --gpu "RTX PRO 6000"`.

No torch here: it reads the model folder's config.json (nothing else: no weights, no tokenizer),
plans the step's memory with `backend.studies.memory_plan`, lets `memory_plan.choose` pick the
micro-batch and gradient checkpointing for the card, and projects the training time as

    seconds = FLOPs a token × trained tokens / (the card's datasheet dense bf16 FLOP/s × MFU)

with FLOPs a token counted as the calibration counts them (`backend.compute.estimate`): 6 a
trained matmul weight (forward, input gradient, weight gradient), 4 a frozen one (no weight
gradient), 12 × layers × attention width × block for attention, plus the forward again (2 a
weight, a third of attention's) when checkpointing recomputes it. The MFU is a measured one where
the workspace holds a calibration made on that card (`ltm-tui estimate` run on it), else an
assumption, and the output says which. Trained tokens follow the recipe exactly as the
on-device forecast does (`forecast.trained_tokens`: epochs, the token floor, whole steps), and
pages become tokens by the same rule (500 words a page, the tokenizer's tokens a word as
calibrated, else the default for subword tokenizers).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from backend.core.errors import LtmError
from backend.studies import forecast, memory_plan

GiB = memory_plan.GiB


@dataclass(frozen=True)
class Card:
    name: str
    aliases: tuple[str, ...]  # what a person or NVML calls it, matched loosely (see find_gpu)
    memory_bytes: int  # the datasheet's capacity (NVML reports a little less: ECC, the driver)
    bf16_flops: float  # dense (no 2:4 sparsity) bf16 tensor-core FLOP/s, FP32 accumulate
    source: str


# Dense bf16 peaks are half the "with sparsity" figure NVIDIA's datasheets headline.
CARDS = (
    # NVIDIA H100 Tensor Core GPU datasheet, SXM5: BF16 1,979 TFLOPS with sparsity; 80 GB HBM3
    Card("H100 SXM", ("h100 sxm", "h100 hbm3", "h100"), 80 * GiB, 989.4e12, "NVIDIA H100 datasheet (SXM)"),
    # the same datasheet, PCIe: BF16 1,513 TFLOPS with sparsity; 80 GB HBM2e
    Card("H100 PCIe", ("h100 pcie",), 80 * GiB, 756.5e12, "NVIDIA H100 datasheet (PCIe)"),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM: BF16 1,979 TFLOPS with sparsity; 141 GB HBM3e
    Card("H200", ("h200",), 141 * GiB, 989.4e12, "NVIDIA H200 datasheet (SXM)"),
    # NVIDIA HGX B200 / DGX B200 datasheet, per GPU: FP16/BF16 4.5 PFLOPS with sparsity; 180 GB HBM3e
    Card("B200", ("b200",), 180 * GiB, 2.25e15, "NVIDIA DGX B200 datasheet, per GPU"),
    # NVIDIA RTX Blackwell GPU architecture whitepaper, RTX PRO 6000 Blackwell Workstation
    # Edition: FP16/BF16 tensor with FP32 accumulate 503.8 TFLOPS dense (1,007.6 sparse); 96 GB GDDR7
    Card("RTX PRO 6000 Blackwell", ("rtx pro 6000", "pro 6000"), 96 * GiB, 503.8e12,
         "NVIDIA RTX Blackwell architecture whitepaper"),
    # NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense (624 sparse); 80 GB HBM2e,
    # or 40 GB HBM2 (the same peak): "A100" alone means the 80 GB card
    Card("A100 80GB", ("a100 80gb", "a100"), 80 * GiB, 312e12, "NVIDIA A100 datasheet"),
    Card("A100 40GB", ("a100 40gb",), 40 * GiB, 312e12, "NVIDIA A100 datasheet"),
    # NVIDIA L40S datasheet: BF16 733 TFLOPS with sparsity; 48 GB GDDR6
    Card("L40S", ("l40s",), 48 * GiB, 366.5e12, "NVIDIA L40S datasheet"),
    # NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090: FP16/BF16 tensor with FP32
    # accumulate 165.2 TFLOPS dense (330.4 sparse); 24 GB GDDR6X
    Card("RTX 4090", ("rtx 4090", "4090"), 24 * GiB, 165.2e12, "NVIDIA Ada architecture whitepaper"),
)
# Model FLOPs utilisation assumed where nothing was measured on the card: what a well-fed
# PyTorch LoRA step of a 7B-13B model in bf16 reaches on one card (issue 15's goal is 45%); a
# 4-bit base dequantises every weight twice a step, which costs it about a quarter of that.
ASSUMED_MFU = {"lora": 0.40, "4bit": 0.30}
TARGET_SHARE = 0.9  # the share of the card's memory the plan may fill (memory_plan.choose)


def _words(text: str) -> list[str]:
    """A card's name as words: runs of letters and runs of digits, lower case (`A100-SXM4-40GB`
    → a 100 sxm 4 40 gb), so that `RTX4090` and `rtx 4090` read alike."""
    return re.findall(r"[a-z]+|[0-9]+", text.lower())


def find_gpu(name: str) -> Card:
    """The card a name means: "RTX PRO 6000", "h100", "NVIDIA H100 80GB HBM3" (NVML's name),
    "NVIDIA A100-SXM4-40GB", "rtx-4090". An alias matches when each of its words is a word of
    the name (case, spaces and punctuation aside); the longest match wins. A name that is only
    part of an alias is not that card: an A10, an H20 or an L40 is another card than the A100,
    H200 or L40S, with less memory or speed. One clear line listing the known cards when none
    matches."""
    wanted = set(_words(name or ""))
    best, score = None, 0
    for card in CARDS:
        for alias in card.aliases:
            parts = _words(alias)
            hit = sum(map(len, parts)) if parts and all(p in wanted for p in parts) else 0
            if hit > score:
                best, score = card, hit
    if best is None:
        raise LtmError(f"unknown --gpu {name!r}; known cards: {', '.join(c.name for c in CARDS)}", title="usage")
    return best


def flops_per_token(config: Mapping[str, Any], block: int, lora_r: int | None, targets="all-linear",
                    grad_checkpointing: bool = False) -> dict[str, int]:
    """The calibration's FLOP model (backend.compute.estimate.flop_model) from a config alone."""
    s = memory_plan.shape(config)
    linears = s.linears()
    out_layer = s.vocab * s.hidden  # the output layer's matmul happens tied or not
    base = s.layers * s.layer_linear_params() + out_layer
    if lora_r:
        chosen = memory_plan.lora_targets(targets)
        trainable = s.layers * sum(lora_r * (linears[n][0] + linears[n][1]) for n in chosen)
        frozen = base
    else:
        trainable, frozen = base, 0
    attention = 12 * s.layers * s.q_dim * block
    total = 6 * trainable + 4 * frozen + attention
    if grad_checkpointing:  # the forward pass once more, in the backward
        total += 2 * (trainable + frozen) + attention // 3
    return {"trainable_matmul_params": trainable, "frozen_matmul_params": frozen, "attention_flops": attention,
            "flops_per_token": total}


def calibrations_on(workspace, card: Card) -> list[dict]:
    """The workspace's calibrations (forecast/calib-*.json) measured on this card."""
    found = []
    folder = forecast.forecast_dir(workspace)
    for path in sorted(folder.glob("calib-*.json")) if folder.is_dir() else []:
        try:
            calib = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        tag = str(calib.get("device_tag") or "")
        if not tag.startswith("cuda:"):
            continue
        try:
            if find_gpu(tag[5:]) == card:
                found.append(calib)
        except LtmError:
            continue
    return found


def mfu_for(workspace, card: Card, quant: str | None) -> tuple[float, str]:
    """(MFU against the card's datasheet peak, where it comes from): the best a calibration on
    this card reached with the same kind of base (4-bit or not), else the assumption."""
    measured = [_hardware_flops_per_s(c) / card.bf16_flops for c in calibrations_on(workspace, card)
                if c.get("achieved_flops_per_s") and bool((c.get("base") or {}).get("quant")) == bool(quant)]
    if measured:
        return max(measured), f"measured on this card ({len(measured)} calibration(s) in the workspace)"
    kind = "4bit" if quant else "lora"
    return ASSUMED_MFU[kind], (f"assumed {ASSUMED_MFU[kind]:.0%} (no calibration on this card in the workspace; "
                               "`ltm-tui estimate` run on the card measures it)")


def _hardware_flops_per_s(calib: Mapping[str, Any]) -> float:
    """What a calibration's card computed a second, the recomputed forward pass included where
    its steps checkpointed: the rate `project` divides by, since its FLOPs a token count the
    recomputation too (model FLOPs alone would charge a checkpointed calibration's slowdown twice)."""
    achieved = float(calib["achieved_flops_per_s"])
    model_flops = float(calib.get("flops_per_token") or 0)
    if not calib.get("grad_checkpointing_used") or not model_flops:
        return achieved
    matmuls = float(calib.get("trainable_matmul_params") or 0) + float(calib.get("frozen_matmul_params") or 0)
    recompute = 2 * matmuls + float(calib.get("attention_flops") or 0) // 3
    return achieved * (model_flops + recompute) / model_flops


def choose_step(config: Mapping[str, Any], card: Card, *, micro_batch: int, grad_accum: int,
                grad_checkpointing: str = "auto", **settings: Any) -> tuple[bool, int, memory_plan.MemoryPlan]:
    """(checkpointing, micro-batch, its plan) on the card, as the worker's `fit_to_card` picks
    them: "on"/"off" fix checkpointing and keep the asked micro-batch (the worker fits nothing
    then; out of memory halves it at run time); "auto" lets the plan decide
    (memory_plan.choose), and the micro-batch is the largest the plan allows that divides the
    effective batch micro_batch × grad_accum, which stays the same."""
    if grad_checkpointing in ("on", "off"):
        ckpt, mb = grad_checkpointing == "on", max(1, micro_batch)
    else:
        cap = max(1, micro_batch * grad_accum)
        ckpt, fitted = memory_plan.choose(config, card.memory_bytes, TARGET_SHARE, micro_batch=micro_batch, cap=cap,
                                          **settings)
        mb = max(d for d in range(1, fitted + 1) if cap % d == 0)
    return ckpt, mb, memory_plan.plan(config, micro_batch=mb, grad_checkpointing=ckpt, **settings)


def project(workspace, config: Mapping[str, Any], card: Card, base: Mapping[str, Any], train: Mapping[str, Any],
            lora: Mapping[str, Any] | None, pages: list[float], *, attention: str = "sdpa",
            grad_checkpointing: str = "auto") -> dict[str, Any]:
    """The plan on the card and one row per pages value (see the module docstring)."""
    cfg = forecast.resolved_train(base, train)
    quant = base.get("quant") or None
    r = int((lora or {}).get("r") or 16)
    targets = (lora or {}).get("target_modules") or "all-linear"
    block = min(cfg.block_size, int(config.get("max_position_embeddings") or cfg.block_size))
    settings = {"quant": quant, "lora_r": r, "target_modules": targets, "block_size": block, "dtype_bytes": 2,
                "attention": attention, "device": "cuda", "lora_dropout": float((lora or {}).get("dropout") or 0.0),
                # a corpus is documents: SDPA then needs the block-diagonal mask (flash does not)
                "packed_documents": attention != "flash",
                "kernels": "liger" if base.get("kernels") == "liger" else None}
    ckpt, mb, step = choose_step(config, card, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum,
                                 grad_checkpointing=grad_checkpointing, **settings)
    accum = max(1, -(-cfg.micro_batch * cfg.grad_accum // mb))
    chosen = {**train, "micro_batch": mb, "grad_accum": accum}
    flops = flops_per_token(config, block, r, targets, ckpt)
    mfu, mfu_source = mfu_for(workspace, card, quant)
    key = forecast.settings_key(base, train)
    same = [c for c in calibrations_on(workspace, card) if c.get("key") == key]
    rows = []
    for p in pages:
        tokens = forecast.tokens_for_pages(workspace, base, train, p)
        steps, trained = forecast.trained_tokens(base, chosen, tokens, block)
        if same:  # measured on this card with these settings: its own speed and peak
            calib = same[-1]
            seconds = float(calib.get("warmup_seconds") or 0.0) + trained / float(calib["tokens_per_s"])
            peak, source = int(calib["peak_memory_bytes"]), "measured"
        else:
            seconds = flops["flops_per_token"] * trained / (card.bf16_flops * mfu)
            peak, source = step.peak, "projection"
        rows.append({
            "pages": int(p) if p == int(p) else p, "tokens": tokens, "trained_tokens": trained, "steps": steps,
            "peak_memory_gb": round(peak / 1e9, 2), "fits": peak <= card.memory_bytes,
            "train_s": round(seconds, 1), "total_s": round(seconds, 1), "source": source,
            "gpu": card.name, "micro_batch": mb, "grad_accum": accum, "grad_checkpointing": ckpt,
            "mfu": round(mfu, 3), "flops_per_token": flops["flops_per_token"],
        })
    return {"card": card, "plan": step, "mfu": mfu, "mfu_source": mfu_source, "flops": flops, "rows": rows,
            "block_size": block, "attention": attention}
