"""Attribution studies: the runs on subsets of files that `ltm-tui attribute` asks for, kept so a
study resumes after any stop, and its table (backend/studies/attribution.py) on request.

Runs inside the job service, which owns the DuckDB connection and the queue (service ops
`attribute` and `attribution`, docs/attribution.md). A study is named by its files' paths and
contents and the run settings: the same command names the same study. Each slot of its design
(baseline, each file alone, all files, the drawn mixed subsets; per seed) is filled by a run:
the one recorded for the slot, else any run in the workspace on the same text with the same
settings and seed (so two files with the same text, or a file already trained by `ltm-tui run`,
are trained once), else a new one. A subset of several files is a corpus set under
`attribution/<study>/` naming them, read in place (backend/ingest/corpora.py); its members are sorted
by content, so one text has one id whichever study asks for it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from backend.core.errors import LtmError
from backend.core.states import JobState
from backend.ingest.corpora import corpus_set_id, expand_paths, inspect_cached, write_corpus_set
from backend.jobs.manager import JobManager
from backend.jobs.settings import JobSettings, battery_fingerprint
from backend.jobs.store import Store
from backend.scoring.measures import AUXILIARY, FIVE_MEASURES, LOWER_IS_BETTER, is_ranked
from backend.studies import attribution

MIN_SUBSETS = 2  # with fewer mixed subsets, most of the 2^n subsets have no run at all


class AttributionError(LtmError):
    title = "attribute"


def default_subsets(n: int) -> int:
    """N when none is given: 2 per file, at least 8, at most every mixed subset."""
    return min(attribution.mixed_count(n), max(8, 2 * n))


def _settings_key(settings: JobSettings) -> dict:
    """What makes two runs comparable: base, batteries (by content), training and LoRA knobs.
    Probes are left out: they look inside a network and change no score."""
    return {
        "base": settings.base,
        "scenes": settings.scenes,
        "battery": battery_fingerprint(Path(settings.scenes)),
        "train": settings.train,
        "lora": settings.lora,
    }


def _comparable(record: dict) -> str:
    return json.dumps({k: v for k, v in record.items() if k != "probes"}, sort_keys=True)


def checked_request(paths: list[str], subsets: int | None) -> tuple[list[Path], int, list[str]]:
    """The study's files (sorted by path), its N and notes; bad input raises one clear line.
    Reads only the file system, so the CLI checks a request before it starts the service."""
    files, errors = expand_paths(paths)
    if errors:
        raise errors[0]
    files.sort(key=str)
    if len(files) < 2:
        only = files[0].name if files else "none"
        raise AttributionError(
            f"attribution compares files: give two or more (got {only}); `ltm-tui run FILE` trains on one"
        )
    n = len(files)
    mixed = attribution.mixed_count(n)
    asked = default_subsets(n) if subsets is None else int(subsets)
    if asked < min(MIN_SUBSETS, mixed):
        raise AttributionError(
            f"--subsets {asked} is too few: {n} files have {mixed} mixed subsets and the estimate needs runs"
            f" on at least {min(MIN_SUBSETS, mixed)} of them (default {default_subsets(n)})"
        )
    notes = []
    if asked > mixed:
        notes.append(f"{n} files have {mixed} mixed subsets, all in the study: more --subsets add nothing, "
                     "more --seeds do")
    return files, asked, notes


def submit_study(
    manager: JobManager,
    paths: list[str],
    settings: JobSettings,
    *,
    subsets: int | None = None,
    seeds: list[int] = (0,),
    priority: int = 0,
) -> dict[str, Any]:
    """Create or resume a study: every slot gets a run, reusing what exists, queueing the rest."""
    store = manager.store
    files, asked, notes = checked_request(paths, subsets)
    infos = [inspect_cached(f) for f in files]
    n = len(infos)
    mixed = attribution.mixed_count(n)
    key = _settings_key(settings)
    file_rows = [{"path": str(i.path), "name": i.name, "sha256": i.sha256} for i in infos]
    blob = json.dumps([[(f["path"], f["sha256"]) for f in file_rows], key], sort_keys=True)
    study_id = hashlib.sha256(blob.encode()).hexdigest()[:12]
    study = store.save_attribution_study(
        study_id, files=file_rows, settings=key, subsets=min(asked, mixed), seeds=list(seeds)
    )
    slots = attribution.plan(n, study["subsets"], study_id)
    recorded = {(s["design"], s["slot"], s["seed"]): s["run_id"] for s in store.attribution_slots(study_id)}
    runs = {r["run_id"]: r for r in store.list_runs()}
    by_text = _reusable(runs.values())
    folder = manager.workspace.root / "attribution" / study_id
    queued, retried, reused = [], [], 0
    study_runs: list[str] = []
    for seed in study["seeds"]:
        record = manager.settings_record(settings, settings.baseline_key(seed))
        for slot in slots:
            run = runs.get(recorded.get((slot.design, slot.slot, seed)))
            if slot.design == "none":
                if run is None or JobState(run["status"]).ended_without_result():
                    run_id = manager.ensure_baseline(settings, seed, record["baseline_key"], priority)
                    if run_id not in runs:
                        queued.append(run_id)
                    run = runs.get(run_id) or store.get_run(run_id)
            elif run is None:
                members = sorted((infos[i] for i in slot.members), key=lambda i: (i.sha256, str(i.path)))
                text_id = members[0].sha256 if len(members) == 1 else corpus_set_id(m.sha256 for m in members)
                run = by_text.get((text_id, seed, _comparable(record)))
                if run is None:
                    path = str(members[0].path)
                    if len(members) > 1:
                        folder.mkdir(parents=True, exist_ok=True)
                        name = "all" if slot.design == "all" else f"subset-{slot.slot:02d}-{_stems(infos, slot)}"
                        path = str(write_corpus_set(
                            folder / f"{name}.corpora", [m.path for m in members],
                            note=f"attribution study {study_id}: {slot.design} {slot.slot}",
                        ))
                    sub = manager.submit([path], settings, seeds=[seed], priority=priority)
                    if sub.errors:
                        raise sub.errors[0]
                    run = store.get_run(sub.run_ids[0])
                    queued.append(run["run_id"])
                    by_text[(text_id, seed, _comparable(record))] = run
            run_id = run["run_id"]
            if run_id in queued or run_id in retried:
                pass
            elif not JobState(run["status"]).ended_without_result() or run["kind"] == "baseline":
                reused += run["status"] == "done"
            else:  # interrupted, failed or cancelled: again, from its newest checkpoint
                manager.retry(run_id)
                retried.append(run_id)
            runs[run_id] = store.get_run(run_id)
            store.set_attribution_slot(study_id, design=slot.design, slot=slot.slot, seed=seed,
                                       members=list(slot.members), run_id=run_id)
            if run_id not in study_runs:
                study_runs.append(run_id)
    return {
        "study": study_id,
        "run_ids": study_runs,
        "queued": queued,
        "retried": retried,
        "reused": reused,
        "files": n,
        "subsets": study["subsets"],
        "seeds": study["seeds"],
        "notes": notes,
    }


def _stems(infos, slot: attribution.Slot) -> str:
    """Which files a subset holds, for its set's name (the results table shows it)."""
    stems = [Path(infos[i].name).stem[:12] for i in slot.members]
    return "+".join(stems[:3]) + (f"+{len(stems) - 3}more" if len(stems) > 3 else "")


