"""benchmarks/gpu_check.py on the CPU: the in-memory nf4 base equals the loader's, and one case's
two sides through the subprocess protocol train the same model on the same data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from backend.core.workspace import PROJECT_ROOT
from benchmarks import gpu_cases


def test_in_memory_nf4_base_gives_the_loaders_logits(tmp_path):
    """quantize_in_memory stands in for load_hf_base(quant="4bit") on a saved copy: the same
    layers quantised, the same packed weights, the same logits, everything frozen."""
    import bitsandbytes as bnb

    from backend.compute.models import BaseSpec, load_hf_base

    cpu = torch.device("cpu")
    ours = gpu_cases.build_base("1b_qlora", True, cpu, torch.float32, "sdpa")
    dense = gpu_cases.build_base("1b_lora", True, cpu, torch.float32, "sdpa")
    dense.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_hf_base(BaseSpec(base=str(tmp_path), quant="4bit", device="cpu"), cpu)

    kinds = {n: type(m).__name__ for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == {n: type(m).__name__ for n, m in loaded.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds["model.layers.0.self_attn.q_proj"] == "Linear4bit" and kinds["lm_head"] == "Linear"
    q_ours = ours.model.layers[1].mlp.down_proj.weight
    q_loaded = loaded.model.layers[1].mlp.down_proj.weight
    assert isinstance(q_ours, bnb.nn.Params4bit) and torch.equal(q_ours.data, q_loaded.data)
    assert not any(p.requires_grad for p in ours.parameters())
    ids = torch.randint(3, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    for model in (ours, loaded, dense):  # from_pretrained leaves eval mode, whose CPU kernel repacks the weights
        model.train()
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
    assert not torch.allclose(a, dense(input_ids=ids).logits, atol=1e-3)  # quantised, not the dense model


def _side(case: str, which: str, spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--case", case, "--side", which, "--spec", json.dumps(spec)],
        check=False, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "LTM_GPU_CHECK_SMALL": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_one_case_both_sides_through_the_subprocess_protocol(tmp_path):
    """Ours runs the worker's path and reports what it chose; the peer, given those settings,
    trains the same steps on the same blocks from the same weights: the same first loss."""
    from backend.studies.gpu_projection import flops_per_token

    case, run = "8b_lora", gpu_cases.run_of("8b_lora", True)
    config = gpu_cases.config_dict(case, True)
    tokens = gpu_cases.corpus(tmp_path, gpu_cases.tokens_needed(case, True), config["vocab_size"])
    spec = {"tokens": str(tokens), "small": True, "seed": 0}
    ours = _side(case, "ours", spec)
    assert (ours["micro_batch"], ours["grad_accum"], ours["grad_checkpointing"]) == (run.micro_batch, run.grad_accum, False)
    assert len(ours["step_seconds"]) == run.warm + run.steps and ours["measured_steps"] == run.steps
    assert ours["tokens_per_s"] == pytest.approx(ours["tokens_per_step"] / ours["median_step_seconds"])
    assert ours["tokens_per_step"] == run.micro_batch * run.grad_accum * run.block
    # the model's FLOPs as the calibration counts them equal the projection's count from the config
    assert ours["flops_per_token"] == flops_per_token(config, run.block, gpu_cases.LORA_R)["flops_per_token"]
    assert ours["plan_peak_bytes"] > 0 and ours["lora"]["dropout"] == 0.0
    peer = _side(case, "peer", {**spec, **{k: ours[k] for k in ("micro_batch", "grad_accum", "grad_checkpointing",
                                                                 "kernels")}})
    assert len(peer["step_seconds"]) == run.warm + run.steps
    assert peer["losses"][0] == pytest.approx(ours["losses"][0], rel=1e-4)
    assert peer["losses"][1] == pytest.approx(ours["losses"][1], rel=2e-3)


def test_preflight_trains_the_nf4_kind_and_reports_what_the_box_runs():
    """The preflight (gpu_check.py --preflight) is the first thing a GPU box runs: it names the
    versions it found and trains two steps on an nf4 base, so the QLoRA cases are skipped with
    a reason where 4-bit cannot run, not failed one by one. Liger's trial needs CUDA."""
    from importlib import metadata

    found = json.loads(json.dumps(gpu_cases.preflight(small=True)))  # what the child prints
    assert found["device"] == "cpu"
    assert found["versions"]["transformers"] == metadata.version("transformers")
    assert found["versions"]["bitsandbytes"] == metadata.version("bitsandbytes")
    assert found["nf4"] == "ok"
    assert found["liger"] == ("not on CUDA" if gpu_cases.liger_importable() else "not installed")


def test_an_unknown_case_is_named_with_the_cases_there_are(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], check=False, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LTM_GPU_CHECK_SMALL": "1", "LTM_GPU_CHECK_CASES": "8b_lora,70b_lora",
                               "LTM_GPU_CHECK_OUT": str(tmp_path)})
    assert done.returncode == 2 and done.stdout == ""
    assert "unknown case 70b_lora" in done.stderr and "13b_qlora" in done.stderr
    assert not (tmp_path / "gpu_check.jsonl").exists()  # nothing started


def test_the_product_line_runs_the_workers_own_job(tiny_hf_model, tmp_path):
    """gpu_check's product phase hands the worker a session as the service does: on a saved
    folder it trains, checkpoints, scores and stores probes, and the line says so."""
    line = gpu_cases.worker_trial(tiny_hf_model, tmp_path, None, "cpu")
    assert line.startswith("ok: on cpu, 4 steps"), line
    assert "probes stored" in line
    assert (tmp_path / "run-bf16" / "checkpoints" / "step-000002").is_dir()


def test_the_load_line_times_both_sides_from_a_saved_folder_to_their_first_step():
    """gpu_check's load phase (hf_load_ratio on the device): a folder saved as a user's, our
    worker and transformers + PEFT each from a fresh process to a first optimizer step on it,
    with the folder out of the page cache; on the CPU here, on the card there."""
    line = json.loads(json.dumps(gpu_cases.load_check(small=True, repeats=1, caches=("cold",))))
    assert line["device"] == "cpu" and line["settings"]["device"] == "cpu"
    ours, peer = line["cold"]["ours"], line["cold"]["peer"]
    for side in (ours, peer):  # each phase timed, in order, adding up to the whole
        assert min(side["start_s"], side["load_lora_s"], side["step_s"]) > 0
        assert side["seconds"] == pytest.approx(side["start_s"] + side["load_lora_s"] + side["step_s"], abs=0.05)
    assert line["hf_load_ratio"] == pytest.approx(peer["seconds"] / ours["seconds"], rel=0.01)
    assert "hf_load_ratio_warm_cache" not in line
    assert "cached_after_drop" in line["cold"]  # how cold "cold" was, measured (below)


def test_a_cold_page_cache_is_measured_not_assumed(tmp_path):
    """hf_load's "cold" side drops the folder from the page cache and then reads back how much of
    it is still there: none on a disk, all of it on a file system that keeps its pages in memory."""
    from benchmarks.hf_load import cached_share, set_cache

    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (tmp_path / name).write_bytes(os.urandom(3 << 20))
    set_cache(tmp_path, "warm")
    if cached_share(tmp_path) is None:
        pytest.skip("this system cannot tell what is in the page cache (no RWF_NOWAIT reads)")
    assert cached_share(tmp_path) == 1.0
    left = set_cache(tmp_path, "cold")
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip()
    if kind == "tmpfs":
        assert left == 1.0
    else:  # a page still being read ahead when the drop came may stay
        assert left is not None and left <= 0.1, (kind, left)
