"""One GPU, no internet, at most 8 minutes: our training against the card's limits and the peer.

    bash benchmarks/gpu_check.sh                         # on the GPU box; one JSON line a case, the whole object last
    LTM_GPU_CHECK_SMALL=1 bash benchmarks/gpu_check.sh   # the same code path, CPU-sized shapes

Llama-3-8B, Llama-2-13B and Llama-3.2-1B shapes (random weights from their configs, built on the
card; nothing downloaded), LoRA on a bf16 base and QLoRA on an nf4 one, in the order of
`benchmarks.gpu_cases.CASES`. For each case two processes, one after the other, each printing
one JSON line (`--case C --side ours|peer`, benchmarks/gpu_cases.py): ours (the worker's path)
and the peer (transformers.Trainer + PEFT with the settings ours ran with). This process imports
no torch and never touches the card; it writes each case's line to stdout and appends it to
`$LTM_GPU_CHECK_OUT/gpu_check.jsonl` (default ltm-workspace/gpu_check/) as soon as the case ends,
so a timeout loses nothing, and ends with the whole object. A case whose estimated time (from
the FLOPs, the MFU and the start-up seconds the cases before it measured) would overrun
`LTM_GPU_CHECK_BUDGET_S` is skipped with the estimate given; `LTM_GPU_CHECK_CASES=8b_qlora,13b_qlora`
runs those alone, after the preflight but without the product phase (a second call for what the
first one's budget left out).

First a preflight (`--preflight`, gpu_cases.preflight): the versions the box runs and two
2-step trainings on tiny models, one with liger's kernels (CUDA only) and one on an nf4 base.
Its line comes first; where liger failed the cases run with PyTorch's own kernels, and where nf4
failed or bitsandbytes is missing the QLoRA cases are skipped, each saying why, instead of each
failing a minute into its build. Then the product's own path (`--product`,
gpu_cases.product_check), which the cases, building their bases in memory, do not take: a tiny
Llama saved as a user's folder, one adapter job each on its bf16 and its 4-bit load through the
worker the service starts (the loader onto the device, the memory plan's fit, a checkpoint,
scoring, probes).

After the cases, where the budget leaves `LOAD_S`, the load phase (`--load`, gpu_cases.load_check):
`hf_load_ratio` on the card, from a saved Llama-3.2-1B-shaped bf16 folder to the first optimizer
step, our worker (weights read straight onto the card while its imports run) against
from_pretrained + `.to("cuda")` + PEFT, with the folder out of the page cache and then in it;
`LTM_GPU_CHECK_CASES=load` runs it alone.

Per case: steady tokens/s of both sides (the median step after the warm-up steps), the ratio,
MFU against the card's datasheet dense bf16 peak (backend/studies/gpu_projection.py's table,
matched to the device's name) and against the bf16 matmul ceiling measured on the card, peak
memory (allocated, reserved, and the card's view) against the memory plan's peak for the same
settings, and the issue 15 goals as flags: MFU ≥ 45% of datasheet peak for 8B and 13B bf16
LoRA, ≥ 1.5× HF Trainer + PEFT, card peak within 10% of the plan.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from benchmarks import gpu_cases  # torch-free at import

SMALL = os.environ.get("LTM_GPU_CHECK_SMALL") == "1"
BUDGET_S = float(os.environ.get("LTM_GPU_CHECK_BUDGET_S", "420"))  # the shell script's timeout is 480
GOAL_MFU, GOAL_RATIO, GOAL_MEMORY = 0.45, 1.5, 0.10
MFU_GOAL_CASES = ("8b_lora", "13b_lora")
# Before a case has measured anything: seconds a side spends outside its training steps (imports,
# CUDA context, building the model, the first step's autotuning), and the MFU against the measured
# ceiling to expect; later cases use what the earlier ones measured.
GUESS_OVERHEAD_S = 40.0
GUESS_MFU = {"lora": 0.35, "qlora": 0.2}
MARGIN = 1.15  # on an estimate, before a case is skipped for it
PREFLIGHT_S = 180.0  # imports, two tiny trainings, liger's Triton kernels compiled once
PRODUCT_S = 200.0  # a tiny folder saved, two worker processes each training and scoring (90 s at most each)
PRODUCT_MIN_S = 60.0  # less left than this: the product phase is skipped, and says so
LOAD_S = 200.0  # a 1B folder saved, eight processes from a cold start to their first step (about 100 s)
PHASES = ("preflight", "product", "load")  # the lines that are not cases


class Interrupted(Exception):
    pass


def _on_term(signum, frame):
    raise Interrupted(f"signal {signum}")


def side(case: str, which: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One side of a case in a fresh process, in a session of its own: a stop (the shell script's
    timeout, ^C) reaches it only through this process, which ends it and still prints its JSON."""
    return _child(["--case", case, "--side", which,
                   "--spec", json.dumps({**spec, "case": case, "side": which, "small": SMALL})], timeout)