def _reusable(runs) -> dict[tuple, dict]:
    """Adapter runs by (text id, seed, settings): a finished one first, then a live one, then
    one that can be retried."""

    def rank(status: str) -> int:
        state = JobState(status)
        return 0 if state is JobState.DONE else 1 if not state.is_terminal() else 2

    best: dict[tuple, dict] = {}
    for run in runs:
        if run["kind"] != "adapter" or not run.get("corpus_id"):
            continue
        key = (run["corpus_id"], run["seed"], _comparable(run["settings"]))
        old = best.get(key)
        if old is None or rank(run["status"]) < rank(old["status"]):
            best[key] = run
    return best


def _measure_order(names) -> list[str]:
    wanted = [m for m in names if m != "overall" and m not in AUXILIARY and "@" not in m
              and (is_ranked(m) or m in LOWER_IS_BETTER)]
    first = [m for m in FIVE_MEASURES if m in wanted]
    return ["overall"] * ("overall" in names) + [*first, *sorted(set(wanted) - set(first))]


def report(store: Store, study_id: str, *, effect: float = attribution.DEFAULT_EFFECT) -> dict[str, Any]:
    """A study's table: per file and measure, the contribution with its interval (shape in
    docs/attribution.md), with the runs' states and how many runs an effect of `effect` needs."""
    study = store.attribution_study(study_id)
    if study is None:
        known = ", ".join(s["study_id"] for s in store.attribution_studies()[:5]) or "none yet"
        raise AttributionError(f"no attribution study {study_id!r} in this workspace (studies: {known})")
    files = study["files"]
    n = len(files)
    slots = store.attribution_slots(study_id)
    states: dict[str, int] = {}
    observations, seen = [], {}
    for s in slots:
        run = seen.get(s["run_id"]) or store.get_run(s["run_id"])
        seen[s["run_id"]] = run
        if run is None:
            continue
        if run["status"] == "done":
            scores = {k: v for k, v in store.run_scores(run["run_id"]).items() if v is not None}
            if run.get("overall") is not None:
                scores["overall"] = run["overall"]
            observations.append({"members": s["members"], "scores": scores, "design": s["design"]})
    for run in seen.values():
        if run is not None:
            states[run["status"]] = states.get(run["status"], 0) + 1
    measures = _measure_order({m for o in observations for m in o["scores"]})
    table = attribution.estimate(observations, n, measures=measures, lower_is_better=LOWER_IS_BETTER) if observations \
        else {"rows": [], "measures": {}}
    rows = [{"corpus": files[r["file"]]["name"], "path": files[r["file"]]["path"], **r} for r in table["rows"]]
    baseline: dict[str, list[float]] = {}  # the empty subset's scores, over its seeds
    for o in observations:
        if not o["members"]:
            for m, v in o["scores"].items():
                baseline.setdefault(m, []).append(v)
    summary = table["measures"]
    for m, info in summary.items():
        info["runs_needed"] = attribution.runs_needed(info["sigma"], effect)
    return {
        "study": study_id,
        "files": files,
        "base": _base_label(study["settings"]),
        "subsets": study["subsets"],
        "mixed_subsets": attribution.mixed_count(n),
        "seeds": study["seeds"],
        "runs": {"slots": len(slots), "distinct": len(seen), **states},
        "observations": len(observations),
        "baseline": {m: round(sum(v) / len(v), 6) for m, v in baseline.items()},
        "effect": effect,
        "measures": summary,
        # a study whose runs are not all ended yet: its contributions still move with each run
        "settled": not any(not JobState(state).is_terminal() for state in states),
        "advice": advice(summary.get("overall"), len(observations), study, n, effect,
                         unfinished=sum(k for state, k in states.items() if not JobState(state).is_terminal())),
        "rows": rows,
    }


