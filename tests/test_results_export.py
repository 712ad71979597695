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


@pytest.fixture
def batteries(tmp_path: Path) -> Path:
    """One base scored on two batteries (x, y): a baseline each, a run on x, two seeds of a run
    on y and a run on y with another learning rate. Scene results make each run's depth."""
    ws = tmp_path / "ws"
    plan = [  # run_id, kind, battery, seed, lr, scenes right of 12
        ("base-x", "baseline", "/b/x", 0, 0.001, 6), ("base-y", "baseline", "/b/y", 0, 0.001, 2),
        ("base-y1", "baseline", "/b/y", 1, 0.001, 3),
        ("x-s0", "adapter", "/b/x", 0, 0.001, 7), ("y-s0", "adapter", "/b/y", 0, 0.001, 5),
        ("y-s1", "adapter", "/b/y", 1, 0.001, 9), ("y-lr", "adapter", "/b/y", 0, 0.01, 4),
    ]
    with Store(ws / "ltm.duckdb") as store:
        for run_id, kind, battery, seed, lr, right in plan:
            rows = [_choice(i, i < right) for i in range(12)]
            scores = measures.score_run(rows)
            settings = {"base": {"base": "micro", "preset": "tiny"}, "scenes": battery, "train": {"lr": lr},
                        "lora": {}, "baseline_key": f"{battery}|{seed}"}
            store.create_run(run_id, kind=kind, base="micro:tiny", settings=settings, seed=seed,
                             corpus_path=None if kind == "baseline" else "/t/a.txt")
            for state in ("starting", "training", "evaluating"):
                store.transition(run_id, state)
            store.ingest_result(run_id, {"scores": scores, "scene_results": rows,
                                         "overall": measures.overall({k: v["value"] for k, v in scores.items()})})
            store.transition(run_id, "done")
    return ws


