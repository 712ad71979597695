"""`ltm-tui estimate`: how long 1, 10, 100, 1000 pages take on this device, and why.

    ltm-tui estimate --base micro --preset small --pages 1,10,100,1000 [--format json]
    ltm-tui estimate --base FOLDER --gpu "RTX PRO 6000" [--quant 4bit] [--format json]

With --gpu it plans for a card that is not here, from the folder's config.json alone (no weights,
no tokenizer, no torch): the memory plan on that card, the micro-batch and checkpointing it
picks, and the training time projected from the card's datasheet peak and an MFU
(`backend.studies.gpu_projection`).

Without --base, --preset or --quant it forecasts for the settings most of the workspace's finished
runs had (and says so), so that those runs refine the forecast. The first call for a device, base
and settings runs the calibration (`backend.compute.estimate`, a few
real optimizer steps), as a task of the job service: a worker in a free slot measures it, so it
never loads a model beside a run on the same card; later calls read the cache and the
workspace's finished runs (`backend.studies.forecast`, no torch). `forecast_before_queueing` prints the
same forecast per corpus for `ltm-tui run`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ltm_tui.cli.common import battery_flag, job_settings, model_flags, training_flags, usage, workspace


def add_parser(sub):
    # the flags of `ltm-tui run` that choose the base and the training: the estimate is of them
    est = sub.add_parser("estimate", help="forecast time and memory for 1, 10, 100, 1000 pages (measured)",
                         parents=[model_flags(), training_flags(),
                                  battery_flag("battery folder or file timed for evaluation (default scenes/)")])
    est.add_argument("--pages", default="1,10,100,1000", help="A4 pages (500 words each), comma-separated")
    est.add_argument("--sample", nargs="+", metavar="FILE",
                     help="measure tokens per word on these texts (default: the demo corpora)")
    est.add_argument("--recalibrate", action="store_true", help="measure again even if a calibration is cached")
    est.add_argument("--calibration-steps", type=int, default=8, help="steady-state steps measured (default 8)")
    est.add_argument("--gpu", metavar="NAME",
                     help='plan for this card instead of measuring here, e.g. "RTX PRO 6000", H100, H200, '
                          "A100, L40S, 4090: memory from the base's config.json, time from the datasheet")
    est.add_argument("--format", choices=["table", "json"], default="table")
    # no --base given is not "micro": it lets the workspace's finished runs choose (_from_runs)
    est.set_defaults(handler=cmd_estimate, probes=False, base=None)
    return est


MODEL_CHOICE = ("base", "preset", "quant")
TRAIN_CHOICE = ("steps", "epochs", "min_train_tokens", "lr", "block_size", "micro_batch", "grad_accum",
                "lora_r", "lora_alpha")
# the training settings a run's length and speed depend on, as (TrainConfig field, flag)
TRAIN_FLAGS = (("block_size", "--block-size"), ("micro_batch", "--micro-batch"), ("grad_accum", "--grad-accum"),
               ("epochs", "--epochs"), ("min_train_tokens", "--min-train-tokens"), ("max_steps", "--steps"))


def _from_runs(args, groups: list[dict]) -> tuple[argparse.Namespace, dict | None]:
    """The flags with the settings of the finished runs filled in where no flag chose: the base
    (and device) of the most common settings when neither --base, --preset nor --quant was given,
    and their training too when no training flag was. Returns (the flags, the group used or None)."""
    if not groups or any(getattr(args, k, None) is not None for k in MODEL_CHOICE):
        return args, None
    group = groups[0]
    base, filled = group["base"], argparse.Namespace(**vars(args))
    filled.base, filled.preset, filled.quant = base["base"], base.get("preset"), base.get("quant")
    filled.trust_remote_code = args.trust_remote_code or bool(base.get("trust_remote_code"))
    filled.device = args.device or base.get("device")
    if not any(getattr(args, k, None) is not None for k in TRAIN_CHOICE):
        for field, flag in TRAIN_FLAGS:
            value = group["train"].get(field)
            setattr(filled, flag[2:].replace("-", "_"), (value or None) if field == "max_steps" else value)
    return filled, group


def settings_flags(base: dict, train: dict) -> str:
    """The flags that choose these settings: the base, and each training setting that is not
    the base's default (`--preset tiny --block-size 64`)."""
    from backend.studies.forecast import resolved_train

    if (base.get("base") or "micro") == "micro":
        flags = [f"--preset {base.get('preset') or 'small'}"]
    else:
        flags = [f"--base {base['base']}"] + (["--quant 4bit"] if base.get("quant") else [])
    default, chosen = resolved_train(base, None).to_dict(), resolved_train(base, train).to_dict()
    flags += [f"{flag} {_number(chosen[field])}" for field, flag in TRAIN_FLAGS if chosen[field] != default[field]]
    return " ".join(flags)


