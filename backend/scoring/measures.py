"""From per-scene results to the measures a run is ranked by, with their intervals (no torch).

Each battery feeds one measure (its `metric`). Scene results are dicts with `scene_id`, `kind`,
`score` (0..1, or mean token loss for perplexity scenes; None when a scene could not be scored),
`correct`, and `detail` (the scene's tags: depth, group, perturb, of; n_choices, tokens, words,
checks, judge). docs/measures.md explains each formula; this file is where they are computed,
and `score_run` is the one entry point: the worker calls it, and so does re-scoring after a judge.
"""

from __future__ import annotations

import math
from collections import defaultdict
from statistics import fmean
from typing import Callable, Iterable, Mapping

from backend.core.errors import LtmError
from backend.scoring import stats

# The five measures of the user's plan, plus held-out perplexity and forgetting.
FIVE_MEASURES = ("reasoning_depth", "consistency", "pressure", "novelty", "compression")
LOWER_IS_BETTER = frozenset({"perplexity", "forgetting"})
# Numbers reported beside a measure that are never folded into `overall`: the depth curve's
# points (`depth@k`), the largest depth above chance, clean accuracy and the drop under pressure,
# per-scene accuracy of the consistency battery.
AUXILIARY = frozenset({"depth_max", "pressure_clean", "pressure_drop", "consistency_scenes"})
GENERAL_BATTERY = "_general"  # scene rows of the general text behind `forgetting`
ABOVE_CHANCE_P = 0.05  # "clearly above chance": one-sided exact binomial p below this
NGRAM = 3  # novelty counts word 3-grams


class WeightsError(LtmError):
    title = "weights"


def _rows(results: Iterable[Mapping]) -> list[Mapping]:
    return [r for r in results if r.get("score") is not None]


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return fmean(values) if values else None


def _detail(r: Mapping) -> Mapping:
    return r.get("detail") or {}


def _right(r: Mapping) -> bool:
    return bool(r["correct"]) if r.get("correct") is not None else float(r["score"]) >= 1.0


# --- reasoning depth ------------------------------------------------------------------------------


def _depth(r: Mapping) -> int:
    return int(_detail(r).get("depth") or 1)


def _chance(r: Mapping) -> float:
    n = _detail(r).get("n_choices") or len(_detail(r).get("loglik") or ()) or 0
    return 1.0 / n if n else 0.0


def depth_curve(results: Iterable[Mapping]) -> dict[int, dict]:
    """Per depth: accuracy, scenes, chance (mean of 1/choices) and the one-sided p-value of the
    right answers against chance (exact binomial)."""
    by_depth: dict[int, tuple[list[bool], list[float]]] = {}
    for r in results:  # one pass, as the bootstrap calls this a thousand times a run
        if r.get("score") is None:
            continue
        right, chances = by_depth.setdefault(_depth(r), ([], []))
        right.append(_right(r))
        chances.append(_chance(r))
    return {depth: _curve_point(*by_depth[depth]) for depth in sorted(by_depth)}


def _curve_point(right: list[bool], chances: list[float]) -> dict:
    hits, n = sum(right), len(right)
    chance = math.fsum(chances) / n  # = statistics.fmean
    return {"accuracy": hits / n, "n": n, "chance": chance,
            "p_above_chance": stats.binomial_tail(hits, n, chance)}


def reasoning_depth(results: Iterable[Mapping]) -> float | None:
    """Area under the accuracy-by-depth curve, normalised to 0..1: each depth present holds its
    accuracy over a unit of width, so the area over the width is the mean over depths (a 4-step
    chain weighs as much as a 1-step one)."""
    curve = depth_curve(results)
    return _mean(point["accuracy"] for point in curve.values())


def depth_max(results: Iterable[Mapping], curve: dict[int, dict] | None = None) -> float | None:
    """The largest depth whose accuracy is clearly above chance (p < 0.05), 0 when none is
    (`curve`: the results' `depth_curve`, when already computed)."""
    curve = depth_curve(results) if curve is None else curve
    if not curve:
        return None
    above = [d for d, point in curve.items() if point["p_above_chance"] < ABOVE_CHANCE_P]
    return float(max(above, default=0))


