"""`ltm-tui estimate --gpu`: the plan for a card that is not here, from a folder holding only a
config.json, through the real command line (no weights, no tokenizer, no torch)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from backend.studies import forecast, gpu_projection, memory_plan
from tests.conftest import REPO, cli

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False,
             "max_position_embeddings": 8192, "rope_theta": 500000.0, "torch_dtype": "bfloat16"}
LLAMA2_13B = {**LLAMA3_8B, "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
              "num_key_value_heads": 40, "intermediate_size": 13824, "vocab_size": 32000,
              "max_position_embeddings": 4096}


def _folder(root, name: str, config: dict):
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _rows(*args: str) -> list[dict]:
    out = cli("estimate", *args, "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_json_rows_for_a_card_from_a_config_alone(tmp_path):
    base = _folder(tmp_path, "llama-3-8b", LLAMA3_8B)
    ws = str(tmp_path / "ws")
    rows = _rows("--base", str(base), "--gpu", "RTX PRO 6000", "--pages", "1,10,100,1000", "--workspace", ws)
    assert [r["pages"] for r in rows] == [1, 10, 100, 1000]
    for r in rows:
        assert r["source"] == "projection" and r["fits"] is True and r["gpu"] == "RTX PRO 6000 Blackwell"
        assert r["micro_batch"] * r["grad_accum"] == 16  # the effective batch of the LoRA defaults, kept
    # the peak is the plan's for the step the card gets
    first = rows[0]
    step = memory_plan.plan(LLAMA3_8B, micro_batch=first["micro_batch"], grad_checkpointing=first["grad_checkpointing"],
                            block_size=512, attention="sdpa", packed_documents=True)
    assert first["peak_memory_gb"] == round(step.peak / 1e9, 2) <= 96 * memory_plan.GiB / 1e9
    # pages become tokens as the on-device forecast makes them; small corpora train the token floor
    assert [r["tokens"] for r in rows] == [forecast.tokens_for_pages(ws, {"base": str(base)}, None, p)
                                           for p in (1, 10, 100, 1000)]
    assert rows[0]["trained_tokens"] == rows[1]["trained_tokens"] < rows[3]["trained_tokens"]
    assert rows[0]["total_s"] < rows[3]["total_s"]
    # checkpointing fixed by flag: the worker fits nothing then, so neither does the projection:
    # the asked micro-batch (the defaults'), unchecked, and that step's peak
    unchecked = _rows("--base", str(base), "--gpu", "RTX PRO 6000", "--pages", "10", "--block-size", "2048",
                      "--grad-checkpointing", "off", "--workspace", ws)[0]
    asked = forecast.resolved_train({"base": str(base)}, {"block_size": 2048})
    assert unchecked["grad_checkpointing"] is False
    assert (unchecked["micro_batch"], unchecked["grad_accum"]) == (asked.micro_batch, asked.grad_accum)
    plan_of = memory_plan.plan(LLAMA3_8B, micro_batch=asked.micro_batch, block_size=2048,
                               attention="sdpa", packed_documents=True)
    assert unchecked["peak_memory_gb"] == round(plan_of.peak / 1e9, 2)
    # the same job on an H100 (twice the datasheet peak, same assumed MFU) takes about half as long
    h100 = _rows("--base", str(base), "--gpu", "h100", "--pages", "1000", "--workspace", ws)[0]
    assert h100["total_s"] == pytest.approx(rows[3]["total_s"] * 503.8 / 989.4, rel=0.02)


def test_13b_in_bf16_does_not_fit_a_4090_and_in_4bit_it_does(tmp_path):
    base = _folder(tmp_path, "llama-2-13b", LLAMA2_13B)
    ws = str(tmp_path / "ws")
    bf16 = _rows("--base", str(base), "--gpu", "RTX 4090", "--pages", "10", "--workspace", ws)[0]
    assert bf16["fits"] is False and bf16["peak_memory_gb"] > 26  # the bf16 weights alone are 26 GB
    assert (bf16["grad_checkpointing"], bf16["micro_batch"]) == (True, 1)  # the smallest step was tried
    nf4 = _rows("--base", str(base), "--gpu", "geforce rtx-4090", "--quant", "4bit", "--pages", "10",
                "--workspace", ws)[0]
    assert nf4["fits"] is True and nf4["peak_memory_gb"] < 24 * memory_plan.GiB / 1e9
    table = cli("estimate", "--base", str(base), "--gpu", "4090", "--pages", "10", "--workspace", ws)
    assert table.returncode == 0, table.stderr
    assert "PROJECTION" in table.stdout and "assumed 40%" in table.stdout
    assert "does NOT fit" in table.stdout and "use --quant 4bit" in table.stdout


def test_a_calibration_on_the_card_replaces_the_assumption(tmp_path):
    base = _folder(tmp_path, "llama-3-8b", LLAMA3_8B)
    ws = tmp_path / "ws"
    card = gpu_projection.find_gpu("H100")
    (ws / "forecast").mkdir(parents=True)
    other = {"device_tag": "cuda:NVIDIA H100 80GB HBM3", "base": {"base": "elsewhere", "quant": None},
             "key": "elsewhere|None|None|512|4|4", "achieved_flops_per_s": 0.5 * card.bf16_flops}
    (ws / "forecast" / "calib-a.json").write_text(json.dumps(other))
    assumed = _rows("--base", str(base), "--gpu", "RTX PRO 6000", "--pages", "100", "--workspace", str(ws))[0]
    measured_mfu = _rows("--base", str(base), "--gpu", "H100", "--pages", "100", "--workspace", str(ws))[0]
    assert assumed["mfu"] == 0.4 and measured_mfu["mfu"] == 0.5 and measured_mfu["source"] == "projection"
    table = cli("estimate", "--base", str(base), "--gpu", "H100", "--pages", "100", "--workspace", str(ws))
    assert "measured on this card (1 calibration(s) in the workspace)" in table.stdout
    # a calibration on the card with these very settings: its own speed and peak, "measured"
    same = {**other, "key": forecast.settings_key({"base": str(base)}, None), "tokens_per_s": 5000.0,
            "warmup_seconds": 3.0, "peak_memory_bytes": 41_000_000_000}
    (ws / "forecast" / "calib-b.json").write_text(json.dumps(same))
    row = _rows("--base", str(base), "--gpu", "H100", "--pages", "100", "--workspace", str(ws))[0]
    assert row["source"] == "measured" and row["peak_memory_gb"] == 41.0
    assert row["total_s"] == pytest.approx(3.0 + row["trained_tokens"] / 5000.0, abs=0.1)


def test_a_checkpointed_calibration_is_not_charged_its_recomputation_twice(tmp_path):
    """A calibration whose steps checkpointed ran slower for the recomputed forward pass. The
    projection counts that pass in a checkpointed job's FLOPs, so the rate it divides by counts
    it too: a job like the calibration's is projected at the calibration's own speed, not at
    its speed once more slowed by the recomputation."""
    ws = tmp_path / "ws"
    card = gpu_projection.find_gpu("H100")
    (ws / "forecast").mkdir(parents=True)
    parts = {"trainable_matmul_params": 40_000_000, "frozen_matmul_params": 7_000_000_000,
             "attention_flops": 12 * 32 * 4096 * 4096}
    model_flops = 6 * parts["trainable_matmul_params"] + 4 * parts["frozen_matmul_params"] + parts["attention_flops"]
    tokens_per_s = 0.3 * card.bf16_flops / model_flops  # what the calibration measured
    calib = {"device_tag": "cuda:NVIDIA H100 80GB HBM3", "base": {"base": "x", "quant": None}, **parts,
             "flops_per_token": model_flops, "achieved_flops_per_s": model_flops * tokens_per_s,
             "grad_checkpointing_used": True}
    (ws / "forecast" / "calib-a.json").write_text(json.dumps(calib))
    mfu, _ = gpu_projection.mfu_for(ws, card, None)
    recompute = 2 * (parts["trainable_matmul_params"] + parts["frozen_matmul_params"]) + parts["attention_flops"] // 3
    job_flops = model_flops + recompute  # a checkpointed job's FLOPs a token (`flops_per_token`)
    assert job_flops / (card.bf16_flops * mfu) == pytest.approx(1 / tokens_per_s, rel=1e-9)
    (ws / "forecast" / "calib-a.json").write_text(json.dumps({**calib, "grad_checkpointing_used": False}))
    assert gpu_projection.mfu_for(ws, card, None)[0] == pytest.approx(0.3)


@pytest.mark.parametrize("name, card", [
    ("RTX PRO 6000", "RTX PRO 6000 Blackwell"),
    ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "RTX PRO 6000 Blackwell"),  # NVML's names
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("h100", "H100 SXM"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("a100", "A100 80GB"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
])
def test_card_names_match_loosely_as_people_and_nvml_write_them(name, card):
    # a calibration's device tag carries NVML's name: this is how it is matched to --gpu
    assert gpu_projection.find_gpu(name).name == card


@pytest.mark.parametrize("name", ["A10", "H20", "L40", "100", "RTX A1000", "RTX 6000", ""])
def test_a_card_that_is_only_part_of_a_known_name_is_not_that_card(name, tmp_path):
    # an A10 (24 GB) read as an A100 (80 GB) would be told that an 8B LoRA fits
    base = _folder(tmp_path, "llama-3-8b", LLAMA3_8B)
    out = cli("estimate", "--base", str(base), "--gpu", name, "--workspace", str(tmp_path / "ws"))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"ltm-tui: usage: unknown --gpu {name!r}; known cards:")


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    # `ltm-tui estimate ... | head -1`: the reader is gone before the rows are written
    base = _folder(tmp_path, "llama-3-8b", LLAMA3_8B)
    proc = subprocess.Popen([sys.executable, "-m", "ltm_tui.cli", "estimate", "--base", str(base), "--gpu", "H200",
                             "--workspace", str(tmp_path / "ws"), "--format", "json"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""


def test_an_unknown_card_or_a_missing_config_is_one_line(tmp_path):
    base = _folder(tmp_path, "llama-3-8b", LLAMA3_8B)
    out = cli("estimate", "--base", str(base), "--gpu", "V100", "--workspace", str(tmp_path / "ws"))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "ltm-tui: usage: unknown --gpu 'V100'; known cards: H100 SXM, H100 PCIe, H200, B200, "
        "RTX PRO 6000 Blackwell, A100 80GB, A100 40GB, L40S, RTX 4090"]
    out = cli("estimate", "--base", str(tmp_path), "--gpu", "H200", "--workspace", str(tmp_path / "ws"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "no config.json in this folder" in out.stderr


def test_the_card_path_never_imports_torch_or_reads_more_than_the_config(tmp_path):
    base = _folder(tmp_path, "llama-3-8b", LLAMA3_8B)
    code = (
        "import json, sys; from ltm_tui.cli import main; "
        f"rc = main(['estimate', '--base', {str(base)!r}, '--gpu', 'H200', '--quant', '4bit', "
        f"'--workspace', {str(tmp_path / 'ws')!r}, '--format', 'json']); "
        "print(json.dumps({'rc': rc, 'heavy': sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', "
        "'safetensors') if m in sys.modules)}), file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    report = json.loads(out.stderr.strip().splitlines()[-1])
    assert report == {"rc": 0, "heavy": []}
    assert json.loads(out.stdout)[0]["fits"] is True
    assert sorted(p.name for p in base.iterdir()) == ["config.json"]  # nothing written beside it either
