"""The evaluation commands end to end on a real workspace database: results with intervals and
weights, compare, scenes weak/check/import-lmeval, and the judge writing its verdicts back."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from backend.jobs.store import Store
from backend.scoring import measures
from tests.conftest import cli, stop_service


def choice(scene_id, right, *, group=None, n=3):
    answer_ll, other = (0.0, -3.0) if right else (-3.0, 0.0)
    detail = {"loglik": [answer_ll, other] + [-4.0] * (n - 2), "answer": 0, "n_choices": n}
    if group:
        detail["group"] = group
    return {"battery": "cons", "scene_id": scene_id, "kind": "choice", "metric": "consistency",
            "score": float(right), "correct": right, "detail": detail}


def generate(scene_id, text):
    return {"battery": "style", "scene_id": scene_id, "kind": "generate", "metric": "style",
            "score": 1.0, "correct": True,
            "detail": {"prompt": "The lamp", "text": text, "words": len(text.split()),
                       "checks": [{"check": "min_words", "passed": True}], "rubric": "says the lamp glows"}}


FLAT = [math.log(1 / 3)] * 3


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    runs = {
        # base: right on nothing; "guess" is flat (at chance) in every run
        "base": [choice(f"s{i}", False, group=f"g{i // 2}") for i in range(10)],
        "run-a": [choice(f"s{i}", i < 6, group=f"g{i // 2}") for i in range(10)],
        "run-b": [choice(f"s{i}", i >= 2, group=f"g{i // 2}") for i in range(10)],
    }
    for rows in runs.values():
        rows.append({**choice("guess", False), "detail": {"loglik": FLAT, "answer": 0, "n_choices": 3}})
    runs["run-a"].append(generate("gl1", "glows bright"))
    with Store(ws / "ltm.duckdb") as store:
        for run_id, rows in runs.items():
            kind = "baseline" if run_id == "base" else "adapter"
            store.create_run(run_id, kind=kind, base="micro:tiny", settings={}, corpus_path=None if kind == "baseline" else f"/t/{run_id}.txt")
            for state in ("starting", "training", "evaluating"):
                store.transition(run_id, state)
            scores = measures.score_run(rows)
            store.ingest_result(run_id, {"scores": scores, "scene_results": rows,
                                         "overall": measures.overall({k: v["value"] for k, v in scores.items()})})
            store.transition(run_id, "done")
    return ws


def test_results_carry_intervals_and_weights(workspace: Path):
    res = cli("results", "--format", "json", "--workspace", str(workspace))
    assert res.returncode == 0, res.stderr
    rows = {r["run_id"]: r for r in json.loads(res.stdout)}
    a = rows["run-a"]
    lo, hi = a["intervals"]["consistency"]
    assert lo <= a["scores"]["consistency"] <= hi and lo < hi
    assert a["scores"]["consistency"] == pytest.approx(3 / 5)  # g0..g2 of g0..g4; ungrouped "guess" left out
    assert a["overall_interval"][0] <= a["overall"] <= a["overall_interval"][1]

    table = cli("results", "--workspace", str(workspace))
    assert table.returncode == 0, table.stderr
    assert f"{a['scores']['consistency']:.2f}±{(hi - lo) / 2:.2f}".replace("±0.", "±.") in table.stdout
    assert "overall = weighted mean of consist×1" in table.stdout

    weighted = json.loads(cli("results", "--format", "json", "--weights", "consist=1,style=3",
                              "--workspace", str(workspace)).stdout)
    a2 = {r["run_id"]: r for r in weighted}["run-a"]
    assert a2["overall"] == pytest.approx((a["scores"]["consistency"] + 3 * a["scores"]["style"]) / 4, abs=1e-6)
    bad = cli("results", "--weights", "perplexity=2", "--workspace", str(workspace))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "weights:" in bad.stderr


def test_compare_and_weak_scenes(workspace: Path):
    res = cli("compare", "run-a", "run-b", "--format", "json", "--workspace", str(workspace))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["right_to_wrong"] == ["cons/s0", "cons/s1"]  # a is right on s0..s5, b on s2..s9
    assert out["wrong_to_right"] == ["cons/s6", "cons/s7", "cons/s8", "cons/s9"]
    assert out["mcnemar_p"] == pytest.approx(2 * (1 + 6 + 15) / 64)
    text = cli("compare", "run-a", "run-b", "--workspace", str(workspace)).stdout
    assert "wrong → right: 4" in text and "McNemar p = 0.6875" in text
    missing = cli("compare", "run-a", "nope", "--workspace", str(workspace))
    assert missing.returncode == 2 and missing.stderr.strip() == "ltm-tui: compare: no run nope; `ltm-tui status` lists them"

    weak = json.loads(cli("scenes", "weak", "--format", "json", "--workspace", str(workspace)).stdout)
    assert {w["scene_id"]: w["reasons"] for w in weak} == {"guess": ["no spread", "at chance"]}


@pytest.mark.slow
def test_judge_grades_and_stores_verdicts(workspace: Path, tiny_hf_model: Path):
    res = cli("judge", "run-a", "--model", str(tiny_hf_model), "--device", "cpu", "--format", "json",
              "--workspace", str(workspace))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)[0]
    assert report["graded"] == 1 and report["yes"] + report["no"] + report["parse_failures"] == 1
    stop_service(workspace)  # the verdicts went through the service, which holds the database
    with Store(workspace / "ltm.duckdb") as store:
        scenes = {r["scene_id"]: r for r in store.scene_results("run-a")}
        verdict = scenes["gl1"]["detail"]["judge"]
        assert "Rubric: says the lamp glows" in verdict["prompt"] and "Answer: glows bright" in verdict["prompt"]
        assert verdict["raw"].startswith("loglik yes") and 0 <= verdict["p_yes"] <= 1
        expected = 1.0 if verdict["verdict"] else 0.5  # the check passed; the verdict is one more
        assert scenes["gl1"]["score"] == expected
        row = {r["run_id"]: r for r in store.results()}["run-a"]
        assert row["scores"]["style"] == expected  # the run was re-scored with the verdict
    nothing = cli("judge", "run-a", "--workspace", str(workspace))
    assert nothing.returncode == 2 and "--model" in nothing.stderr


def test_scenes_check_counts_and_errors(tmp_path: Path):
    folder = tmp_path / "bat"
    folder.mkdir()
    (folder / "a.yaml").write_text(textwrap.dedent("""\
        battery: a
        description: two languages
        metric: consistency
        scenes:
          - {id: x1, kind: choice, lang: en, prompt: P, choices: [a, b], answer: a, group: g}
          - {id: x2, kind: choice, lang: ru, prompt: П, choices: [а, б], answer: 0, group: g}
          - {id: x3, kind: perplexity, text: some text}
        """), encoding="utf-8")
    res = cli("scenes", "check", str(folder), "--format", "json")
    assert res.returncode == 0, res.stderr
    counts = json.loads(res.stdout)
    assert counts["batteries"][0]["kinds"] == {"choice": 2, "perplexity": 1}
    assert counts["measures"]["consistency"] == {"batteries": 1, "scenes": 3, "langs": {"en": 1, "ru": 1, "-": 1}}
    (folder / "b.yaml").write_text("battery: b\ndescription: d\nmetric: x\nscenes:\n  - {id: q, kind: choise}\n", encoding="utf-8")
    bad = cli("scenes", "check", str(folder))
    assert bad.returncode == 2 and "b.yaml:5" in bad.stderr and "did you mean 'choice'" in bad.stderr


def test_import_lmeval_task_with_csv_and_jinja(tmp_path: Path):
    (tmp_path / "items.csv").write_text(
        "premise,q,a,b,c,label\nAll glims are zents.,So glims are,zents,blorps,lamps,0\n"
        "The lamp is red.,So the lamp is,blue,red,green,1\nX,Y,same,same,other,0\n",
        encoding="utf-8",
    )
    task = tmp_path / "task.yaml"
    task.write_text(textwrap.dedent("""\
        task: tiny-mc
        dataset_path: csv
        dataset_kwargs:
          data_files:
            validation: items.csv
        validation_split: validation
        output_type: multiple_choice
        doc_to_text: "{{premise}}\\nQuestion: {{q}}"
        doc_to_choice: "{{[a, b, c]}}"
        doc_to_target: "{{label}}"
        """), encoding="utf-8")
    out = tmp_path / "battery.yaml"
    res = cli("scenes", "import-lmeval", str(task), "-o", str(out))
    assert res.returncode == 0, res.stderr
    from backend.scoring.scenes import choice_request, load_battery

    battery = load_battery(out)
    assert battery.metric == "tiny_mc" and len(battery.scenes) == 2  # the repeated-choice item is skipped
    first, second = battery.scenes
    assert choice_request(first) == ("All glims are zents.\nQuestion: So glims are", [" zents", " blorps", " lamps"])
    assert second.answer_text == "red"
    task.write_text("task: t\ndataset_path: json\ndoc_to_text: !function utils.doc_to_text\n", encoding="utf-8")
    bad = cli("scenes", "import-lmeval", str(task))
    assert bad.returncode == 2 and "!function" in bad.stderr and bad.stderr.count("\n") == 1


def test_results_pool_seeds(workspace: Path):
    with Store(workspace / "ltm.duckdb") as store:  # a second seed of run-a's corpus, right on fewer
        rows = [choice(f"s{i}", i < 2, group=f"g{i // 2}") for i in range(10)]
        store.create_run("run-a1", kind="adapter", base="micro:tiny", settings={}, corpus_path="/t/run-a.txt", seed=1)
        for state in ("starting", "training", "evaluating"):
            store.transition("run-a1", state)
        store.ingest_result("run-a1", {"scores": measures.score_run(rows), "scene_results": rows})
        store.transition("run-a1", "done")
    res = cli("results", "--pool-seeds", "--format", "json", "--workspace", str(workspace))
    assert res.returncode == 0, res.stderr
    pooled = {r["run_id"]: r for r in json.loads(res.stdout)}
    a = pooled["run-a,run-a1"]
    assert a["seeds"] == [0, 1]
    assert a["scores"]["consistency"] == pytest.approx((3 / 5 + 1 / 5) / 2)  # the mean over seeds
    lo, hi = a["intervals"]["consistency"]
    assert lo < a["scores"]["consistency"] < hi
    single = {r["run_id"]: r for r in json.loads(cli("results", "--format", "json", "--workspace", str(workspace)).stdout)}
    # seeds that disagree widen the interval beyond either seed's own
    assert hi - lo > single["run-a1"]["intervals"]["consistency"][1] - single["run-a1"]["intervals"]["consistency"][0]
    table = cli("results", "--pool-seeds", "--workspace", str(workspace))
    assert table.returncode == 0 and f"{a['scores']['consistency']:.2f}±{(hi - lo) / 2:.2f}".replace("±0.", "±.") in table.stdout
