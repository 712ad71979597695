"""One side of one case of `benchmarks/gpu_check.py`, each in a process of its own.

    python benchmarks/gpu_check.py --case 8b_lora --side ours --spec '{"tokens": "…/tokens.bin"}'
    python benchmarks/gpu_check.py --case 8b_lora --side peer --spec '{…, "micro_batch": 4, …}'

Each prints one JSON line. A case is a Llama shape built from its published config with random
weights, straight on the device in bf16 (nothing downloaded, nothing saved), trained with LoRA on
that bf16 base or QLoRA on an nf4 copy of it made in memory (`quantize_in_memory`).

`ours` is what the worker does with a job on a card (backend/compute/worker.py `Worker._train`,
`main`): TF32 on (`use_tensor_cores`), the attention `attention_for` picks (flash-attn 2 where
importable, else SDPA), `--kernels liger` where liger-kernel is importable (`use_kernels`), a
fresh adapter with `LoraSettings()` (r 16, alpha 32, dropout 0, every linear layer), the memory
plan's micro-batch and checkpointing (`fit_to_card`, effective batch kept), then
`train_model` (bf16 autocast, fused AdamW, packed documents). Its progress events come every
step (log_every 1; each one reads the step's loss, so it ends when the step's kernels have), and
the seconds between them are the step times.

`peer` is transformers.Trainer + PEFT on the same weights (same seed, same attention), the same
`LoraConfig`, the same packed blocks in the same order fed as the same tensors (one row per
block with its document positions, or the blocks laid end to end for flash-attn 2, as
`DataCollatorWithFlattening` would), bf16, TF32, `adamw_torch_fused`, the same schedule, the
same allocator settings (PYTORCH_ALLOC_CONF from gpu_check.sh, glibc's `keep_freed_memory`), the
micro-batch, accumulation and checkpointing ours ran with, and liger when ours had it
(`use_liger_kernel`). A `TrainerCallback` times each step, synchronising the device at its end.

Both report the median of the step times after `warm` warm-up steps. The corpus is the demo texts
as documents (BOS … EOS each, written by `backend.ingest.packing.tokenize_documents`, as a corpus
set is), so blocks hold several documents and SDPA runs with the block-diagonal mask a real run
needs. This module imports torch only inside functions: the orchestrating process reads its
tables without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from backend.core.workspace import PROJECT_ROOT

# The published configs (hidden, layers, heads, kv heads, ffn, vocabulary, RoPE, context);
# random weights, so nothing is downloaded.
CONFIGS: dict[str, dict[str, Any]] = {
    "1b": {  # meta-llama/Llama-3.2-1B
        "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    },
    "8b": {  # meta-llama/Meta-Llama-3-8B
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False,
        "max_position_embeddings": 8192, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    },
    "13b": {  # meta-llama/Llama-2-13b-hf
        "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
        "intermediate_size": 13824, "vocab_size": 32000, "tie_word_embeddings": False,
        "max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
}
# LTM_GPU_CHECK_SMALL: the same three, shrunk to CPU size with their kinds kept (tied embeddings
# and GQA for 1B, GQA and the larger vocabulary for 8B, full multi-head attention for 13B).
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "1b": {**CONFIGS["1b"], "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 1, "intermediate_size": 512, "vocab_size": 4096},
    "8b": {**CONFIGS["8b"], "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 1, "intermediate_size": 896, "vocab_size": 4096, "max_position_embeddings": 1024},
    "13b": {**CONFIGS["13b"], "hidden_size": 320, "num_hidden_layers": 2, "num_attention_heads": 5,
            "num_key_value_heads": 5, "intermediate_size": 864, "vocab_size": 2048, "max_position_embeddings": 1024},
}

# Most informative first: the 8B and 13B LoRA goals, the small model's LoRA (the loop's
# overhead shows most there), then QLoRA. gpu_check skips, saying so, what its budget cannot fit.
CASES = ("8b_lora", "13b_lora", "1b_lora", "8b_qlora", "13b_qlora", "1b_qlora")


@dataclass(frozen=True)
class Run:
    block: int  # tokens a sequence
    micro_batch: int  # asked; the memory plan may grow it up to micro_batch × grad_accum (fit_to_card)
    grad_accum: int
    warm: int  # steps left out of the timing: cuBLAS/flash autotuning, the allocator growing
    steps: int  # timed steps: their median step time is the result


RUNS = {  # 16k tokens a step (4 × 2 × 2048; 8 × 1 for 1B, whose 128k-vocabulary logits dominate)
    "1b": Run(2048, 8, 1, 3, 10),
    "8b": Run(2048, 4, 2, 3, 8),
    "13b": Run(2048, 4, 2, 3, 6),
}
SMALL_RUNS = {name: Run(128, 4, 1, 2, 3) for name in RUNS}
LORA_R = 16  # LoraSettings' default rank (alpha 32, dropout 0, all-linear)


def parts(case: str) -> tuple[str, str | None]:
    """("8b", "4bit") for "8b_qlora"."""
    shape, kind = case.split("_")
    return shape, "4bit" if kind == "qlora" else None


def config_dict(case: str, small: bool) -> dict[str, Any]:
    return (SMALL_CONFIGS if small else CONFIGS)[parts(case)[0]]


def run_of(case: str, small: bool) -> Run:
    return (SMALL_RUNS if small else RUNS)[parts(case)[0]]


def liger_importable() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


# --- the model ---------------------------------------------------------------------------------


def build_base(case: str, small: bool, device, dtype, attention: str, seed: int = 0):
    """The case's Llama with random weights, built on `device` in `dtype` (a 13B in seconds,
    never through host memory or disk); for QLoRA, quantised to nf4 there."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_dict(case, small))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if torch.device(device).type == "cuda":
            torch.cuda.manual_seed(seed)
        with torch.device(device):
            model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attention)
    model.config.use_cache = False
    if parts(case)[1] == "4bit":
        quantize_in_memory(model, torch.device(device), dtype)
    return model


