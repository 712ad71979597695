"""The worker process: load a base once, then for each job train → save → evaluate → report.

    python -m backend.compute.worker <session.json>
    python -m backend.compute.worker tasks/<id>/task.json   (a calibration or a judge: backend.compute.task_worker)

The session file names the base and a list of jobs (see `backend.jobs.manager.write_session`). The
worker writes only inside each job's run folder: `events.jsonl`, `train.log`, `tokens.bin`,
`checkpoints/`, `model/` (micro) or `adapter/` (PEFT format), and `result.json`, written to a
temp name and renamed. It never opens the results database. On SIGTERM it saves a checkpoint
and exits with code 3; a failed job is reported and the next one still runs (exit code 1). A
job whose `cancel.<attempt>` file appears (`ltm-tui cancel`) is skipped, or checkpointed and
left, and the next job runs. Every event carries the job's attempt. A disk so full that not
even a job's error can be written ends the worker with code 4.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.core.errors import describe
from backend.core.events import LoadWatch
from backend.core.states import (
    EXIT_BAD_SESSION,
    EXIT_DEVICE_LOST,
    EXIT_DISK_FULL,
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_STOPPED,
)


class Stop:
    """Set by SIGTERM; training checkpoints and returns at the next step boundary."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(signum, frame):  # noqa: ARG001 - signal signature
            cls.requested = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


class CancelWatch:
    """Whether one attempt of one run was cancelled (its marker file exists). Called every
    training step, it looks at the disk at most twice a second; `now()` always looks."""

    def __init__(self, marker: Path, every: float = 0.5) -> None:
        self.marker = marker
        self.every = every
        self._next = 0.0
        self._seen = False

    def now(self) -> bool:
        self._seen = self._seen or self.marker.exists()
        return self._seen

    def __call__(self) -> bool:
        if not self._seen and time.monotonic() >= self._next:
            self._next = time.monotonic() + self.every
            self.now()
        return self._seen


