"""Training and scoring side by side with the peers users would otherwise pick.

Used by `benchmarks/run.py` (CPU-sized shapes) and `benchmarks/gpu_check.py` (1B- and 7B-shaped
Llamas). Both sides of every comparison get the same randomly initialised model built from a
config (no download), the same LoRA adapter (`backend.compute.models.attach_lora` with
`LoraSettings()`'s rank-independent defaults, dropout included; the peer's keeps PEFT's own
dropout, ours `backend.compute.dropout.FastDropout` at the same rate), the same packed blocks in
the same order, the same optimizer (fused AdamW, betas 0.9/0.95, weight decay 0.01, clip 1.0),
the same schedule (no warm-up, cosine to 10% of the peak; both sides' learning rates are
compared), the same precision and the worker's allocator setting (`keep_freed_memory`), each
side in a fresh process.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend.core.config import LoraSettings, TrainConfig
from backend.core.workspace import PROJECT_ROOT
from backend.ingest.packing import TOKEN_DTYPE, PackedBlocks, load_tokens


def llama(shape: dict[str, int], seed: int = 0, dtype=torch.float32, device="cpu"):
    """A randomly initialised Llama from a config shaped by `shape` (hidden, layers, heads, kv,
    ffn, vocab, context)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape.get("kv", shape["heads"]), max_position_embeddings=shape.get("context", 2048),
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):  # built where it trains, directly in its dtype: a 7B in seconds
            model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.config.use_cache = False
    return model


def lora_model(shape, seed=0, dtype=torch.float32, device="cpu", r=16, peer: bool = False):
    """Our LoRA model; `peer=True` gives plain PEFT (its own dropout), what the Trainer side runs.
    Both start from the same weights."""
    from backend.compute.models import attach_lora

    return attach_lora(llama(shape, seed, dtype, device), lora_settings(r), seed, fast_dropout=not peer)


def lora_settings(r: int) -> LoraSettings:
    """The worker's LoRA settings (dropout, target modules: whatever `LoraSettings` defaults to
    now) at rank r, alpha 2r: both sides of every comparison get these."""
    return replace(LoraSettings(), r=r, alpha=2 * r)


def demo_tokens(folder: Path, n_tokens: int, vocab: int) -> Path:
    """Real text (the demo corpora, as UTF-8 bytes) tiled to n_tokens, ids below `vocab`."""
    ids = []
    for path in sorted((PROJECT_ROOT / "data" / "demo").glob("*.md")):
        ids += list(path.read_bytes())
    arr = np.resize(np.asarray(ids, dtype=TOKEN_DTYPE) % vocab, n_tokens)
    path = folder / "tokens.bin"
    arr.tofile(path)
    return path