def _number(value) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _pages(text: str) -> list[float]:
    try:
        pages = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        pages = []
    if not pages or any(not (0 < p < float("inf")) for p in pages):  # nan and inf too
        raise usage(f"--pages {text!r}: give positive numbers separated by commas, e.g. 1,10,100,1000")
    return pages


def cmd_estimate(args) -> int:
    from backend.studies import forecast

    pages = _pages(args.pages)
    if args.gpu is not None:  # `--gpu ""` is an unknown card, not this machine
        return estimate_on_card(args, pages)
    if args.sample:
        for path in args.sample:
            if not Path(path).expanduser().is_file():
                raise usage(f"--sample {path}: no such file")
    ws = workspace(args)
    groups = forecast.settings_in_use(ws)
    args, adopted = _from_runs(args, groups)
    settings = job_settings(args)
    base, train = settings.base, settings.train
    if adopted is not None:  # say which settings, before a calibration's lines
        total = sum(g["runs"] for g in groups)
        print(f"forecast for {settings_flags(base, train)}: the settings of {adopted['runs']} of the {total} "
              "finished run(s) here (--preset or --base chooses others)",
              file=sys.stderr if args.format == "json" else sys.stdout, flush=True)
    if args.recalibrate or forecast.load_calibration(ws, base, train) is None:
        from backend.jobs.client import run_task

        # measured by a worker in one of the service's slots: never beside a run on the same card
        say = (lambda s: None) if args.format == "json" else (lambda s: print(f"calibrating: {s}", file=sys.stderr))
        run_task(
            ws, "calibrate", say, base=base, train=train, lora=settings.lora or None,
            steps=max(1, args.calibration_steps), scenes=settings.scenes,
            sample=[str(Path(p).expanduser().absolute()) for p in args.sample or []] or None,
        )
    calib = forecast.load_calibration(ws, base, train)
    free, where = forecast.free_memory(base, ws)
    rows = []
    for p in pages:
        tokens = forecast.tokens_for_pages(ws, base, train, p)
        pred = forecast.predict(ws, base, train, tokens)
        peak = pred["peak_memory_bytes"]
        fix = forecast.memory_fix(peak, free, base, train, where)
        rows.append({"pages": p if p != int(p) else int(p), **pred, "free_memory_bytes": free, "memory_fix": fix,
                     # the keys a row of `--gpu` has too, so that a script reads both alike
                     # (`source` says what was measured here: calibration, runs or both)
                     "peak_memory_gb": None if peak is None else round(peak / 1e9, 2),
                     "fits": None if peak is None or free is None else peak <= free,
                     "total_s": round(pred["total_seconds"], 1)})
    others = [g for g in groups
              if forecast.settings_key(g["base"], g["train"]) != forecast.settings_key(base, train)]
    if args.format == "json":
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        if not rows[0]["runs"] and others:
            print(other_settings_line(others), file=sys.stderr)
    else:
        _print_table(rows, calib, base, train, others)
    return 0


def other_settings_line(others: list[dict]) -> str:
    """One line when no finished run had the forecast's settings but some had others: the most
    common of those, as the flags that forecast from them."""
    first = others[0]
    more = f" ({len(others) - 1} other setting(s) too)" if len(others) > 1 else ""
    return (f"no finished runs with these settings yet: the forecast is the calibration alone; "
            f"{first['runs']} finished run(s) here had {settings_flags(first['base'], first['train'])}{more}: "
            "pass those flags to forecast from them")


