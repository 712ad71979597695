"""Which file makes the difference: Data Banzhaf values of corpus files, from runs on subsets.

No torch, no textual: the service computes a study's table on request (numpy over stats' resamples).

A study trains on subsets S of n files and scores each run; v(S) is a run's score on one measure.
The Banzhaf value of file i is its mean marginal effect over all subsets of the other files,

    β_i = mean over S ⊆ N∖{i} of  v(S ∪ {i}) − v(S)
        = E[v(S) | i ∈ S] − E[v(S) | i ∉ S]        (S uniform over all 2^n subsets),

which is also the slope w_i of the least-squares linear datamodel v(S) ≈ w₀ + Σ w_i·[i ∈ S]
under that uniform distribution (the indicators are then independent, so each slope is a
difference of two means). The maximum-sample-reuse estimator (Wang & Jia, "Data Banzhaf", 2023)
takes the second form on sampled subsets: every run serves every file's estimate, as a run
"with" it or a run "without" it.

The design (`plan`): the empty set (the baseline: the base model untrained), each file alone and
all files together, each once per seed, plus N subsets drawn without replacement from the other
M = 2^n − n − 2 ("mixed": each file in with probability ½; draws of size 0, 1 or n are
rejected), the same draws for every seed. The fixed subsets are drawn far more often than the
uniform distribution would, so each run is weighted by 1/π, its subset's inclusion probability
(Horvitz–Thompson): 1 for a fixed subset, M/N for a drawn one; the two means are weighted means
(Hájek). With N = M every subset is run and the estimate is the exact Banzhaf value of the
scores. A file and an exact copy of it share their credit: if one copy is enough, each gets half
of what either gets alone (the copy is present in half of the other subsets).

Intervals: percentile bootstrap over runs with backend/scoring/stats.py's resampler (`stats.draws`:
1000 resamples, fixed seed, 95%), resampling within each kind of subset (empty, alone, all, mixed)
so every resample keeps the design's shape. It is done for all files of a measure at once, as
matrix products over the resamples' row counts: calling `stats.bootstrap_interval` once per file
and measure took 7 s for 10 files × 10 measures × 104 runs, and the dashboard asks for the table
whenever a run ends. Noise: σ is the
weighted standard deviation of a run's score among the runs with a file and among those without
it, pooled over the files; the estimate's standard error is about 2σ/√R with R runs (half with,
half without), so an effect δ stands out of its 95% interval with about 16σ²/δ² runs.

For lower-is-better measures (perplexity, forgetting) the contribution is reported as the
reduction, so a positive contribution helps on every measure; `standalone` stays the raw score.
"""

from __future__ import annotations

import math
import random
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from backend.scoring import stats

FIXED_DESIGNS = ("none", "alone", "all")  # subsets every study runs, once per seed
DEFAULT_EFFECT = 0.05  # δ of the runs-needed hint: five points on a 0..1 measure


class Slot(NamedTuple):
    """One subset of a study's design: what it is, which draw or file, and its members."""

    design: str  # "none" | "alone" | "all" | "random"
    slot: int  # the file (alone) or the draw (random); 0 for none and all
    members: tuple[int, ...]  # indices into the study's files, ascending


def mixed_count(n: int) -> int:
    """M: the subsets of n files that are neither empty, single files, nor all of them."""
    return max(0, 2**n - n - 2)


def plan(n: int, subsets: int, key: str) -> list[Slot]:
    """The design for n files with N = `subsets` drawn mixed subsets (at most M), seeded by
    `key`. Prefix-stable: asking for more subsets later keeps the first N draws and their slots."""
    if n < 2:
        raise ValueError("an attribution study needs at least two files")
    slots = [Slot("none", 0, ())]
    slots += [Slot("alone", i, (i,)) for i in range(n)]
    slots.append(Slot("all", 0, tuple(range(n))))
    wanted = min(max(0, subsets), mixed_count(n))
    rng = random.Random(f"ltm-tui attribution {key}")
    seen: set[tuple[int, ...]] = set()
    while len(seen) < wanted:
        members = tuple(i for i in range(n) if rng.random() < 0.5)
        if 2 <= len(members) < n and members not in seen:
            seen.add(members)
            slots.append(Slot("random", len(seen) - 1, members))
    return slots


