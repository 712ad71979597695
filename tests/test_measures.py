"""The measures on hand-built scene results whose right answers are known."""

from __future__ import annotations

import math

import pytest

from backend import measures


def r(scene_id, score, correct=None, **detail):
    return {"scene_id": scene_id, "score": score, "correct": bool(score) if correct is None else correct, "detail": detail}


def test_reasoning_depth_weighs_each_depth_equally():
    rows = [r("a", 1, depth=1), r("b", 1, depth=1), r("c", 1, depth=1), r("d", 0, depth=3)]
    assert measures.reasoning_depth(rows) == pytest.approx(0.5)


def test_consistency_needs_the_whole_group_right():
    rows = [r("a", 1, group="g1"), r("b", 0, group="g1"), r("c", 1, group="g2"), r("d", 1, group="g2"), r("e", 1)]
    assert measures.consistency(rows) == pytest.approx(2 / 3)


def test_pressure_scores_perturbed_items_only():
    rows = [r("clean", 1), r("p1", 0, perturb="distractor", of="clean"), r("p2", 1, perturb="rotated", of="clean")]
    assert measures.pressure(rows) == pytest.approx(0.5)


def test_perplexity_is_token_weighted():
    rows = [r("a", 1.0, correct=None, tokens=10), r("b", 2.0, correct=None, tokens=30)]
    assert measures.perplexity(rows) == pytest.approx(math.exp((10 + 60) / 40))


def test_overall_ignores_perplexity_and_missing():
    assert measures.overall({"consistency": 0.5, "pressure": 1.0, "perplexity": 40.0, "novelty": None}) == 0.75
    assert measures.overall({"perplexity": 3.0}) is None


def test_novelty_counts_only_unseen_ngrams_of_passing_text():
    gen = measures.word_ngrams("all glims are new zents")
    seen = measures.word_ngrams("so all glims are blorps")
    assert measures.novelty_score(gen, seen, passed=True) == pytest.approx(2 / 3)
    assert measures.novelty_score(gen, seen, passed=False) == 0.0
    assert measures.novelty_score(set(), seen, passed=True) == 0.0


def test_compression_rewards_ideas_within_the_word_limit():
    assert measures.compression_score([("contains", True), ("contains", False), ("max_words", True)]) == 0.5
    assert measures.compression_score([("contains", True), ("max_words", False)]) == 0.0
