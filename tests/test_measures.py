"""The measures on hand-built scene results whose right answers are known."""

from __future__ import annotations

import math

import pytest

from backend.core.errors import LtmError
from backend.scoring import measures


def r(scene_id, score, correct=None, metric="m", battery="b", **detail):
    correct = (bool(score) if score is not None else None) if correct is None else correct
    return {"battery": battery, "scene_id": scene_id, "metric": metric, "score": score,
            "correct": correct, "detail": detail}


def test_depth_curve_auc_and_largest_depth_above_chance():
    # depth 1: 10/10 right (chance 1/3: p = 3^-10), depth 2: 6/10 (p ≈ 0.08, not clearly above),
    # depth 3: 9/10 (p ≈ 0.0004), depth 4: 0/10
    rows = []
    for depth, right in ((1, 10), (2, 6), (3, 9), (4, 0)):
        rows += [r(f"d{depth}-{i}", float(i < right), depth=depth, n_choices=3) for i in range(10)]
    curve = measures.depth_curve(rows)
    assert [curve[d]["accuracy"] for d in (1, 2, 3, 4)] == [1.0, 0.6, 0.9, 0.0]
    assert curve[1]["chance"] == pytest.approx(1 / 3)
    assert curve[1]["p_above_chance"] == pytest.approx(3.0 ** -10)
    assert curve[2]["p_above_chance"] > 0.05 > curve[3]["p_above_chance"]
    assert measures.depth_max(rows) == 3.0
    assert measures.reasoning_depth(rows) == pytest.approx((1 + 0.6 + 0.9 + 0) / 4)


def test_depth_max_is_zero_when_nothing_beats_chance():
    rows = [r(f"x{i}", float(i < 1), depth=1, n_choices=2) for i in range(4)]
    assert measures.depth_max(rows) == 0.0


def test_reasoning_depth_weighs_each_depth_equally():
    rows = [r("a", 1, depth=1), r("b", 1, depth=1), r("c", 1, depth=1), r("d", 0, depth=3)]
    assert measures.reasoning_depth(rows) == pytest.approx(0.5)


def test_consistency_is_the_share_of_groups_all_right():
    rows = [r("a", 1, group="g1"), r("b", 0, group="g1"), r("c", 1, group="g2"), r("d", 1, group="g2"),
            r("e", 0, group="g3"), r("f", 0, group="g3"), r("loose", 1)]
    assert measures.consistency(rows) == pytest.approx(1 / 3)  # only g2 agrees on the right answer
    assert measures.consistency_scenes(rows) == pytest.approx(4 / 7)
    assert measures.consistency([r("a", 1), r("b", 0)]) == 0.5  # no groups: share of scenes right


def test_pressure_counts_rotations_together_and_reports_the_drop():
    rows = [
        r("c1", 1), r("c1-dis", 0, perturb="distractor", of="c1"), r("c1-rot", 1, perturb="rotated", of="c1"),
        r("c1-rot2", 0, perturb="rotated", of="c1"),  # one rotation wrong: the rotated item is wrong
        r("c2", 1), r("c2-hint", 1, perturb="hint", of="c2"), r("c2-rot", 1, perturb="rotated", of="c2"),
        r("c3", 0), r("c3-rot", 1, perturb="rotated", of="c3"),  # clean order wrong: rotated item wrong
    ]
    clean, items = measures.pressure_items(rows)
    assert sorted(clean) == [False, True, True]
    # items: c1-dis 0, c2-hint 1, rotated c1 0, rotated c2 1, rotated c3 0
    assert measures.pressure(rows) == pytest.approx(2 / 5)
    assert measures.pressure_clean(rows) == pytest.approx(2 / 3)
    assert measures.pressure_drop(rows) == pytest.approx(2 / 3 - 2 / 5)


def test_perplexity_is_token_weighted():
    rows = [r("a", 1.0, tokens=10), r("b", 2.0, tokens=30)]
    assert measures.perplexity(rows) == pytest.approx(math.exp((10 + 60) / 40))


def test_forgetting_is_the_relative_perplexity_change_on_general_text():
    rows = [r("g1", 2.0, tokens=10, base_loss=1.5), r("g2", 3.0, tokens=30, base_loss=3.0)]
    expected = math.exp((20 + 90) / 40 - (15 + 90) / 40) - 1
    assert measures.forgetting(rows) == pytest.approx(expected)
    assert measures.forgetting([r("g", 2.0, tokens=5, base_loss=2.0)]) == 0.0


def test_overall_weights_ranked_measures_only():
    scores = {"consistency": 0.5, "pressure": 1.0, "perplexity": 40.0, "novelty": None,
              "depth_max": 4.0, "depth@1": 1.0, "forgetting": 0.2}
    assert measures.overall(scores) == 0.75
    assert measures.overall(scores, {"pressure": 3}) == pytest.approx((0.5 + 3.0) / 4)
    assert measures.overall(scores, {"pressure": 0, "consistency": 0}) is None
    assert measures.overall({"perplexity": 3.0}) is None


def test_parse_weights_short_names_files_and_errors(tmp_path):
    assert measures.parse_weights("depth=2, novelty=0.5") == {"reasoning_depth": 2.0, "novelty": 0.5}
    f = tmp_path / "w.yaml"
    f.write_text("consistency: 3\npress: 0\n", encoding="utf-8")
    assert measures.parse_weights(str(f)) == {"consistency": 3.0, "pressure": 0.0}
    for bad in ("depth", "depth=x", "depth=-1", "perplexity=2", "depth_max=1"):
        with pytest.raises(LtmError):
            measures.parse_weights(bad)