# --- consistency ----------------------------------------------------------------------------------


def _group(r: Mapping) -> str:
    return _detail(r).get("group") or f"scene:{r['scene_id']}"


def consistency(results: Iterable[Mapping]) -> float | None:
    """Share of groups whose scenes are all answered right (they state one fact, so agreeing on
    it means every one is right). Ungrouped scenes are left out; a battery with no groups at all
    falls back to the share of scenes right."""
    rows = _rows(results)
    grouped = [r for r in rows if _detail(r).get("group")]
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in grouped or rows:
        groups[_group(r)].append(_right(r))
    return _mean(float(all(v)) for v in groups.values())


def consistency_scenes(results: Iterable[Mapping]) -> float | None:
    """Per-scene accuracy of the same scenes, beside the group share."""
    return _mean(float(_right(r)) for r in _rows(results))


# --- pressure -------------------------------------------------------------------------------------


def _family(r: Mapping) -> str:
    return _detail(r).get("of") or r["scene_id"]


def pressure_items(results: Iterable[Mapping]) -> tuple[list[bool], list[bool]]:
    """(clean items, perturbed items) as right/wrong.

    Clean: each scene that some perturbed copy points at. Perturbed: each distractor,
    contradiction or hint copy on its own, plus one item per clean scene with rotated copies,
    right only if the clean order and every rotation are right.
    """
    rows = _rows(results)
    perturbed = [r for r in rows if _detail(r).get("perturb")]
    targets = {_detail(r)["of"] for r in perturbed if _detail(r).get("of")}
    clean = {r["scene_id"]: _right(r) for r in rows if r["scene_id"] in targets}
    items = [_right(r) for r in perturbed if _detail(r)["perturb"] != "rotated"]
    rotations: dict[str, list[bool]] = defaultdict(list)
    for r in perturbed:
        if _detail(r)["perturb"] == "rotated":
            rotations[_family(r)].append(_right(r))
    for family, rights in rotations.items():
        items.append(all(rights) and clean.get(family, True))
    return list(clean.values()), items


def pressure(results: Iterable[Mapping]) -> float | None:
    """Accuracy on the perturbed items; with none tagged, on every scene."""
    clean, items = pressure_items(results)
    if not items and not clean:
        return _mean(float(_right(r)) for r in _rows(results))
    return _mean(float(v) for v in items)


def pressure_clean(results: Iterable[Mapping]) -> float | None:
    clean, _ = pressure_items(results)
    return _mean(float(v) for v in clean)


def pressure_drop(results: Iterable[Mapping]) -> float | None:
    """Clean accuracy minus perturbed accuracy: how much the pressure costs (lower is better)."""
    clean, items = pressure_items(results)
    if not clean or not items:
        return None
    return fmean(float(v) for v in clean) - fmean(float(v) for v in items)


# --- perplexity and forgetting --------------------------------------------------------------------


def perplexity(results: Iterable[Mapping]) -> float | None:
    """Token-weighted perplexity over the battery's texts: exp(total loss / total tokens)."""
    rows = _rows(results)
    total = sum(float(r["score"]) * int(_detail(r).get("tokens", 1)) for r in rows)
    count = sum(int(_detail(r).get("tokens", 1)) for r in rows)
    return math.exp(total / count) if count else None


def forgetting(results: Iterable[Mapping]) -> float | None:
    """Relative change of perplexity on general text against the base: ppl / base ppl − 1.
    0 means the base's knowledge of ordinary text is intact; +0.5 means 50% more perplexed."""
    rows = [r for r in _rows(results) if _detail(r).get("base_loss") is not None]
    count = sum(int(_detail(r).get("tokens", 1)) for r in rows)
    if not count:
        return None
    loss = sum(float(r["score"]) * int(_detail(r).get("tokens", 1)) for r in rows) / count
    base = sum(float(_detail(r)["base_loss"]) * int(_detail(r).get("tokens", 1)) for r in rows) / count
    return math.exp(loss - base) - 1.0


def mean_score(results: Iterable[Mapping]) -> float | None:
    return _mean(float(r["score"]) for r in _rows(results))


# --- per-scene scores of generate scenes -----------------------------------------------------------


