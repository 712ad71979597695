"""The exported tables carry what the results table shows: the probes' summary (Δweights,
Δattn H, drift L) and every score's 95% interval, overall's included, in `ltm-tui export`'s CSV
(backend/jobs/store.py) and in `results --format csv` / `--format json`."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from backend.jobs.store import Store
from backend.scoring import measures
from tests.conftest import cli


def _choice(i: int, right: bool) -> dict:
    return {"battery": "depth", "scene_id": f"s{i}", "kind": "choice", "metric": "reasoning_depth",
            "score": float(right), "correct": right,
            "detail": {"depth": 1 + i % 2, "loglik": [0.0, -1.0], "answer": 0 if right else 1, "n_choices": 2}}


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    with Store(ws / "ltm.duckdb") as store:
        for run_id, kind, right, probes in (
            ("base", "baseline", 3, None),
            ("run-a", "adapter", 8, {"summary": {"weight_change": 1.25, "attn_entropy_change": -0.03, "drift_layer": 2}}),
        ):
            rows = [_choice(i, i < right) for i in range(12)]
            scores = measures.score_run(rows)
            store.create_run(run_id, kind=kind, base="micro:tiny", settings={},
                             corpus_path=None if kind == "baseline" else "/t/a.txt")
            for state in ("starting", "training", "evaluating"):
                store.transition(run_id, state)
            store.ingest_result(run_id, {"scores": scores, "scene_results": rows, "probes": probes,
                                         "overall": measures.overall({k: v["value"] for k, v in scores.items()})})
            store.transition(run_id, "done")
    return ws


def _check(table: dict[str, dict[str, str]]) -> None:
    a, base = table["run-a"], table["base"]
    assert float(a["weight_change"]) == 1.25 and float(a["attn_entropy_change"]) == -0.03
    assert int(float(a["drift_layer"])) == 2
    assert base["weight_change"] == base["drift_layer"] == ""  # a baseline has no probes
    for row in (a, base):
        lo, hi = float(row["reasoning_depth_lo"]), float(row["reasoning_depth_hi"])
        assert lo <= float(row["reasoning_depth"]) <= hi and lo < hi
        # overall's interval: the measures' standard errors combined (one measure here)
        assert float(row["overall_lo"]) < float(row["overall"]) < float(row["overall_hi"])


def test_export_csv_has_probe_columns_and_intervals(workspace: Path, tmp_path: Path):
    with Store(workspace / "ltm.duckdb") as store:
        path = store.export_csv(tmp_path / "out.csv")
    with path.open(newline="", encoding="utf-8") as fh:
        _check({r["run_id"]: r for r in csv.DictReader(fh)})


def test_results_csv_and_json_carry_the_same(workspace: Path):
    res = cli("results", "--format", "csv", "--workspace", str(workspace))
    assert res.returncode == 0, res.stderr
    _check({r["run_id"]: r for r in csv.DictReader(io.StringIO(res.stdout))})
    rows = {r["run_id"]: r for r in json.loads(cli("results", "--format", "json", "--workspace", str(workspace)).stdout)}
    assert rows["run-a"]["weight_change"] == 1.25 and rows["run-a"]["drift_layer"] == 2
    a = rows["run-a"]
    assert a["overall_interval"] == list(measures.overall_interval(a["scores"], a["intervals"]))
    assert cli("export", "--csv", str(workspace / "t.csv"), "--workspace", str(workspace)).returncode == 0
    exported = {r["run_id"]: r for r in csv.DictReader((workspace / "t.csv").open())}
    assert [float(exported["run-a"][k]) for k in ("overall_lo", "overall_hi")] == a["overall_interval"]
