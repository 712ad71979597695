"""The forecast: a real calibration on a tiny model, the FLOP model, the fit over finished runs,
the memory warning and `ltm-tui estimate` end to end. No timing is asserted: only that the parts
are measured, cached, combined and explained consistently."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from backend.studies import forecast
from tests.conftest import REPO, cli

MICRO_TINY = {"base": "micro", "preset": "tiny", "quant": None, "trust_remote_code": False, "device": "cpu"}
TRAIN = {"block_size": 64, "micro_batch": 4, "grad_accum": 1, "min_train_tokens": 0, "epochs": 1}


def _calibrate(ws, tiny_battery, **kw):
    from backend.compute.estimate import calibrate

    return calibrate(ws, MICRO_TINY, TRAIN, steps=2, warm=1, scenes=tiny_battery / "heldout.yaml", **kw)


def test_forecast_module_never_loads_torch():
    code = "import sys, backend.studies.forecast, ltm_tui.cli.estimate; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_nothing_known_means_no_forecast(tmp_path):
    assert forecast.predict(tmp_path / "ws", MICRO_TINY, TRAIN, 10_000) is None


def test_calibration_measures_caches_and_feeds_the_forecast(tmp_path, tiny_battery):
    from backend.compute.estimate import ensure_calibration
    from backend.compute.models import MICRO_PRESETS

    ws = tmp_path / "ws"
    calib = _calibrate(ws, tiny_battery)
    assert forecast.calibration_path(ws, MICRO_TINY, TRAIN).is_file()
    assert calib["tokens_per_s"] > 0 and calib["step_seconds"] > 0 and calib["load_seconds"] > 0
    assert calib["eval_seconds"] > 0 and calib["peak_memory_bytes"] > 10_000_000  # torch alone is more
    # micro trains every weight: 6 FLOPs a matmul weight (the tied lm_head is one), plus attention
    p = MICRO_PRESETS["tiny"]
    linear = p.num_layers * (4 * p.hidden_size**2 + 3 * p.hidden_size * p.intermediate_size) + 260 * p.hidden_size
    assert calib["trainable_matmul_params"] == linear and calib["frozen_matmul_params"] == 0
    assert calib["flops_per_token"] == 6 * linear + 12 * p.num_layers * p.hidden_size * 64
    assert 0 < calib["mfu"] < 1.5 and calib["matmul_ceiling_flops_per_s"] > 1e8
    # the demo corpora are English prose: bytes a word, space included
    assert 5.0 < calib["tokens_per_word"] < 7.0

    again, measured = ensure_calibration(ws, MICRO_TINY, TRAIN)
    assert not measured and again == json.loads(forecast.calibration_path(ws, MICRO_TINY, TRAIN).read_text())

    small = forecast.predict(ws, MICRO_TINY, TRAIN, 64 * 4 * 10)
    big = forecast.predict(ws, MICRO_TINY, TRAIN, 64 * 4 * 1000)
    assert small["source"] == "calibration" and small["runs"] == 0
    assert (small["steps"], big["steps"]) == (10, 1000)
    assert big["train_seconds"] == pytest.approx(
        calib["warmup_seconds"] + 64 * 4 * 1000 / calib["tokens_per_s"], rel=1e-3)
    for pred in (small, big):
        parts = pred["load_seconds"] + pred["tokenize_seconds"] + pred["train_seconds"] + pred["eval_seconds"]
        assert pred["total_seconds"] == pytest.approx(parts, abs=0.02)
        assert pred["peak_memory_bytes"] == calib["peak_memory_bytes"]
    # other settings are another calibration: nothing is borrowed across keys
    assert forecast.predict(ws, MICRO_TINY, {**TRAIN, "micro_batch": 8}, 10_000) is None


def test_lora_flops_count_frozen_weights_at_four(tiny_hf_model):
    from backend.compute.estimate import flop_model
    from backend.compute.models import BaseSpec, attach_lora, load_base
    from backend.core.config import LoraSettings

    model, _, _ = load_base(BaseSpec(base=str(tiny_hf_model), device="cpu"))
    cfg = model.config
    d, f, L, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_key_value_heads
    head = d // cfg.num_attention_heads
    base_linear = L * (2 * d * d + 2 * d * kv * head + 3 * d * f) + d * cfg.vocab_size
    full = flop_model(model, 32)
    assert full["trainable_matmul_params"] == base_linear and full["frozen_matmul_params"] == 0
    adapted = attach_lora(model, LoraSettings(r=4, alpha=8), 0)
    lora = flop_model(adapted, 32)
    r = 4
    lora_weights = L * r * ((d + d) * 2 + (d + kv * head) * 2 + (d + f) * 2 + (f + d))
    assert lora["trainable_matmul_params"] == lora_weights
    assert lora["frozen_matmul_params"] == base_linear  # lm_head is not adapted and stays frozen
    assert lora["flops_per_token"] == 4 * base_linear + 6 * lora_weights + 12 * L * d * 32
    assert lora["flops_per_token"] < full["flops_per_token"]


def _write_result(ws, run_id: str, tokens_seen: int, seconds: float, base=MICRO_TINY, train=TRAIN, **extra):
    folder = ws / "runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    result = {"run_id": run_id, "kind": "adapter", "tokens": tokens_seen // 3, "tokens_seen": tokens_seen,
              "train_seconds": seconds, "eval_seconds": 1.5, "load_seconds": 0.25, "device": "cpu",
              "settings": {"base": base, "train": train, "lora": None}, **extra}
    (folder / "result.json").write_text(json.dumps(result))


def test_fit_over_finished_runs_recovers_fixed_and_per_token_time(tmp_path):
    ws = tmp_path / "ws"
    for i, n in enumerate((100_000, 200_000, 400_000, 800_000)):
        _write_result(ws, f"r{i}", n, 3.0 + 2e-5 * n, probes={"summary": {"seconds": 0.5}})
    _write_result(ws, "baseline", 0, 0.0, kind="baseline")
    _write_result(ws, "other", 100_000, 99.0, train={**TRAIN, "block_size": 32})
    pred = forecast.predict(ws, MICRO_TINY, TRAIN, 1_000_000)
    assert pred["source"] == "runs" and pred["runs"] == 4
    assert pred["fixed_seconds"] == pytest.approx(3.0, abs=1e-6)
    assert pred["per_token_seconds"] == pytest.approx(2e-5, rel=1e-6)
    steps, seen = forecast.trained_tokens(MICRO_TINY, TRAIN, 1_000_000)
    assert pred["train_seconds"] == pytest.approx(3.0 + 2e-5 * seen, abs=0.01)
    assert (pred["eval_seconds"], pred["load_seconds"]) == (2.0, 0.25)  # evaluation + probes
    assert pred["peak_memory_bytes"] is None  # only a calibration measures memory

    # the index remembers parsed files and notices a changed one
    assert (ws / "forecast" / "runs-index.json").is_file()
    _write_result(ws, "r0", 100_000, 13.0 + 2e-5 * 100_000)
    assert forecast.predict(ws, MICRO_TINY, TRAIN, 1_000_000)["fixed_seconds"] != pred["fixed_seconds"]

    # Jobs a warm worker ran after its first found everything loaded: the forecast, for one
    # corpus on its own, still counts a cold start's load. Runs from before `warm` was recorded
    # count as warm when their load was under 0.1 s.
    for i in range(5):
        _write_result(ws, f"warm{i}", 100_000, 5.0, load_seconds=0.3, warm=True)
        _write_result(ws, f"old-warm{i}", 100_000, 5.0, load_seconds=0.012)
    assert forecast.predict(ws, MICRO_TINY, TRAIN, 1_000_000)["load_seconds"] == 0.25
    # A recorded cold start counts whatever its length (a micro build is fast), and a baseline,
    # usually a worker's first job, counts for the load though it trained nothing.
    quick = tmp_path / "quick"
    _write_result(quick, "first", 0, 0.0, load_seconds=0.05, warm=False, kind="baseline")
    _write_result(quick, "second", 100_000, 5.0, load_seconds=0.01, warm=True)
    assert forecast.predict(quick, MICRO_TINY, TRAIN, 1_000_000)["load_seconds"] == 0.05


def test_runs_of_one_length_take_the_slope_from_the_calibration(tmp_path, tiny_battery):
    """Every micro run on a short corpus trains the same 1.2M-token floor: the runs then set the
    level and the calibration the slope."""
    ws = tmp_path / "ws"
    calib = _calibrate(ws, tiny_battery)
    per_token = 1.0 / calib["tokens_per_s"]
    for i in range(3):
        _write_result(ws, f"r{i}", 50_000, 5.0 + per_token * 50_000)
    pred = forecast.predict(ws, MICRO_TINY, TRAIN, 100_000)
    assert pred["source"] == "calibration+runs" and pred["runs"] == 3
    assert pred["fixed_seconds"] == pytest.approx(5.0, abs=1e-3)
    assert pred["per_token_seconds"] == pytest.approx(per_token)


def test_trained_tokens_follow_the_recipes_plan():
    """Whole steps, at least max(epochs × tokens, the token floor), less than a step more."""
    micro = {"base": "micro", "preset": "small"}
    train = {"min_train_tokens": 100_000, "epochs": 3, "micro_batch": 4, "grad_accum": 2, "block_size": 128}
    step = 4 * 2 * 128
    for tokens, wanted in ((2_600, 100_000), (2_600_000, 3 * 2_600_000)):  # a page: the floor; many: epochs
        steps, seen = forecast.trained_tokens(micro, train, tokens)
        assert seen == steps * step and wanted <= seen < wanted + step
    capped, _ = forecast.trained_tokens(micro, {**train, "max_steps": 7}, 2_600_000)
    assert capped == 7
    hf = {"base": "some/model"}
    steps, seen = forecast.trained_tokens(hf, {**train, "epochs": 2, "min_train_tokens": 0}, 600_000)
    assert seen == steps * step and 2 * 600_000 <= seen < 2 * 600_000 + step


def test_memory_warning_names_the_fix():
    hf = {"base": "org/13b", "quant": None}
    line = forecast.memory_fix(40e9, 30e9, hf, {"micro_batch": 4, "grad_accum": 4}, "GPU")
    assert "exceeds" in line and "--quant 4bit" in line and "--micro-batch 2 --grad-accum 8" in line
    assert "\n" not in line
    assert forecast.memory_fix(20e9, 30e9, hf, {}, "GPU") is None
    assert forecast.memory_fix(None, 30e9, hf, {}, "GPU") is None
    qlora = forecast.memory_fix(40e9, 30e9, {**hf, "quant": "4bit"}, {"micro_batch": 1}, "GPU")
    assert "--quant" not in qlora and "a smaller base" in qlora
    free, where = forecast.free_memory({"base": "micro", "device": "cpu"})
    assert where == "RAM" and free > 0


def test_the_fit_check_reads_the_card_a_job_asks_for_or_each_card(fake_nvml, monkeypatch):
    """On a box of two cards (the mock: 56 GiB free on card 0, 131 GiB on card 1), `cuda:N` is
    read on the N-th card CUDA shows, and a job that may go to any card (the queue starts it in
    the first free slot) on the one with the least memory free; a worker in a slot sees its one
    card as cuda:0 whatever it asked for."""
    from backend.core.devices import SLOT_ENV

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(SLOT_ENV, raising=False)
    gib = 2**30
    assert forecast.free_memory({"base": "micro", "device": "cuda:0"}) == (56 * gib, "GPU")
    assert forecast.free_memory({"base": "micro", "device": "cuda:1"}) == (131 * gib, "GPU")
    assert forecast.free_memory({"base": "micro"}) == (56 * gib, "GPU")
    assert forecast.device_tag({"base": "micro", "device": "cuda:1"}) == "cuda:NVIDIA H200"
    assert forecast.device_tag({"base": "micro", "device": "cuda:0"}) == "cuda:NVIDIA RTX PRO 6000 Blackwell"

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the second card alone, as cuda:0
    assert forecast.free_memory({"base": "micro"}) == (131 * gib, "GPU")
    assert forecast.free_memory({"base": "micro", "device": "cuda:0"}) == (131 * gib, "GPU")
    assert forecast.free_memory({"base": "micro", "device": "cuda:1"}) == (None, "GPU")  # no such card here
    assert forecast.device_tag({"base": "micro", "device": "cuda:0"}) == "cuda:NVIDIA H200"

    # as CUDA reads it: a number from its entry's leading digits, up to the first entry that
    # names no card; a unique prefix of a UUID, up to the first entry of another kind
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1a,0,7")
    assert forecast.free_memory({"base": "micro", "device": "cuda:1"}) == (56 * gib, "GPU")
    assert forecast.free_memory({"base": "micro", "device": "cuda:2"}) == (None, "GPU")
    assert forecast.device_tag({"base": "micro"}) == "cuda:NVIDIA H200"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{fake_nvml.uuid(1)[:12]},0")
    assert forecast.free_memory({"base": "micro", "device": "cuda:0"}) == (131 * gib, "GPU")
    assert forecast.free_memory({"base": "micro", "device": "cuda:1"}) == (None, "GPU")

    monkeypatch.setenv(SLOT_ENV, "1")  # a worker the service put on card 1 for a run asking cuda:1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert forecast.device_tag({"base": "micro", "device": "cuda:1"}) == "cuda:NVIDIA H200"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no card shown: the CPU
    assert forecast.device_tag({"base": "micro", "device": "cuda:1"}).startswith("cpu:")


def test_a_peak_above_the_free_memory_fits_where_the_smallest_step_does(tmp_path):
    """A calibration on a card fills it, so its peak says what the step took, not what the job
    needs: with less free now, a base whose smallest step (micro-batch 1, checkpointed) fits is
    not flagged; one whose smallest step does not fit is, with the 4-bit fix; a base whose
    config is not here is judged by the peak alone."""
    from backend.studies import memory_plan

    folder = tmp_path / "Llama-3-8B"
    folder.mkdir()
    config = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False,
              "max_position_embeddings": 8192}
    (folder / "config.json").write_text(json.dumps(config))
    base = {"base": str(folder), "quant": None}
    least = forecast.least_peak_bytes(base, {})
    assert least == memory_plan.plan(config, micro_batch=1, block_size=512, grad_checkpointing=True,
                                     device="cuda", packed_documents=True).peak
    assert least < memory_plan.plan(config, micro_batch=16, block_size=512, device="cuda").peak
    calibrated = 80e9  # the step the calibration fitted to a 96 GB card
    assert forecast.memory_fix(calibrated, least + 1e9, base, {}, "GPU") is None
    line = forecast.memory_fix(calibrated, least - 1e9, base, {}, "GPU")
    assert "exceeds" in line and "--quant 4bit" in line
    assert forecast.memory_fix(calibrated, least + 1e9, base, {"grad_checkpointing": "off"}, "GPU")  # as asked
    assert forecast.memory_fix(calibrated, least + 1e9, {"base": "org/not-here"}, {}, "GPU")
    assert forecast.least_peak_bytes({"base": "micro"}, {}) is None


@pytest.mark.slow
def test_estimate_command_answers_in_json_then_from_the_cache(tmp_path, tiny_battery):
    ws = tmp_path / "ws"
    args = ("estimate", "--workspace", str(ws), "--preset", "tiny", "--device", "cpu", "--pages", "1,10,2.5",
            "--calibration-steps", "2", "--scenes", str(tiny_battery), "--block-size", "64", "--micro-batch", "4")
    first = cli(*args, "--format", "json")
    assert first.returncode == 0, first.stderr
    rows = json.loads(first.stdout)
    assert [r["pages"] for r in rows] == [1, 10, 2.5]
    want = {"pages", "tokens", "load_seconds", "train_seconds", "eval_seconds", "total_seconds", "peak_memory_bytes"}
    for r in rows:
        assert want <= set(r) and r["source"] == "calibration" and r["peak_memory_bytes"] > 0
        # the keys of a `--gpu` row too, the same numbers
        assert r["peak_memory_gb"] == round(r["peak_memory_bytes"] / 1e9, 2) and r["total_s"] == round(r["total_seconds"], 1)
        assert r["fits"] is (r["peak_memory_bytes"] <= r["free_memory_bytes"])
    assert rows[1]["tokens"] == pytest.approx(10 * rows[0]["tokens"], abs=10)
    assert rows[0]["trained_tokens"] == rows[1]["trained_tokens"]  # both under the 1.2M-token floor

    table = cli(*args)
    assert table.returncode == 0, table.stderr
    assert "calibrating" not in table.stderr  # the cached calibration answered
    out = table.stdout
    assert "tokens/s" in out and "MFU" in out and "FLOP model" in out and "no finished runs" in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("1 ", "10 ", "2.5 "))]) == 3

    bad = cli("estimate", "--workspace", str(ws), "--pages", "ten")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--pages" in bad.stderr


def test_run_prints_the_forecast_before_queueing(tmp_path, tiny_battery, corpora, capsys):
    from backend.jobs.settings import JobSettings
    from ltm_tui.cli.estimate import forecast_before_queueing

    ws = tmp_path / "ws"
    settings = JobSettings(base=MICRO_TINY, scenes=str(tiny_battery), train=TRAIN)
    forecast_before_queueing(ws, settings, [str(corpora["logic"])])
    assert "`ltm-tui estimate` measures one" in capsys.readouterr().err
    _calibrate(ws, tiny_battery)
    forecast_before_queueing(ws, settings, [str(corpora["logic"]), str(corpora["story"])])
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("forecast logic.txt (") and "train " in err[0] and "peak " in err[0]
    assert err[1].startswith("forecast story.txt (") and len(err) == 2


def test_settings_in_use_puts_the_most_common_base_and_shape_first(tmp_path):
    ws = tmp_path / "ws"
    small = {**MICRO_TINY, "preset": "small"}
    for i in range(3):
        _write_result(ws, f"tiny{i}", 50_000, 5.0)
    for i in range(2):
        _write_result(ws, f"tiny-long{i}", 50_000, 5.0, train={**TRAIN, "max_steps": 40})  # same shape, longer
        _write_result(ws, f"tiny32-{i}", 50_000, 5.0, train={**TRAIN, "block_size": 32})
    for i in range(4):
        _write_result(ws, f"small{i}", 50_000, 5.0, base=small)
    _write_result(ws, "baseline", 0, 0.0, kind="baseline", base=small)  # trains nothing: not counted
    groups = forecast.settings_in_use(ws)
    # tiny has 7 runs, small 4: tiny's shapes first, its block-64 one (5 runs) before block 32 (2)
    assert [(g["base"]["preset"], g["train"]["block_size"], g["runs"]) for g in groups] == [
        ("tiny", 64, 5), ("tiny", 32, 2), ("small", 64, 4)]
    assert groups[0]["train"] == TRAIN  # what 3 of its 5 runs had


def test_estimate_forecasts_for_the_finished_runs_settings_and_names_them_otherwise(tmp_path, tiny_battery):
    """Seven finished `tiny` runs: `estimate` with no flag forecasts for their settings and fits
    them; asked for other settings it says which settings the finished runs had."""
    from backend.compute.estimate import calibrate

    ws = tmp_path / "ws"
    _calibrate(ws, tiny_battery)
    other = {**TRAIN, "block_size": 32}
    calibrate(ws, MICRO_TINY, other, steps=2, warm=1, scenes=tiny_battery / "heldout.yaml")
    for i, tokens in enumerate((50_000, 100_000, 150_000, 200_000, 250_000, 300_000, 350_000)):
        _write_result(ws, f"tiny{i}", tokens, 2.0 + 1e-5 * tokens)
    scenes = ("--scenes", str(tiny_battery))

    plain = cli("estimate", "--workspace", str(ws), "--pages", "1", *scenes)
    assert plain.returncode == 0, plain.stderr
    first = plain.stdout.splitlines()[0]
    assert first.startswith("forecast for --preset tiny --block-size 64 --micro-batch 4 --epochs 1 "
                            "--min-train-tokens 0: the settings of 7 of the 7 finished run(s)")
    assert "fit over 7 finished run(s) with these settings" in plain.stdout
    assert "no finished runs" not in plain.stdout and "calibrating" not in plain.stderr

    chosen = cli("estimate", "--workspace", str(ws), "--pages", "1", "--preset", "tiny", "--device", "cpu",
                 "--block-size", "32", "--micro-batch", "4", "--min-train-tokens", "0", *scenes)
    assert chosen.returncode == 0, chosen.stderr
    assert "forecast for" not in chosen.stdout  # the flags chose
    hint = [line for line in chosen.stdout.splitlines() if line.startswith("no finished runs")]
    assert len(hint) == 1 and "7 finished run(s) here had --preset tiny --block-size 64" in hint[0]

    as_json = cli("estimate", "--workspace", str(ws), "--pages", "1", "--format", "json", *scenes)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)[0]["runs"] == 7
    assert as_json.stderr.startswith("forecast for --preset tiny")


def test_the_fit_check_counts_the_workspaces_own_workers_as_free(tmp_path, tiny_battery, fake_nvml, monkeypatch):
    """While this workspace's warm worker holds 30 GiB of the card, a new job may use them: the
    queue runs one job a slot. Memory of processes that are not its workers stays taken. The
    worker is real (a run training in the real service); NVML is the mock, told its pid."""
    from dataclasses import asdict

    from backend.core.config import MICRO_DEFAULTS
    from backend.core.workspace import Workspace
    from backend.jobs.client import connect
    from backend.jobs.settings import JobSettings
    from tests.conftest import LOGIC_TEXT, stop_service, wait_for

    ws = Workspace(tmp_path / "ws")
    corpus = tmp_path / "long.txt"
    corpus.write_text(LOGIC_TEXT, encoding="utf-8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # the fake card (the job itself trains on the CPU)
    gpu = {"base": "micro", "device": "cuda"}
    card_free = 56 * 2**30  # the fake card: 96 GiB, 40 used
    assert forecast.free_memory(gpu, ws) == (card_free, "GPU")  # no service: nothing of ours
    train = {**MICRO_DEFAULTS.to_dict(), "min_train_tokens": 10**9}  # trains until cancelled
    train.pop("seed", None)
    settings = JobSettings(base={"base": "micro", "preset": "tiny", "device": "cpu"}, scenes=str(tiny_battery),
                           train=train)
    try:
        with connect(ws) as client:
            run_id = client.call("submit", paths=[str(corpus)], settings=asdict(settings), seeds=[0])["run_ids"][0]
            workers = wait_for(lambda: client.call("workers"), what="a live worker")
            assert run_id in workers[0]["runs"]
            fake_nvml.processes = [(workers[0]["pid"], 30 * 2**30), (999_999, 8 * 2**30)]  # ours, and another's
            assert forecast.free_memory(gpu, ws) == (card_free + 30 * 2**30, "GPU")
            assert forecast.free_memory(gpu) == (card_free, "GPU")  # without the workspace: the card's own free
            client.call("cancel", run_id=run_id)
    finally:
        stop_service(ws.root)


def test_cuda_n_is_the_n_th_card_of_the_service_that_runs_the_job(tmp_path, fake_nvml, monkeypatch):
    """`--device cuda:0` names the first card of the job service (its workers get its cards),
    not of the shell that asks. A service started where CUDA_VISIBLE_DEVICES=1 runs cuda:0 on
    the H200; a shell that sees both cards, or none, checks the H200 for it too: its free memory,
    and the card name a calibration is filed under. Without a service, the shell's own view."""
    from backend.core.workspace import Workspace
    from backend.jobs.client import connect
    from tests.conftest import stop_service

    ws = Workspace(tmp_path / "ws")
    gib = 2**30
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the service starts with this (no NVML in it)
    try:
        with connect(ws) as client:
            assert client.call("cards") == ["1"]
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
        job = {"base": "micro", "device": "cuda:0"}
        assert forecast.free_memory(job) == (56 * gib, "GPU")  # this shell's cuda:0
        assert forecast.free_memory(job, ws) == (131 * gib, "GPU")  # the service's cuda:0
        assert forecast.device_tag(job) == "cuda:NVIDIA RTX PRO 6000 Blackwell"
        assert forecast.device_tag(job, ws) == "cuda:NVIDIA H200"
        assert forecast.free_memory({"base": "micro", "device": "cuda:1"}, ws) == (None, "GPU")  # it has one
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a shell that sees no card
        assert forecast.free_memory({"base": "micro"})[1] == "RAM"  # alone, it would check the host's RAM
        assert forecast.free_memory({"base": "micro"}, ws) == (131 * gib, "GPU")
    finally:
        stop_service(ws.root)