def word_ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    words = [w.strip(".,;:!?\"'()«»—-").lower() for w in text.split()]
    words = [w for w in words if w]
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def novelty_score(
    generated: set[tuple[str, ...]], seen: set[tuple[str, ...]], passed: bool, fluent: bool = True
) -> float:
    """Share of the generation's word 3-grams absent from the training corpus; 0 unless the
    text is fluent (base-model perplexity under the bound) and passes its checks, so noise and
    empty answers earn nothing."""
    if not passed or not fluent or not generated:
        return 0.0
    return len(generated - seen) / len(generated)


def compression_score(checks: list[tuple[str, bool]], words: int | None = None, judge: bool | None = None) -> float:
    """Key ideas covered per word used, within the word limit.

    The key ideas are the content checks (contains, not_contains, regex) and the judge's verdict
    when one was given. score = ideas covered / max(words used, ideas): one word per idea is
    the densest possible statement and scores 1; the same ideas in three times as many words
    score a third. Breaking `max_words` scores 0. Without a word count, the share covered.
    """
    if any(kind == "max_words" and not ok for kind, ok in checks):
        return 0.0
    ideas = [ok for kind, ok in checks if kind not in ("max_words", "min_words")]
    if judge is not None:
        ideas.append(bool(judge))
    if not ideas:
        return float(all(ok for _, ok in checks))
    if words is None:
        return sum(ideas) / len(ideas)
    return sum(ideas) / max(int(words), len(ideas))


def generate_passed(checks: list[tuple[str, bool]], judge: bool | None) -> bool:
    """A generation passes when every check and the judge (when it gave a verdict) say yes."""
    return all(ok for _, ok in checks) and judge is not False


def generic_generate_score(checks: list[tuple[str, bool]], judge: bool | None) -> float | None:
    """Share of the checks passed, the judge's verdict counting as one more check."""
    votes = [ok for _, ok in checks] + ([] if judge is None else [bool(judge)])
    return sum(votes) / len(votes) if votes else None


def rescore_generate(metric: str, detail: Mapping) -> tuple[float | None, bool]:
    """(score, passed) of a generate scene from its detail: checks, words, the judge's verdict
    (`judge.verdict`, when a judge graded it), and for novelty the n-gram counts and the fluency
    gate (`fluent`, False when the base model found the text too perplexing)."""
    checks = [(c["check"], bool(c["passed"])) for c in detail.get("checks") or ()]
    verdict = (detail.get("judge") or {}).get("verdict")
    judge = None if verdict is None else bool(verdict)
    passed = generate_passed(checks, judge)
    if metric == "novelty":
        total = int(detail.get("ngrams") or 0)
        novel = int(detail.get("novel_ngrams") or 0)
        if not passed or detail.get("fluent") is False or not total:
            return 0.0, passed
        return novel / total, passed
    if metric == "compression":
        return compression_score(checks, detail.get("words"), judge), passed
    return generic_generate_score(checks, judge), passed


# --- a run's scores --------------------------------------------------------------------------------

Statistic = Callable[[list], "float | None"]


def _by_scene(r: Mapping) -> str:
    return r["scene_id"]


def _specs(metric: str, rows: list[Mapping]) -> list[tuple[str, Statistic, Callable, Callable | None]]:
    """(score name, statistic, bootstrap cluster, bootstrap stratum) for one measure's rows."""
    if metric == "reasoning_depth":
        curve = _LastCurve(rows)  # the depth scores all read one curve per resample
        specs = [
            ("reasoning_depth", lambda rs: _mean(p["accuracy"] for p in curve(rs).values()), _by_scene, _depth),
            ("depth_max", lambda rs: depth_max(rs, curve(rs)), _by_scene, _depth),
        ]
        for depth in sorted({_depth(r) for r in _rows(rows)}):
            specs.append((f"depth@{depth}", _accuracy_at(depth, curve), _by_scene, _depth))
        return specs
    if metric == "consistency":
        return [("consistency", consistency, _group, None), ("consistency_scenes", consistency_scenes, _group, None)]
    if metric == "pressure":
        return [
            ("pressure", pressure, _family, None),
            ("pressure_clean", pressure_clean, _family, None),
            ("pressure_drop", pressure_drop, _family, None),
        ]
    if metric == "perplexity":
        return [("perplexity", perplexity, _by_scene, None)]
    if metric == GENERAL_BATTERY:
        return [("forgetting", forgetting, _by_scene, None)]
    return [(metric, mean_score, _by_scene, None)]


