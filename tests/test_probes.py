"""Probes: known cases on hand-built tensors and tiny real models, the store, and end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from backend.compute.models import BaseSpec, ByteTokenizer, build_micro, load_base
from backend.compute.probes import (
    _first_for_good,
    attention_sums,
    linear_cka,
    lora_weight_change,
    matrix_stats,
    run_probes,
)
from backend.core.errors import JobError
from backend.jobs.store import Store
from backend.scoring.scenes import load_batteries
from tests.conftest import cli

CPU = torch.device("cpu")


def _peft(tiny_hf_model, r: int = 4):
    from peft import LoraConfig, get_peft_model

    model, tok, device = load_base(BaseSpec(base=str(tiny_hf_model), device="cpu"))
    config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules="all-linear")
    return get_peft_model(model, config), tok, device


# --- weight change -------------------------------------------------------------------------


def test_rank_one_matrix_has_effective_and_stable_rank_one():
    u, v = torch.randn(40, generator=torch.Generator().manual_seed(1)), torch.randn(30)
    delta = torch.outer(u, v)
    stats = matrix_stats(torch.linalg.svdvals(delta), delta.shape)
    assert stats["effective_rank"] == pytest.approx(1.0, abs=1e-9)
    assert stats["stable_rank"] == pytest.approx(1.0, abs=1e-6)
    assert stats["norm"] == pytest.approx(float(u.norm() * v.norm()), rel=1e-5)
    # four equal directions: effective rank 4, stable rank 4
    eye = torch.eye(4)
    stats = matrix_stats(torch.linalg.svdvals(eye), eye.shape)
    assert stats["effective_rank"] == pytest.approx(4.0) and stats["stable_rank"] == pytest.approx(4.0)
    zero = matrix_stats(torch.zeros(3), (3, 3))
    assert zero == {"norm": 0.0, "stable_rank": 0.0, "effective_rank": 0.0, "singular_values": []}


def test_rank_one_lora_update_has_effective_rank_one(tiny_hf_model):
    model, _, _ = _peft(tiny_hf_model, r=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                a = module.lora_A["default"].weight
                b = module.lora_B["default"].weight
                # every row of A the same direction: B·A has rank 1 whatever B is
                a.copy_(torch.outer(torch.randn(a.shape[0], generator=g), torch.randn(a.shape[1], generator=g)))
                b.copy_(torch.randn(b.shape, generator=g))
    entries = lora_weight_change(model)
    assert len(entries) == 2 * 7  # q k v o gate up down in each of 2 layers
    for e in entries:
        assert e["effective_rank"] == pytest.approx(1.0, abs=1e-6), e["module"]
        assert e["stable_rank"] == pytest.approx(1.0, abs=1e-4)
    # the norm is that of scaling · B·A formed in full
    module = model.base_model.model.model.layers[1].mlp.down_proj
    full = (module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight).detach()
    entry = next(e for e in entries if e["module"] == "model.layers.1.mlp.down_proj")
    assert entry["norm"] == pytest.approx(float(full.norm()), rel=1e-5)
    assert entry["layer"] == 1 and entry["kind"] == "down_proj" and entry["shape"] == list(full.shape)
    assert entry["rel_norm"] == pytest.approx(entry["norm"] / float(module.base_layer.weight.norm()), rel=1e-6)


# --- attention -----------------------------------------------------------------------------


def _causal_uniform(t: int) -> torch.Tensor:
    return torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]


def _on_previous(t: int) -> torch.Tensor:
    a = torch.zeros(t, t)
    a[0, 0] = 1.0
    for i in range(1, t):
        a[i, i - 1] = 1.0
    return a


def test_hand_built_attention_gives_the_computed_statistics():
    t = 5
    # batch of two: the second sequence is 3 long; its padded rows hold garbage that must not count
    base = torch.stack([_causal_uniform(t), _on_previous(t)])[None].repeat(2, 1, 1, 1)
    base[1, :, 3:, :] = 7.0
    sums = attention_sums(base, base.clone(), [t, 3])
    rows = (t - 1) + (3 - 1)
    assert sums["rows"].tolist() == [rows, rows]
    # head 0, uniform over t+1 keys at query t: entropy log(t+1), previous and first share 1/(t+1)
    queries = list(range(1, t)) + [1, 2]
    entropy = sum(math.log(q + 1) for q in queries) / rows
    share = sum(1 / (q + 1) for q in queries) / rows
    mean = {k: (v / sums["rows"]).tolist() for k, v in sums.items() if k != "rows"}
    assert mean["entropy_base"][0] == pytest.approx(entropy)
    assert mean["prev_base"][0] == pytest.approx(share) and mean["first_base"][0] == pytest.approx(share)
    # head 1, all on the previous token: entropy 0, previous share 1, first share only at query 1
    assert mean["entropy_base"][1] == pytest.approx(0.0) and mean["prev_base"][1] == pytest.approx(1.0)
    assert mean["first_base"][1] == pytest.approx(2 / rows)
    assert mean["js"] == [0.0, 0.0]  # the same maps: distance 0

    # two maps that differ, on one row: p = [.5, .5], q = [1, 0]
    p2 = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    q2 = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    m = [0.75, 0.25]
    jsd = 0.5 * (0.5 * math.log2(0.5 / m[0]) + 0.5 * math.log2(0.5 / m[1])) + 0.5 * math.log2(1 / m[0])
    out = attention_sums(p2, q2, [2])
    assert float(out["js"][0]) == pytest.approx(math.sqrt(jsd))
    assert float(out["entropy_base"][0]) == pytest.approx(math.log(2))
    assert float(out["entropy_adapter"][0]) == pytest.approx(0.0)


# --- drift ---------------------------------------------------------------------------------


def test_linear_cka_is_one_under_rotation_and_scale_and_low_for_unrelated():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, 3.0 * x @ q + 2.0) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x[:10], x[:10] @ q) == pytest.approx(1.0, abs=1e-9)  # the n < d form
    assert linear_cka(x, torch.randn(300, 16, generator=g)) < 0.2
    assert linear_cka(x, torch.ones(300, 16)) is None  # no variance: no answer


def test_first_depth_that_keeps_the_answer():
    assert _first_for_good([False, True, False, True, True]) == 3
    assert _first_for_good([True, True, True]) == 0
    assert _first_for_good([True, False]) is None


# --- whole probe pass on real tiny models --------------------------------------------------


def _check_no_change(probes: dict, layers: int, heads: int) -> None:
    s = probes["summary"]
    assert s["weight_change"] == 0.0
    assert all(e["norm"] == 0.0 for e in probes["weight"])
    assert len(probes["cka"]) == layers + 1
    assert all(v == pytest.approx(1.0, abs=1e-9) for v in probes["cka"])
    js = probes["attention"]["js"]
    assert len(js) == layers and all(len(row) == heads for row in js)
    assert all(v == 0.0 for row in js for v in row)
    assert all(v == 0.0 for row in probes["attention"]["entropy_delta"] for v in row)
    assert s["drift_layer"] is None and s["min_cka"] == pytest.approx(1.0)
    assert s["lens_layer_base"] == s["lens_layer_adapter"]


def test_zero_lora_update_changes_nothing(tiny_hf_model, tiny_battery):
    model, tok, device = _peft(tiny_hf_model)  # PEFT starts B at zero: the update is zero
    model.train()
    probes = run_probes(model, tok, load_batteries(tiny_battery), device=device)
    assert probes["method"] == "lora" and len(probes["weight"]) == 14
    _check_no_change(probes, layers=2, heads=4)
    # the probe pass leaves the model as it found it: sdpa attention, training mode
    assert model.get_base_model().config._attn_implementation == "sdpa"
    assert model.training


def test_micro_against_its_own_initialisation_changes_nothing(tiny_battery):
    a, b = build_micro("tiny", 5, CPU), build_micro("tiny", 5, CPU)
    probes = run_probes(a, ByteTokenizer(), load_batteries(tiny_battery), device=CPU, base=b)
    assert probes["method"] == "full"
    _check_no_change(probes, layers=2, heads=4)
    # a different initialisation is a change everywhere
    other = run_probes(build_micro("tiny", 6, CPU), ByteTokenizer(), load_batteries(tiny_battery), device=CPU, base=b)
    assert other["summary"]["weight_change"] > 1.0
    assert other["summary"]["min_cka"] < 0.99 and other["summary"]["attn_js"] > 0


def test_lens_at_the_last_depth_is_the_models_own_choice(tiny_battery):
    """Read through the lens at the last depth, a network picks what evaluation picks."""
    from backend.compute.evaluate import evaluate_battery

    tok = ByteTokenizer()
    battery = load_batteries(tiny_battery)
    for seed in (0, 1, 2):
        model, base = build_micro("tiny", seed, CPU), build_micro("tiny", seed + 10, CPU)
        probes = run_probes(model, tok, battery, device=CPU, base=base)
        picked = {r["scene_id"]: r["detail"]["pred"] == r["detail"]["answer"]
                  for r in evaluate_battery(model, tok, battery[0], device=CPU) if r["kind"] == "choice"}
        lens = {r["scene_id"]: r["adapter"]["prefers"][-1] for r in probes["logit_lens"]["scenes"]}
        assert lens == picked
        assert all(len(r["adapter"]["prefers"]) == 3 for r in probes["logit_lens"]["scenes"])


# --- the store -----------------------------------------------------------------------------


def test_store_keeps_probes_and_says_why_a_run_has_none(tmp_path, tiny_battery):
    probes = run_probes(build_micro("tiny", 1, CPU), ByteTokenizer(), load_batteries(tiny_battery),
                        device=CPU, base=build_micro("tiny", 0, CPU))
    with Store(tmp_path / "ltm.duckdb") as store:
        assert "004_probes" in store.applied_migrations()
        for run_id, kind in (("a", "adapter"), ("b", "baseline"), ("c", "adapter"), ("d", "adapter")):
            store.create_run(run_id, kind=kind, base="micro", settings={})
        for run_id in ("a", "b", "c", "d"):
            for state in ("starting", "training", "evaluating"):
                store.transition(run_id, state)
        store.ingest_result("a", {"overall": 0.5, "probes": json.loads(json.dumps(probes))})
        store.ingest_result("b", {"overall": 0.1, "probes": None})
        store.ingest_result("c", {"overall": 0.2})
        store.ingest_result("d", {"overall": 0.3, "probes": {"error": "RuntimeError: boom"}})
        for run_id in ("a", "b", "c", "d"):
            store.transition(run_id, "done")
        rows = {r["run_id"]: r for r in store.results()}
        assert rows["a"]["weight_change"] == pytest.approx(probes["summary"]["weight_change"])
        assert rows["a"]["attn_entropy_change"] == pytest.approx(probes["summary"]["attn_entropy_change"])
        assert rows["a"]["drift_layer"] == probes["summary"]["drift_layer"]
        assert rows["b"]["weight_change"] is None and rows["d"]["weight_change"] is None
        assert [r["run_id"] for r in store.results(sort="weight_change")][0] == "a"
        stored = store.probes("a")
        assert stored["run_id"] == "a" and stored["cka"] == probes["cka"]
        assert stored["attention"]["entropy_delta"] == probes["attention"]["entropy_delta"]
        assert store.probes("d") == {"run_id": "d", "error": "RuntimeError: boom"}
        with pytest.raises(JobError, match="baseline"):
            store.probes("b")
        with pytest.raises(JobError, match="--no-probes"):
            store.probes("c")
        with pytest.raises(JobError, match="no run ghost"):
            store.probes("ghost")


# --- end to end ----------------------------------------------------------------------------

TINY = ["--preset", "tiny", "--steps", "30", "--block-size", "64", "--micro-batch", "8",
        "--min-train-tokens", "0", "--epochs", "50", "--quiet", "--format", "json"]


@pytest.mark.slow
def test_a_real_run_stores_probes_and_the_cli_prints_them(tmp_path, corpora, tiny_battery, tiny_hf_model, finished):
    shared = finished.ws  # the session's micro runs, probed as `ltm-tui run` does by default
    done = cli("results", "--format", "json", "--workspace", str(shared))
    assert done.returncode == 0, done.stderr
    rows = {r["corpus"]: r for r in json.loads(done.stdout)}
    run, baseline = rows["logic.txt"], rows[None]
    assert run["weight_change"] > 0 and run["drift_layer"] in (0, 1, 2)
    assert isinstance(run["attn_entropy_change"], float)
    assert baseline["weight_change"] is None

    shown = cli("probes", run["run_id"], "--format", "json", "--workspace", str(shared))
    assert shown.returncode == 0, shown.stderr
    probes = json.loads(shown.stdout)
    assert probes["run_id"] == run["run_id"] and probes["method"] == "full"
    assert probes["summary"]["weight_change"] == pytest.approx(run["weight_change"])
    assert len(probes["cka"]) == 3 and len(probes["attention"]["entropy_delta"]) == 2
    assert all(len(row) == 4 for row in probes["attention"]["js"])
    assert {e["module"] for e in probes["weight"]} >= {"model.layers.0.self_attn.q_proj", "model.embed_tokens"}
    assert [s["scene_id"] for s in probes["logit_lens"]["scenes"]] == ["d1", "d2"]
    # the same in the result file the worker wrote
    result = json.loads((shared / "runs" / run["run_id"] / "result.json").read_text())
    assert result["probes"]["cka"] == probes["cka"]

    table = cli("probes", run["run_id"], "--workspace", str(shared))
    assert table.returncode == 0 and "drift layer" in table.stdout and "largest updates" in table.stdout

    refused = cli("probes", baseline["run_id"], "--workspace", str(shared))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "baseline" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1

    # --no-probes: the run is stored without them, and `probes` says why
    ws = tmp_path / "ws"
    off = cli("run", str(corpora["story"]), "--scenes", str(tiny_battery), "--workspace", str(ws),
              "--no-probes", *TINY)
    assert off.returncode == 0, off.stderr
    story = next(r for r in json.loads(off.stdout) if r["corpus"] == "story.txt")
    assert story["weight_change"] is None
    why = cli("probes", story["run_id"], "--workspace", str(ws))
    assert why.returncode == 2 and "--no-probes" in why.stderr

    # an HF base: the LoRA update against the base with the adapter switched off
    hf = cli("run", str(corpora["logic"]), "--base", str(tiny_hf_model), "--scenes", str(tiny_battery),
             "--workspace", str(ws), "--steps", "3", "--block-size", "32", "--micro-batch", "4",
             "--grad-accum", "1", "--lr", "1e-2", "--lora-r", "4", "--quiet", "--format", "json")
    assert hf.returncode == 0, hf.stderr
    lora_run = next(r for r in json.loads(hf.stdout) if r["corpus"] == "logic.txt")
    lora = json.loads(cli("probes", lora_run["run_id"], "--format", "json", "--workspace", str(ws)).stdout)
    assert lora["method"] == "lora" and len(lora["weight"]) == 14
    assert lora["summary"]["weight_change"] > 0 and all(e["effective_rank"] <= 4.0 + 1e-6 for e in lora["weight"])
