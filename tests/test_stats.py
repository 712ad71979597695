"""Intervals, exact tests, paired comparison and weak scenes on cases with known answers."""

from __future__ import annotations

import math
import random

import pytest

from backend.scoring import stats


def test_binomial_tail_and_sign_test_match_hand_computed_values():
    assert stats.binomial_tail(3, 3, 0.5) == pytest.approx(1 / 8)
    assert stats.binomial_tail(2, 3, 0.5) == pytest.approx(4 / 8)
    assert stats.binomial_tail(0, 5, 0.3) == 1.0
    # 8 flips one way, 1 the other: p = 2 * (1 + 9) / 512
    assert stats.sign_test(8, 1) == pytest.approx(20 / 512)
    assert stats.sign_test(1, 8) == stats.sign_test(8, 1)
    assert stats.sign_test(0, 0) == 1.0
    assert stats.sign_test(3, 3) == 1.0


def test_bootstrap_interval_of_a_mean_covers_it_and_shrinks_with_more_data():
    rng = random.Random(1)
    small = [float(rng.random() < 0.7) for _ in range(20)]
    big = [float(rng.random() < 0.7) for _ in range(400)]

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    lo_s, hi_s = stats.bootstrap_interval(small, mean)
    lo_b, hi_b = stats.bootstrap_interval(big, mean)
    assert lo_s <= mean(small) <= hi_s and lo_b <= mean(big) <= hi_b
    assert (hi_b - lo_b) < (hi_s - lo_s) / 2
    # the textbook width for a proportion: 2 * 1.96 * sqrt(p(1-p)/n)
    p = mean(big)
    assert hi_b - lo_b == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / 400), rel=0.2)
    # a constant has a zero-width interval
    assert stats.bootstrap_interval([1.0] * 10, mean) == (1.0, 1.0)


def test_bootstrap_keeps_clusters_whole_and_strata_sized():
    rows = [("a", 1.0), ("a", 1.0), ("b", 0.0), ("b", 0.0)]
    seen = set()

    def statistic(sample):
        seen.add(tuple(sorted(sample)))
        return sum(v for _, v in sample) / len(sample)

    stats.bootstrap_interval(rows, statistic, cluster=lambda row: row[0], samples=50)
    # clusters travel whole: every sample holds the a-pair and/or the b-pair, never a lone row
    assert all(len(s) == 4 for s in seen)
    assert all(s.count(("a", 1.0)) % 2 == 0 for s in seen)


def test_bootstrap_over_runs_widens_with_seed_disagreement():
    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    agree = [[1.0, 0.0] * 10, [1.0, 0.0] * 10, [1.0, 0.0] * 10]
    differ = [[1.0] * 20, [0.0] * 20, [1.0, 0.0] * 10]
    m1, ci1 = stats.bootstrap_over_runs(agree, mean)
    m2, ci2 = stats.bootstrap_over_runs(differ, mean)
    assert m1 == m2 == 0.5
    assert (ci2[1] - ci2[0]) > (ci1[1] - ci1[0])


def row(scene, correct, score=None, kind="choice", loglik=None, answer=0):
    detail = {"loglik": loglik, "answer": answer} if loglik else {}
    return {"battery": "b", "scene_id": scene, "kind": kind, "correct": correct,
            "score": float(correct) if score is None else score, "detail": detail}


def test_compare_runs_lists_flips_and_gives_the_exact_mcnemar_p():
    a = [row(f"s{i}", i < 10) for i in range(12)] + [row("only-a", True)]
    b = [row(f"s{i}", i >= 2) for i in range(12)]  # s0,s1 right→wrong; s10,s11 wrong→right
    result = stats.compare_runs(a, b)
    assert result["right_to_wrong"] == ["b/s0", "b/s1"]
    assert result["wrong_to_right"] == ["b/s10", "b/s11"]
    assert result["both_right"] == 8 and result["both_wrong"] == 0
    assert result["only_a"] == 1 and result["shared"] == 12
    assert result["mcnemar_p"] == 1.0
    lopsided = stats.compare_runs([row(f"s{i}", False) for i in range(9)], [row(f"s{i}", True) for i in range(9)])
    assert lopsided["mcnemar_p"] == pytest.approx(2 / 512)


def test_weak_scenes_flags_no_spread_and_chance_everywhere():
    flat = [math.log(1 / 3)] * 3
    peaked = [0.0, -5.0, -5.0]
    runs = {
        "base": [row("same", True, loglik=peaked), row("guess", False, loglik=flat), row("good", False, loglik=flat)],
        "r1": [row("same", True, loglik=peaked), row("guess", True, loglik=flat), row("good", True, loglik=peaked)],
        "r2": [row("same", True, loglik=peaked), row("guess", False, loglik=flat), row("good", True, loglik=peaked)],
    }
    weak = {w["scene_id"]: w["reasons"] for w in stats.weak_scenes(runs)}
    assert weak == {"same": ["no spread"], "guess": ["at chance"]}


def test_several_statistics_on_shared_draws_equal_each_bootstrapped_alone():
    rng = random.Random(3)
    rows = [(f"c{i // 3}", i % 4, float(rng.random() < 0.6)) for i in range(60)]

    def mean(xs):
        return sum(v for *_, v in xs) / len(xs)

    def share_of_stratum_0(xs):  # undefined on resamples without stratum 0? never: strata keep their size
        picked = [v for _, s, v in xs if s == 0]
        return sum(picked) / len(picked) if picked else None

    def sometimes_nan(xs):
        m = mean(xs)
        return math.nan if m > 0.65 else m

    statistics = {"mean": mean, "s0": share_of_stratum_0, "nan": sometimes_nan, "never": lambda xs: None}
    kw = {"cluster": lambda row: row[0], "stratum": lambda row: row[1], "samples": 300}
    shared = stats.bootstrap_intervals(rows, statistics, **kw)
    assert shared == {name: stats.bootstrap_interval(rows, fn, **kw) for name, fn in statistics.items()}
    assert shared["never"] is None and shared["mean"] is not None

    # Over seeds: a statistic defined on only some runs draws over those runs, as alone.
    runs = [rows[:30], rows[30:], [row for row in rows if row[1] != 0]]
    statistics["s0"] = share_of_stratum_0
    pooled = stats.bootstrap_over_runs_many(runs, statistics, **kw)
    assert pooled == {name: stats.bootstrap_over_runs(runs, fn, **kw) for name, fn in statistics.items()}
    assert pooled["never"] == (None, None)