class _LastCurve:
    """`depth_curve` for the bootstrap of one run's depth scenes: each row's depth, outcome and
    chance are read once (a resample holds the same row objects), and the curve of the rows it
    was last called with is kept while they are passed again (every depth score reads one
    curve per resample). Rows it has not seen go through `depth_curve` itself."""

    def __init__(self, rows: list[Mapping]) -> None:
        self._held = rows  # keeps the rows alive, so their ids stay theirs
        self._facts = {id(r): (_depth(r), _right(r), _chance(r)) for r in _rows(rows)}
        self._last: object = None
        self._curve: dict[int, dict] = {}

    def __call__(self, rows: list) -> dict[int, dict]:
        if rows is not self._last:  # identity: the list is held, so its id cannot be reused
            self._last, self._curve = rows, self._compute(rows)
        return self._curve

    def _compute(self, rows: list) -> dict[int, dict]:
        facts = self._facts
        try:
            picked = [facts[id(r)] for r in rows if r.get("score") is not None]
        except KeyError:
            return depth_curve(rows)
        by_depth: dict[int, tuple[list[bool], list[float]]] = {}
        for depth, right, chance in picked:
            rights, chances = by_depth.setdefault(depth, ([], []))
            rights.append(right)
            chances.append(chance)
        return {depth: _curve_point(*by_depth[depth]) for depth in sorted(by_depth)}


def _accuracy_at(depth: int, curve: _LastCurve) -> Statistic:
    def statistic(rows: list) -> float | None:
        point = curve(rows).get(depth)
        return None if point is None else point["accuracy"]

    return statistic


def score_run(scene_results: Iterable[Mapping], *, intervals: bool = True) -> dict[str, dict]:
    """Every score of one run: {name: {value, n, lo, hi}} (lo/hi: the bootstrap 95% interval
    over scenes, resampling groups and clean families whole and each depth on its own)."""
    by_metric: dict[str, list[Mapping]] = defaultdict(list)
    for r in scene_results:
        metric = GENERAL_BATTERY if r.get("battery") == GENERAL_BATTERY else r.get("metric")
        by_metric[metric].append(r)
    scores: dict[str, dict] = {}
    for metric, rows in by_metric.items():
        for (cluster, stratum), specs in _shared_draws(_specs(metric, rows)).items():
            cis = (stats.bootstrap_intervals(_rows(rows), specs, cluster=cluster, stratum=stratum)
                   if intervals else {})
            for name, statistic in specs.items():
                value = statistic(rows)
                if value is None:
                    continue
                ci = cis.get(name)
                scores[name] = {"value": round(value, 6), "n": len(_rows(rows)),
                                "lo": None if ci is None else round(ci[0], 6),
                                "hi": None if ci is None else round(ci[1], 6)}
    return scores


def _shared_draws(specs) -> dict[tuple, dict[str, Statistic]]:
    """A measure's statistics grouped by (cluster, stratum): those in one group are bootstrapped
    on the same resamples (drawn once; the intervals are the same as drawing them for each)."""
    groups: dict[tuple, dict[str, Statistic]] = defaultdict(dict)
    for name, statistic, cluster, stratum in specs:
        groups[(cluster, stratum)][name] = statistic
    return groups


def pooled_scores(runs: list[list[Mapping]]) -> dict[str, dict]:
    """Scores pooled over repeats of one corpus with different seeds: {name: {value, n, lo, hi,
    seeds}}, the value the mean over seeds and the interval a two-level bootstrap (seeds drawn
    with replacement, then each drawn seed's scenes, clustered as in `score_run`)."""
    by_metric: dict[str, list[list[Mapping]]] = defaultdict(lambda: [[] for _ in runs])
    for i, rows in enumerate(runs):
        for r in rows:
            metric = GENERAL_BATTERY if r.get("battery") == GENERAL_BATTERY else r.get("metric")
            by_metric[metric][i].append(r)
    scores: dict[str, dict] = {}
    for metric, per_run in by_metric.items():
        per_run = [_rows(rows) for rows in per_run if _rows(rows)]
        if not per_run:
            continue
        groups = _shared_draws(_specs(metric, [r for rows in per_run for r in rows]))
        for (cluster, stratum), specs in groups.items():
            pooled = stats.bootstrap_over_runs_many(per_run, specs, cluster=cluster, stratum=stratum)
            for name, (mean, ci) in pooled.items():
                if mean is None:
                    continue
                scores[name] = {"value": round(mean, 6), "n": sum(len(rows) for rows in per_run), "seeds": len(per_run),
                                "lo": None if ci is None else round(ci[0], 6),
                                "hi": None if ci is None else round(ci[1], 6)}
    return scores


