"""Run settings: what a person chooses for a batch of runs, checked and completed.

`RunOptions` holds the choices as a person makes them (the flags of `ltm-tui run`, the file
picker's fields, a study's request), every one optional; `job_settings()` checks them (one
`LtmError` line for the first problem: an unknown preset, 4-bit on micro, a battery that is
missing or malformed) and completes them with the per-base defaults into the `JobSettings` a
job is queued with. The CLI, the dashboard and the studies build settings only this way.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from backend.core.config import ATTENTION, GRAD_CHECKPOINTING, KERNELS, PRECISIONS
from backend.core.errors import LtmError

MICRO_PRESETS = ("tiny", "small", "base", "large")


@dataclass(frozen=True)
class JobSettings:
    """What a batch of jobs shares: the base, the battery and the training knobs."""

    base: dict[str, Any]  # BaseSpec fields: base, preset, quant, trust_remote_code, device
    scenes: str  # folder or file of batteries
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    lora: dict[str, Any] = field(default_factory=dict)  # LoraSettings overrides (HF bases)
    probes: bool = True  # look inside each adapted network after evaluation (--no-probes: off)

    def base_label(self) -> str:
        b = self.base
        if b.get("base") == "micro":
            return f"micro:{b.get('preset', 'small')}"
        return b["base"] + (f" ({b['quant']})" if b.get("quant") else "")

    def baseline_key(self, seed: int) -> str:
        """Runs with the same key share one baseline: same base, same batteries, same seed."""
        battery_hash = battery_fingerprint(Path(self.scenes))
        blob = json.dumps([self.base, battery_hash, seed], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def battery_fingerprint(path: Path) -> str:
    """The batteries by name and content: two runs on equal batteries compare."""
    files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class RunOptions:
    """A person's choices for a batch of runs; None means the base's default."""

    base: str = "micro"  # micro, a Hugging Face id or a local model folder
    preset: str | None = None  # micro size (default small)
    quant: str | None = None  # "4bit": QLoRA
    trust_remote_code: bool = False
    device: str | None = None
    scenes: str | None = None  # battery folder or file (default: the built-in scenes/)
    steps: int | None = None
    epochs: float | None = None
    min_train_tokens: int | None = None
    lr: float | None = None
    block_size: int | None = None
    micro_batch: int | None = None
    grad_accum: int | None = None
    lora_r: int | None = None
    lora_alpha: int | None = None
    grad_checkpointing: str | None = None  # auto (default), on, off
    precision: str | None = None  # auto (default), bf16, fp32
    attn: str | None = None  # auto (default), sdpa, flash_attention_2, eager
    kernels: str | None = None  # liger
    compile: bool = False
    probes: bool = True

    @classmethod
    def from_namespace(cls, ns: Any) -> "RunOptions":
        """The options a parsed command line carries (a command without a flag keeps its default)."""
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if getattr(ns, f.name, None) is not None})

    def _check_numbers(self) -> None:
        """Each number in its range, before anything is queued: a run of -5 steps would end
        `done` with the base's scores, and a zero block size would fail in the worker."""
        at_least = {"--steps": (self.steps, 1), "--min-train-tokens": (self.min_train_tokens, 0),
                    "--block-size": (self.block_size, 8), "--micro-batch": (self.micro_batch, 1),
                    "--grad-accum": (self.grad_accum, 1), "--lora-r": (self.lora_r, 1),
                    "--lora-alpha": (self.lora_alpha, 1)}
        for flag, (value, low) in at_least.items():
            if value is not None and not (isinstance(value, int) and value >= low):
                raise LtmError(f"{flag} {value!r}: give a whole number of at least {low}", title="usage")
        for flag, value in (("--lr", self.lr), ("--epochs", self.epochs)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise LtmError(f"{flag} {value!r}: give a positive number", title="usage")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device.strip()):
            raise LtmError(f"--device {self.device!r}: give cpu, cuda or cuda:N (or leave it out)", title="usage")

    def job_settings(self) -> JobSettings:
        from backend.core.config import LORA_DEFAULTS, MICRO_DEFAULTS, LoraSettings
        from backend.core.workspace import default_scenes_dir
        from backend.scoring.scenes import load_batteries

        micro = self.base == "micro"
        preset = self.preset or "small"
        if micro and preset not in MICRO_PRESETS:
            raise LtmError(f"unknown --preset {preset!r}; use {', '.join(MICRO_PRESETS[:-1])} or {MICRO_PRESETS[-1]}",
                           title="usage")
        if micro and self.quant:
            raise LtmError("--quant 4bit is for Hugging Face bases; micro trains in full", title="usage")
        for value, known, flag in ((self.precision, PRECISIONS, "--precision"), (self.attn, ATTENTION, "--attn"),
                                   (self.grad_checkpointing, GRAD_CHECKPOINTING, "--grad-checkpointing"),
                                   (self.kernels, KERNELS, "--kernels")):
            if value is not None and value not in known:
                raise LtmError(f"unknown {flag} {value!r}; use one of {', '.join(known)}", title="usage")
        self._check_numbers()
        scenes = Path(self.scenes).expanduser().resolve() if self.scenes else default_scenes_dir()
        if not scenes.exists():
            raise LtmError(f"{scenes}: no such battery folder; pass --scenes DIR", title="battery")
        load_batteries(scenes)  # a malformed battery stops here, naming file, line and field
        train = (MICRO_DEFAULTS if micro else LORA_DEFAULTS).to_dict()
        chosen = {"max_steps": self.steps, "epochs": self.epochs, "min_train_tokens": self.min_train_tokens,
                  "lr": self.lr, "block_size": self.block_size, "micro_batch": self.micro_batch,
                  "grad_accum": self.grad_accum, "grad_checkpointing": self.grad_checkpointing}
        train.update({k: v for k, v in chosen.items() if v is not None})
        train.pop("seed", None)  # each job's seed travels with the job
        lora = {}
        if not micro:
            lora = LoraSettings().to_dict()
            lora.update({k: v for k, v in (("r", self.lora_r), ("alpha", self.lora_alpha)) if v})
        base = {"base": self.base, "preset": preset if micro else None, "quant": self.quant,
                "trust_remote_code": bool(self.trust_remote_code), "device": self.device}
        # How the base runs, only where it differs from the default: a run's baseline key is
        # its base's settings, and runs queued before these choices existed keep their baselines.
        speed = {"precision": self.precision, "attn": self.attn, "kernels": self.kernels, "compile": self.compile}
        base.update({k: v for k, v in speed.items() if v not in (None, False, "auto")})
        return JobSettings(base=base, scenes=str(scenes), train=train, lora=lora, probes=self.probes)