def test_novelty_counts_only_unseen_ngrams_of_fluent_passing_text():
    gen = measures.word_ngrams("all glims are new zents")
    seen = measures.word_ngrams("so all glims are blorps")
    assert measures.novelty_score(gen, seen, passed=True) == pytest.approx(2 / 3)
    assert measures.novelty_score(gen, seen, passed=False) == 0.0
    assert measures.novelty_score(gen, seen, passed=True, fluent=False) == 0.0
    assert measures.novelty_score(set(), seen, passed=True) == 0.0


def test_compression_is_ideas_covered_per_word_within_the_limit():
    checks = [("contains", True), ("contains", True), ("max_words", True)]
    assert measures.compression_score(checks, words=2) == 1.0  # one word per idea: the densest
    assert measures.compression_score(checks, words=8) == pytest.approx(2 / 8)
    half = [("contains", True), ("contains", False), ("max_words", True)]
    assert measures.compression_score(half, words=4) == pytest.approx(1 / 4)
    assert measures.compression_score(half) == 0.5  # no word count: the share covered
    assert measures.compression_score([("contains", True), ("max_words", False)], words=30) == 0.0
    assert measures.compression_score([("contains", True)], words=4, judge=True) == pytest.approx(2 / 4)


def test_score_run_gives_every_measure_an_interval_that_holds_its_value():
    rows = [r(f"d{i}", float(i % 3 != 0), metric="reasoning_depth", depth=1 + i % 2, n_choices=3)
            for i in range(30)]
    rows += [r(f"h{i}", 1.0 + i / 10, metric="perplexity", tokens=10) for i in range(5)]
    rows += [r(f"g{i}", 2.0, battery="_general", metric="_general", tokens=5, base_loss=2.1) for i in range(4)]
    scores = measures.score_run(rows)
    assert set(scores) >= {"reasoning_depth", "depth_max", "depth@1", "depth@2", "perplexity", "forgetting"}
    for name, entry in scores.items():
        assert entry["lo"] <= entry["value"] + 1e-9 and entry["value"] <= entry["hi"] + 1e-9, name
    assert scores["reasoning_depth"]["lo"] < scores["reasoning_depth"]["hi"]
    assert scores["forgetting"]["value"] == pytest.approx(math.exp(-0.1) - 1, abs=1e-6)
    assert scores == measures.score_run(rows)  # the bootstrap is seeded: the same every time


def test_overall_interval_combines_independent_measures():
    ci = measures.overall_interval({"a": 0.5, "b": 0.7}, {"a": (0.4, 0.6), "b": (0.6, 0.8)})
    half = 1.96 * math.sqrt(2 * (0.2 / 3.92) ** 2) / 2
    assert ci == pytest.approx((0.6 - half, 0.6 + half), abs=1e-6)


def test_depth_scores_read_one_curve_per_resample_and_keep_their_intervals():
    # The depth scores share each resample's curve; every interval must equal bootstrapping
    # that score on its own with the plain functions.
    from backend.scoring import stats

    rows = []
    for depth, right in ((1, 7), (2, 5), (3, 2)):
        rows += [r(f"d{depth}-{i}", float(i < right), metric="reasoning_depth", depth=depth, n_choices=3)
                 for i in range(9)]
    scores = measures.score_run(rows)

    def accuracy_at(depth):
        return lambda rs: measures._mean(float(measures._right(x)) for x in rs if measures._depth(x) == depth)

    alone = {"reasoning_depth": measures.reasoning_depth, "depth_max": measures.depth_max,
             **{f"depth@{d}": accuracy_at(d) for d in (1, 2, 3)}}
    for name, fn in alone.items():
        ci = stats.bootstrap_interval(rows, fn, cluster=measures._by_scene, stratum=measures._depth)
        assert (scores[name]["lo"], scores[name]["hi"]) == (round(ci[0], 6), round(ci[1], 6)), name
        assert scores[name]["value"] == round(fn(rows), 6)


def _golden_rows(seed: int) -> list[dict]:
    rows = [{"battery": "depth", "metric": "reasoning_depth", "scene_id": f"d{i}", "score": 1.0,
             "correct": (i * 7 + seed) % 5 < 3 - i % 3, "detail": {"depth": 1 + i % 4, "n_choices": 3}}
            for i in range(48)]
    rows += [{"battery": "press", "metric": "pressure", "scene_id": f"p{i}", "score": 1.0,
              "correct": (i * 3 + seed) % 4 != 0, "detail": ({"of": f"p{i - i % 3}"} if i % 3 else {})}
             for i in range(30)]
    return rows


def test_intervals_are_the_ones_stored_before_the_draws_were_shared():
    # Recorded with the code of commit a1ad7eb, which drew 1000 resamples for each score on its
    # own: sharing and caching the draws must not move any stored interval.
    run = {"depth@1": [0.166667, 0.666667], "depth@2": [0.25, 0.833333], "depth@3": [0.083333, 0.583333],
           "depth@4": [0.083333, 0.583333], "depth_max": [0.0, 3.0], "pressure": [0.666667, 0.833333],
           "reasoning_depth": [0.270833, 0.541667]}
    pooled = {"depth@1": [0.222222, 0.555556], "depth@2": [0.25, 0.583333], "depth@3": [0.25, 0.583333],
              "depth@4": [0.222222, 0.555556], "depth_max": [0.0, 2.333333], "pressure": [0.699722, 0.8],
              "reasoning_depth": [0.319444, 0.486111]}
    assert {k: [v["lo"], v["hi"]] for k, v in measures.score_run(_golden_rows(0)).items()} == run
    got = measures.pooled_scores([_golden_rows(0), _golden_rows(1), _golden_rows(2)])
    assert {k: [v["lo"], v["hi"]] for k, v in got.items()} == pooled