class RunLog:
    """Human lines for one run: `train.log` in its folder (and the worker's stdout)."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "a", encoding="utf-8")

    def __call__(self, line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        self._fh.write(stamped + "\n")
        self._fh.flush()
        print(stamped, flush=True)

    def close(self) -> None:
        self._fh.close()


def _corpus_chunks(path: str):
    from backend.ingest.corpora import iter_text

    return lambda: iter_text(Path(path))


@dataclass
class _Trained:
    """What a job's training step leaves for evaluation: the model to score (the adapted one),
    the adapter to unload afterwards, and the outcome (None for a baseline, which trains nothing)."""

    model: Any = None
    adapter: Any = None
    outcome: Any = None
    tokens: int = 0
    grad_checkpointing: bool = False  # what the memory plan (or the user) chose for the steps


# Fault injection for the tests: a job whose corpus path contains this variable's value fails as
# after a sticky CUDA error, and the worker then reads its device as lost (`Worker.device_lost`).
FAULT_DEVICE_ENV = "LTM_FAULT_DEVICE_LOST"
LOST_DEVICE = ("; this worker cannot go on (its device failed, or this job's clean-up did): it ends here, "
               "and a fresh worker takes the jobs queued behind it")


class InjectedDeviceFault(RuntimeError):
    """What `FAULT_DEVICE_ENV` raises: the message a CUDA illegal memory access gives."""


class Worker:
    def __init__(self, session: dict[str, Any]) -> None:
        from backend.compute.models import BaseSpec
        from backend.scoring.scenes import load_batteries

        self.session = session
        self.spec = BaseSpec(**session["base"])
        self.batteries = load_batteries(session["scenes"])
        self._base = None  # (model, tokenizer, device) of an HF base, loaded once
        self.jobs_started = 0  # a job after the first finds the imports done and an HF base loaded
        self._base_memos: dict = {}  # per reference base (an HF base; micro: per seed): see evaluate_all
        self.broken = False  # a job's clean-up failed: the base may still carry its adapter

    def base(self, seed: int, log=None, events=None):
        from backend.compute.models import load_base, use_kernels

        if self.spec.is_micro:
            loaded = load_base(self.spec, seed)  # a fresh network per job, from its seed
        elif self._base is None:
            with LoadWatch(events, self.spec.base) if events is not None else contextlib.nullcontext():
                loaded = self._base = load_base(self.spec, seed)
        else:
            return self._base
        line = use_kernels(loaded[0], self.spec, loaded[2])
        if log is not None:
            log(line)
        return loaded

    def device_lost(self, exc: BaseException) -> bool:
        """After a job failed with `exc`: whether this process can run no more jobs, because its
        device is lost (`models.device_lost`) or the job's clean-up failed."""
        from backend.compute.models import device_lost, pick_device

        if self.broken or isinstance(exc, InjectedDeviceFault):
            return True
        try:
            device = pick_device(self.spec.device)
        except Exception:  # a device this process cannot even name: the job's error says why
            return False
        return device_lost(device)

    def run_job(self, job: dict[str, Any]) -> None:
        """One job's recipe: load (or reuse) the base, train (an adapter run), evaluate, look
        inside, write result.json. Every step says so in the run's events and train.log."""
        from backend.compute.evaluate import EvalProgress, evaluate_all
        from backend.compute.models import count_params
        from backend.compute.train import StopRequested
        from backend.core.config import TrainConfig
        from backend.core.events import EventLog, write_json_atomic
        from backend.core.workspace import cancel_marker

        run_dir = Path(job["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        attempt = int(job.get("attempt", 0))
        cancelled = CancelWatch(cancel_marker(run_dir, attempt))
        if cancelled.now():
            return  # cancelled while it waited in this worker's session: never started
        events = EventLog(run_dir / "events.jsonl", job["run_id"], attempt)
        log = RunLog(run_dir / "train.log")
        trained = _Trained()
        failing = False  # an exception leaves this job: a failed clean-up must not hide it
        try:
            if (run_dir / "result.json").exists():
                # an earlier attempt finished but its result never reached the store (the run
                # was marked failed or interrupted meanwhile): report it for this attempt
                log("result.json already written by an earlier attempt; reporting it")
                result = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
                events.emit("result", overall=result.get("overall"))
                return
            events.emit("phase", phase="starting")
            seed = int(job.get("seed", 0))
            warm = self.jobs_started > 0
            self.jobs_started += 1
            t_load = time.perf_counter()
            model, tok, device = self.base(seed, log, events)
            load_seconds = time.perf_counter() - t_load
            log(f"base {self.spec.base} on {device} ({count_params(model):,} parameters) in {load_seconds:.1f}s")
            cfg = TrainConfig.from_dict({**job.get("train", {}), "seed": seed})
            trained.model = model
            fault = os.environ.get(FAULT_DEVICE_ENV)
            if fault and fault in str(job.get("corpus_path") or ""):
                raise InjectedDeviceFault(f"CUDA error: an illegal memory access was encountered ({FAULT_DEVICE_ENV})")
            if job["kind"] == "adapter":
                self._train(job, trained, tok, device, cfg, seed, events, log, cancelled)
            if Stop.requested or cancelled.now():
                raise _stopped()
            events.emit("phase", phase="evaluating")
            chunks = _corpus_chunks(job["corpus_path"]) if job.get("corpus_path") else None
            scores, scene_results, eval_seconds = evaluate_all(
                trained.model, tok, self.batteries, device=device, corpus_chunks=chunks,
                reference=self._reference(job, trained.model, seed),
                progress=EvalProgress(self.batteries, events.emit),  # eval_progress events, ≤ 1 a second
                base_memo=self._base_memo(job, seed),
            )
            probes = None
            if job["kind"] == "adapter" and job.get("probes", True):
                probes = self._probe(trained.model, tok, device, seed, eval_seconds, log)
            result = self._result(job, trained, cfg, device, scores, scene_results, probes,
                                  load_seconds=load_seconds, eval_seconds=eval_seconds, warm=warm)
            if cancelled.now():
                raise _stopped()
            write_json_atomic(run_dir / "result.json", result)
            events.emit("result", overall=result["overall"], scores={k: v["value"] for k, v in scores.items()})
            log(f"done: overall {result['overall']} | {json.dumps(result['scores'])}")
        except StopRequested:
            if Stop.requested:
                failing = True
                raise  # the whole worker stops
            # only this run was cancelled: say so (the service lets go of it), then the next job
            events.emit("phase", phase="cancelled")
            log("cancelled by the user; `ltm-tui retry` resumes it from its newest checkpoint")
        except BaseException:
            failing = True
            raise
        finally:
            try:
                if trained.adapter is not None:
                    trained.adapter.unload()  # the base goes back untouched for the next job
                trained = None
                _give_back_cached_memory()
            except Exception:
                if not failing:
                    raise
                # the job's own error is the one to report (on a lost device these fail too);
                # the base may still carry the adapter, so this worker takes no further job
                self.broken = True
            finally:
                events.close()
                log.close()

    def _train(self, job, trained: "_Trained", tok, device, cfg, seed: int, events, log, cancelled) -> None:
        """Tokenize the corpus, wrap an HF base in a fresh LoRA adapter, train, save the weights."""
        from backend.compute.models import attach_lora, count_params
        from backend.compute.train import done_training, ready_to_train, train_model
        from backend.core.config import LoraSettings

        run_dir = Path(job["run_dir"])
        trained.tokens = self._tokenize(job, tok, run_dir, log)
        lora = None
        if not self.spec.is_micro:
            lora = LoraSettings.from_dict(job.get("lora"))
            trained.adapter = trained.model = attach_lora(trained.model, lora, seed)
        cfg, trained.grad_checkpointing = ready_to_train(trained.model, self.spec, cfg, lora, device, log)
        trainable = count_params(trained.model, trainable_only=True)
        events.emit("phase", phase="training", tokens=trained.tokens, trainable_params=trainable)
        log(f"training {trainable:,} parameters on {trained.tokens:,} tokens: {json.dumps(cfg.to_dict())}")
        try:
            trained.outcome = train_model(
                trained.model, run_dir / "tokens.bin", run_dir, cfg, device=device, emit=events.emit, log=log,
                should_stop=lambda: Stop.requested or cancelled(), precision=self.spec.precision,
            )
        finally:
            done_training(trained.model, self.spec)  # a warm base goes to the next job as it came
        self._save(trained.model, run_dir)

    def _result(self, job, trained: "_Trained", cfg, device, scores, scene_results, probes, *,
                load_seconds: float, eval_seconds: float, warm: bool) -> dict[str, Any]:
        """result.json: what the store ingests (backend/jobs/store.py) and the forecast fits."""
        from backend.compute.models import count_params
        from backend.scoring.measures import overall

        outcome = trained.outcome
        return {
            "run_id": job["run_id"],
            "kind": job["kind"],
            "base": self.spec.base,
            "corpus_path": job.get("corpus_path"),
            "tokens": trained.tokens,
            "steps": outcome.steps if outcome else 0,
            "tokens_seen": outcome.tokens_seen if outcome else 0,
            "train_seconds": round(outcome.train_seconds, 3) if outcome else 0.0,
            "eval_seconds": round(eval_seconds, 3),
            "load_seconds": round(load_seconds, 3),
            "warm": warm,  # this worker had run a job before: its load was not a cold start's
            "final_loss": outcome.final_loss if outcome else None,
            # what the steps ran with: smaller than asked when out-of-memory halved it
            "micro_batch_used": outcome.micro_batch if outcome else None,
            "grad_accum_used": outcome.grad_accum if outcome else None,
            "oom_halvings": outcome.oom_halvings if outcome else 0,
            "grad_checkpointing_used": trained.grad_checkpointing or bool(outcome and outcome.oom_checkpointing),
            "device": str(device),
            "params": count_params(trained.model),
            "settings": {
                "base": self.spec.to_dict(),
                "train": cfg.to_dict(),
                "lora": job.get("lora") if not self.spec.is_micro else None,
            },
            "scores": scores,
            "overall": overall({k: v["value"] for k, v in scores.items()}),
            "scene_results": scene_results,
            "curve": _curve_from_events(Path(job["run_dir"]) / "events.jsonl"),
            "probes": probes,
        }

    def _base_memo(self, job: dict, seed: int) -> dict | None:
        """What evaluation may remember about the reference base across this worker's jobs:
        an HF base is one network for every job; a micro run's base is its seed's untrained
        network, the same for every job of that seed."""
        if job["kind"] != "adapter":
            return None
        return self._base_memos.setdefault(seed if self.spec.is_micro else None, {})

    def _reference(self, job: dict, model, seed: int):
        """The base an adapted model is compared with (fluency gate, forgetting); None for a
        baseline run, which is its own base."""
        from backend.compute.evaluate import fixed_base, peft_base

        if job["kind"] != "adapter":
            return None
        if self.spec.is_micro:
            from backend.compute.models import load_base

            return fixed_base(load_base(self.spec, seed)[0])  # the untrained network of this seed
        return peft_base(model)

    def _tokenize(self, job: dict, tok, run_dir: Path, log) -> int:
        from backend.core.errors import CorpusError
        from backend.ingest.corpora import content_id, iter_documents
        from backend.ingest.packing import TOKEN_DTYPE, tokenize_documents

        path = run_dir / "tokens.bin"
        if path.exists():  # a resumed run trains on exactly the tokens it started with
            return path.stat().st_size // TOKEN_DTYPE().itemsize
        queued = job.get("sha256")
        if queued and content_id(job["corpus_path"]) != queued:
            # its row (pages, words, the id other runs of the same text are found by) describes
            # what was read at queueing; training on other text would pair those with this run
            raise CorpusError(f"{job['corpus_path']} changed since it was queued; queue it again "
                              "(`ltm-tui run FILE`) to train on what it holds now")
        t0 = time.perf_counter()
        # a corpus set's files are documents of their own: each ends with EOS, and training keeps
        # one from attending to another (packing.model_inputs)
        n = tokenize_documents(
            iter_documents(Path(job["corpus_path"])), tok.encode, path, bos_id=tok.bos_id, eos_id=tok.eos_id
        )
        log(f"tokenized {job['corpus_path']}: {n:,} tokens in {time.perf_counter() - t0:.1f}s")
        return n

    def _probe(self, model, tok, device, seed: int, eval_seconds: float, log) -> dict:
        """Look inside the adapted network, against its base: the LoRA adapter switched off, or
        for micro the seed's initial network, rebuilt. A failed probe is logged and recorded;
        the run's training and scores stand."""
        from backend.compute.models import build_micro
        from backend.compute.probes import run_probes

        try:
            base = build_micro(self.spec.preset, seed, device) if self.spec.is_micro else None
            probes = run_probes(model, tok, self.batteries, device=device, base=base)
        except Exception as exc:  # noqa: BLE001 - an optional analysis never fails the run
            log(f"probes failed: {describe(exc)}\n{traceback.format_exc()}")
            return {"error": describe(exc)}
        s = probes["summary"]
        ratio = f" ({s['seconds'] / eval_seconds:.0%} of evaluation)" if eval_seconds > 0 else ""
        log(
            f"probes in {s['seconds']:.2f}s{ratio}: weight change {s['weight_change']:.4g}, "
            f"attention entropy {s['attn_entropy_change']}, drift layer {s['drift_layer']} (CKA {s['min_cka']})"
        )
        return probes

    def _save(self, model, run_dir: Path) -> None:
        target = run_dir / ("model" if self.spec.is_micro else "adapter")
        model.save_pretrained(str(target), safe_serialization=True)


def _give_back_cached_memory() -> None:
    """After a job, CUDA's cached blocks go back to the card: a warm worker waiting for its next
    job holds its base and no more, so a worker beside it on the card (--slots-per-gpu) and the
    free memory the queue's fit check reads see the rest."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def _stopped():
    from backend.compute.train import StopRequested

    return StopRequested(-1)


def _curve_from_events(path: Path) -> list[dict]:
    """The whole loss curve, across resumed attempts (a later point for a step wins); the
    events a slow step added between its points (`timed`) are not on it."""
    from backend.core.events import read_events

    events, _ = read_events(path)
    points: dict[int, dict] = {}
    for e in events:
        if e.get("type") == "progress" and not e.get("timed"):
            points[e["step"]] = {k: e.get(k) for k in ("step", "loss", "lr", "tokens", "tokens_per_s")}
    return [points[s] for s in sorted(points)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m backend.compute.worker SESSION.json", file=sys.stderr)
        return EXIT_BAD_SESSION
    from backend.core.workspace import keep_private

    keep_private()
    task = _read_task(Path(argv[0]))
    _before_torch(task, Path(argv[0]))
    from backend.compute.models import use_tensor_cores

    use_tensor_cores()  # before a calibration too: it measures what the runs will do
    if task is not None:  # a calibration or a judge (backend.jobs.tasks), not a session of runs
        from backend.compute.task_worker import run_task

        return run_task(task)
    from backend.compute.train import keep_freed_memory

    Stop.install()
    keep_freed_memory()
    from backend.core.errors import LtmError

    try:
        session = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
        worker = Worker(session)
    except LtmError as exc:
        _report_all(session if "session" in locals() else {}, exc.one_line())
        print(exc.one_line(), file=sys.stderr)
        return EXIT_BAD_SESSION
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"worker: cannot read session {argv[0]}: {exc}", file=sys.stderr)
        return EXIT_BAD_SESSION
    try:
        return _run_jobs(worker, session, Path(argv[0]))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        try:
            print(f"worker: disk full while writing {exc.filename or 'a run folder'}", file=sys.stderr, flush=True)
        except OSError:
            pass  # its log is on the same disk: the exit code says it
        return EXIT_DISK_FULL


def _read_task(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # main() says what is wrong with the file
    return found if isinstance(found, dict) and "task" in found else None


def _before_torch(task: dict | None, session_path: Path) -> None:
    """What a worker starts before it imports torch (backend.compute.startup): the disk reads
    the base's weights (a session's or a calibration's base, a judge's model) while the imports
    run, and a process that loads no 4-bit base leaves bitsandbytes out. A file that cannot be
    read is main()'s to report."""
    from backend.compute.startup import leave_out_bitsandbytes, needs_bitsandbytes, read_ahead

    try:
        if task is not None and task.get("task") == "judge":
            name, quant, remote = str(task["model"]), None, False
        else:
            base = (task or json.loads(session_path.read_text(encoding="utf-8")))["base"]
            name, quant, remote = str(base["base"]), base.get("quant"), bool(base.get("trust_remote_code"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    leave_out_bitsandbytes(needs_bitsandbytes(name, quant, remote))
    read_ahead(name)


def _run_jobs(worker: Worker, session: dict, session_path: Path) -> int:
    from backend.compute.train import StopRequested
    from backend.core.errors import LtmError

    failed = False
    jobs = list(session["jobs"])
    while jobs:
        for job in jobs:
            job_failed = False
            try:
                worker.run_job(job)
            except StopRequested:
                return EXIT_STOPPED
            except Exception as exc:  # one line for the user; for an unexpected error, the traceback in train.log
                failed = job_failed = True
                line, trace = (exc.one_line(), None) if isinstance(exc, LtmError) else (describe(exc), traceback.format_exc())
                # a loading error on a lost card is a ModelError too: every error asks
                if worker.device_lost(exc):
                    _report(job, line + LOST_DEVICE, trace)
                    return EXIT_DEVICE_LOST
                _report(job, line, trace)
            if job_failed:
                # out here the failed job's traceback, and with it the frames that held its
                # optimizer state and activations, is gone: only now can their memory go back
                _give_back_cached_memory()
            if Stop.requested:
                return EXIT_STOPPED
        jobs = claim_more(session_path, float(session.get("linger") or 0))
    return EXIT_SOME_FAILED if failed else EXIT_OK


def claim_more(session_path: Path, linger: float) -> list[dict]:
    """Jobs the service handed over while this worker ran (`<session>.more-*.json`), waiting up
    to `linger` seconds for some: a warm worker keeps its base loaded for the next corpus.
    Renaming a file claims it; one the service finds unclaimed after we exit goes back to the queue."""
    deadline = time.monotonic() + linger
    while True:
        for more in sorted(session_path.parent.glob(f"{session_path.stem}.more-*.json")):
            taken = more.with_suffix(".taken")
            try:
                more.rename(taken)
            except FileNotFoundError:
                continue
            return json.loads(taken.read_text(encoding="utf-8"))["jobs"]
        if time.monotonic() >= deadline or Stop.requested:
            return []
        time.sleep(0.2)


def _report(job: dict, message: str, trace: str | None = None) -> None:
    from backend.core.events import EventLog

    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if trace:
        with open(run_dir / "train.log", "a", encoding="utf-8") as fh:
            fh.write(trace)
    events = EventLog(run_dir / "events.jsonl", job["run_id"], int(job.get("attempt", 0)))
    events.emit("error", message=message)
    events.close()
    print(f"{job['run_id']}: {message}", file=sys.stderr, flush=True)


def _report_all(session: dict, message: str) -> None:
    for job in session.get("jobs", []):
        _report(job, message)


def record_exit(session_path: Path, code: int) -> None:
    """The exit code beside the session (`<session>.exit`): a service that adopted this worker
    (it is not its parent) or finds it gone after a restart reads why it ended there, so a full
    disk or a lost device is named in the morning, not "exit code -1"."""
    try:
        tmp = session_path.with_suffix(".exit.tmp")
        tmp.write_text(str(code))
        tmp.replace(session_path.with_suffix(".exit"))
    except OSError:
        pass  # a full disk: the code is lost, the runs' own error lines are not


if __name__ == "__main__":
    code = main()
    if len(sys.argv) == 2:
        record_exit(Path(sys.argv[1]), code)
    # Every run file is closed by now (run_job's `finally`). Skipping the interpreter's teardown
    # of torch and its threads saves a second or more at each worker's exit, which the slot's
    # next job would otherwise wait out.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
