"""Training and adapter settings (no torch here: the CLI and the dashboard read them too)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

# How a base may run: the flags' choices (ltm_tui/cli/common.py), checked when settings are made
# (backend/jobs/settings.py) and again when the worker loads the base (backend/compute/models.py).
PRECISIONS = ("auto", "bf16", "fp32")
ATTENTION = ("auto", "sdpa", "flash_attention_2", "eager")
KERNELS = ("liger",)
GRAD_CHECKPOINTING = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Training knobs; every run records the resolved values with its result."""

    block_size: int = 256  # tokens per training sequence (capped by the model's context)
    micro_batch: int = 16  # sequences per forward pass; halve it if memory runs out
    grad_accum: int = 1  # micro-batches per optimizer step: effective batch = micro_batch × this
    # recompute each layer's activations in the backward pass: about a third more compute for a
    # fraction of the activation memory. auto: on a GPU, the memory plan decides, and grows the
    # micro-batch (fewer accumulation steps, the same effective batch) to fill the card; off on
    # the CPU. on/off: as said, with the micro-batch as given.
    grad_checkpointing: str = "auto"
    lr: float = 3e-3  # peak learning rate; LoRA wants ~2e-4, a from-scratch micro model ~3e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr × this
    schedule: str = "cosine"  # "cosine" or "linear" decay after warm-up
    warmup_frac: float = 0.05  # share of steps spent warming up linearly from zero
    weight_decay: float = 0.01  # AdamW decoupled weight decay on trainable weights
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    epochs: float = 3.0  # passes over the corpus...
    # ...but at least this many tokens, so a 10-page corpus is learned, not glimpsed: a `small`
    # micro model on a 7 KB text is still at loss 1.3 (chance on the scenes) after 600k tokens
    # and at 0.07 after 1.2M, because the learning rate must stay high long enough.
    min_train_tokens: int = 1_200_000
    max_steps: int = 0  # hard cap on optimizer steps; 0 means no cap
    checkpoint_every: int = 200  # steps between checkpoints (also saved on SIGTERM)
    keep_checkpoints: int = 2  # older checkpoints are deleted
    log_every: int = 10  # steps between progress events
    # steps between `metric` events with eval_loss, the mean loss on a fixed sample of the
    # corpus's blocks (the same blocks at every evaluation); 0: off. `ltm-tui search` sets it
    # to feed its pruner.
    eval_every: int = 0
    eval_blocks: int = 8  # blocks in that sample
    seed: int = 0  # seeds data order, dropout and (for micro) the initial weights

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "TrainConfig":
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def plan_steps(self, n_tokens: int, block_size: int) -> int:
        """Optimizer steps for a corpus of n_tokens: epochs, raised to the token floor, capped."""
        per_step = self.micro_batch * self.grad_accum * block_size
        want = max(self.epochs * n_tokens, self.min_train_tokens)
        steps = max(1, math.ceil(want / per_step))
        return min(steps, self.max_steps) if self.max_steps else steps


# Defaults per kind of base: a micro network learns from zero, an adapter nudges a trained base.
MICRO_DEFAULTS = TrainConfig()
LORA_DEFAULTS = TrainConfig(
    block_size=512, micro_batch=4, grad_accum=4, lr=2e-4, epochs=2.0, min_train_tokens=100_000
)


@dataclass
class LoraSettings:
    """LoRA adapter shape (HF bases only)."""

    r: int = 16  # rank: higher learns more, costs more memory
    alpha: int = 32  # scale = alpha / r
    # dropout on the adapter's input; 0 (PEFT's own default) lets the branch run as two plain
    # matmuls with no mask to draw or keep, which on a card is most of what the branch costs
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"  # which linear layers get an adapter

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "LoraSettings":
        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown LoRA setting(s): {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
