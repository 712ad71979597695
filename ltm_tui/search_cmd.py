"""`ltm-tui search`: hyperparameters (and corpus subsets) searched with Optuna, one job a trial.

    ltm-tui search --space SPACE.yaml --trials N [--sampler tpe|grid] [FILE...] [--scenes DIR]

The loop runs in this process with Optuna's ask-and-tell interface: ask a trial, queue its job
through the job service (like `ltm-tui run`), read the job's `eval_loss` events from its run
folder into trial.report() and cancel the job when the pruner says so, then tell the study the
run's score. The study is a journal file in WORKSPACE/search/<study>/, so the same command
resumes it after any stop: a trial whose job is still queued or running is waited for, an
interrupted one is retried (it resumes from its checkpoint), a failed one ends FAIL with the
job's reason. The summary goes to DuckDB through the service (op `search`, docs/search.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

# `run`'s flags that set the base and the settings every trial starts from (copied from run's
# parser, so help and checks never drift apart); a space parameter overrides its own.
SHARED_WITH_RUN = (
    "base", "preset", "quant", "trust_remote_code", "device", "scenes", "seed", "priority",
    "steps", "epochs", "min_train_tokens", "lr", "block_size", "micro_batch", "grad_accum",
    "lora_r", "lora_alpha", "quiet",
)
POLL_SECONDS = 0.5
MAX_RETRIES = 2  # an interrupted trial job (service or machine restart) is queued again this often
# the pruner is asked only while a quarter of the training remains: stopping later saves little
# and loses the trial's score (the demo pruned a trial at step 140 of 150)
PRUNE_BEFORE = 0.75


def add_parser(sub, run: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = sub.add_parser("search", help="search hyperparameters (and file subsets) with Optuna; resumable")
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="corpora searched over (default on resume: the study's own)")
    p.add_argument("--space", required=True, metavar="SPACE.yaml", help="the search space (docs/search.md)")
    p.add_argument("--trials", required=True, type=int, metavar="N",
                   help="trials in the study; a resumed study runs only the ones missing")
    p.add_argument("--sampler", choices=["tpe", "grid"], default="tpe", help="tpe (default) or grid")
    p.add_argument("--study", metavar="NAME", help="the study's name (default: the space's study: or file name)")
    p.add_argument("--probes", action="store_true", help="also look inside each trial's network (slower)")
    p.add_argument("--format", choices=["table", "json"], default="table", help="final output")
    for action in run._actions:
        if action.dest in SHARED_WITH_RUN:
            p._add_action(action)
    return p


def cmd_search(args) -> int:
    from backend import search as S
    from backend.errors import SpaceError
    from ltm_tui.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, _job_settings, _workspace

    space = S.load_space(args.space)
    if args.study:
        if not S.STUDY_NAME.match(args.study):
            raise SpaceError(f"--study {args.study!r}: use letters, digits, _ . - (at most 64)")
        space = replace(space, study=args.study)
    if args.trials < 1:
        raise SpaceError(f"--trials {args.trials}: give at least 1")
    settings = _job_settings(args)
    S.check_base(space, settings.base["base"] == "micro")
    S.check_objective(space, settings.scenes)
    ws = _workspace(args).ensure()
    folder = S.study_dir(ws.root, space.study)
    files = _files(args, space, folder)
    target = args.trials
    if args.sampler == "grid":
        size = S.grid_size(S.grid_space(space, files))
        if target > size:
            _say(f"the grid holds {size} points: {size} trials, not {target}")
            target = size
    base = asdict(settings)
    study = S.open_study(folder, space, args.sampler, files, base, args.seed)
    record = folder / "files.json"  # the files a resume takes when none are named
    if not record.exists():
        record.write_text(json.dumps(files, indent=1), encoding="utf-8")
    loop = SearchLoop(ws, study, space, args.sampler, files, base, target, args)
    try:
        loop.run()
    except KeyboardInterrupt:
        loop.save()
        _say(f"search {space.study} stopped; a queued or running trial goes on in the service."
             " The same command resumes the study.")
        return EXIT_INTERRUPTED
    report = loop.report()
    if args.format == "json":
        print(json.dumps(report, ensure_ascii=False, indent=1))
    else:
        print("\n".join(report_lines(report)))
    return EXIT_OK if report["best"] is not None else EXIT_FAILED


def _files(args, space, folder: Path) -> list[str]:
    from backend import search as S
    from backend.errors import SpaceError

    record = folder / "files.json"
    if args.files:
        files = S.check_files(args.files, space.subsets, space.path)
    elif record.exists():
        files = json.loads(record.read_text(encoding="utf-8"))
    else:
        raise SpaceError(f"study {space.study!r} is new: name the files to search over (FILE...)")
    return files


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class SearchLoop:
    def __init__(self, ws, study, space, sampler: str, files: list[str], base: dict, target: int, args) -> None:
        self.ws, self.study, self.space, self.sampler = ws, study, space, sampler
        self.files, self.base, self.target, self.args = files, base, target, args
        self.quiet = args.quiet  # the lines go to stderr: JSON on stdout stays clean

    # -- the service, a connection per request (a restarted service is found again) ----------

    def call(self, op: str, **kwargs):
        from backend.client import connect

        with connect(self.ws) as client:
            return client.call(op, **kwargs)

    def save(self) -> tuple[dict, str | None]:
        """The study's summary into DuckDB (through the service) for the dashboard; returns it
        and why the importances are missing, if they are."""
        from backend import search as S

        imp, why = S.importances(self.study)
        summary = S.study_summary(self.study, self.space, self.sampler, self.files, self.target, imp)
        self.call("search_save", study=summary, trials=S.trial_rows(self.study))
        return summary, why

    def log(self, line: str) -> None:
        if not self.quiet:
            _say(line)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        from backend import search as S

        rows = S.trial_rows(self.study)
        self.log(
            f"study {self.space.study}: {S.finished_count(rows)} of {self.target} trials finished;"
            f" {self.sampler} sampler; {self.study_path()}"
        )
        self.save()
        for frozen in self.study.get_trials(deepcopy=False, states=[_state("RUNNING")]):
            self.resume(frozen)
        while S.finished_count(S.trial_rows(self.study)) < self.target:
            self.one_trial()

    def study_path(self) -> str:
        from backend import search as S

        return str(S.study_dir(self.ws.root, self.space.study) / "journal.log")

    def resume(self, frozen) -> None:
        """A trial asked before a stop: wait for its job, or end it if it never got one."""
        import optuna

        trial = optuna.trial.Trial(self.study, frozen._trial_id)
        run_id = frozen.user_attrs.get("run_id")
        if run_id is None:
            self.finish(trial, "FAIL", error="stopped before its job was queued")
            return
        self.log(f"trial {trial.number}: waiting for its job {run_id} (asked before the last stop)")
        self.watch(trial, run_id, seen=set(frozen.intermediate_values))

    def one_trial(self) -> None:
        from backend import search as S

        trial = self.study.ask()
        params = S.suggest(trial, self.space, self.files)
        shown = _params_text(params)
        members = S.chosen_files(params, self.files, self.space.subsets)
        if not members:
            self.finish(trial, "FAIL", error="the subset holds no file")
            return
        corpus = S.combined_corpus(members, S.study_dir(self.ws.root, self.space.study) / "corpora")
        settings = S.trial_settings(self.base, self.space, params)
        sub = self.call("submit", paths=[str(corpus)], settings=settings, seeds=[self.args.seed],
                        priority=self.args.priority)
        if not sub["run_ids"]:
            self.finish(trial, "FAIL", error="; ".join(sub["errors"]) or "nothing was queued")
            return
        run_id = sub["run_ids"][0]
        trial.set_user_attr("run_id", run_id)
        self.save()
        self.log(f"trial {trial.number}: {shown} -> job {run_id}")
        self.watch(trial, run_id)

    def watch(self, trial, run_id: str, seen: set | None = None) -> None:
        """Feed the job's eval losses to the pruner until the job ends; then tell the study."""
        from backend import search as S
        from backend.events import read_events

        path = self.ws.run_dir(run_id) / "events.jsonl"
        offset = 0
        seen = set(seen or ())
        while True:
            events, offset = read_events(path, offset)
            for e in events:
                if e.get("type") != "metric" or e.get("name") != "eval_loss" or e.get("step") in seen:
                    continue
                seen.add(e["step"])
                trial.report(S.intermediate(float(e["value"]), self.space.direction), int(e["step"]))
                self.log(f"trial {trial.number}: eval loss {e['value']:.4f} at step {e['step']}/{e.get('total')}")
                late = e.get("total") and e["step"] > PRUNE_BEFORE * e["total"]
                if not late and trial.should_prune():
                    why = f"pruned at step {e['step']}: eval loss {e['value']:.4f}"
                    trial.set_user_attr("pruned", why)  # before the cancel: a stop between them still reads PRUNED
                    self._cancel(run_id)
                    self.finish(trial, "PRUNED", error=why)
                    return
            job = self.call("jobs", runs=[run_id])
            status = job[0]["status"] if job else "missing"
            if status == "done":
                detail = self.call("run", run_id=run_id)
                value = S.objective_value(detail["run"], detail.get("scores") or {}, self.space.objective)
                if value is None:
                    self.finish(trial, "FAIL", error=f"run {run_id} has no {self.space.objective} score")
                else:
                    self.finish(trial, "COMPLETE", value=float(value))
                return
            if status == "cancelled":
                why = trial.user_attrs.get("pruned")
                self.finish(trial, "PRUNED" if why else "FAIL", error=why or f"job {run_id} was cancelled")
                return
            if status == "interrupted" and trial.user_attrs.get("retries", 0) < MAX_RETRIES:
                trial.set_user_attr("retries", trial.user_attrs.get("retries", 0) + 1)
                self.log(f"trial {trial.number}: job {run_id} was interrupted; queued again (it resumes)")
                self.call("retry", run_id=run_id)
            elif status in ("failed", "interrupted", "missing"):
                reason = job[0].get("error") if job else f"job {run_id} is not in this workspace"
                self.finish(trial, "FAIL", error=f"job {status}: {reason}")
                return
            time.sleep(POLL_SECONDS)

    def _cancel(self, run_id: str) -> None:
        from backend.errors import LtmError

        try:
            self.call("cancel", run_id=run_id)
        except LtmError:
            pass  # it ended meanwhile: nothing to stop

    def finish(self, trial, state: str, *, value: float | None = None, error: str | None = None) -> None:
        from backend import search as S

        if error:
            trial.set_user_attr("error", error)
        if state == "COMPLETE":
            self.study.tell(trial, value)
        else:
            self.study.tell(trial, state=_state(state))
        self.save()
        top = S.best(self.study)
        best = f"; best so far {top.value:.4f} (trial {top.number})" if top else ""
        what = f"{self.space.objective} {value:.4f}" if value is not None else (error or "")
        self.log(f"trial {trial.number}: {state} {what}{best}")

    def report(self) -> dict:
        from backend import search as S

        summary, why = self.save()
        rows = S.trial_rows(self.study)
        top = next((r for r in rows if r["number"] == summary["best_trial"]), None)
        return {"study": summary, "trials": rows, "best": top, "importances": summary["importances"],
                "importances_note": why,
                "journal": self.study_path()}