def quantize_in_memory(model, device, compute_dtype) -> None:
    """What `backend.compute.models.load_hf_base(quant="4bit")` gets from `from_pretrained`, on a
    model already on the device: the same BitsAndBytesConfig (nf4, double quantisation, the
    training dtype for compute), transformers' own quantizer swapping each decoder linear layer
    for a `bnb.nn.Linear4bit` (the output layer and embeddings stay in the load dtype), each
    weight quantised as transformers' `Bnb4bitQuantize` does it, then every weight frozen as the
    loader leaves it. Only the read from safetensors is missing: a 13B base is not saved to
    disk (26 GB) to be read back. tests/test_gpu_check.py checks the result gives the same
    logits as the loader's own path."""
    import bitsandbytes as bnb
    import torch
    from transformers import BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute_dtype)
    quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
    dense = {name: m.weight.data for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    quantizer.preprocess_model(model, device_map={"": str(device)})  # Linear4bit shells on the meta device
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            shell = module.weight
            module.weight = bnb.nn.Params4bit(dense.pop(name), requires_grad=False, **shell.__dict__).to(device)
            module._is_hf_initialized = True
    dense.clear()  # the bf16 copies go as soon as the last one is quantised
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    for p in model.parameters():  # frozen, as load_hf_base leaves a 4-bit base (no fp32 upcast)
        p.requires_grad_(False)


def corpus(folder: Path, n_tokens: int, vocab: int) -> Path:
    """A token file of at least n_tokens: the demo texts as documents (BOS + UTF-8 bytes + EOS,
    ids 1 and 2, bytes shifted past them), repeated, with its documents record beside it."""
    from backend.ingest.packing import tokenize_documents

    texts = [p.read_text(encoding="utf-8") for p in sorted((PROJECT_ROOT / "data" / "demo").glob("*.md"))]
    per_round = sum(len(t.encode("utf-8")) + 2 for t in texts)
    docs = [[t] for _ in range(n_tokens // per_round + 1) for t in texts]
    path = folder / "tokens.bin"
    tokenize_documents(docs, lambda s: [3 + b % (vocab - 3) for b in s.encode("utf-8")], path, bos_id=1, eos_id=2)
    return path


def tokens_needed(case: str, small: bool) -> int:
    run = run_of(case, small)
    return (run.warm + run.steps) * run.micro_batch * run.grad_accum * run.block + 2 * run.block


# --- measuring ---------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device) -> dict[str, int | None]:
    """The allocator's peaks, and the card's peak as the driver saw it: the reserved peak plus
    what the process holds outside the allocator (context, cuBLAS workspaces, kernels), read as
    the card's used memory less the reserved bytes now (this process alone on the card)."""
    import torch

    if device.type != "cuda":
        return {"peak_allocated_bytes": None, "peak_reserved_bytes": None, "card_peak_bytes": None}
    free, total = torch.cuda.mem_get_info(device)
    outside = max(0, (total - free) - torch.cuda.memory_reserved(device))
    reserved = int(torch.cuda.max_memory_reserved(device))
    return {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_reserved_bytes": reserved,
            "card_peak_bytes": reserved + int(outside), "outside_allocator_bytes": int(outside)}


def _fresh_peaks(device) -> None:
    """Peaks from here on, with the cache emptied first: what building left cached (the bf16
    weights an nf4 base was quantised from, the ceiling's matrices) is not the training's."""
    import gc

    import torch

    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _steady(times: list[float], warm: int) -> dict[str, Any]:
    steady = times[warm:] or times
    return {"step_seconds": [round(t, 4) for t in times], "median_step_seconds": statistics.median(steady),
            "warm_steps": min(warm, len(times)), "measured_steps": len(steady)}


def _setting(spec: dict[str, Any], device) -> dict[str, Any]:
    """The case's base spec as the worker would hold it, and what it resolves to here. The
    libraries building the model needs are imported now, so the build's seconds are its own."""
    for name in ("peft", "transformers.models.llama.modeling_llama", "bitsandbytes" if parts(spec["case"])[1] else None):
        if name:
            importlib.import_module(name)
    from backend.compute.models import BaseSpec, attention_for, train_dtype

    quant = parts(spec["case"])[1]
    # --kernels liger runs on CUDA only; gpu_check's preflight may have found it failing here
    kernels = "liger" if liger_importable() and device.type == "cuda" and not spec.get("no_liger") else None
    base = BaseSpec(base=f"random:{spec['case']}", quant=quant, device=str(device), kernels=kernels)
    dtype = train_dtype(device, base.precision)
    return {"base": base, "dtype": dtype, "attention": attention_for(base, device), "quant": quant}


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """The worker's path for one adapter job on this device (see the module docstring)."""
    import torch

    from backend.compute.estimate import flop_model, matmul_ceiling
    from backend.compute.memory_fit import fit_to_card, plan_settings
    from backend.compute.models import attach_lora, pick_device, use_kernels, use_tensor_cores
    from backend.compute.train import keep_freed_memory, set_grad_checkpointing, train_model
    from backend.core.config import LoraSettings
    from backend.studies.memory_plan import plan
    from benchmarks.peers import train_config

    t_start = time.perf_counter()
    use_tensor_cores()  # the worker's main() does both before its first job
    keep_freed_memory()
    small, case = bool(spec["small"]), spec["case"]
    device = pick_device("cpu" if small else None)
    s = _setting(spec, device)
    run = run_of(case, small)
    ceiling = matmul_ceiling(device, s["dtype"])  # before the model: the card to itself
    t0 = time.perf_counter()
    model = build_base(case, small, device, s["dtype"], s["attention"], spec.get("seed", 0))
    kernels_line = use_kernels(model, s["base"], device)
    kernels = getattr(model, "ltm_kernels", None)  # set where they were applied, not where they fell back
    lora = LoraSettings()
    model = attach_lora(model, lora, spec.get("seed", 0))
    _sync(device)
    build_seconds = time.perf_counter() - t0
    lines: list[str] = []
    cfg = replace(train_config(run.warm + run.steps, run.block, run.micro_batch, run.grad_accum), log_every=1)
    cfg, ckpt = fit_to_card(model, cfg, quant=s["quant"], lora=lora, device=device,
                            dtype_bytes=s["dtype"].itemsize, log=lines.append)
    set_grad_checkpointing(model, ckpt)
    settings = plan_settings(model, cfg, quant=s["quant"], lora=lora, device=device, dtype_bytes=s["dtype"].itemsize)
    planned = plan(model.get_base_model().config.to_dict(), micro_batch=cfg.micro_batch, grad_checkpointing=ckpt,
                   **settings)
    stamps: list[float] = []
    losses: list[float] = []

    def emit(kind, **p):
        if kind == "progress":  # one a step (log_every 1), after the step's loss reached the host
            stamps.append(time.perf_counter())
            losses.append(p["loss"])

    _fresh_peaks(device)
    with tempfile.TemporaryDirectory() as tmp:
        _sync(device)
        t_train = time.perf_counter()
        outcome = train_model(model, Path(spec["tokens"]), Path(tmp), cfg, device=device, emit=emit,
                              log=lines.append, precision=s["base"].precision)
        _sync(device)
        train_seconds = time.perf_counter() - t_train
    times = [b - a for a, b in zip([t_train] + stamps, stamps)]
    step = _steady(times, run.warm)
    tokens_per_step = cfg.micro_batch * cfg.grad_accum * run.block  # the effective batch: never changed
    return {
        "side": "ours", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(s["dtype"]).replace("torch.", ""), "attention": s["attention"],
        # the kernels that ran (the peer is given the same), not only those asked for
        "kernels": kernels, "kernels_line": kernels_line, "quant": "nf4" if s["quant"] else None,
        "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": lora.target_modules},
        # what the last step ran with: out-of-memory halving (train_model's fallback) shows here
        "block": run.block, "micro_batch": outcome.micro_batch, "grad_accum": outcome.grad_accum,
        "oom_halvings": outcome.oom_halvings, "asked": [run.micro_batch, run.grad_accum],
        "fitted": [cfg.micro_batch, cfg.grad_accum], "grad_checkpointing": ckpt,
        "plan_line": next((x for x in lines if x.startswith("memory plan")), None),
        "tokens_per_step": tokens_per_step, **step,
        "tokens_per_s": tokens_per_step / step["median_step_seconds"],
        "flops_per_token": flop_model(model, run.block)["flops_per_token"],
        "matmul_ceiling_flops": ceiling,
        "losses": [losses[0], losses[-1]] if losses else None,
        **_memory(device),
        "plan_peak_bytes": planned.peak,
        "plan_allocated_bytes": planned.peak - planned.cuda_context - planned.allocator_slack,
        "plan_peak_stage": planned.peak_stage,
        "build_seconds": round(build_seconds, 2), "train_seconds": round(train_seconds, 2),
        "process_seconds": round(time.perf_counter() - t_start, 2),
    }


def run_peer(spec: dict[str, Any]) -> dict[str, Any]:
    """transformers.Trainer + PEFT with the settings ours ran with (see the module docstring)."""
    import numpy as np
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from backend.compute.models import attach_lora, pick_device
    from backend.compute.train import keep_freed_memory
    from backend.core.config import LoraSettings
    from backend.ingest.packing import PackedBlocks, document_marks, load_tokens, model_inputs

    t_start = time.perf_counter()
    keep_freed_memory()  # the same (host) allocator setting as ours; what matters on the CPU run
    small, case = bool(spec["small"]), spec["case"]
    device = pick_device("cpu" if small else None)
    cuda = device.type == "cuda"
    s = _setting(spec, device)
    run = run_of(case, small)
    micro_batch, grad_accum, ckpt = spec["micro_batch"], spec["grad_accum"], spec["grad_checkpointing"]
    t0 = time.perf_counter()
    model = build_base(case, small, device, s["dtype"], s["attention"], spec.get("seed", 0))
    model = attach_lora(model, LoraSettings(), spec.get("seed", 0), fast_dropout=False)  # plain PEFT
    _sync(device)
    build_seconds = time.perf_counter() - t0
    tokens = Path(spec["tokens"])
    steps = run.warm + run.steps
    blocks = PackedBlocks(load_tokens(tokens), run.block, spec.get("seed", 0))
    starts: list[int] = []
    epoch = 0
    while len(starts) < steps * micro_batch * grad_accum:  # the order `packing.step_blocks` gives ours
        starts += [int(x) for x in blocks.epoch_blocks(epoch)]
        epoch += 1
    marks = document_marks(tokens)
    flat = s["attention"] == "flash_attention_2"

    def collate(rows):  # the tensors ours feeds: document positions, labels masked across documents
        arrays = model_inputs(blocks.batch(np.asarray(rows)), **marks, flat=flat)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}

    times: list[float] = []
    losses: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            _sync(device)
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            now = time.perf_counter()
            times.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    with tempfile.TemporaryDirectory() as tmp:
        cfg_lr = 2e-4  # benchmarks.peers.train_config's, as ours
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=grad_accum,
            max_steps=steps, learning_rate=cfg_lr, lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0, weight_decay=0.01, adam_beta1=0.9,
            adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch_fused", bf16=s["dtype"] == torch.bfloat16,
            tf32=True if cuda else None, gradient_checkpointing=ckpt,
            gradient_checkpointing_kwargs={"use_reentrant": False}, use_liger_kernel=spec.get("kernels") == "liger",
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=not cuda, dataloader_num_workers=0,
            remove_unused_columns=False, seed=spec.get("seed", 0), disable_tqdm=True,
        )
        trainer = InOrder(model=model, args=args, train_dataset=starts[: steps * micro_batch * grad_accum],
                          data_collator=collate, callbacks=[StepTimes()])
        trainer.remove_callback(PrinterCallback)
        _fresh_peaks(device)
        t_train = time.perf_counter()
        trainer.train()
        _sync(device)
        train_seconds = time.perf_counter() - t_train
    step = _steady(times, run.warm)
    tokens_per_step = micro_batch * grad_accum * run.block
    return {
        "side": "peer", "attention": s["attention"], "kernels": "liger" if args.use_liger_kernel else None,
        "micro_batch": micro_batch, "grad_accum": grad_accum, "grad_checkpointing": ckpt,
        "tokens_per_step": tokens_per_step, **step, "tokens_per_s": tokens_per_step / step["median_step_seconds"],
        "losses": [losses[0], losses[-1]] if losses else None, **_memory(device),
        "build_seconds": round(build_seconds, 2), "train_seconds": round(train_seconds, 2),
        "process_seconds": round(time.perf_counter() - t_start, 2),
    }


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# The product's own path on this box: a tiny Llama saved as a user's folder (bf16 safetensors and a
# word-level tokenizer), trained and scored by the worker the service starts.
WORKER_SHAPE = {"hidden": 128, "layers": 2, "heads": 4, "kv": 2, "ffn": 352, "vocab": 8192, "context": 512}
# beside hf_load's two choice scenes, one that decodes (greedy, with the key/value cache)
BRIEF_BATTERY = """\
battery: brief
description: One law stated briefly, so the trial decodes as well as scores choices.
metric: compression
scenes:
  - id: k1-glim-line
    kind: generate
    lang: en
    prompt: "In brief, the glim line:"
    max_new_tokens: 12
    checks:
      - contains: zent
      - max_words: 12
"""