def _print_table(rows: list[dict], calib: dict, base: dict, train: dict, others: list[dict]) -> None:
    from backend.core.config import TrainConfig
    from backend.studies import forecast

    fs, fb = forecast.format_seconds, forecast.format_bytes
    name = base["base"] + (f" ({base.get('preset')})" if base["base"] == "micro" else "")
    name += " QLoRA 4-bit" if base.get("quant") else (" LoRA" if base["base"] != "micro" else " trained from scratch")
    cfg = TrainConfig.from_dict(train)
    print(f"{name} on {calib['device_tag']} ({calib['dtype']})")
    print(
        f"calibration ({calib['measured_at']}): {calib['steps']} steps of {cfg.micro_batch} × {cfg.grad_accum} × "
        f"{calib['block_size']} tokens after {calib['warm_steps']} warm-up steps: "
        f"{calib['tokens_per_s']:,.0f} tokens/s, peak memory {fb(calib['peak_memory_bytes'])} "
        f"({calib['peak_memory_kind']}), base loaded in {fs(calib['load_seconds'])}"
    )
    per_tok = calib["flops_per_token"]
    print(
        f"FLOP model: 6 × {calib['trainable_matmul_params']:,} trained + 4 × {calib['frozen_matmul_params']:,} "
        f"frozen matmul weights + {calib['attention_flops']:,} attention = {per_tok / 1e6:,.1f} MFLOP a token; "
        f"{calib['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s achieved = MFU {calib['mfu']:.0%} of the measured "
        f"{calib['matmul_ceiling_flops_per_s'] / 1e9:,.0f} GFLOP/s {calib['dtype']} matmul ceiling"
    )
    first = rows[0]
    if first["runs"]:
        print(
            f"fit over {first['runs']} finished run(s) with these settings: train = {first['fixed_seconds']:.1f} s + "
            f"{first['per_token_seconds'] * 1e6:.2f} µs × trained tokens (calibration alone: "
            f"{1e6 / calib['tokens_per_s']:.2f} µs a token)"
        )
    elif others:
        print(other_settings_line(others))
    else:
        print("no finished runs with these settings yet: the forecast is the calibration alone; "
              "each finished run refines it")
    print(
        f"a page is 500 words = {calib['tokens_per_word'] * 500:,.0f} tokens (measured on "
        f"{calib['tokens_per_word_source']}); a run trains max({cfg.epochs:g} epochs, "
        f"{cfg.min_train_tokens:,} tokens); evaluation = one pass over the batteries"
    )
    print("load = starting on the base as a worker's first job does (imports, loading or building "
          "the base) plus tokenizing the corpus; a worker keeps an HF base loaded, so corpora "
          "queued behind the first on it skip the base's load")
    head = ("pages", "tokens", "trained", "load", "train", "eval", "total", "peak memory")
    table = [head] + [
        (f"{r['pages']:g}", f"{r['tokens']:,}", f"{r['trained_tokens']:,}", fs(r["load_seconds"] + r["tokenize_seconds"]),
         fs(r["train_seconds"]), fs(r["eval_seconds"]), fs(r["total_seconds"]), fb(r["peak_memory_bytes"]))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    for r in rows[:1]:
        if r["memory_fix"]:
            print(f"warning: {r['memory_fix']}")


def forecast_before_queueing(ws, settings, files: list[str], budget_s: float = 5.0) -> None:
    """One stderr line per corpus about to be queued: predicted time and peak memory, and a
    warning with the fix when the peak exceeds free memory. Reads files only (no torch)."""
    from backend.core.errors import LtmError
    from backend.ingest.corpora import expand_paths, inspect_corpus
    from backend.studies import forecast

    base, train = settings.base, settings.train
    found, _ = expand_paths(files)  # bad paths are reported by the submission itself
    per_word, _ = forecast.tokens_per_word(ws, base, train)
    deadline = time.monotonic() + budget_s
    free, where = forecast.free_memory(base, ws)
    warned = False
    for i, path in enumerate(found):
        if time.monotonic() > deadline:
            print(f"forecast: {len(found) - i} more corpora not forecast (reading them took too long)", file=sys.stderr)
            break
        try:
            words = inspect_corpus(path).words
        except (LtmError, OSError, ValueError, RuntimeError):  # the service names the file's trouble
            continue
        pred = forecast.predict(ws, base, train, max(1, int(words * per_word)))
        if pred is None:
            print(f"forecast: none yet for {base['base']} with these settings on this device; "
                  "`ltm-tui estimate` measures one in a few seconds", file=sys.stderr)
            return
        fs = forecast.format_seconds
        print(
            f"forecast {path.name} ({words / 500:,.1f} pages, {pred['tokens']:,} tokens): train "
            f"{fs(pred['train_seconds'])}, total {fs(pred['total_seconds'])}, peak "
            f"{forecast.format_bytes(pred['peak_memory_bytes'])} ({pred['source']})",
            file=sys.stderr,
        )
        fix = forecast.memory_fix(pred["peak_memory_bytes"], free, base, train, where)
        if fix and not warned:
            print(f"ltm-tui: warning: {fix}", file=sys.stderr)
            warned = True


GIB = 1 << 30
# --attn's names as the memory plan knows them; auto: SDPA, what runs where flash-attn is not installed
_PLAN_ATTENTION = {"flash_attention_2": "flash", "sdpa": "sdpa", "eager": "eager"}


def estimate_on_card(args, pages: list[float]) -> int:
    """`estimate --gpu`: the plan and a projected time for a card that is not here, from the
    base folder's config.json alone (no weights or tokenizer are read, torch is not imported)."""
    from backend.studies import gpu_projection, memory_plan

    if not args.base or args.base == "micro":
        raise usage("--gpu plans a Hugging Face base from its config.json: pass --base FOLDER (the folder "
                    "holding config.json is enough)")
    if getattr(args, "precision", None) == "fp32":
        raise usage("--gpu projects bf16 training (what a card runs by default) from the bf16 datasheet peak; "
                    "drop --precision fp32")
    card = gpu_projection.find_gpu(args.gpu)
    config = memory_plan.read_config(args.base)
    settings = job_settings(args)
    attn = _PLAN_ATTENTION.get(getattr(args, "attn", None) or "sdpa", "sdpa")
    out = gpu_projection.project(workspace(args), config, card, settings.base, settings.train, settings.lora, pages,
                                 attention=attn, grad_checkpointing=getattr(args, "grad_checkpointing", None) or "auto")
    if args.format == "json":
        print(json.dumps(out["rows"], ensure_ascii=False, indent=1))
        return 0
    _print_card_table(args, out, config)
    return 0


def _print_card_table(args, out: dict, config: dict) -> None:
    from backend.studies import forecast

    fs, fb = forecast.format_seconds, forecast.format_bytes
    card, step, flops, rows = out["card"], out["plan"], out["flops"], out["rows"]
    first = rows[0]
    kind = f"QLoRA 4-bit, r{step.lora_r}" if step.quant else f"LoRA r{step.lora_r} on bf16"
    print(f"{Path(args.base).expanduser().name} ({step.params / 1e9:.2f}B parameters, {kind}) on {card.name} "
          f"({card.memory_bytes / GIB:.0f} GiB, {card.bf16_flops / 1e12:,.1f} TFLOP/s dense bf16, "
          f"{card.source})")
    if first["source"] == "projection":
        print("a PROJECTION for a card that is not here, not a measurement: memory from the plan, time from the "
              "datasheet peak and the MFU below")
    else:
        print("measured: a calibration on this card with these settings is in the workspace")
    attention = {"flash": "flash-attn 2", "sdpa": "SDPA with each block's document mask",
                 "eager": "eager attention"}[out["attention"]]
    print(f"memory plan (block {out['block_size']}, {attention}): micro-batch {first['micro_batch']} × "
          f"accumulation {first['grad_accum']}, {'with' if step.grad_checkpointing else 'no'} gradient "
          f"checkpointing: peak {fb(step.peak)} of the card's {card.memory_bytes / GIB:.0f} GiB "
          f"({fb(card.memory_bytes)}) "
          f"({'fits' if step.peak <= card.memory_bytes else 'does NOT fit'})")
    print(f"  weights {fb(step.weights + step.quantized_weights)}, adapter with gradients and AdamW "
          f"{fb(step.adapters + step.grads + step.optimizer)}, activations {fb(step.activations)}, logits and "
          f"loss {fb(step.logits)}, CUDA context and allocator {fb(step.cuda_context + step.allocator_slack)}")
    print(f"time: 4 × {flops['frozen_matmul_params'] / 1e9:,.2f}B frozen + 6 × "
          f"{flops['trainable_matmul_params'] / 1e6:,.1f}M adapter matmul weights + attention"
          f"{' + the recomputed forward' if step.grad_checkpointing else ''} = "
          f"{flops['flops_per_token'] / 1e9:,.1f} GFLOP a token, at an MFU of {out['mfu_source']}; "
          "training only (loading the base and evaluation are not projected)")
    head = ("pages", "tokens", "trained", "steps", "train", "peak memory", "fits")
    table = [head] + [
        (f"{r['pages']:g}", f"{r['tokens']:,}", f"{r['trained_tokens']:,}", f"{r['steps']:,}", fs(r["train_s"]),
         f"{r['peak_memory_gb']:,.1f} GB", "yes" if r["fits"] else "no")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    if step.kernels:
        print(f"note: planned with --kernels {step.kernels}: its fused cross-entropy never holds the full logits, "
              "and its RMSNorm and SwiGLU keep less; these terms come from liger-kernel's code, not yet from a "
              "card's measured peak")
    if not first["fits"]:
        print(f"warning: the step does not fit {card.name} even at micro-batch 1 with checkpointing: "
              f"{'a smaller --block-size or a larger card' if step.quant else 'use --quant 4bit (QLoRA)'}")
