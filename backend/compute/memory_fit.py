"""Fit a training step to the card before the first batch: gradient checkpointing and the
micro-batch, from the memory plan (`backend.studies.memory_plan`).

On a GPU with `--grad-checkpointing auto` (the default) the worker asks the plan for the
largest micro-batch that fits `MEMORY_SHARE` of the memory this process may use (what the card
has free plus what this process already holds, its base included), up to the run's effective
batch: a 96 GB card then runs a 7B adapter's 4 × 4 as 16 × 1, the same data a step, a quarter of
the forward passes. Checkpointing goes on only when the requested micro-batch would not fit
without it. The effective batch (micro-batch × accumulation) never changes, so what a step
learns does not depend on the card; out-of-memory halving stays as the fallback for a plan that
was wrong. On the CPU, auto keeps the run's own settings: memory there is the machine's, and a
larger batch buys no speed on a few cores.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from backend.core.config import LoraSettings, TrainConfig

MEMORY_SHARE = 0.9  # of free + held memory: room for the allocator's fragmentation and NCCL-free spikes
# the plan's names for the attention kernels transformers knows
_PLAN_ATTENTION = {"flash_attention_2": "flash", "sdpa": "sdpa", "eager": "eager"}


def plan_settings(model, cfg: TrainConfig, *, quant: str | None, lora: LoraSettings | None,
                  device: torch.device, dtype_bytes: int) -> dict:
    """The memory plan's keywords for this model and run (lora None: every weight trains)."""
    config = _base_config(model)
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        "quant": quant,
        "lora_r": lora.r if lora else None,
        "target_modules": lora.target_modules if lora else "all-linear",
        "lora_dropout": lora.dropout if lora else 0.0,
        "block_size": min(cfg.block_size, int(getattr(config, "max_position_embeddings", cfg.block_size))),
        "dtype_bytes": dtype_bytes,
        "attention": _PLAN_ATTENTION.get(attention, "sdpa"),
        "device": device.type,
        "packed_documents": True,
        "kernels": getattr(inner, "ltm_kernels", None),  # set by models.use_kernels where they run
    }


def fit_to_card(model, cfg: TrainConfig, *, quant: str | None, lora: LoraSettings | None, device: torch.device,
                dtype_bytes: int, log: Callable[[str], None],
                card_bytes: int | None = None) -> tuple[TrainConfig, bool]:
    """(the run's settings with the micro-batch fitted, whether to checkpoint). `card_bytes`
    stands in for the measured budget (tests; a plan for another card)."""
    from backend.studies.memory_plan import choose, plan

    mode = cfg.grad_checkpointing
    if mode in ("on", "off"):
        return cfg, mode == "on"
    if card_bytes is None:
        if device.type != "cuda":
            return cfg, False
        from backend.studies.memory_plan import CUDA_CONTEXT_BYTES

        free, _total = torch.cuda.mem_get_info(device)
        # What this process may fill, plus the context it already has: the plan's peak counts
        # the context, which `free` has already lost.
        card_bytes = int(free + torch.cuda.memory_reserved(device)) + CUDA_CONTEXT_BYTES
    settings = plan_settings(model, cfg, quant=quant, lora=lora, device=device, dtype_bytes=dtype_bytes)
    config = _base_config(model).to_dict()
    effective = cfg.micro_batch * cfg.grad_accum
    ckpt, fitted = choose(config, card_bytes, MEMORY_SHARE, micro_batch=cfg.micro_batch, cap=effective, **settings)
    # the largest micro-batch the plan allows that divides the effective batch
    micro = max(d for d in range(1, fitted + 1) if effective % d == 0)
    peak = plan(config, micro_batch=micro, grad_checkpointing=ckpt, **settings).peak
    log(f"memory plan: {peak / 1e9:.1f} GB a step of {card_bytes / 1e9:.1f} GB usable at micro-batch {micro} × "
        f"accumulation {effective // micro}, checkpointing {'on' if ckpt else 'off'} "
        f"(asked {cfg.micro_batch} × {cfg.grad_accum})")
    return replace(cfg, micro_batch=micro, grad_accum=effective // micro), ckpt


def _base_config(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.config


def eval_bytes_per_token(config, dtype_bytes: int, width: int) -> int:
    """Bytes one padded token of a no-grad forward pass holds at its fullest, on the safe side:
    nothing is kept for a backward pass, so it is one layer's working set (the residual stream,
    q/k/v and the attention output, SwiGLU's three intermediates), the key/value cache that
    decoding keeps for every layer, the token's row of the 4D attention mask (and of the scores
    in fp32 and the model's dtype where attention is eager), and its logits in the model's dtype,
    their fp32 copy and the scorer's fp32 log-softmax."""
    d = int(config.hidden_size)
    f = int(getattr(config, "intermediate_size", 4 * d) or 4 * d)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or d // heads)
    layers = int(config.num_hidden_layers)
    vocab = int(config.vocab_size)
    working = (2 * d + (heads + 2 * kv) * head_dim + d + 3 * f) * dtype_bytes
    cache = 2 * layers * kv * head_dim * dtype_bytes
    mask = width * dtype_bytes
    if getattr(config, "_attn_implementation", None) == "eager":
        mask += heads * width * (4 + dtype_bytes)
    logits = vocab * (dtype_bytes + 8)
    return working + cache + mask + logits


def eval_batch_tokens(model, device: torch.device, floor: int) -> int:
    """Padded tokens a scoring or decoding batch may hold on this device: on a GPU, what the
    memory this process may still fill holds at `eval_bytes_per_token`, never below `floor`
    (the CPU's constant); `floor` itself on the CPU, where larger batches buy no speed."""
    if device.type != "cuda":
        return floor
    config = _base_config(model)
    dtype_bytes = 4 if next(model.parameters()).dtype == torch.float32 else 2
    width = min(int(getattr(config, "max_position_embeddings", 2048) or 2048), 4096)
    free, _total = torch.cuda.mem_get_info(device)
    usable = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    per_token = eval_bytes_per_token(config, dtype_bytes, width)
    return max(floor, min(1 << 20, int(usable * MEMORY_SHARE) // per_token))