def stratum(size: int, n: int) -> str:
    """The kind of subset a run is, by its size: the bootstrap resamples within each kind."""
    if size == 0:
        return "none"
    if size == 1:
        return "alone"
    return "all" if size >= n else "random"


class _Row(NamedTuple):
    members: frozenset[int]
    value: float
    weight: float
    stratum: str


def _rows(observations: Iterable[Mapping], measure: str, n: int) -> list[_Row]:
    """The runs that scored `measure`, each weighted by 1/π of its subset."""
    usable = []
    for obs in observations:
        value = (obs.get("scores") or {}).get(measure)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        members = frozenset(int(m) for m in obs["members"])
        usable.append((members, float(value)))
    drawn = {m for m, _ in usable if stratum(len(m), n) == "random"}
    mixed_weight = mixed_count(n) / len(drawn) if drawn else 1.0
    return [
        _Row(m, v, mixed_weight if stratum(len(m), n) == "random" else 1.0, stratum(len(m), n))
        for m, v in usable
    ]


def _bootstrap(rows: Sequence[_Row], n: int, samples: int) -> list[tuple[float, float] | None]:
    """Each file's 95% percentile interval of `_banzhaf`, over resamples of the rows drawn with
    replacement within each stratum (the same resamples for every file)."""
    if not rows or samples < 1:
        return [None] * n
    x = np.array([[i in r.members for i in range(n)] for r in rows], dtype=float)  # runs × files
    w = np.array([r.weight for r in rows])
    wv = w * np.array([r.value for r in rows])
    strata: dict[str, list[int]] = {}
    for k, r in enumerate(rows):
        strata.setdefault(r.stratum, []).append(k)
    # the project's one resampler (stats.draws), read as a samples × runs array of indices
    # within each stratum, then counted: how often each run is in each resample
    sizes = [len(m) for m in strata.values()]
    drawn = np.stack([np.frombuffer(d, dtype=f"u{d.itemsize}") for d in stats.draws(sizes, samples)])
    counts = np.zeros((samples, len(rows)))
    start = 0
    for members in strata.values():
        picked = np.asarray(members)[drawn[:, start:start + len(members)]]
        np.add.at(counts, (np.arange(samples)[:, None], picked), 1.0)
        start += len(members)
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = (counts @ (wv[:, None] * x)) / (counts @ (w[:, None] * x)) - (
            counts @ (wv[:, None] * (1 - x))) / (counts @ (w[:, None] * (1 - x)))
    alpha = (1 - stats.CONFIDENCE) / 2
    out: list[tuple[float, float] | None] = []
    for i in range(n):
        values = beta[:, i][np.isfinite(beta[:, i])]
        out.append(None if not len(values) else tuple(float(q) for q in np.quantile(values, [alpha, 1 - alpha])))
    return out


def _weighted_mean(rows: Iterable[_Row]) -> float | None:
    total = weight = 0.0
    for r in rows:
        total += r.weight * r.value
        weight += r.weight
    return total / weight if weight else None


def _banzhaf(rows: Sequence[_Row], i: int) -> float | None:
    """E_w[v | i in S] − E_w[v | i not in S]; None when one side has no run."""
    with_i = _weighted_mean(r for r in rows if i in r.members)
    without = _weighted_mean(r for r in rows if i not in r.members)
    if with_i is None or without is None:
        return None
    return with_i - without


