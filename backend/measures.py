"""From per-scene results to the measures a run is ranked by (pure Python, no torch).

Each battery feeds one measure (its `metric`). Scene results are dicts with `scene_id`,
`kind`, `score` (0..1, or mean token loss for perplexity scenes), `correct`, and `detail`
(which keeps the scene's tags: depth, group, perturb, of, tokens). docs/measures.md explains
each formula; this file is where they are computed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from statistics import fmean
from typing import Iterable, Mapping

# The five measures of the user's plan, plus held-out perplexity.
FIVE_MEASURES = ("reasoning_depth", "consistency", "pressure", "novelty", "compression")
LOWER_IS_BETTER = frozenset({"perplexity"})


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return fmean(values) if values else None


def reasoning_depth(results: list[Mapping]) -> float | None:
    """Mean over depths of the accuracy at that depth, so deep chains weigh as much as short ones."""
    by_depth: dict[int, list[float]] = defaultdict(list)
    for r in results:
        by_depth[int(r["detail"].get("depth") or 1)].append(float(r["score"]))
    return _mean(fmean(v) for v in by_depth.values())


def consistency(results: list[Mapping]) -> float | None:
    """Share of groups whose scenes are all answered right (a scene with no group is its own)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        key = r["detail"].get("group") or f"scene:{r['scene_id']}"
        groups[key].append(bool(r["correct"]))
    return _mean(float(all(v)) for v in groups.values())


def pressure(results: list[Mapping]) -> float | None:
    """Accuracy on the perturbed scenes; with none tagged, on every scene."""
    perturbed = [r for r in results if r["detail"].get("perturb")]
    return _mean(float(r["score"]) for r in (perturbed or results))


def perplexity(results: list[Mapping]) -> float | None:
    """Token-weighted perplexity over the battery's texts: exp(total loss / total tokens)."""
    total = sum(float(r["score"]) * int(r["detail"].get("tokens", 1)) for r in results)
    count = sum(int(r["detail"].get("tokens", 1)) for r in results)
    return math.exp(total / count) if count else None


def mean_score(results: list[Mapping]) -> float | None:
    return _mean(float(r["score"]) for r in results)


AGGREGATORS = {
    "reasoning_depth": reasoning_depth,
    "consistency": consistency,
    "pressure": pressure,
    "perplexity": perplexity,
    # novelty and compression scenes already carry their per-scene score; any other measure
    # a user names is the mean of its scenes' scores.
}


def battery_score(metric: str, results: list[Mapping]) -> float | None:
    return AGGREGATORS.get(metric, mean_score)(results)


def overall(scores: Mapping[str, float | None]) -> float | None:
    """Mean of the measures scored in 0..1 (every measure but perplexity), each weighted equally."""
    usable = [v for k, v in scores.items() if k not in LOWER_IS_BETTER and v is not None]
    return round(fmean(usable), 6) if usable else None


def word_ngrams(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = [w.strip(".,;:!?\"'()«»—-").lower() for w in text.split()]
    words = [w for w in words if w]
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def novelty_score(generated: set[tuple[str, ...]], seen: set[tuple[str, ...]], passed: bool) -> float:
    """Share of the generation's word 3-grams absent from the training corpus; 0 unless its checks
    pass, so fluent-looking noise and empty answers earn nothing."""
    if not passed or not generated:
        return 0.0
    return len(generated - seen) / len(generated)


def compression_score(checks: list[tuple[str, bool]]) -> float:
    """Share of the key-idea checks met, and nothing if the length limit is broken."""
    if any(kind == "max_words" and not ok for kind, ok in checks):
        return 0.0
    ideas = [ok for kind, ok in checks if kind not in ("max_words", "min_words")]
    if not ideas:
        return float(all(ok for _, ok in checks))
    return sum(ideas) / len(ideas)