def worker_trial(folder: Path, work: Path, quant: str | None, device: str, timeout: float = 90) -> str:
    """One adapter job through `python -m backend.compute.worker` (LocalExecutor, as the service
    starts it) on the base saved in `folder`: `load_hf_base` onto `device` (with `quant` "4bit",
    bitsandbytes' nf4 through `from_pretrained`), the memory plan's fit, 4 steps with a
    checkpoint at step 2, two choice scenes scored and one decoded, probes. What the cases do not cover: they build
    their bases in memory. "ok: …" with what result.json says, or "failed: …" with the log's end."""
    from backend.jobs.executor import LocalExecutor
    from benchmarks.hf_load import TINY_BATTERY, one_job_session

    tag = quant or "bf16"
    scenes = work / f"scenes-{tag}"
    scenes.mkdir(exist_ok=True)
    (scenes / "choice.yaml").write_text(TINY_BATTERY, encoding="utf-8")
    (scenes / "brief.yaml").write_text(BRIEF_BATTERY, encoding="utf-8")  # decoding with the cache
    train = {"block_size": 64, "micro_batch": 2, "grad_accum": 1, "lr": 2e-4, "warmup_frac": 0.0,
             "min_train_tokens": 0, "epochs": 1, "max_steps": 4, "checkpoint_every": 2, "log_every": 1}
    session, run_dir = one_job_session(folder, work, tag, train=train, scenes=scenes, quant=quant, device=device,
                                       probes=True)
    result = run_dir / "result.json"
    t0 = time.monotonic()
    worker = LocalExecutor().start(session, None)
    try:  # a worker lingers for more jobs once its session is done: the result is the end here
        while not result.exists() and worker.exit_code() is None and time.monotonic() - t0 < timeout:
            time.sleep(0.2)
    finally:
        worker.kill()
    if not result.exists():
        log = session.with_suffix(".log")
        lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
        why = "timed out" if time.monotonic() - t0 >= timeout else f"exit {worker.exit_code()}"
        return f"failed: {why}: {' | '.join(lines[-3:])[-400:]}"
    done = json.loads(result.read_text(encoding="utf-8"))
    probes = done.get("probes") or {}
    return (f"ok: on {done['device']}, {done['steps']} steps (micro-batch {done['micro_batch_used']}), "
            f"final loss {done['final_loss']:.3f}, load {done['load_seconds']:.1f} s, {len(done['scene_results'])} "
            f"scenes scored, overall {done['overall']}, probes {'stored' if probes else 'none'}, "
            f"{time.monotonic() - t0:.1f} s in all")


