"""Noise estimates and comparisons: bootstrap intervals, exact binomial tests, paired runs, weak scenes.

Pure Python (no torch, no numpy), so the service and the CLI use it without loading a model.
Every random draw comes from a `random.Random` with a fixed seed: the same results give the same
interval on every machine, so a table printed twice never disagrees with itself.
docs/measures.md says what each interval means.
"""

from __future__ import annotations

import functools
import math
import random
from array import array
from collections import defaultdict
from typing import Callable, Hashable, Iterable, Mapping, Sequence

BOOTSTRAP_SAMPLES = 1000  # resamples per interval; the 2.5% tail then rests on 25 draws
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 20240229  # fixed: intervals are reproducible


# --- exact tests ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)  # the depth bootstrap asks the same few (k, n, p) many times
def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the one-sided p-value of k successes in n at chance p."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    # each term in logs: comb(n, i) * p**i overflows a float past n of about 1,030 scenes
    lp, lq = math.log(p), math.log1p(-p)
    head = math.lgamma(n + 1)
    terms = (math.exp(head - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq)
             for i in range(k, n + 1))
    return min(1.0, math.fsum(terms))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (= exact McNemar on the discordant pairs): ties are dropped.

    With b items that went right→wrong and c wrong→right, p = min(1, 2·P(X <= min(b, c))) for
    X ~ Binomial(b + c, 1/2); 1.0 when nothing flipped.
    """
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    # P(X <= k) = P(X >= n - k) at p = 1/2: summed in logs, not as integers of n bits (seconds
    # for a comparison over thousands of scenes)
    return min(1.0, 2 * binomial_tail(n - k, n, 0.5))


# --- the bootstrap --------------------------------------------------------------------------------


def _percentiles(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    values = sorted(values)
    if not values:
        return (math.nan, math.nan)
    alpha = (1 - confidence) / 2

    def at(q: float) -> float:  # linear interpolation between order statistics (numpy's default)
        pos = q * (len(values) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(values) - 1)
        return values[lo] + (values[hi] - values[lo]) * (pos - lo)

    return at(alpha), at(1 - alpha)


def _clusters(
    rows: Sequence, cluster: Callable[[object], Hashable], stratum: Callable[[object], Hashable] | None
) -> list[list[list]]:
    """Rows grouped into clusters, clusters grouped into strata (each stratum keeps its size)."""
    strata: dict[Hashable, dict[Hashable, list]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        strata[stratum(row) if stratum else None][cluster(row)].append(row)
    return [list(clusters.values()) for clusters in strata.values()]


def _resample(strata: list[list[list]], rng: random.Random) -> list:
    """One bootstrap sample: in each stratum, as many clusters as it has, drawn with replacement."""
    sample: list = []
    for clusters in strata:
        for _ in range(len(clusters)):
            sample.extend(clusters[rng.randrange(len(clusters))])
    return sample


_CACHED_DRAWS = 2_000_000  # cluster indices (4 bytes each) at most in one cached set of draws


def _draws(sizes: tuple[int, ...], samples: int, seed: int) -> tuple[array, ...]:
    """The cluster indices `_resample` draws, one flat array per sample (stratum after stratum,
    in `_resample`'s order), for strata of these sizes. They depend only on the sizes and the
    seed, so a warm worker scoring one battery run after run draws them once: sets of up to
    `_CACHED_DRAWS` indices (8 MB) are kept, the 8 most recent."""
    if sum(sizes) * samples <= _CACHED_DRAWS:
        return _cached_draws(sizes, samples, seed)
    return _make_draws(sizes, samples, seed)


def _make_draws(sizes: tuple[int, ...], samples: int, seed: int) -> tuple[array, ...]:
    rng = random.Random(seed)
    return tuple(array("I", [rng.randrange(n) for n in sizes for _ in range(n)]) for _ in range(samples))


_cached_draws = functools.lru_cache(maxsize=8)(_make_draws)


def draws(sizes: Sequence[int], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[array, ...]:
    """The bootstrap's resamples for strata of these sizes: one flat array of indices a sample,
    stratum after stratum, each index drawn with replacement within its own stratum. Every
    bootstrap in the project resamples with these (the attribution's, vectorised, too)."""
    return _draws(tuple(sizes), samples, seed)


def bootstrap_interval(
    rows: Sequence,
    statistic: Callable[[list], float | None],
    *,
    cluster: Callable[[object], Hashable] = id,
    stratum: Callable[[object], Hashable] | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """Percentile bootstrap 95% interval of `statistic(rows)`, resampling whole clusters.

    A cluster is what must stay together (a consistency group; a clean scene with its perturbed
    copies); a stratum keeps its count in every resample (each depth of the depth curve). None
    when the statistic is undefined on the data.
    """
    return bootstrap_intervals(rows, {"": statistic}, cluster=cluster, stratum=stratum, samples=samples, seed=seed)[""]


def bootstrap_intervals(
    rows: Sequence,
    statistics: Mapping[str, Callable[[list], float | None]],
    *,
    cluster: Callable[[object], Hashable] = id,
    stratum: Callable[[object], Hashable] | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, tuple[float, float] | None]:
    """`bootstrap_interval` for several statistics of the same rows, clusters and strata: the
    resamples are drawn once and each statistic read on every one. The draws do not depend on
    the statistic, so each interval is exactly the one `bootstrap_interval` gives it alone."""
    defined = {name: fn for name, fn in statistics.items() if fn(list(rows)) is not None}
    out: dict[str, tuple[float, float] | None] = {name: None for name in statistics}
    if not defined:
        return out
    strata = _clusters(rows, cluster, stratum)
    owners = [clusters for clusters in strata for _ in clusters]  # the stratum each draw picks from
    values: dict[str, list[float]] = {name: [] for name in defined}
    for picks in _draws(tuple(len(clusters) for clusters in strata), samples, seed):
        sample = [row for clusters, i in zip(owners, picks) for row in clusters[i]]
        for name, fn in defined.items():
            value = fn(sample)
            if value is not None and not math.isnan(value):
                values[name].append(value)
    out.update({name: _percentiles(v) for name, v in values.items() if v})
    return out


def bootstrap_over_runs(
    runs: Sequence[Sequence],
    statistic: Callable[[list], float | None],
    *,
    cluster: Callable[[object], Hashable] = id,
    stratum: Callable[[object], Hashable] | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float | None, tuple[float, float] | None]:
    """(mean over runs, 95% interval) for repeats with different seeds: a two-level bootstrap
    that draws seeds with replacement, then the clusters of each drawn seed's scenes."""
    return bootstrap_over_runs_many(runs, {"": statistic}, cluster=cluster, stratum=stratum,
                                    samples=samples, seed=seed)[""]


def bootstrap_over_runs_many(
    runs: Sequence[Sequence],
    statistics: Mapping[str, Callable[[list], float | None]],
    *,
    cluster: Callable[[object], Hashable] = id,
    stratum: Callable[[object], Hashable] | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, tuple[float | None, tuple[float, float] | None]]:
    """`bootstrap_over_runs` for several statistics, drawing the seeds and clusters once (each
    result equals the one-statistic call's)."""
    out: dict[str, tuple[float | None, tuple[float, float] | None]] = {}
    plans = {}  # name -> indices of the runs where it is defined
    for name, fn in statistics.items():
        per_run = [fn(list(rows)) for rows in runs]
        usable = [i for i, v in enumerate(per_run) if v is not None]
        if not usable:
            out[name] = (None, None)
            continue
        plans[name] = usable
        out[name] = (sum(per_run[i] for i in usable) / len(usable), None)
    # The one-statistic bootstrap draws over the runs where its statistic is defined; statistics
    # defined on the same runs share the draws.
    by_runs: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for name, usable in plans.items():
        by_runs[tuple(usable)].append(name)
    for usable, names in by_runs.items():
        levels = [_clusters(runs[i], cluster, stratum) for i in usable]
        rng = random.Random(seed)
        values: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(samples):
            totals = {name: [0.0, 0] for name in names}
            for _ in range(len(levels)):
                sample = _resample(levels[rng.randrange(len(levels))], rng)
                for name in names:
                    value = statistics[name](sample)
                    if value is not None and not math.isnan(value):
                        totals[name][0] += value
                        totals[name][1] += 1
            for name, (total, count) in totals.items():
                if count:
                    values[name].append(total / count)
        for name in names:
            out[name] = (out[name][0], _percentiles(values[name]) if values[name] else None)
    return out


def combine_intervals(
    values: Mapping[str, float], intervals: Mapping[str, Sequence[float] | None], weights: Mapping[str, float]
) -> tuple[float, float] | None:
    """Interval of a weighted mean of measures from their own intervals.

    The batteries hold different scenes, so their errors are independent and variances add:
    se_i ≈ (hi − lo) / 3.92, se = √(Σ w_i² se_i²) / Σ w_i, interval = mean ± 1.96 se.
    """
    used = [m for m in weights if weights[m] > 0 and values.get(m) is not None]
    if not used or any(intervals.get(m) is None for m in used):
        return None
    total = sum(weights[m] for m in used)
    mean = sum(weights[m] * values[m] for m in used) / total
    var = sum((weights[m] * (intervals[m][1] - intervals[m][0]) / 3.92) ** 2 for m in used)
    half = 1.96 * math.sqrt(var) / total
    return (mean - half, mean + half)


# --- paired comparison of two runs ----------------------------------------------------------------


def compare_runs(rows_a: Iterable[Mapping], rows_b: Iterable[Mapping]) -> dict:
    """Scene by scene: which items flipped between run A and run B, and an exact test.

    Items with a right/wrong outcome (choice scenes, generate scenes with checks) give the exact
    McNemar test on the flips; every scene with a score in both runs gives a sign test on the
    score differences. Scenes in only one run are counted, not compared.
    """
    a = {(r["battery"], r["scene_id"]): r for r in rows_a}
    b = {(r["battery"], r["scene_id"]): r for r in rows_b}
    shared = sorted(set(a) & set(b))
    to_right, to_wrong, better, worse = [], [], 0, 0
    both_right = both_wrong = 0
    for key in shared:
        ra, rb = a[key], b[key]
        if ra.get("correct") is not None and rb.get("correct") is not None:
            ca, cb = bool(ra["correct"]), bool(rb["correct"])
            if ca and not cb:
                to_wrong.append(key)
            elif cb and not ca:
                to_right.append(key)
            elif ca:
                both_right += 1
            else:
                both_wrong += 1
        sa, sb = ra.get("score"), rb.get("score")
        if sa is not None and sb is not None and ra.get("kind") != "perplexity":
            if sb > sa:
                better += 1
            elif sb < sa:
                worse += 1
    return {
        "shared": len(shared),
        "only_a": len(set(a) - set(b)),
        "only_b": len(set(b) - set(a)),
        "both_right": both_right,
        "both_wrong": both_wrong,
        "right_to_wrong": [f"{bat}/{sid}" for bat, sid in to_wrong],
        "wrong_to_right": [f"{bat}/{sid}" for bat, sid in to_right],
        "mcnemar_p": sign_test(len(to_right), len(to_wrong)),
        "scores_better": better,
        "scores_worse": worse,
        "sign_test_p": sign_test(better, worse),
    }


# --- weak scenes ----------------------------------------------------------------------------------

CHANCE_MARGIN = 0.05  # a choice scene is "at chance" when P(answer) ≤ 1/choices + this


def answer_probability(detail: Mapping) -> float | None:
    """P(answer) among the choices (softmax of their log-likelihoods), from a choice scene's detail."""
    lls, answer = detail.get("loglik"), detail.get("answer")
    if not lls or answer is None:
        return None
    top = max(lls)
    weights = [math.exp(v - top) for v in lls]
    return weights[int(answer)] / sum(weights)


def weak_scenes(runs: Mapping[str, Iterable[Mapping]]) -> list[dict]:
    """Scenes that cannot tell runs apart, given every run's scene results (baselines included).

    - `no spread`: two or more runs scored it, and every run gave it the same score;
    - `at chance`: a choice scene whose answer no run (the base included) gives more probability
      than a guess would (1/choices + CHANCE_MARGIN).
    """
    by_scene: dict[tuple[str, str], list[Mapping]] = defaultdict(list)
    for rows in runs.values():
        for r in rows:
            if r.get("kind") == "perplexity" or str(r["battery"]).startswith("_"):
                continue
            by_scene[(r["battery"], r["scene_id"])].append(r)
    weak = []
    for (battery, scene_id), rows in sorted(by_scene.items()):
        reasons = []
        scores = {None if r.get("score") is None else round(float(r["score"]), 9) for r in rows}
        if len(rows) >= 2 and len(scores) == 1:
            reasons.append("no spread")
        if rows and rows[0].get("kind") == "choice":
            probs = [answer_probability(r.get("detail") or {}) for r in rows]
            n = len((rows[0].get("detail") or {}).get("loglik") or [])
            if n and all(p is not None and p <= 1 / n + CHANCE_MARGIN for p in probs):
                reasons.append("at chance")
        if reasons:
            weak.append({"battery": battery, "scene_id": scene_id, "runs": len(rows), "reasons": reasons,
                         "score": None if len(scores) != 1 else next(iter(scores))})
    return weak