def _child(args: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        _stop(proc)
        return {"error": f"timed out after {timeout:.0f} s"}
    except BaseException:
        _stop(proc)
        raise
    tail = "\n".join(err.strip().splitlines()[-6:])[-1500:]
    for line in reversed(out.strip().splitlines()):  # its JSON, whatever a library printed after it
        try:
            found = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(found, dict):  # kept even where the exit failed after it (CUDA's teardown)
            return found if proc.returncode == 0 else {**found, "exit": f"{proc.returncode}: {tail[-300:]}"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {tail}"}
    return {"error": f"no JSON line on stdout (it ended {out.strip()[-300:]!r}); stderr: {tail}"}


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's group, a wait, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def _left_out(found: dict[str, Any]) -> dict[str, str]:
    """What the preflight found the cases cannot use: {"liger" | "nf4": why}. Liger is left out
    where it failed (the cases run with PyTorch's own kernels, as they do where it is not
    installed); the QLoRA cases are skipped where nf4 failed or bitsandbytes is not installed.
    A preflight that could not run at all leaves nothing out: each case finds out for itself."""
    out = {"liger": found["liger"]} if str(found.get("liger", "")).startswith("failed") else {}
    nf4 = str(found.get("nf4", ""))
    if nf4.startswith("failed"):
        out["nf4"] = nf4
    elif nf4 == "not installed":
        out["nf4"] = "not installed: bitsandbytes is missing (bash benchmarks/gpu_wheels.sh where pip works)"
    return out


def estimate_seconds(case: str, seen: dict[str, Any]) -> float:
    """Both sides of `case`, from what earlier cases measured (or the guesses above): the steps at
    the MFU seen, the peer's at the ratio seen, and each process's start-up (imports, CUDA, the
    first steps' extra time) plus its build, which grows with the base's size."""
    from backend.studies.gpu_projection import flops_per_token

    ceiling = seen.get("ceiling")
    if not ceiling:
        return 0.0  # the first case measures what the estimates need
    run = gpu_cases.run_of(case, SMALL)
    kind = "qlora" if gpu_cases.parts(case)[1] else "lora"
    flops = flops_per_token(gpu_cases.config_dict(case, SMALL), run.block, gpu_cases.LORA_R)["flops_per_token"]
    work = (run.warm + run.steps) * run.micro_batch * run.grad_accum * run.block * flops
    mfu = seen.get(f"mfu_{kind}") or (seen["mfu_lora"] * 0.6 if kind == "qlora" and seen.get("mfu_lora")
                                      else GUESS_MFU[kind])
    ours = work / (ceiling * mfu)
    peer = ours / min(seen.get("ratio") or 1.0, 3.0)
    overhead = seen.get("startup", GUESS_OVERHEAD_S) + seen.get("build_per_b", 0.0) * _billions(case)
    return MARGIN * (ours + peer + 2 * overhead)


def _billions(case: str) -> float:
    from backend.studies.memory_plan import shape

    return shape(gpu_cases.config_dict(case, SMALL)).params() / 1e9


def _learn(seen: dict[str, Any], case: str, ours: dict[str, Any], line: dict[str, Any]) -> None:
    """What the next estimates use from a finished case: the slowest start-up and build rate."""
    kind = "qlora" if gpu_cases.parts(case)[1] else "lora"
    seen["ceiling"] = ours["matmul_ceiling_flops"]
    seen[f"mfu_{kind}"] = line["mfu_vs_measured_ceiling"]
    if line.get("ratio_vs_hf_trainer"):
        seen["ratio"] = line["ratio_vs_hf_trainer"]
    steady = ours["median_step_seconds"] * len(ours["step_seconds"])
    startup = ours["process_seconds"] - ours["build_seconds"] - steady  # the warm-up's extra included
    seen["startup"] = max(seen.get("startup", 0.0), startup)
    seen["build_per_b"] = max(seen.get("build_per_b", 0.0), ours["build_seconds"] / _billions(case))


def summarise(case: str, ours: dict, peer: dict, card) -> dict[str, Any]:
    """One case's line: both sides' numbers, the ratios and the goals' flags."""
    out: dict[str, Any] = {"case": case, **{k: ours.get(k) for k in (
        "device", "dtype", "quant", "attention", "kernels", "kernels_line", "lora", "block", "asked", "fitted",
        "micro_batch", "grad_accum", "oom_halvings", "grad_checkpointing", "plan_line", "tokens_per_step", "warm_steps", "measured_steps",
        "flops_per_token", "build_seconds")}}
    tps = ours["tokens_per_s"]
    achieved = ours["flops_per_token"] * tps
    out["tokens_per_s"] = round(tps, 1)
    out["median_step_seconds"] = round(ours["median_step_seconds"], 4)
    out["step_seconds"] = ours["step_seconds"]
    out["mfu_vs_measured_ceiling"] = round(achieved / ours["matmul_ceiling_flops"], 4)
    out["matmul_ceiling_tflops"] = round(ours["matmul_ceiling_flops"] / 1e12, 2)
    out["mfu_vs_datasheet"] = round(achieved / card.bf16_flops, 4) if card else None
    out["memory"] = {k: ours.get(k) for k in ("peak_allocated_bytes", "peak_reserved_bytes", "card_peak_bytes",
                                              "plan_peak_bytes", "plan_allocated_bytes", "plan_peak_stage")}
    mem = out["memory"]
    if ours.get("card_peak_bytes"):
        mem["card_peak_vs_plan"] = round(ours["card_peak_bytes"] / ours["plan_peak_bytes"], 3)
        mem["allocated_vs_plan"] = round(ours["peak_allocated_bytes"] / ours["plan_allocated_bytes"], 3)
        mem["reserved_vs_allocated"] = round(ours["peak_reserved_bytes"] / ours["peak_allocated_bytes"], 3)
        if ours.get("kernels") == "liger":
            mem["note"] = "planned with liger's kernels: terms read from liger-kernel's code, first measured here"
    out["ours_losses"] = ours.get("losses")
    if "error" in peer or "skipped" in peer:
        out["hf_trainer"] = peer
        ratio = None
    else:
        ratio = tps / peer["tokens_per_s"]
        out["hf_trainer"] = {k: peer.get(k) for k in ("tokens_per_s", "median_step_seconds", "step_seconds",
                                                      "losses", "kernels", "peak_allocated_bytes", "build_seconds")}
        out["hf_trainer"]["tokens_per_s"] = round(peer["tokens_per_s"], 1)
        out["hf_trainer"]["median_step_seconds"] = round(peer["median_step_seconds"], 4)
        out["hf_trainer"]["losses"] = [round(x, 5) for x in peer["losses"]] if peer.get("losses") else None
        out["ratio_vs_hf_trainer"] = round(ratio, 3)
    memory_ratio = mem.get("card_peak_vs_plan")
    out["goals"] = {
        "mfu_ge_45pct_of_datasheet": (out["mfu_vs_datasheet"] >= GOAL_MFU
                                      if case in MFU_GOAL_CASES and out["mfu_vs_datasheet"] is not None else None),
        "ge_1_5x_hf_trainer": ratio >= GOAL_RATIO if ratio is not None else None,
        "peak_memory_within_10pct_of_plan": abs(memory_ratio - 1) <= GOAL_MEMORY if memory_ratio else None,
    }
    return out


def _goals(result: dict[str, Any]) -> dict[str, bool | None]:
    """Each goal over the cases: false if any case failed it, true if some passed and none failed."""
    flags: dict[str, list[bool]] = {}
    for value in result.values():
        if isinstance(value, dict) and isinstance(value.get("goals"), dict):
            for name, flag in value["goals"].items():
                if flag is not None:
                    flags.setdefault(name, []).append(flag)
    names = ("mfu_ge_45pct_of_datasheet", "ge_1_5x_hf_trainer", "peak_memory_within_10pct_of_plan")
    return {n: (all(flags[n]) if n in flags else None) for n in names}


def _card(device: str | None):
    from backend.core.errors import LtmError
    from backend.studies.gpu_projection import find_gpu

    if not device or device == "cpu":
        return None
    try:
        return find_gpu(device)
    except LtmError:
        return None


def main() -> int:
    import tempfile

    started = time.perf_counter()
    signal.signal(signal.SIGTERM, _on_term)
    chosen = [c.strip() for c in os.environ.get("LTM_GPU_CHECK_CASES", "").split(",") if c.strip()]
    cases = chosen or list(gpu_cases.CASES)
    load = "load" in cases or not chosen  # the load phase: after the cases, where the budget leaves time
    cases = [c for c in cases if c != "load"]
    unknown = [c for c in cases if c not in gpu_cases.CASES]
    if unknown:
        print(f"gpu_check: unknown case {', '.join(unknown)} in LTM_GPU_CHECK_CASES; the cases are "
              f"{', '.join(gpu_cases.CASES)}, and load", file=sys.stderr)
        return 2
    out_dir = Path(os.environ.get("LTM_GPU_CHECK_OUT") or REPO / "ltm-workspace" / "gpu_check")
    out_dir.mkdir(parents=True, exist_ok=True)
    lines_path = out_dir / "gpu_check.jsonl"
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result: dict[str, Any] = {"date": date, "small": SMALL, "budget_s": BUDGET_S, "results_file": str(lines_path),
                              "cases": list(cases)}
    if SMALL:
        result["note"] = ("CPU smoke run (LTM_GPU_CHECK_SMALL=1): proves the code path on CPU-sized shapes; its "
                          "numbers are not GPU results and its goal flags are not the GPU goals")
    seen: dict[str, Any] = {}
    stopped: BaseException | None = None

    def record(case: str, line: dict[str, Any]) -> None:
        result[case] = line
        text = json.dumps({"date": date, "small": SMALL, **({case: line} if case in PHASES else {"case": case, **line})})
        print(text, flush=True)
        with open(lines_path, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")

    def phase(name: str, what: str, limit: float) -> dict[str, Any]:
        print(f"{name}: {what}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        line = _child([f"--{name}"], min(limit, BUDGET_S - (t0 - started)))
        line["seconds"] = round(time.perf_counter() - t0, 1)
        record(name, line)
        return line

    try:
        left_out = _left_out(phase("preflight", "versions, liger's kernels and nf4 on tiny models", PREFLIGHT_S))
        order = list(cases)
        if not chosen:  # a run of chosen cases is a second call: the first one checked the product
            # after the headline cases (8B and 13B LoRA): on a slow, cold box the product phase
            # must not eat the budget they need
            last = max((i + 1 for i, c in enumerate(order) if c in MFU_GOAL_CASES), default=0)
            order.insert(last, "product")
        with tempfile.TemporaryDirectory(prefix="ltm-gpu-check-") as tmp:
            for case in order:
                if case == "product":
                    left = BUDGET_S - (time.perf_counter() - started)
                    if left < PRODUCT_MIN_S:
                        record("product", {"skipped": f"would not finish: {left:.0f} s of the budget left"})
                    else:
                        phase("product", "the worker's own job on a saved tiny Llama, bf16 and 4-bit", PRODUCT_S)
                    continue
                if gpu_cases.parts(case)[1] and "nf4" in left_out:
                    record(case, {"skipped": f"preflight: nf4 {left_out['nf4']}"})
                    continue
                left = BUDGET_S - (time.perf_counter() - started)
                need = estimate_seconds(case, seen)
                if need > left:
                    record(case, {"skipped": f"would not finish: about {need:.0f} s needed, {left:.0f} s left"})
                    continue
                folder = Path(tmp) / case
                folder.mkdir()
                tokens = gpu_cases.corpus(folder, gpu_cases.tokens_needed(case, SMALL),
                                          gpu_cases.config_dict(case, SMALL)["vocab_size"])
                spec = {"tokens": str(tokens), "seed": 0, "no_liger": "liger" in left_out}
                t0 = time.perf_counter()
                print(f"{case}: ours, then HF Trainer + PEFT ({left:.0f} s of the budget left)", file=sys.stderr,
                      flush=True)
                ours = side(case, "ours", spec, left)
                if "error" in ours:
                    record(case, {"error": f"ours: {ours['error']}"})
                    continue
                result.setdefault("machine", ours["device"] if ours["device"] != "cpu" else
                                  f"{os.uname().machine} CPU ×{os.cpu_count()}")
                left = BUDGET_S - (time.perf_counter() - started)
                peer_need = ours["process_seconds"] / min(seen.get("ratio") or 1.0, 3.0)
                if peer_need > left:
                    peer = {"skipped": f"would not finish: about {peer_need:.0f} s needed, {left:.0f} s left"}
                else:
                    try:
                        peer = side(case, "peer", {**spec, **{k: ours[k] for k in (
                            "micro_batch", "grad_accum", "grad_checkpointing", "kernels")}}, left)
                    except (Interrupted, KeyboardInterrupt) as exc:  # ours' numbers are kept
                        stopped = exc
                        peer = {"skipped": f"interrupted ({exc or '^C'})"}
                line = summarise(case, ours, peer, _card(ours["device"]))
                line["seconds"] = round(time.perf_counter() - t0, 1)
                record(case, line)
                if stopped is not None:
                    raise stopped
                _learn(seen, case, ours, line)
        left = BUDGET_S - (time.perf_counter() - started)
        if load and left >= LOAD_S:
            phase("load", "hf_load_ratio: a saved 1B folder to the first step, ours against from_pretrained + .to()",
                  LOAD_S)
        elif load:
            record("load", {"skipped": f"would not finish: about {LOAD_S:.0f} s needed, {left:.0f} s left; "
                                       "LTM_GPU_CHECK_CASES=load runs it alone"})
    except (Interrupted, KeyboardInterrupt) as exc:  # the child is stopped already (side)
        result["interrupted"] = str(exc) or "^C"
    measured = [v["matmul_ceiling_tflops"] for v in result.values() if isinstance(v, dict) and "matmul_ceiling_tflops" in v]
    result["matmul_ceiling_tflops"] = statistics.median(measured) if measured else None
    card = _card(result.get("machine"))
    result["datasheet_bf16_tflops"] = round(card.bf16_flops / 1e12, 1) if card else None
    result["datasheet"] = card.source if card else None
    result["goals"] = _goals(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result)
    print(text, flush=True)
    with open(lines_path, "a", encoding="utf-8") as fh:
        fh.write(text + "\n")
    return 0


def child(argv: list[str]) -> int:
    """`--case C --side ours|peer --spec JSON`: one side, one JSON line on stdout; `--preflight`:
    what this box can run (gpu_cases.preflight); `--product`: the worker's own job on this
    device (gpu_cases.product_check)."""
    # a stop from the parent (`_stop`) unwinds: the product's `finally` ends the worker it started,
    # which runs in a process group of its own
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if argv == ["--preflight"]:
        print(json.dumps(gpu_cases.preflight(SMALL)), flush=True)
        return 0
    if argv == ["--product"]:
        print(json.dumps(gpu_cases.product_check(SMALL)), flush=True)
        return 0
    if argv == ["--load"]:
        print(json.dumps(gpu_cases.load_check(SMALL)), flush=True)
        return 0
    args = dict(zip(argv[::2], argv[1::2]))
    spec = {**json.loads(args.get("--spec", "{}")), "case": args["--case"], "side": args["--side"]}
    spec.setdefault("small", SMALL)
    print(json.dumps(gpu_cases.run_side(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(child(sys.argv[1:]) if {"--case", "--preflight", "--product", "--load"} & set(sys.argv) else main())