def product_check(small: bool) -> dict[str, Any]:
    """The worker's own path on this device (`worker_trial`), on a bf16 base and a 4-bit one."""
    from backend.compute.models import pick_device
    from benchmarks.hf_load import save_llama_folder

    device = str(pick_device("cpu" if small else None))
    with tempfile.TemporaryDirectory(prefix="ltm-product-") as tmp:
        folder = save_llama_folder(Path(tmp) / "base", WORKER_SHAPE)
        out: dict[str, Any] = {"device": device, "shape": WORKER_SHAPE}
        for name, quant in (("lora", None), ("qlora", "4bit")):
            if quant and _version("bitsandbytes") is None:
                out[name] = "not installed: bitsandbytes is missing"
                continue
            out[name] = worker_trial(folder, Path(tmp), quant, device)
    return out


# hf_load_ratio on this device: Llama-3.2-1B's shape (2.5 GB in bf16), or WORKER_SHAPE on the CPU
LOAD_REPEATS = 2


def load_check(small: bool, repeats: int = LOAD_REPEATS, caches: tuple[str, ...] = ("cold", "warm")) -> dict[str, Any]:
    """`hf_load_ratio` where the saving is claimed (benchmarks/hf_load.py): from a saved bf16
    folder to the first optimizer step, our worker (weights read straight onto the device, while
    its imports run) against transformers + PEFT (from_pretrained into host memory, then
    `.to(device)`), alternating, each a fresh process; with the folder out of the page cache,
    then in it."""
    from backend.compute.models import pick_device
    from benchmarks.hf_load import LLAMA_1B, load_ratio, save_llama_folder

    device = str(pick_device("cpu" if small else None))
    shape = WORKER_SHAPE if small else LLAMA_1B
    out: dict[str, Any] = {"device": device}
    with tempfile.TemporaryDirectory(prefix="ltm-load-") as tmp:
        t0 = time.perf_counter()
        folder = save_llama_folder(Path(tmp) / "base", shape)
        out["save_seconds"] = round(time.perf_counter() - t0, 1)
        for cache in caches:
            found = load_ratio(folder, shape, repeats=repeats, cache=cache, device=device)
            key = "hf_load_ratio" if cache == "cold" else "hf_load_ratio_warm_cache"
            out[key] = found["ratio"]
            out[cache] = {k: found[k] for k in ("ratios", "ours", "peer")}
            if cache == "cold":  # a file system that keeps its pages makes "cold" warm: said, not hidden
                out[cache]["cached_after_drop"] = found["settings"]["cached_after_drop"]
        out["settings"] = {k: v for k, v in found["settings"].items() if k not in ("page_cache", "cached_after_drop")}
    return out