def _json(*args: str) -> list[dict]:
    out = cli(*args, "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_sorting_by_the_gain_over_the_baseline_and_exporting_in_any_order(batteries: Path):
    ws = ("--workspace", str(batteries))
    # Δ base by its header: x-s0 +1/12 over base-x, y-s0 +3/12 over base-y, y-s1 +6/12 over base-y1
    rows = _json("results", "--sort", "Δ base", *ws)
    assert [r["run_id"] for r in rows][:4] == ["y-s1", "y-s0", "y-lr", "x-s0"]
    table = cli("results", "--sort", "Δ base", "--asc", *ws).stdout
    assert "battery" in table and " x " in table and " y " in table  # which battery each row is on
    out = cli("export", "--csv", "-", "--sort", "depth", "--asc", *ws)  # a header, and a direction
    assert out.returncode == 0, out.stderr
    depth = [float(r["reasoning_depth"]) for r in csv.DictReader(io.StringIO(out.stdout))]
    assert depth == sorted(depth)


def test_a_weight_for_a_measure_no_run_has_is_one_line(batteries: Path):
    out = cli("results", "--weights", "dpeth=2", "--workspace", str(batteries))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("ltm-tui: usage: --weights: no run has a measure 'dpeth'; the runs have depth")
    assert cli("results", "--weights", "depth=2", "--workspace", str(batteries)).returncode == 0


def test_pooled_seeds_are_runs_that_differ_by_their_seed_alone(batteries: Path):
    rows = _json("results", "--pool-seeds", "--sort", "depth", "--asc", "--workspace", str(batteries))
    groups = sorted(tuple(sorted(r["run_id"].split(","))) for r in rows)
    assert groups == [("base-x",), ("base-y", "base-y1"), ("x-s0",), ("y-lr",), ("y-s0", "y-s1")]
    depth = [r["scores"]["reasoning_depth"] for r in rows]
    assert depth == sorted(depth)  # the order asked for
    by_gain = _json("results", "--pool-seeds", "--sort", "Δ base", "--workspace", str(batteries))
    # y-s0+y-s1 pool to 7/12 against base-y+base-y1's 2.5/12; x-s0 7/12 against 6/12; y-lr 4/12 against 2.5/12
    assert [sorted(r["run_id"].split(",")) for r in by_gain][:3] == [["y-s0", "y-s1"], ["y-lr"], ["x-s0"]]


# --- the ranked table fits the terminal ------------------------------------------------------

RU = "Война и мир. Том первый. Часть вторая (издание 1869 года).fb2.txt"
EN = "Sherlock Holmes - The Complete Collection, Unabridged, Annotated Edition.epub"
FIVE = ("reasoning_depth", "consistency", "pressure", "novelty", "compression")


def _ranked_rows() -> list[dict]:
    """A baseline and three runs as `results` gets them: the five measures, the side numbers,
    perplexity and forgetting, each with its interval; long Cyrillic and Latin names."""
    rows = []
    for i, (corpus, kind, status) in enumerate(((None, "baseline", "done"), (RU, "adapter", "done"),
                                                 (EN, "adapter", "done"), ("logic.txt", "adapter", "training"))):
        scores = {m: 0.31 + 0.1 * i + 0.01 * j for j, m in enumerate(FIVE)}
        scores.update(depth_max=3 + i, pressure_drop=0.12, perplexity=123.4 + 50 * i, forgetting=0.031)
        half = {m: 5.6 if m == "perplexity" else 0.05 for m in scores}
        rows.append({"run_id": f"r{i}", "corpus": corpus, "kind": kind, "status": status, "base": "micro:small",
                     "seed": 0, "pages": 1234.5, "train_seconds": 5321.7, "overall": 0.3 + 0.1 * i,
                     "scores": scores, "intervals": {m: [v - half[m], v + half[m]] for m, v in scores.items()}})
    return rows


def _printed(width: int, **kw) -> list[str]:
    from rich.console import Console

    from ltm_tui.report import print_ranked

    console = Console(file=io.StringIO(), width=width, color_system=None)
    print_ranked(_ranked_rows(), console=console, **kw)
    return console.file.getvalue().splitlines()


@pytest.mark.parametrize("width", [80, 120])
def test_results_table_fits_the_terminal_without_wrapping_or_cutting_numbers(width):
    from ltm_tui.report import MEASURE_LABELS, fmt_interval, ranked_columns, reweigh

    lines = _printed(width)
    assert max(len(line) for line in lines) <= width
    header = lines[1].split()
    assert header[:6] == ["#", "corpus", "status", "overall", "Δ", "base"]  # the priority columns lead
    rows = reweigh(_ranked_rows(), None)
    body = lines[3:3 + len(rows)]
    assert [line.split()[0] for line in body] == ["base", "1", "2", "3"]  # one line a row: nothing wrapped
    assert body[1].split()[1].startswith("Война") and "…" in body[1] and body[1].count("…") == 1
    assert body[2].split()[1].startswith("Sherlock") and ".epub" in body[2]
    assert "logic.txt" in body[3]  # a short name whole
    # every number shown is whole: the cells of each shown column, in its row
    columns, _ = ranked_columns(rows)
    shown = [c for c in columns if c.label.split()[0] in header and not c.names]
    for column in shown:
        for line, cell in zip(body, column.cells):
            assert cell in line, (column.label, cell)
    assert fmt_interval(rows[1]["overall"], rows[1]["overall_interval"], 3) in body[1]
    # the measures follow in their order, as many as fit, and the line below names the rest
    labels = [MEASURE_LABELS[m] for m in FIVE]
    measures = [h for h in header if h in labels]
    assert measures == labels[: len(measures)] and len(measures) >= (3 if width == 80 else 5)
    note = lines[3 + len(rows)]
    assert note.startswith("left out: ") and "--wide" in note and len(note) <= width
    left = [c.label for c in columns if c.label.split()[0] not in header]
    assert left and note.startswith("left out: " + left[0])


def test_results_table_wide_shows_every_column_and_whole_names():
    from ltm_tui.report import MEASURE_LABELS

    lines = _printed(80, wide=True)
    assert any(RU in line for line in lines) and any(EN in line for line in lines)
    header = lines[1]
    for label in [MEASURE_LABELS[m] for m in FIVE] + ["ppl↓", "forget↓", "d.max", "drop↓", "pages", "train s"]:
        assert label in header
    assert not any(line.startswith("left out") for line in lines)


def test_results_command_takes_wide(workspace: Path):
    res = cli("results", "--wide", "--workspace", str(workspace))
    assert res.returncode == 0, res.stderr
    assert "train s" in res.stdout and "left out" not in res.stdout