def _noise(rows: Sequence[_Row], n: int) -> float | None:
    """σ: the spread of a run's score within the runs with a file and within those without it
    (weighted, pooled over both sides and over the files). It is what the estimate's standard
    error is made of, 2σ/√R: the training noise, and every other file's effect."""
    total = weight = 0.0
    for i in range(n):
        for side in ([r for r in rows if i in r.members], [r for r in rows if i not in r.members]):
            mean = _weighted_mean(side)
            if mean is None:
                continue
            total += sum(r.weight * (r.value - mean) ** 2 for r in side)
            weight += sum(r.weight for r in side)
    if len(rows) < 3 or not weight:
        return None
    return math.sqrt(total / weight * len(rows) / (len(rows) - 2))  # two means fitted per file


def runs_needed(sigma: float | None, effect: float = DEFAULT_EFFECT) -> int | None:
    """Runs for an effect δ to clear its 95% interval: the estimate's standard error is about
    2σ/√R, and 1.96 × 2σ/√R ≤ δ gives R ≥ 15.4 σ²/δ², rounded up to 16 σ²/δ²."""
    if sigma is None or effect <= 0:
        return None
    return max(1, math.ceil(16 * sigma**2 / effect**2))


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def estimate(
    observations: Sequence[Mapping],
    n: int,
    *,
    measures: Iterable[str] | None = None,
    lower_is_better: Iterable[str] = (),
    samples: int = stats.BOOTSTRAP_SAMPLES,
) -> dict:
    """Per file and measure: the Banzhaf contribution with its 95% bootstrap interval.

    `observations`: one mapping per finished run and slot, `{"members": [file indices],
    "scores": {measure: value}}` (the baseline has no members). Returns `{"rows": [...],
    "measures": {...}}`: each row has `file` (index), `measure`, `rank` (1 = most helpful),
    `contribution`, `ci_low`, `ci_high`, `standalone` (mean raw score of the file alone),
    `runs`, `runs_with`, `runs_without`, `lower_is_better`; each measure has `runs`, `sigma`,
    `mean` and `intercept` (w₀ of the linear datamodel, in the measure's own direction).
    """
    if n < 2:
        raise ValueError("an attribution study needs at least two files")
    lower = set(lower_is_better)
    names = list(measures) if measures is not None else sorted(
        {m for obs in observations for m, v in (obs.get("scores") or {}).items() if v is not None}
    )
    out_rows: list[dict] = []
    summary: dict[str, dict] = {}
    for measure in names:
        rows = _rows(observations, measure, n)
        sign = -1.0 if measure in lower else 1.0
        intervals = _bootstrap(rows, n, samples)
        per_file = []
        for i in range(n):
            beta = _banzhaf(rows, i)
            ci = intervals[i] if beta is not None else None
            lo, hi = (None, None) if ci is None else sorted((sign * ci[0], sign * ci[1]))
            alone = [r.value for r in rows if r.members == frozenset((i,))]
            per_file.append({
                "file": i,
                "measure": measure,
                "contribution": _r(None if beta is None else sign * beta),
                "ci_low": _r(lo),
                "ci_high": _r(hi),
                "standalone": _r(sum(alone) / len(alone) if alone else None),
                "runs": len(rows),
                "runs_with": sum(1 for r in rows if i in r.members),
                "runs_without": sum(1 for r in rows if i not in r.members),
                "lower_is_better": measure in lower,
            })
        order = sorted(per_file, key=lambda r: (r["contribution"] is None, -(r["contribution"] or 0.0), r["file"]))
        for rank, row in enumerate(order, 1):
            row["rank"] = rank
        out_rows += order
        mean = _weighted_mean(rows)
        betas = [_banzhaf(rows, i) for i in range(n)]
        summary[measure] = {
            "runs": len(rows),
            "sigma": _r(_noise(rows, n)),
            "mean": _r(mean),
            "intercept": _r(None if mean is None or None in betas else mean - sum(betas) / 2),
            "lower_is_better": measure in lower,
        }
    return {"rows": out_rows, "measures": summary}