def _state(name: str):
    from optuna.trial import TrialState

    return TrialState[name]


def _params_text(params: dict) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def report_lines(report: dict) -> list[str]:
    """The trials as a table, then the best trial and the importances."""
    s = report["study"]
    rows = report["trials"]
    names = list(dict.fromkeys(k for r in rows for k in r["params"]))
    head = ["trial", "state", s["objective"], *names, "eval loss", "run"]
    cells = [
        [str(r["number"]), r["state"], "-" if r["value"] is None else f"{r['value']:.4f}",
         *[_fmt(r["params"].get(k, "-")) for k in names],
         "-" if r["last_value"] is None else f"{r['last_value']:.3f}@{r['last_step']}", r["run_id"] or "-"]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]
    lines = [f"study {s['study']}: {len(rows)} trials, {s['sampler']} sampler, {s['direction']} {s['objective']}",
             "  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    best = report["best"]
    if best is None:
        lines.append("no trial finished with a score")
    else:
        lines.append(f"best: trial {best['number']}, {s['objective']} {best['value']:.4f}, run {best['run_id']}:"
                     f" {_params_text(best['params'])}")
    if report["importances"]:
        lines.append("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in report["importances"].items()))
    else:
        lines.append(f"importance: n/a ({report['importances_note']})")
    for r in rows:
        if r["state"] == "FAIL" and r["error"]:
            lines.append(f"trial {r['number']} failed: {r['error']}")
    return lines