def advice(overall: dict | None, have: int, study: dict, n: int, effect: float, unfinished: int = 0) -> str | None:
    """One line: the noise seen on `overall` and how many runs an effect of δ needs (while
    runs are unfinished, only how many are in so far: the noise itself is still being measured)."""
    if not overall or overall.get("sigma") is None:
        return None
    sigma, needed = overall["sigma"], attribution.runs_needed(overall["sigma"], effect)
    line = (f"noise on overall: σ = {sigma:.3f} a run; an effect of δ = {effect:g} stands out of its 95% "
            f"interval with about 16σ²/δ² = {needed} run{'s' * (needed != 1)}; this study has {have}")
    if unfinished:
        return line + f" so far, {unfinished} more to come: wait for them before reading the colours"
    if needed <= have:
        return line + ": enough"
    seeds = max(1, len(study["seeds"]))
    fixed = n + 2  # baseline, each file alone, all together
    mixed = attribution.mixed_count(n)
    want = -(-needed // seeds) - fixed  # mixed subsets per seed
    if want <= mixed:
        return line + f": ask for --subsets {want}"
    per_seed = fixed + mixed
    return line + f": all {mixed} mixed subsets are in; ask for --seeds {-(-needed // per_seed)}"


def _base_label(settings: dict) -> str:
    base = settings.get("base") or {}
    if base.get("base") == "micro":
        return f"micro:{base.get('preset') or 'small'}"
    return str(base.get("base"))


def list_studies(store: Store) -> list[dict[str, Any]]:
    """Every study, newest first, with its runs' progress."""
    out = []
    for study in store.attribution_studies():
        run_ids = {s["run_id"] for s in store.attribution_slots(study["study_id"])}
        done = sum(1 for r in run_ids if (store.get_run(r) or {}).get("status") == "done")
        out.append({
            "study": study["study_id"],
            "files": [f["name"] for f in study["files"]],
            "base": _base_label(study["settings"]),
            "subsets": study["subsets"],
            "seeds": study["seeds"],
            "runs": len(run_ids),
            "done": done,
            "created_at": study["created_at"],
            "updated_at": study["updated_at"],
        })
    return out


def handle(service, op: str, args: dict[str, Any]) -> Any:
    """The service's `attribute` (create or resume a study) and `attribution` (read) ops."""
    if op == "attribute":
        settings = JobSettings(**args["settings"])
        with service.lock:
            return submit_study(
                service.manager, list(args["paths"]), settings, subsets=args.get("subsets"),
                seeds=list(args.get("seeds") or [0]), priority=int(args.get("priority", 0)),
            )
    if args.get("study"):
        return report(service.store, str(args["study"]), effect=float(args.get("effect") or attribution.DEFAULT_EFFECT))
    return list_studies(service.store)