def is_ranked(name: str) -> bool:
    """Whether a score can carry weight in `overall`: 0..1, higher is better, not a side number."""
    return name not in LOWER_IS_BETTER and name not in AUXILIARY and "@" not in name


def default_weights(names: Iterable[str]) -> dict[str, float]:
    return {name: 1.0 for name in names if is_ranked(name)}


def parse_weights(spec: str | None) -> dict[str, float]:
    """`depth=2,consistency=1` (short names as in the table work too) or a YAML/JSON file
    holding such a mapping. A measure not named keeps weight 1; weight 0 leaves it out."""
    if not spec:
        return {}
    from pathlib import Path

    path = Path(spec).expanduser()
    if path.is_file():
        import yaml

        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else " ".join(str(exc).split())[:120]
            raise WeightsError(f"{spec}: cannot read the weights file: {why}") from None
        if not isinstance(loaded, dict):
            raise WeightsError(f"{spec}: expected a mapping such as `reasoning_depth: 2`")
        pairs = [(str(k), v) for k, v in loaded.items()]
    else:
        pairs = []
        for part in spec.split(","):
            if not part.strip():
                continue
            name, sep, value = part.partition("=")
            if not sep:
                raise WeightsError(f"{part.strip()!r}: write MEASURE=WEIGHT, e.g. --weights depth=2,novelty=0.5")
            pairs.append((name.strip(), value.strip()))
    weights = {}
    for name, value in pairs:
        full = SHORT_NAMES.get(name, name)
        if not is_ranked(full):
            raise WeightsError(f"{name} cannot be weighted into overall (it is lower-is-better or a side number)")
        try:
            weight = float(value)
        except (TypeError, ValueError):
            raise WeightsError(f"{name}={value}: the weight must be a number") from None
        if weight < 0 or math.isnan(weight) or math.isinf(weight):
            raise WeightsError(f"{name}={value}: the weight must be 0 or more")
        weights[full] = weight
    return weights


SHORT_NAMES = {
    "depth": "reasoning_depth", "consist": "consistency", "press": "pressure",
    "novel": "novelty", "compr": "compression",
}


def overall(scores: Mapping[str, float | None], weights: Mapping[str, float] | None = None) -> float | None:
    """Weighted mean of the ranked measures present (equal weights unless given)."""
    use = {**default_weights(scores), **(weights or {})}
    pairs = [(use[k], v) for k, v in scores.items() if k in use and v is not None and is_ranked(k)]
    total = sum(w for w, _ in pairs)
    if not pairs or total <= 0:
        return None
    return round(sum(w * v for w, v in pairs) / total, 6)


def overall_interval(
    scores: Mapping[str, float | None], intervals: Mapping[str, Iterable[float] | None],
    weights: Mapping[str, float] | None = None,
) -> tuple[float, float] | None:
    """The interval of `overall`, from the measures' intervals (independent batteries)."""
    use = {**default_weights(scores), **(weights or {})}
    use = {k: w for k, w in use.items() if k in scores and is_ranked(k)}
    values = {k: v for k, v in scores.items() if v is not None}
    ci = stats.combine_intervals(values, {k: (list(v) if v else None) for k, v in intervals.items()}, use)
    return None if ci is None else (round(ci[0], 6), round(ci[1], 6))


# Kept for callers of v1: one measure's value from its scene rows.
def battery_score(metric: str, results: list[Mapping]) -> float | None:
    specs = _specs(metric, results)
    return specs[0][1](results) if specs else None
