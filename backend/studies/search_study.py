"""Search studies in the job service: Optuna's ask-and-tell loop, one thread a study.

`ltm-tui search` checks its space and files, then asks the service to run the study (op
`search_start`) and follows its lines; the loop lives here, so a dropped SSH connection or a
closed terminal stops nothing. Each trial is an ordinary job: asked, queued (`submit`), its
`eval_loss` events fed to the pruner (a pruned trial's job is cancelled), then told the run's
score. The study is a journal file in `search/<study>/` and the request that started it is
`search/<study>/request.json`: a service that starts goes on with every study whose request is
still active (backend/studies/searches.py): a trial whose job is queued or running is waited
for, an interrupted one is retried from its checkpoint. A study ends when it has its trials, or on
`search_stop`. The pure parts (space, sampler, settings of a trial) are backend/studies/search.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from typing import Any

from backend.core.errors import JobError, LtmError, SpaceError
from backend.core.events import read_events, write_json_atomic
from backend.studies import search as S

POLL_SECONDS = 0.5
MAX_RETRIES = 2  # an interrupted trial job (a service or machine restart) is queued again this often
# the pruner is asked only while a quarter of the training remains: stopping later saves little
# and loses the trial's score
PRUNE_BEFORE = 0.75
BACKLOG = 500  # lines a client that starts following a running study is shown first
REQUEST_KEYS = ("study", "space", "space_path", "sampler", "files", "settings", "target", "seed", "priority")


class _Stopped(Exception):
    """The service stops (the study goes on when it starts again) or the user stopped the study."""


def checked(args: dict[str, Any]) -> dict[str, Any]:
    """A `search_start` request, its space parsed again here (the client checked it too)."""
    request = {k: args.get(k) for k in REQUEST_KEYS}
    if not isinstance(request["study"], str) or not S.STUDY_NAME.fullmatch(request["study"]):
        raise SpaceError(f"search: study {request['study']!r}: use letters, digits, _ . - (at most 64)")
    if request["sampler"] not in ("tpe", "grid"):
        raise SpaceError(f"search: sampler {request['sampler']!r}: use tpe or grid")
    files = request["files"]
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise SpaceError("search: files must be a list of corpus paths")
    for key in ("target", "seed", "priority"):
        if isinstance(request[key], bool) or not isinstance(request[key], int):
            raise SpaceError(f"search: {key} must be a whole number")
    if request["target"] < 1:
        raise SpaceError(f"search: {request['target']} trials: give at least 1")
    if not isinstance(request["settings"], dict) or not isinstance(request["settings"].get("base"), dict):
        raise SpaceError("search: settings must be a run's settings (base, scenes, train, lora)")
    space_of(request)  # a space that does not parse ends here, in one line
    return request


def space_of(request: dict[str, Any]) -> S.Space:
    shown = str(request.get("space_path") or request["study"])
    from dataclasses import replace

    return replace(S.parse_space(request["space"], shown, default_study=request["study"]), study=request["study"])


class StudyRunner:
    """One study's loop on its own thread, inside the service."""

    def __init__(self, service, request: dict[str, Any]) -> None:
        self.service = service
        self.request = request
        self.name = request["study"]
        self.space = space_of(request)
        self.folder = service.workspace.search_dir(self.name)
        self.files: list[str] = list(request["files"])
        self.target = int(request["target"])
        self.sampler = request["sampler"]
        self.study = S.open_study(self.folder, self.space, self.sampler, self.files, request["settings"],
                                  int(request["seed"]))
        self.lines: deque[tuple[int, str]] = deque(maxlen=BACKLOG)
        self._seq = 0
        self._say_lock = threading.Lock()
        self._stop = threading.Event()
        self.stopped_by_user = False
        self.thread = threading.Thread(target=self._main, name=f"search {self.name}", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._write_request(active=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, *, by_user: bool) -> None:
        """By the user: the running trial's job is cancelled and the study ends. Else (the service
        stops): the trial's job goes on and the next service waits for it."""
        self.stopped_by_user = self.stopped_by_user or by_user
        self._stop.set()

    def same_as(self, request: dict[str, Any]) -> bool:
        keep = ("space", "files", "settings", "sampler", "seed")
        return all(json.dumps(request[k], sort_keys=True) == json.dumps(self.request[k], sort_keys=True) for k in keep)

    def backlog(self) -> list[dict]:
        with self._say_lock:
            return [{"seq": n, "message": m} for n, m in self.lines]

    def _write_request(self, *, active: bool, error: str | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.service.workspace.search_request(self.name),
                          {**self.request, "active": active, "error": error})

    def say(self, line: str, **extra: Any) -> None:
        with self._say_lock:
            self._seq += 1
            self.lines.append((self._seq, line))
            seq = self._seq
        try:
            with open(self.folder / "search.log", "a", encoding="utf-8") as fh:
                fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        except OSError:
            pass  # a full disk: the line still reaches whoever follows
        self.service.broadcast({"type": "search", "study": self.name, "seq": seq, "message": line, **extra})

    def _main(self) -> None:
        try:
            self._loop()
        except _Stopped:
            if self.stopped_by_user:
                self._finish_study("stopped", "search stopped by the user")
            return
        except LtmError as exc:
            self._end_with_error(exc.one_line())
        except Exception as exc:  # noqa: BLE001 - the service goes on; the study says why it stopped
            import traceback

            self.service.log(f"search {self.name} failed:\n{traceback.format_exc()}")
            self._end_with_error(f"{type(exc).__name__}: {exc}; see service.log")
        else:
            self._finish_study("finished", None)

    def _end_with_error(self, message: str) -> None:
        """The request stays active: the next service start, or the same command, goes on."""
        self.say(f"search {self.name} stopped: {message}", status="failed", error=message)

    def _finish_study(self, status: str, note: str | None) -> None:
        report = self.report()
        write_json_atomic(self.folder / "report.json", report)
        self._write_request(active=False)
        self.say(note or f"search {self.name}: {S.finished_count(report['trials'])} trials finished",
                 status=status, report=report)

    # -- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        rows = S.trial_rows(self.study)
        self.say(f"study {self.name}: {S.finished_count(rows)} of {self.target} trials finished;"
                 f" {self.sampler} sampler; {self.folder / 'journal.log'}")
        self.save()
        for frozen in self.study.get_trials(deepcopy=False, states=[_state("RUNNING")]):
            self.resume(frozen)
        while S.finished_count(S.trial_rows(self.study)) < self.target:
            self._check_stop(None, None)
            self.one_trial()

    def save(self) -> tuple[dict, str | None]:
        """The study's summary into DuckDB for the dashboard and `search`; returns it and why the
        importances are missing, if they are."""
        imp, why = S.importances(self.study)
        summary = S.study_summary(self.study, self.space, self.sampler, self.files, self.target, imp)
        self.service.store.save_search(summary, S.trial_rows(self.study))
        return summary, why

    def resume(self, frozen) -> None:
        """A trial asked before a stop: wait for its job, or end it if it never got one."""
        import optuna

        trial = optuna.trial.Trial(self.study, frozen._trial_id)
        run_id = frozen.user_attrs.get("run_id")
        if run_id is None:
            self.finish(trial, "FAIL", error="stopped before its job was queued")
            return
        self.say(f"trial {trial.number}: waiting for its job {run_id} (asked before the last stop)")
        self.watch(trial, run_id, seen=set(frozen.intermediate_values))

    def one_trial(self) -> None:
        from backend.jobs.manager import inspect_files
        from backend.jobs.settings import JobSettings

        trial = self.study.ask()
        params = S.suggest(trial, self.space, self.files)
        members = S.chosen_files(params, self.files, self.space.subsets)
        if not members:
            self.finish(trial, "FAIL", error="the subset holds no file")
            return
        corpus = S.combined_corpus(members, self.folder / "corpora")
        settings = JobSettings(**S.trial_settings(self.request["settings"], self.space, params))
        inspected = inspect_files([str(corpus)])  # reads the files: outside the service's lock
        with self.service.lock:
            sub = self.service.manager.enqueue(inspected, settings, seeds=[int(self.request["seed"])],
                                               priority=int(self.request["priority"]))
        if not sub.run_ids:
            self.finish(trial, "FAIL", error="; ".join(e.one_line() for e in sub.errors) or "nothing was queued")
            return
        run_id = sub.run_ids[0]
        trial.set_user_attr("run_id", run_id)
        self.save()
        self.say(f"trial {trial.number}: {S.params_text(params)} -> job {run_id}")
        self.watch(trial, run_id)

    def watch(self, trial, run_id: str, seen: set | None = None) -> None:
        """Feed the job's eval losses to the pruner until the job ends; then tell the study."""
        path = self.service.workspace.run_dir(run_id) / "events.jsonl"
        offset = 0
        seen = set(seen or ())
        while True:
            self._check_stop(trial, run_id)
            events, offset = read_events(path, offset)
            for e in events:
                if e.get("type") != "metric" or e.get("name") != "eval_loss" or e.get("step") in seen:
                    continue
                seen.add(e["step"])
                trial.report(S.intermediate(float(e["value"]), self.space.direction), int(e["step"]))
                self.say(f"trial {trial.number}: eval loss {e['value']:.4f} at step {e['step']}/{e.get('total')}")
                late = e.get("total") and e["step"] > PRUNE_BEFORE * e["total"]
                if not late and trial.should_prune():
                    why = f"pruned at step {e['step']}: eval loss {e['value']:.4f}"
                    trial.set_user_attr("pruned", why)  # before the cancel: a stop between them still reads PRUNED
                    self._cancel(run_id)
                    self.finish(trial, "PRUNED", error=why)
                    return
            run = self.service.store.get_run(run_id)
            status = run["status"] if run else "missing"
            if status == "done":
                value = S.objective_value(run, self.service.store.run_scores(run_id) or {}, self.space.objective)
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
                with self.service.lock:  # the manager may have queued it again meanwhile (a hung worker's run)
                    again = self.service.store.get_run(run_id)["status"] == "interrupted"
                    if again:
                        self.service.manager.retry(run_id, self.service.broadcast)
                if again:
                    trial.set_user_attr("retries", trial.user_attrs.get("retries", 0) + 1)
                    self.say(f"trial {trial.number}: job {run_id} was interrupted; queued again (it resumes)")
            elif status in ("failed", "interrupted", "missing"):
                reason = run.get("error") if run else f"job {run_id} is not in this workspace"
                self.finish(trial, "FAIL", error=f"job {status}: {reason}")
                return
            self._stop.wait(POLL_SECONDS)

    def _check_stop(self, trial, run_id: str | None) -> None:
        if not self._stop.is_set():
            return
        if self.stopped_by_user and trial is not None:
            self._cancel(run_id)
            self.finish(trial, "FAIL", error="search stopped by the user")
        raise _Stopped()

    def _cancel(self, run_id: str) -> None:
        try:
            with self.service.lock:
                self.service.manager.cancel(run_id, self.service.broadcast)
        except JobError:
            pass  # it ended meanwhile: nothing to stop

    def finish(self, trial, state: str, *, value: float | None = None, error: str | None = None) -> None:
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
        self.say(f"trial {trial.number}: {state} {what}{best}")

    def report(self) -> dict:
        summary, why = self.save()
        rows = S.trial_rows(self.study)
        top = next((r for r in rows if r["number"] == summary["best_trial"]), None)
        return {"study": summary, "trials": rows, "best": top, "importances": summary["importances"],
                "importances_note": why, "journal": str(self.folder / "journal.log")}


def _state(name: str):
    from optuna.trial import TrialState

    return TrialState[name]
