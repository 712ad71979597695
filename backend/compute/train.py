"""The training recipe: setup → train → save → cleanup, for one corpus and one model.

The worker calls `train_model` with a model already on its device (a fresh micro network, or
an HF base wrapped in a LoRA adapter); this file reads top to bottom like one training script.
Run it through the worker, e.g.::

    python -m backend.compute.worker ltm-workspace/runs/<run_id>/session.json

Every `log_every` steps, and after any step that ends a second or more after the last event (so
a slow step still moves the bar), it writes a `progress` event (step, total, tokens, loss: the
mean over the steps since the last event, tokens_per_s, eta_s, gpu_mem_bytes; an event of the
second kind is marked `timed`, and the loss of one of the first kind is the mean since the last
of that kind, so the loss curve is the same however fast the steps ran) and one human line. On
a GPU the forward pass runs under bf16 autocast (`precision`, `models.autocast`); the ETA comes from `smooth_pace`, not from the last window alone. Every `eval_every` steps (when set) a `metric` event
{name: "eval_loss", step, value}: the mean loss on a fixed, evenly spaced sample of the corpus's
blocks, the same at every evaluation, in eval mode (no dropout, no random numbers drawn, so a
resumed run still trains exactly as an uninterrupted one); every `checkpoint_every` steps,
and on SIGTERM, it saves `checkpoints/step-000123/` with the trainable weights, the optimizer
and its config, so a retry resumes where it stopped without training any step twice.

A step trains on the next effective batch of blocks (`packing.step_blocks`: the epochs'
shuffled orders end to end), split into micro-batches of whatever size fits, and its loss is the
mean over all of its targets: what a step learns does not depend on the split, so a card's
memory plan, an out-of-memory halving or a resumed run with another micro-batch changes nothing
but the memory it takes.

Out of memory in a step: the step's gradients are dropped; with `--grad-checkpointing auto`
and checkpointing off, it is switched on, else the micro-batch is halved and the accumulation
doubled (the effective batch, and so the data each step sees, stays the same); a `log` event
says so, and the step is redone. Only at micro-batch 1 does the job fail, with one line.
`LTM_FAULT_OOM_ABOVE=N` (environment) makes every forward pass of more than N sequences raise
`torch.OutOfMemoryError` after it ran, and `N/M` more than M with checkpointing on: the fault
injection the tests and benchmarks use to exercise that path on a machine with memory to spare.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from backend.compute.models import autocast
from backend.core.config import TrainConfig
from backend.core.errors import LtmError
from backend.ingest.packing import PackedBlocks, document_marks, load_tokens, model_inputs, step_blocks

FAULT_OOM_ENV = "LTM_FAULT_OOM_ABOVE"  # see the module docstring
# A progress event goes out every `log_every` steps and also after any step that ends this many
# seconds after the last event: at most about one event a second more than before, however fast
# or slow the steps are.
PROGRESS_SECONDS = 1.0
# The ETA's seconds a step: the mean over the attempt so far, until the attempt is longer than
# this many seconds; then an exponential moving average with this time constant, so one slow
# window (a checkpoint, another process on the card) moves it by a few percent, and a lasting
# change of speed shows within about a minute.
PACE_TIME_CONSTANT = 30.0
ETA_MIN_STEPS = 3  # before this many steps of the attempt the pace is mostly warm-up: no ETA


@dataclass
class TrainOutcome:
    steps: int
    tokens_seen: int
    final_loss: float
    train_seconds: float
    resumed_from: int
    micro_batch: int = 0  # what the last step ran with (smaller than asked after out-of-memory)
    grad_accum: int = 0
    oom_halvings: int = 0  # how often out-of-memory halved the micro-batch
    oom_checkpointing: bool = False  # out-of-memory switched gradient checkpointing on


class OutOfMemory(LtmError):
    """Out of memory even at micro-batch 1: the job cannot fit on this device."""

    title = "out of memory"


class StopRequested(Exception):
    """SIGTERM arrived; a checkpoint has been saved."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped at step {step}; checkpoint saved")
        self.step = step


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier on the peak lr at `step` (0-based): linear warm-up, then cosine/linear decay."""
    warmup = max(1, int(total * cfg.warmup_frac)) if cfg.warmup_frac > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(1.0, progress)
    if cfg.schedule == "linear":
        decay = 1.0 - progress
    elif cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; use cosine or linear")
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def smooth_pace(pace: float | None, seconds: float, steps: int, attempt_steps: int,
                time_constant: float = PACE_TIME_CONSTANT) -> float | None:
    """Seconds a step for the ETA, after a window of `steps` steps that took `seconds`, given
    the smoothed `pace` before it (None at the start) and the steps of the attempt so far, this
    window's included. The window's weight is the larger of its share of the attempt's steps
    (so early on the pace is the attempt's plain mean) and 1 - exp(-seconds / time_constant)
    (later, a moving average over about `time_constant` seconds)."""
    if steps <= 0:
        return pace
    window = seconds / steps
    if pace is None:
        return window
    weight = max(steps / max(attempt_steps, steps), 1.0 - math.exp(-seconds / time_constant))
    return pace + weight * (window - pace)


def eta_seconds(pace: float | None, remaining_steps: int, attempt_steps: int) -> float | None:
    """The ETA from a smoothed pace, or None for the first steps of an attempt."""
    if pace is None or attempt_steps < ETA_MIN_STEPS:
        return None
    return max(0, remaining_steps) * pace


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    model, optimizer, scheduler, step: int, cfg: TrainConfig, ckpt_dir: Path, elapsed: float = 0.0
) -> Path:
    """checkpoints/step-000123/: trainable weights, optimizer state and the resolved config."""
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weights = {n: p.detach().to("cpu").contiguous() for n, p in _trainable(model).items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "step": step,
                "elapsed": elapsed,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                # the training device's generator too (dropout draws on the GPU), so a run resumed
                # on CUDA continues the same random sequence; None on the CPU
                "cuda_rng": _cuda_rng(model),
            },
            tmp / "optimizer.pt",
        )
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half checkpoint, and its space back
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    kept = sorted(ckpt_dir.glob("step-*"))
    for old in kept[: -cfg.keep_checkpoints] if cfg.keep_checkpoints > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(p for p in ckpt_dir.glob("step-*") if (p / "optimizer.pt").is_file())
    return found[-1] if found else None


def resume_newest(model, optimizer, scheduler, ckpt_dir: Path, log: Callable[[str], None]) -> tuple[Path | None, int, float]:
    """Restore the newest checkpoint that loads; one that does not (a torn write, a bad disk
    block) is set aside as `broken-step-…` and the one before it is tried. Returns (the
    checkpoint, its step, the seconds before it), or (None, 0, 0.0) to start from the beginning."""
    while (path := newest_checkpoint(ckpt_dir)) is not None:
        try:
            return path, *load_checkpoint(model, optimizer, scheduler, path)
        except Exception as exc:  # noqa: BLE001 - safetensors, pickle and shape errors alike
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            aside = path.with_name(f"broken-{path.name}")
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            log(f"checkpoint {path.name} does not load ({reason}); set aside as {aside.name}, trying the one before")
    return None, 0, 0.0


def load_checkpoint(model, optimizer, scheduler, path: Path) -> tuple[int, float]:
    """Restore a checkpoint; returns (step, training seconds spent before it). Both files are
    read before anything is changed, so an unreadable checkpoint leaves the model as it was."""
    weights = load_file(str(path / "trainable.safetensors"))
    state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    params = _trainable(model)
    missing = set(params) - set(weights)
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {len(missing)} trainable tensors")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    device = _device_of(model)
    if state.get("cuda_rng") is not None and device.type == "cuda":  # a checkpoint from a GPU, resumed on one
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return int(state["step"]), float(state.get("elapsed", 0.0))


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _cuda_rng(model) -> torch.Tensor | None:
    """The random state of the CUDA device the model trains on (the slot's own, whatever its
    number on the machine), or None when it trains elsewhere."""
    device = _device_of(model)
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _fault_oom_limit() -> tuple[int, int] | None:
    """(sequences a pass may hold without checkpointing, with it) from `LTM_FAULT_OOM_ABOVE`."""
    raw = os.environ.get(FAULT_OOM_ENV, "").strip()
    if not raw:
        return None
    plain, _, checkpointed = raw.partition("/")
    return int(plain), int(checkpointed or plain)


def _free_after_oom(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _device_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def train_model(
    model,
    tokens_path: Path,
    run_dir: Path,
    cfg: TrainConfig,
    *,
    device: torch.device,
    emit: Callable[..., Any],
    log: Callable[[str], None],
    should_stop: Callable[[], bool] = lambda: False,
    precision: str = "auto",
) -> TrainOutcome:
    # --- setup -------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":  # the progress events' gpu_mem_bytes: this run's peak, not an earlier job's
        torch.cuda.reset_peak_memory_stats(device)
    context = int(getattr(model.config, "max_position_embeddings", cfg.block_size) or cfg.block_size)
    blocks = PackedBlocks(load_tokens(tokens_path), min(cfg.block_size, context), cfg.seed)
    block_size = blocks.block_size
    marks = document_marks(tokens_path)  # the ids that start and end its documents
    total = cfg.plan_steps(len(blocks.tokens), block_size)
    params = list(_trainable(model).values())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        fused=device.type in ("cuda", "cpu"),  # one kernel over all tensors (CPU too since torch 2.4)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg))
    eval_sample = blocks.batch(_eval_starts(blocks, cfg.eval_blocks)) if cfg.eval_every else None
    ckpt_dir = run_dir / "checkpoints"
    resume, start, before = resume_newest(model, optimizer, scheduler, ckpt_dir, log)
    if resume is not None:
        log(f"resumed from {resume.name} (step {start} of {total})")
        emit("log", message=f"resumed from {resume.name}", step=start)
    model.train()

    # --- train -------------------------------------------------------------------------------
    micro_batch, grad_accum = cfg.micro_batch, cfg.grad_accum
    oom_limit, halvings, oom_checkpointing = _fault_oom_limit(), 0, False
    per_step = micro_batch * grad_accum  # blocks a step: the same however they are split
    stream = step_blocks(blocks, per_step, start_step=start)
    tokens_seen = start * per_step * block_size
    t0 = time.perf_counter()
    window_t, window_tokens, window_loss, window_n = t0, 0, 0.0, 0
    pace = None  # smoothed seconds a step (smooth_pace), for the ETA
    # the loss since the last multiple of log_every: the outcome's final loss, the same however
    # the time-driven events fell
    tail_loss, tail_n = 0.0, 0
    loss_value = final_loss = float("nan")
    step = start
    starts = next(stream)
    while step < total:
        out_of_memory = False
        try:
            step_tokens, step_loss = _accumulate(model, blocks, starts, micro_batch, device, oom_limit, marks,
                                                 precision)
        except torch.OutOfMemoryError:
            out_of_memory = True
        if out_of_memory:  # handled out here: inside `except` the traceback still holds the pass's tensors
            optimizer.zero_grad(set_to_none=True)
            _free_after_oom(device)
            if cfg.grad_checkpointing == "auto" and not _checkpointing(model):
                # The plan left checkpointing off and the card disagrees (its own context, other
                # processes, fragmentation): recomputing activations cuts them by about the
                # number of layers, far more than halving the micro-batch does, at a third more
                # compute. Redo this step with it.
                set_grad_checkpointing(model, True)
                oom_checkpointing = True
                message = f"out of memory at step {step + 1}: gradient checkpointing now on"
                log(message)
                emit("log", message=message, step=step, grad_checkpointing=True)
                continue
            if micro_batch == 1:
                hint = "" if _checkpointing(model) else " (or --grad-checkpointing on)"
                raise OutOfMemory(
                    f"a step does not fit even at micro-batch 1 (block {block_size} tokens) on "
                    f"{device}: use --quant 4bit (QLoRA), a smaller --block-size or a smaller base{hint}"
                ) from None
            # Redo this step, its blocks split into micro-batches half as large.
            micro_batch, halvings = micro_batch // 2, halvings + 1
            grad_accum = -(-per_step // micro_batch)
            message = (
                f"out of memory at step {step + 1}: micro-batch now {micro_batch} × "
                f"accumulation {grad_accum} (effective batch kept)"
            )
            log(message)
            emit("log", message=message, step=step, micro_batch=micro_batch, grad_accum=grad_accum)
            continue
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        starts = next(stream)
        tokens_seen += step_tokens
        window_tokens += step_tokens
        window_n += 1
        window_loss += step_loss  # stays on the device: one host sync per log line, not per step
        tail_loss, tail_n = tail_loss + step_loss, tail_n + 1
        # The curve's points: every log_every steps and the last, each the mean loss since the
        # one before, so a run's curve is the same however fast its steps ran. The events a slow
        # step adds in between (for the bar and the ETA) carry their own window's mean, marked
        # `timed`, and stay out of the curve.
        on_curve = step % cfg.log_every == 0 or step == total
        if step == total:
            final_loss = float(tail_loss) / tail_n

        now = time.perf_counter()
        if on_curve or now - window_t >= PROGRESS_SECONDS:
            loss_value = float(tail_loss) / tail_n if on_curve else float(window_loss) / window_n
            tps = window_tokens / max(now - window_t, 1e-9)
            pace = smooth_pace(pace, now - window_t, window_n, step - start)
            eta = eta_seconds(pace, total - step, step - start)
            point = {
                "step": step,
                "loss": round(loss_value, 5),
                "lr": scheduler.get_last_lr()[0],
                "tokens": tokens_seen,
                "tokens_per_s": round(tps, 1),
            }
            emit(
                "progress",
                **point,
                total=total,
                eta_s=None if eta is None else round(eta, 1),
                gpu_mem_bytes=_device_memory(device),
                **({} if on_curve else {"timed": True}),
            )
            log(
                f"step {step:>6}/{total} | loss {loss_value:.4f} | lr {point['lr']:.2e} "
                f"| {tps:,.0f} tok/s | eta {'-' if eta is None else f'{eta:,.0f}s'}"
            )
            window_t, window_tokens, window_loss, window_n = now, 0, 0.0, 0
        if on_curve:
            tail_loss, tail_n = 0.0, 0
        if eval_sample is not None and (step % cfg.eval_every == 0 or step == total):
            value = _eval_loss(model, eval_sample, micro_batch, device, marks, precision)
            emit("metric", name="eval_loss", step=step, value=round(value, 5), total=total)
            log(f"step {step:>6}/{total} | eval loss {value:.4f} on {len(eval_sample)} fixed blocks")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            elapsed = before + time.perf_counter() - t0
            save_checkpoint(model, optimizer, scheduler, step, cfg, ckpt_dir, elapsed)
        if should_stop():
            elapsed = before + time.perf_counter() - t0
            save_checkpoint(model, optimizer, scheduler, step, cfg, ckpt_dir, elapsed)
            emit("log", message=f"stop requested: checkpoint saved at step {step}", step=step)
            raise StopRequested(step)

    # --- cleanup -----------------------------------------------------------------------------
    model.eval()
    return TrainOutcome(
        steps=step,
        tokens_seen=tokens_seen,
        final_loss=final_loss,
        train_seconds=before + time.perf_counter() - t0,
        resumed_from=start,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        oom_halvings=halvings,
        oom_checkpointing=oom_checkpointing,
    )


def ready_to_train(model, spec, cfg: TrainConfig, lora, device: torch.device,
                   log: Callable[[str], None]) -> tuple[TrainConfig, bool]:
    """What comes between attaching the adapter and the first step, in the worker and in the
    estimate's calibration alike (so a calibration measures the speed the worker gets): the
    micro-batch and checkpointing fitted to the card (`memory_fit.fit_to_card`), checkpointing
    switched on or off, the decoder layers compiled when asked. Returns (the fitted settings,
    whether checkpointing is on); the caller switches it off again after training."""
    from backend.compute.memory_fit import fit_to_card
    from backend.compute.models import compile_layers, train_dtype

    # A micro network's weights are fp32 master weights on every device: plan them so.
    dtype_bytes = 4 if spec.is_micro else train_dtype(device, spec.precision).itemsize
    cfg, checkpointing = fit_to_card(model, cfg, quant=spec.quant, lora=lora, device=device,
                                     dtype_bytes=dtype_bytes, log=log)
    set_grad_checkpointing(model, checkpointing)
    if spec.compile:
        log(f"torch.compile: {compile_layers(model)} decoder layers, each on its own; "
            "the first steps include the compiling")
    return cfg, checkpointing


def _checkpointing(model) -> bool:
    """Whether checkpointing is on, by transformers 5.25's name where it has it (the older one warns)."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(model.is_gradient_checkpointing if on is None else on)


def done_training(model, spec) -> None:
    """After the steps, in the worker and the calibration alike: the base goes on to evaluation,
    and a warm base to the next job, as it came: no checkpointing, no compiled forward passes."""
    from backend.compute.models import eager_after_training

    set_grad_checkpointing(model, False)
    if spec.compile:
        eager_after_training()


def set_grad_checkpointing(model, on: bool) -> None:
    """Recompute each decoder layer's activations in the backward pass (or stop doing so). The
    non-reentrant form: it needs no input that requires a gradient (a frozen base has none) and
    keeps the random state, so dropout draws the same masks in the recomputation."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers 5.x's name
        if on:
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif _checkpointing(inner):
            inner.activation_checkpointing_disable()
    elif on:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif inner.is_gradient_checkpointing:
        inner.gradient_checkpointing_disable()
    if not on and hasattr(inner, "disable_input_require_grads"):
        # Enabling also hooks the embeddings so their output requires a gradient; transformers
        # takes the hook off again only for adapters it attached itself, not PEFT's. Left on, a
        # warm worker's later jobs would keep layer 0's activations and compute its input
        # gradient for nothing, and gain one hook a job.
        inner.disable_input_require_grads()


def _eval_starts(blocks: PackedBlocks, n: int):
    """Start indices of `n` blocks spread evenly over the corpus (fewer if it holds fewer)."""
    count = max(1, blocks.blocks_per_epoch)
    picks = np.unique(np.linspace(0, count - 1, num=max(1, min(n, count))).round().astype(np.int64))
    return picks * blocks.block_size


@torch.no_grad()
def _eval_loss(model, sample, micro_batch: int, device: torch.device, marks: dict, precision: str) -> float:
    """Mean loss over the sample's blocks, in eval mode, micro_batch blocks a forward pass."""
    model.eval()
    total = 0.0
    for i in range(0, len(sample), micro_batch):
        rows = sample[i : i + micro_batch]
        with autocast(device, precision):
            total += float(model(**packed_inputs(model, rows, marks, device)).loss) * len(rows)
    model.train()
    return total / len(sample)


def _accumulate(model, blocks: PackedBlocks, starts: np.ndarray, micro_batch: int, device: torch.device,
                oom_limit: tuple[int, int] | None, marks: dict, precision: str):
    """Forward and backward over one step's blocks (`starts`), `micro_batch` blocks a pass;
    returns (tokens, the step's loss). Each pass's loss (the mean over its targets) counts by its
    share of the step's targets, so the step's loss and gradient are the mean over all of its
    targets however its blocks are split, as the HF Trainer counts them (`num_items_in_batch`).
    The loss stays a tensor on the device: no host sync inside a step. The forward pass (the loss
    included) runs under autocast, the backward pass outside it, as autocast wants."""
    chunks = [blocks.batch(starts[i : i + micro_batch]) for i in range(0, len(starts), micro_batch)]
    arrays = [packed_arrays(model, batch, marks) for batch in chunks]
    # a target is a label that is not -100; the model's shift drops only first labels, which are
    # -100 (a block starts a document, packing.model_inputs)
    targets = [int((a["labels"] != -100).sum()) for a in arrays]
    total = max(1, sum(targets))
    step_loss = torch.zeros((), device=device)
    for batch, a, n in zip(chunks, arrays, targets):
        if n == 0:  # nothing to predict (a block of document starts): its mean would be 0 / 0
            continue
        with autocast(device, precision):
            out = model(**packed_inputs(model, batch, marks, device, arrays=a))
        if oom_limit is not None and len(batch) > oom_limit[_checkpointing(model)]:
            del out  # the injected fault comes after the forward pass, as a real one would
            raise torch.OutOfMemoryError(f"{FAULT_OOM_ENV}={oom_limit}: {len(batch)} sequences")
        loss = out.loss * (n / total)
        del out  # its logits (tokens × vocabulary) would otherwise live on through the next forward pass
        loss.backward()
        step_loss += loss.detach()
    return int(sum(batch.size for batch in chunks)), step_loss


def packed_arrays(model, batch: np.ndarray, marks: dict) -> dict[str, np.ndarray]:
    """`packing.model_inputs` of a batch in the layout the model's attention takes: one row of
    blocks end to end for flash_attention_2 (see `packed_inputs`)."""
    flat = getattr(model.config, "_attn_implementation", None) == "flash_attention_2"
    return model_inputs(batch, **marks, flat=flat)


def packed_inputs(model, batch: np.ndarray, marks: dict, device: torch.device,
                  arrays: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """A batch of packed blocks as the model's keyword arguments, on its device: positions that
    restart at each document and labels masked across documents (packing.model_inputs), so no
    document attends to or predicts another. No cache: with one (a micro network's config asks
    for it), transformers skips the packed-sequence mask and attention runs across documents.
    flash_attention_2 finds the documents from the positions only at batch 1: its blocks go in
    end to end as one row, which costs nothing there (no mask is materialised), with the
    documents' bounds worked out here (`document_lengths`).

    For SDPA and eager attention a batch with a document boundary inside a block gets its
    block-diagonal causal mask here (`document_mask`), once, in the dtype attention runs in. Left
    to transformers it would be a boolean mask that SDPA turns into a new additive one in every
    layer, and on a card the memory-efficient kernel keeps each layer's copy for the backward
    pass: 40 layers × 8 × 4096² × 2 bytes, 10.7 GB, for a 13B step of 8 × 4096 tokens. Blocks
    that each hold one document need no mask at all (plain causal attention, the fastest kernel)."""
    flat = getattr(model.config, "_attn_implementation", None) == "flash_attention_2"
    arrays = packed_arrays(model, batch, marks) if arrays is None else arrays  # or made once by the caller
    inputs: dict[str, Any] = {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in arrays.items()}
    if flat:
        inputs |= document_lengths(arrays["position_ids"], device)
    elif (arrays["position_ids"][:, 1:] == 0).any() and not _windowed(model, batch.shape[1]):  # on the host: no sync
        inputs["attention_mask"] = document_mask(inputs["position_ids"], _attention_dtype(model, device))
    return inputs | {"use_cache": False}


def _windowed(model, length: int) -> bool:
    """Whether some layers attend through a sliding window shorter than `length` (Mistral v0.1,
    Gemma 2 and 3, Qwen2 where it asks for one): those get their masks from transformers, which
    makes the windowed one for them; a mask given here would go to every layer as it is."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    if not window or window >= length:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return "sliding_attention" in layer_types
    return bool(getattr(config, "use_sliding_window", True))


def document_lengths(position_ids: np.ndarray, device: torch.device) -> dict[str, Any]:
    """flash_attention_2's variable-length arguments for blocks laid end to end as one row: where
    each document starts (and the row's end) and the longest one, from the positions on the host.
    Without them transformers works them out from the positions on the device in every layer,
    with two or three reads back to the host each time: as many stalls of the card a step."""
    flat = position_ids.reshape(-1)
    bounds = np.append(np.flatnonzero(flat == 0), flat.size).astype(np.int32)
    cu = torch.from_numpy(bounds).to(device, non_blocking=True)
    longest = int(np.diff(bounds).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def document_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive (batch, 1, L, L) mask that lets a token attend to the tokens before it in its
    own document: 0 there, the dtype's lowest value elsewhere. A document starts wherever the
    positions restart at 0, as transformers reads packed positions."""
    document = (position_ids == 0).cumsum(-1)
    n = position_ids.shape[-1]
    allowed = document[:, :, None] == document[:, None, :]
    allowed &= torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _attention_dtype(model, device: torch.device) -> torch.dtype:
    """The dtype the attention's queries have: autocast's where it is on (so autocast finds the
    mask already in it and casts nothing), else the model's own."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.get_input_embeddings().weight.dtype


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory in the process instead of handing it back to the system.

    A training step allocates and frees the same large activations every time. By default glibc
    serves an allocation above its threshold with a fresh `mmap` and returns it on free, so the
    next step faults every page in again: on `benchmarks/run.py`'s CPU training shape that was
    about 8,000 page faults and 13–20 ms of system time a step (6% of it). With a 32 MiB
    threshold (glibc's largest) and 1 GiB kept before trimming, allocations up to 32 MiB are
    reused from the heap and those faults go away (larger ones, such as the logits of a
    32k-token vocabulary, are still mapped afresh); the cost is that the worker's resident memory
    stays at its peak, which it reaches again at the next step anyway. Called once at the
    worker's start; False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