def preflight(small: bool) -> dict[str, Any]:
    """Before the cases spend minutes each: the versions this box runs, and two short trainings
    (`train_model`, 2 steps of 2 × 64 tokens) on a shrunk Llama of each kind the cases use
    beyond plain LoRA: liger's kernels (CUDA only) and an nf4 base through bitsandbytes. The
    cases then leave out what failed here, each line saying why, instead of failing one by one
    a minute into their build. (Liger's Triton kernels compile again for each case's shapes, in
    its warm-up steps.)"""
    import torch

    from backend.compute.models import BaseSpec, attach_lora, pick_device, train_dtype, use_kernels
    from backend.compute.train import train_model
    from backend.core.config import LoraSettings
    from benchmarks.peers import train_config

    device = pick_device("cpu" if small else None)
    dtype = train_dtype(device)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {name: _version(name) for name in ("torch", "transformers", "peft", "accelerate",
                                                       "bitsandbytes", "liger-kernel", "flash-attn", "triton")},
        "cuda": torch.version.cuda,
    }

    def trial(case: str, kernels: str | None) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            config = SMALL_CONFIGS[parts(case)[0]]
            tokens = corpus(Path(tmp), 4 * 64 * 2, config["vocab_size"])
            model = build_base(case, True, device, dtype, "sdpa")
            line = use_kernels(model, BaseSpec(base=f"random:{case}", device=str(device), kernels=kernels), device)
            if kernels and getattr(model, "ltm_kernels", None) != kernels:  # asked for, fell back
                return f"failed: {line}"
            model = attach_lora(model, LoraSettings(), 0)
            losses: list[float] = []
            train_model(model, tokens, Path(tmp), replace(train_config(2, 64, 2, 1), log_every=1), device=device,
                        emit=lambda kind, **p: losses.append(p["loss"]) if kind == "progress" else None,
                        log=lambda line: None)
        if len(losses) != 2 or not all(math.isfinite(x) for x in losses):
            return f"failed: losses {losses}"
        return "ok"

    def attempt(case: str, kernels: str | None) -> str:
        try:
            return trial(case, kernels)
        except Exception as exc:  # noqa: BLE001 - any failure here is the finding, reported in one line
            return f"failed: {_first_line(exc)}"
        finally:
            try:
                _fresh_peaks(device)
            except Exception:  # noqa: BLE001 - a kernel fault leaves CUDA unusable: the trial said so
                pass

    # nf4 first: a liger kernel that faults can leave this process's CUDA context unusable
    out["nf4"] = "not installed" if out["versions"]["bitsandbytes"] is None else attempt("1b_qlora", None)
    if out["versions"]["liger-kernel"] is None:
        out["liger"] = "not installed"
    elif device.type != "cuda":
        out["liger"] = "not on CUDA"
    else:
        out["liger"] = attempt("8b_lora", "liger")
    return out


def run_side(spec: dict[str, Any]) -> dict[str, Any]:
    out = run_ours(spec) if spec["side"] == "ours" else run_peer(spec)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