def train_config(steps: int, block: int, micro_batch: int, grad_accum: int, lr: float = 2e-4) -> TrainConfig:
    return TrainConfig(
        block_size=block, micro_batch=micro_batch, grad_accum=grad_accum, lr=lr, min_lr_ratio=0.1,
        schedule="cosine", warmup_frac=0.0, weight_decay=0.01, grad_clip=1.0, epochs=1e6,
        min_train_tokens=0, max_steps=steps, checkpoint_every=0, log_every=max(1, steps // 4), seed=0,
    )


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def train_ours(model, tokens: Path, cfg: TrainConfig, device) -> dict[str, Any]:
    from backend.compute.train import train_model

    curve: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        _sync(device)
        t0 = time.perf_counter()
        out = train_model(model, tokens, Path(tmp), cfg, device=torch.device(device),
                          emit=lambda kind, **p: curve.append(p) if kind == "progress" else None,
                          log=lambda s: None)
        _sync(device)
        seconds = time.perf_counter() - t0
    losses, steady = log_windows(curve)
    return {**_rates_used(curve, cfg, out.steps),"seconds": seconds, "tokens": out.tokens_seen, "tokens_per_s": out.tokens_seen / seconds,
            "steady_tokens_per_s": steady,  # after the first log window
            "final_loss": losses[-1], "first_loss": losses[0]}


def _rates_used(curve: list[dict], cfg: TrainConfig, total: int) -> dict[str, list[float]]:
    """{"lrs": the learning rate each multiple of log_every steps ran with}, as the Trainer logs
    it. Our progress events carry the rate for the step after theirs; when those are exactly
    `lr_factor`'s, the rates the steps ran with are lr_factor's one step earlier; when not, the
    events' own rates, which then differ from the Trainer's."""
    from backend.compute.train import lr_factor

    logged = [(p["step"], p["lr"]) for p in curve if p["step"] % cfg.log_every == 0]
    if isclose_all([lr for _, lr in logged], [cfg.lr * lr_factor(s, total, cfg) for s, _ in logged], 1e-6):
        return {"lrs": [cfg.lr * lr_factor(s - 1, total, cfg) for s, _ in logged]}
    return {"lrs": [lr for _, lr in logged]}


def log_windows(curve: list[dict]) -> tuple[list[float], float]:
    """The mean loss of each `log_every` steps (what the Trainer logs with logging_steps), and the
    tokens/s after the first such window, from progress events that may also come between them
    (one goes out after any step that ends a second after the last: backend/compute/train.py).
    An event at a multiple of log_every (or the last) carries the mean loss since the one before
    it; one in between is marked `timed`. Every event's tokens/s is over the steps since the
    event before it."""
    losses, prev_tokens = [], 0
    tokens = seconds = 0.0
    for p in curve:
        window = p["tokens"] - prev_tokens
        if losses:  # after the first window
            tokens, seconds = tokens + window, seconds + window / max(p["tokens_per_s"], 1e-9)
        prev_tokens = p["tokens"]
        if not p.get("timed"):
            losses.append(p["loss"])
    steady = tokens / seconds if seconds else curve[0]["tokens_per_s"]
    return losses, steady


class _Blocks(torch.utils.data.Dataset):
    """The same blocks in the same order as `backend.ingest.packing.step_blocks` feeds our loop."""

    def __init__(self, tokens: Path, cfg: TrainConfig, n_blocks: int) -> None:
        blocks = PackedBlocks(load_tokens(tokens), cfg.block_size, cfg.seed)
        order, epoch = [], 0
        while len(order) < n_blocks:
            order += list(blocks.epoch_blocks(epoch))
            epoch += 1
        self.blocks, self.starts = blocks, order[:n_blocks]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        ids = torch.from_numpy(self.blocks.batch(np.asarray([self.starts[i]]))[0])
        return {"input_ids": ids, "labels": ids}


def train_hf_trainer(model, tokens: Path, cfg: TrainConfig, device, bf16: bool = False) -> dict[str, Any]:
    """The peer: transformers.Trainer + PEFT, configured to match `cfg` exactly."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback

    n_blocks = cfg.max_steps * cfg.micro_batch * cfg.grad_accum
    data = _Blocks(tokens, cfg, n_blocks)
    losses: list[float] = []
    lrs: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                lrs.append(float(logs["learning_rate"]))

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg.micro_batch,
            gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, max_steps=cfg.max_steps,
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio},
            warmup_steps=0, weight_decay=cfg.weight_decay, adam_beta1=0.9, adam_beta2=0.95,
            max_grad_norm=cfg.grad_clip, logging_steps=cfg.log_every, save_strategy="no", report_to=[],
            use_cpu=torch.device(device).type == "cpu", bf16=bf16, dataloader_num_workers=0, seed=cfg.seed,
            disable_tqdm=True, optim="adamw_torch_fused",  # the Trainer's own default with torch ≥ 2.8, CPU and GPU
        )
        trainer = InOrder(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                          callbacks=[Losses()])
        trainer.remove_callback(PrinterCallback)  # its log lines would bury the benchmark's own
        _sync(device)
        t0 = time.perf_counter()
        trainer.train()
        _sync(device)
        seconds = time.perf_counter() - t0
    n = n_blocks * cfg.block_size
    return {"seconds": seconds, "tokens": n, "tokens_per_s": n / seconds,
            "final_loss": losses[-1], "first_loss": losses[0], "lrs": lrs}


def train_side(spec: dict[str, Any]) -> dict[str, Any]:
    """One side of `train_ratio` in this process: `spec` names the side ("ours" or "peer"), the
    shape, the run (steps, block, micro_batch, grad_accum), dtype, device, LoRA rank and quant,
    and the token file. Both sides start as the worker does (`keep_freed_memory`): the same
    allocator setting, so the ratio is our loop's and not glibc's."""
    from backend.compute.train import keep_freed_memory

    ours = spec["side"] == "ours"
    keep_freed_memory()
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    cfg = train_config(spec["steps"], spec["block"], spec["micro_batch"], spec["grad_accum"])
    model = (quantized_lora_model(spec["shape"], device=device, r=spec["r"], peer=not ours) if spec["quant"]
             else lora_model(spec["shape"], dtype=dtype, device=device, r=spec["r"], peer=not ours))
    tokens = Path(spec["tokens"])
    if ours:
        return train_ours(model, tokens, cfg, device)
    return train_hf_trainer(model, tokens, cfg, device, bf16=dtype == torch.bfloat16)


def _side_in_process(spec: dict[str, Any]) -> dict[str, Any]:
    """`train_side` in a fresh Python process, as a worker runs: nothing carried over from the
    other side (allocator state, garbage, warmed caches)."""
    code = "import json, sys; from benchmarks.peers import train_side; print(json.dumps(train_side(json.loads(sys.argv[1]))))"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{spec['side']} side failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_ratio(shape, steps, block, micro_batch, grad_accum, *, device="cpu", dtype=torch.float32,
                repeats: int = 3, r: int = 16, quant: bool = False) -> dict[str, Any]:
    """Our tokens/s ÷ HF Trainer + PEFT tokens/s: the median over `repeats` pairs run one after
    the other (ours, then the peer), each side in a process of its own, every pair's ratio
    listed; with both final losses (the same model, data, order and settings must reach the
    same loss) and both learning-rate schedules."""
    ours, peer = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tokens = demo_tokens(Path(tmp), steps * micro_batch * grad_accum * block + block + 1, shape["vocab"])
        spec = {"shape": shape, "steps": steps, "block": block, "micro_batch": micro_batch, "grad_accum": grad_accum,
                "device": str(device), "dtype": str(dtype).replace("torch.", ""), "r": r, "quant": quant,
                "tokens": str(tokens)}
        for _ in range(repeats):
            ours.append(_side_in_process({**spec, "side": "ours"}))
            peer.append(_side_in_process({**spec, "side": "peer"}))
    ratios = [o["tokens_per_s"] / p["tokens_per_s"] for o, p in zip(ours, peer)]
    mid = sorted(range(repeats), key=lambda i: ratios[i])[(repeats - 1) // 2]  # the median pair
    o, p = ours[mid], peer[mid]
    loss_gap = abs(o["final_loss"] - p["final_loss"]) / max(1e-9, p["final_loss"])
    lora = lora_settings(r)
    return {
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(x, 3) for x in ratios],
        "ours_tokens_per_s": round(statistics.median(x["tokens_per_s"] for x in ours), 1),
        "hf_trainer_tokens_per_s": round(statistics.median(x["tokens_per_s"] for x in peer), 1),
        "ours_loss": [round(o["first_loss"], 4), round(o["final_loss"], 4)],
        "hf_trainer_loss": [round(p["first_loss"], 4), round(p["final_loss"], 4)],
        "same_loss": bool(loss_gap < 0.02 and o["final_loss"] < o["first_loss"]),
        "same_schedule": bool(len(o["lrs"]) == len(p["lrs"]) > 0 and isclose_all(o["lrs"], p["lrs"], 1e-6)),
        "settings": {"shape": shape, "steps": steps, "block": block, "micro_batch": micro_batch,
                     "grad_accum": grad_accum, "lora_r": r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
                     "dtype": spec["dtype"], "quant": "nf4" if quant else None, "device": str(device),
                     "allocator": "keep_freed_memory on both sides", "repeats": repeats,
                     "each_side": "own process, alternating"},
    }


def quantized_lora_model(shape, device="cuda", r=16, seed=0, peer: bool = False):
    """A QLoRA model: the random Llama saved and loaded back in 4-bit nf4 by the project's loader."""
    from backend.compute.models import BaseSpec, attach_lora, load_hf_base

    with tempfile.TemporaryDirectory() as tmp:
        model = llama(shape, seed, torch.bfloat16, device)
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        import json

        (Path(tmp) / "config.json").write_text(
            json.dumps({**json.loads((Path(tmp) / "config.json").read_text()), "use_cache": False}))
        base = load_hf_base(BaseSpec(base=tmp, quant="4bit", device=str(device)), torch.device(device))
    return attach_lora(base, lora_settings(r), seed, fast_dropout=not peer)


def mfu_ceiling(device, dtype) -> float:
    from backend.compute.estimate import matmul_ceiling

    return matmul_ceiling(torch.device(device), dtype)


def flops_per_token(model, block: int) -> int:
    from backend.compute.estimate import flop_model

    return flop_model(model, block)["flops_per_token"]


def isclose_all(a, b, tol=1e-5) -> bool:
    return all(math.isclose(x, y, rel_tol=tol, abs_tol=tol) for x, y in zip(a, b))


# --- scoring ---------------------------------------------------------------------------------


def word_tokenizer(folder: Path, texts: list[str]):
    """A word-level tokenizer trained on `texts` (no download), saved in `folder` and returned."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.save_pretrained(folder)
    return tok


def hf_folder(folder: Path, shape: dict[str, int], texts: list[str], seed: int = 0) -> Path:
    """A random Llama saved with a word-level tokenizer trained on `texts` (no download)."""
    tok = word_tokenizer(folder, texts)
    model = llama({**shape, "vocab": len(tok)}, seed)
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def choice_requests(scenes_dir: Path) -> list[list]:
    """Every choice scene of the built-in batteries as its list of (context, continuation)."""
    from backend.compute.evaluate import LoglikRequest
    from backend.scoring.scenes import ChoiceScene, choice_request, load_batteries

    out = []
    for battery in load_batteries(scenes_dir):
        for scene in battery.scenes:
            if isinstance(scene, ChoiceScene):
                context, continuations = choice_request(scene)
                out.append([LoglikRequest(context, c) for c in continuations])
    return out


def per_scene_loglikelihoods(model, tok, requests, device) -> list[tuple[float, bool]]:
    """The peer: one scene at a time, as a user would write it with transformers. The scene's
    choices (context + choice, lm-eval's tokenization) are padded into one batch, one forward
    pass, and each choice's tokens are gathered from the log-softmax."""
    import torch.nn.functional as F

    from backend.compute.evaluate import encode_pair

    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    rows = []
    for r in requests:
        ctx, cont = encode_pair(tok, r.context, r.continuation)
        rows.append(((ctx or [prefix]) + cont, cont))
    width = max(len(ids) - 1 for ids, _ in rows)
    batch = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        batch[i, : len(ids) - 1] = torch.tensor(ids[:-1])
        mask[i, : len(ids) - 1] = 1
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits.float(), -1)
    out = []
    for i, (ids, cont) in enumerate(rows):
        n = len(ids) - 1
        span = logprobs[i, n - len(cont) : n]
        target = torch.tensor(cont, device=span.device)
        out.append((span.gather(1, target[:, None]).sum().item(), bool((span.argmax(-1) == target).all())))
    return out


def eval_speedup(shape: dict[str, int], repeats: int = 3) -> dict[str, Any]:
    """Our batched scoring of every choice scene (`backend.compute.evaluate.loglikelihoods`: the
    context once per scene with every choice in one row, rows longest first in batches sized
    by tokens) ÷ the same scenes scored one scene at a time (`per_scene_loglikelihoods`), with
    identical numbers required; and against lm-evaluation-harness's HF backend on the same
    items, when lm_eval is installed."""
    from backend.compute.evaluate import BATCH_TOKENS, loglikelihoods
    from backend.compute.models import BaseSpec, load_base
    from backend.core.workspace import default_scenes_dir

    scenes = choice_requests(default_scenes_dir())
    flat = [r for scene in scenes for r in scene]
    texts = [r.context + r.continuation for r in flat]
    texts += [p.read_text(encoding="utf-8") for p in sorted((PROJECT_ROOT / "data" / "demo").glob("*.md"))]
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = hf_folder(Path(tmp), shape, texts)
        model, tok, _ = load_base(BaseSpec(base=str(folder), device="cpu"))
        model.eval()

        def batched():
            return loglikelihoods(model, tok, flat, device=cpu)

        def per_scene():
            out = []
            for scene in scenes:
                out += per_scene_loglikelihoods(model, tok, scene, cpu)
            return out

        t_batched, ours = _best(batched, repeats)
        t_single, single = _best(per_scene, repeats)
        gap = max(abs(a[0] - b[0]) for a, b in zip(ours, single))
        result = {
            "speedup": round(t_single / t_batched, 2),
            "batched_seconds": round(t_batched, 3),
            "per_scene_seconds": round(t_single, 3),
            "requests": len(flat),
            "scenes": len(scenes),
            "max_abs_loglik_gap": gap,
            "identical": bool(gap < 1e-4 and [a[1] for a in ours] == [b[1] for b in single]),
            "settings": {"shape": {**shape, "vocab": len(tok.tok)}, "batch_tokens": BATCH_TOKENS, "dtype": "float32"},
        }
        result.update(_lm_eval_side(folder, flat, ours, repeats, 32, t_batched))
    return result


def eval_run_time(preset: str = "small", repeats: int = 1) -> dict[str, Any]:
    """Seconds of one run's whole evaluation (`backend.compute.evaluate.evaluate_all`, as the worker
    calls it) on the built-in batteries: a baseline run of the untrained micro network, whose
    completions never stop early (every generate scene decodes all its max_new_tokens), so this
    is the slowest case. Wall and CPU seconds, best of `repeats` after a warm-up call."""
    from backend.compute.evaluate import evaluate_all
    from backend.compute.models import BaseSpec, load_base
    from backend.core.workspace import default_scenes_dir
    from backend.scoring.scenes import GenerateScene, load_batteries

    batteries = load_batteries(default_scenes_dir())
    model, tok, device = load_base(BaseSpec(preset=preset, device="cpu"), 0)
    evaluate_all(model, tok, batteries[:1], device=device, general=[])  # warm-up
    wall = cpu = math.inf
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        _, rows, _ = evaluate_all(model, tok, batteries, device=device)
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    scenes = [s for b in batteries for s in b.scenes]
    return {
        "seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "scenes": len(scenes),
        "generate_scenes": sum(isinstance(s, GenerateScene) for s in scenes),
        "rows": len(rows),
        "settings": {"model": f"micro:{preset}", "kind": "baseline (untrained)", "threads": torch.get_num_threads()},
    }


def _best(fn, repeats: int):
    """Best time of `repeats` timed calls, after one untimed call that warms everything up."""
    out = fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _lm_eval_side(folder: Path, flat, ours, repeats: int, batch_size: int, t_ours: float) -> dict[str, Any]:
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except Exception as exc:  # not installed, or broken: say so instead of failing the run
        return {"lm_eval": f"not available ({type(exc).__name__})"}
    lm = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=batch_size)
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=(r.context, r.continuation), idx=i)
                 for i, r in enumerate(flat)]
    t_theirs, theirs = _best(lambda: lm.loglikelihood(instances, disable_tqdm=True), repeats)
    gap = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
    return {
        "speedup_vs_lm_eval": round(t_theirs / t_ours, 2),
        "lm_eval_seconds": round(t_theirs, 3),
        "lm_eval_max_abs_loglik_gap": gap,
        "lm_eval_identical": bool(gap < 1e-4 and [a[1] for a in ours] == [bool(b[1]) for b in theirs]),
    }
