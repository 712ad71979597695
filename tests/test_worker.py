"""The worker as a real subprocess: SIGTERM checkpoints, a rerun resumes, events drive states."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from backend.core.events import EventLog, read_events
from backend.core.workspace import Workspace
from backend.jobs.manager import JobManager, detect_slots
from backend.jobs.settings import JobSettings
from backend.jobs.store import Store
from tests.conftest import WAIT, exit_code, wait_for

TRAIN = {"block_size": 64, "micro_batch": 4, "min_train_tokens": 0, "epochs": 1000,
         "max_steps": 3000, "checkpoint_every": 0, "log_every": 5}


def _manager(tmp_path, battery):
    ws = Workspace(tmp_path / "ws")
    store = Store(ws.root / "ltm.duckdb") if ws.ensure() else None
    settings = JobSettings(base={"base": "micro", "preset": "tiny", "quant": None,
                                 "trust_remote_code": False, "device": "cpu"},
                           scenes=str(battery), train=TRAIN)
    return JobManager(ws, store), store, settings


@pytest.mark.slow
def test_sigterm_checkpoints_and_a_rerun_resumes(tmp_path, corpora, tiny_battery):
    manager, store, settings = _manager(tmp_path, tiny_battery)
    sub = manager.submit([corpora["logic"]], settings)
    run = store.get_run(sub.run_ids[0])
    session = manager._write_session([run])
    proc = manager.start_worker(session)
    events_path = tmp_path / "ws" / "runs" / run["run_id"] / "events.jsonl"

    def progressed():
        events, _ = read_events(events_path)
        steps = [e["step"] for e in events if e["type"] == "progress"]
        return steps and steps[-1] >= 20

    wait_for(progressed)
    os.killpg(proc.pid, signal.SIGTERM)
    assert exit_code(proc, "the worker after SIGTERM") == 3
    ckpts = sorted((tmp_path / "ws" / "runs" / run["run_id"] / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert stopped_at >= 20
    assert not (events_path.parent / "result.json").exists()

    # a rerun of the same job resumes from the checkpoint instead of starting over
    short = json.loads(session.read_text())
    short["jobs"][0]["train"] = {**TRAIN, "max_steps": stopped_at + 10}
    session.write_text(json.dumps(short))
    assert manager.start_worker(session).wait(timeout=WAIT) == 0
    result = json.loads((events_path.parent / "result.json").read_text())
    assert result["steps"] == stopped_at + 10
    log = (events_path.parent / "train.log").read_text()
    assert f"resumed from step-{stopped_at:06d}" in log
    steps = [p["step"] for p in result["curve"]]
    assert steps == sorted(set(steps)) and steps[-1] == stopped_at + 10
    store.close()


def test_a_second_batch_on_the_same_base_and_battery_reuses_its_baseline(tmp_path, corpora, tiny_battery):
    manager, store, settings = _manager(tmp_path, tiny_battery)
    first = manager.submit([corpora["logic"]], settings)
    again = manager.submit([corpora["story"]], settings)
    assert first.new_baseline_ids == first.baseline_ids and len(first.baseline_ids) == 1
    assert again.baseline_ids == first.baseline_ids and again.new_baseline_ids == []  # nothing queued twice
    assert sum(r["kind"] == "baseline" for r in store.list_runs()) == 1
    store.close()


@pytest.mark.slow
def test_a_corpus_edited_after_queueing_is_not_trained_under_its_old_name(tmp_path, corpora, tiny_battery):
    """The run's row holds what was read at queueing (pages, words, the id other runs of the
    same text are found by): a file changed since then fails its run with one line, not trained."""
    manager, store, settings = _manager(tmp_path, tiny_battery)
    book = tmp_path / "book.txt"
    book.write_text(corpora["logic"].read_text(encoding="utf-8"), encoding="utf-8")
    run_id = manager.submit([book], settings).run_ids[0]
    book.write_text(corpora["story"].read_text(encoding="utf-8") * 3, encoding="utf-8")  # edited while queued
    manager.run_queue()
    run = store.get_run(run_id)
    assert run["status"] == "failed" and "changed since it was queued; queue it again" in run["error"]
    assert not (Path(run["run_dir"]) / "tokens.bin").exists()
    store.close()


@pytest.mark.slow
def test_killed_worker_leaves_runs_interrupted_with_log_tail(tmp_path, corpora, tiny_battery):
    manager, store, settings = _manager(tmp_path, tiny_battery)
    sub = manager.submit([corpora["logic"]], settings)
    seen = []
    killed = []

    def on_event(event):
        seen.append(event)
        # once: a busy machine hands over several steps in one read, all after the kill
        if event.get("type") == "progress" and event.get("step", 0) >= 10 and not killed:
            killed.append(next(e["pid"] for e in seen if e["type"] == "worker"))
            os.killpg(killed[0], signal.SIGKILL)

    assert manager.run_queue(on_event=on_event) is False
    run = store.get_run(sub.run_ids[0])
    assert run["status"] == "interrupted"
    assert "worker exited with code -9" in run["error"] and "step" in run["error"]
    baseline = store.get_run(sub.baseline_ids[0])
    assert baseline["status"] == "done"  # the baseline ran first and was ingested
    # retry puts it back in the queue; the state machine refuses to leave `done`
    manager.retry(run["run_id"])
    assert store.get_run(run["run_id"])["status"] == "queued"
    store.close()


@pytest.mark.slow
def test_evaluation_progress_reaches_the_listeners_and_never_the_curve(tmp_path, corpora):
    """A real tiny run on the built-in batteries: its events file holds eval_progress events
    whose count of scenes done rises to all of them; the manager forwards each, with the run id,
    and stores none of them as a point of the loss curve."""
    from dataclasses import replace

    from backend.core.workspace import default_scenes_dir
    from backend.scoring.scenes import load_batteries

    manager, store, settings = _manager(tmp_path, default_scenes_dir())
    settings = replace(settings, train={**TRAIN, "max_steps": 6, "log_every": 2}, probes=False)
    sub = manager.submit([corpora["logic"]], settings)
    seen = []
    assert manager.run_queue(on_event=seen.append) is True
    scenes = sum(len(b.scenes) for b in load_batteries(default_scenes_dir()))
    for run_id in sub.run_ids + sub.baseline_ids:
        events, _ = read_events(tmp_path / "ws" / "runs" / run_id / "events.jsonl")
        written = [e for e in events if e["type"] == "eval_progress"]
        done = [e["done"] for e in written]
        assert done and done == sorted(done) and done[-1] == scenes
        assert {e["total"] for e in written} == {scenes}
        heard = [e for e in seen if e.get("type") == "eval_progress" and e.get("run_id") == run_id]
        assert [(e["done"], e["eta_s"]) for e in heard] == [(e["done"], e["eta_s"]) for e in written]
        # the curve's points (a slow step adds `timed` events for the bar, never to the curve)
        steps = [e["step"] for e in events if e["type"] == "progress" and not e.get("timed")]
        assert [p["step"] for p in store.curve(run_id)] == steps
    assert [p["step"] for p in store.curve(sub.run_ids[0])][-1] == 6
    store.close()


def test_workers_get_cudas_expandable_segments_unless_the_user_chose(tmp_path, corpora, tiny_battery):
    """The allocator setting a long run on a GPU wants (fewer out-of-memory errors from
    fragmentation) is in the real worker's environment, under the name the installed torch
    reads; a setting of the user's own is passed on untouched."""
    from dataclasses import asdict

    from backend.core.config import MICRO_DEFAULTS
    from backend.jobs.client import connect
    from backend.jobs.executor import ALLOC_CONF_NAMES, worker_env
    from tests.conftest import stop_service

    ws = Workspace(tmp_path / "ws")
    train = {**MICRO_DEFAULTS.to_dict(), "min_train_tokens": 10**9}  # trains until cancelled
    train.pop("seed", None)
    settings = JobSettings(base={"base": "micro", "preset": "tiny"}, scenes=str(tiny_battery), train=train)
    clean = {k: v for k, v in os.environ.items() if k not in ALLOC_CONF_NAMES}
    try:
        with connect(ws) as client:
            run_id = client.call("submit", paths=[str(corpora["logic"])], settings=asdict(settings),
                                 seeds=[0])["run_ids"][0]
            pid = wait_for(lambda: client.call("workers"), what="a live worker")[0]["pid"]
            environ = dict(line.split("=", 1) for line in
                           open(f"/proc/{pid}/environ", encoding="utf-8", errors="replace").read().split("\0") if "=" in line)
            client.call("cancel", run_id=run_id)
    finally:
        stop_service(ws.root)
    import torch

    expected = "PYTORCH_ALLOC_CONF" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 9) \
        else "PYTORCH_CUDA_ALLOC_CONF"
    if not any(os.environ.get(name) for name in ALLOC_CONF_NAMES):
        assert environ.get(expected) == "expandable_segments:True"
    mine = worker_env({**clean, "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}, None)
    assert mine["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512" and "PYTORCH_ALLOC_CONF" not in mine
    assert worker_env(clean, "1")["CUDA_VISIBLE_DEVICES"] == "1"
    # slots are NVML's card numbers, which count by PCI bus: CUDA is told to count the same way
    if "CUDA_DEVICE_ORDER" not in os.environ:
        assert environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
    assert worker_env({**clean, "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, "1")["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


def test_a_worker_silent_past_the_stall_limit_is_stopped_and_its_run_queued_again(tmp_path, corpora, tiny_battery):
    """A hung worker (a card or file system that stopped answering) would hold its slot and the
    queue behind it until morning. One that holds a run and has written no event for the stall
    limit is stopped; its run ends `interrupted` with the reason and is queued again once by
    itself, to resume from its newest checkpoint. A worker that spoke lately, or one lingering
    with every run ended, is left alone. (A live process stands in for the hung worker.)"""
    import subprocess
    import time

    from backend.core.states import JobState
    from backend.jobs.executor import LocalProcess, process_start_ticks
    from backend.jobs.manager import LiveWorker

    manager, store, settings = _manager(tmp_path, tiny_battery)
    manager.stall_seconds = 600
    run_id = manager.submit([corpora["logic"]], settings).run_ids[0]
    for state in (JobState.STARTING, JobState.TRAINING):
        store.transition(run_id, state)
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        worker = LiveWorker(LocalProcess(hung.pid, process_start_ticks(hung.pid), hung),
                            tmp_path / "session.json", [run_id], 0)
        said: list[dict] = []
        worker.last_sign = time.monotonic() - 300  # silent, but within the limit
        manager._enforce_stall(worker, said.append)
        assert worker.stop_requested is None
        worker.last_sign = time.monotonic() - 900
        manager._enforce_stall(worker, said.append)
        assert worker.stop_requested is not None and "no sign of life from its worker for 15 min" in worker.stalled
        assert said and said[0]["run_id"] == run_id  # the run's log says why
        assert exit_code(hung, "the hung worker, stopped") == -signal.SIGTERM
        manager._settle(worker, said.append)
        run = store.get_run(run_id)
        assert run["status"] == "queued" and run["attempt"] == 1  # queued again by itself
        # followers (`ltm-tui run`, `follow`) are told the run is not over
        ended = [e for e in said if e.get("type") == "state" and e["status"] == "interrupted"]
        assert [e.get("requeued") for e in ended] == [True]
        first = store.attempts(run_id)[0]
        assert first["status"] == "interrupted" and "no sign of life" in first["error"]
        # once: a second hang of the same run leaves it interrupted, for the user to look at
        store.transition(run_id, JobState.STARTING)
        again = LiveWorker(LocalProcess(hung.pid, process_start_ticks(hung.pid), hung), tmp_path / "session.json",
                           [run_id], 0, stalled="no sign of life")
        said.clear()
        manager._settle(again, said.append)
        assert store.get_run(run_id)["status"] == "interrupted"
        assert [e.get("requeued") for e in said if e.get("type") == "state"] == [None]  # this time it is over
    finally:
        if hung.poll() is None:
            hung.kill()
        hung.wait()
    # a lingering worker whose runs have all ended (this one's is interrupted) says nothing, and is not stopped for it
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        lingering = LiveWorker(LocalProcess(idle.pid, process_start_ticks(idle.pid), idle),
                               tmp_path / "session.json", [run_id], 0)
        lingering.last_sign = time.monotonic() - 900
        manager._enforce_stall(lingering, said.append)
        assert lingering.stop_requested is None
    finally:
        idle.kill()
        idle.wait()
    store.close()


def test_a_run_its_worker_ended_is_let_go_of_so_a_retry_takes_any_free_slot(tmp_path, corpora, tiny_battery):
    """A warm worker fails one run and goes on with its others. The failed run is let go of: a
    retry queues it for any free slot (before, it waited for that worker to exit, all night on
    a steady queue), and the worker's list of runs, which every tick walks, keeps only its live
    ones. A cancel that lands as the worker finishes a run (its result already written) lets go
    of that run too, and the worker is not stopped five minutes later for a run it no longer
    holds. (A live process stands in for the worker; the events are the worker's own format.)"""
    import subprocess

    from backend.core.events import EventLog
    from backend.core.states import JobState
    from backend.jobs.executor import LocalProcess, process_start_ticks
    from backend.jobs.manager import LiveWorker

    manager, store, settings = _manager(tmp_path, tiny_battery)
    manager.slots = ["0", "1"]
    sub = manager.submit([corpora["logic"], corpora["story"]], settings)
    for baseline in sub.baseline_ids:
        manager.cancel(baseline)
    failed, cancelled = sub.run_ids
    for run_id in sub.run_ids:
        for state in (JobState.STARTING, JobState.TRAINING):
            store.transition(run_id, state)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        worker = LiveWorker(LocalProcess(proc.pid, process_start_ticks(proc.pid), proc), tmp_path / "session.json",
                            list(sub.run_ids), 0, offsets=dict.fromkeys(sub.run_ids, 0))
        manager.live[proc.pid] = worker
        manager.cancel(cancelled)  # the worker has already finished it: its result is written
        for run_id, kind in ((failed, "error"), (cancelled, "result")):
            events = EventLog(Path(store.get_run(run_id)["run_dir"]) / "events.jsonl", run_id)
            events.emit(kind, **({"message": "out of memory at micro-batch 1"} if kind == "error" else {}))
            events.close()
        manager._pump(worker, lambda event: None)
        assert store.get_run(failed)["status"] == "failed" and store.get_run(cancelled)["status"] == "cancelled"
        assert worker.run_ids == [] and not worker.stopping
        manager.retry(failed)
        assert [r["run_id"] for group in manager.sessions() for r in group] == [failed]  # the tick starts it
        worker.enforce_cancel(grace=0)
        assert worker.stop_requested is None and proc.poll() is None  # nothing of its own was cancelled
    finally:
        proc.kill()
        proc.wait()
        store.close()


def test_a_loading_base_shows_signs_of_life_while_it_moves_bytes_and_none_when_it_hangs(tmp_path):
    """A base that takes longer to load than the stall limit (a first download of a 13B) must not
    get its worker stopped as hung: while the load moves bytes, the worker writes a `log` event
    each interval. A load that hangs moves none and writes nothing, so the limit still catches it."""
    import time

    from backend.core.events import LoadWatch

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(4 << 20))
    events_path = tmp_path / "events.jsonl"
    events = EventLog(events_path, "big-s0-000000")
    with LoadWatch(events, "org/big-13b", every=0.2):
        until = time.monotonic() + 1.5
        while time.monotonic() < until:  # reading the weights, as a load does
            weights.read_bytes()
    said = [e["message"] for e in read_events(events_path)[0] if e["type"] == "log"]
    assert len(said) >= 3 and all(m.startswith("loading org/big-13b: ") for m in said)
    with LoadWatch(events, "org/big-13b", every=0.2):
        time.sleep(1.5)  # a load stuck on a file system that stopped answering
    assert len([e for e in read_events(events_path)[0] if e["type"] == "log"]) == len(said)
    events.close()


@pytest.fixture
def frozen(freezer):
    """Start a process and freeze it (conftest's `freezer`): the kernel then holds it, as a GPU
    driver that faulted holds a worker (state D), and SIGKILL does not end it until it is thawed."""
    import subprocess

    procs = []

    def start():
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        procs.append(proc)
        freezer.freeze(proc.pid)
        return proc

    yield start, freezer.thaw
    freezer.thaw()
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_worker_that_outlives_sigkill_frees_its_runs_and_holds_only_its_card(tmp_path, corpora, tiny_battery,
                                                                                frozen, monkeypatch):
    """A worker the kernel holds (a GPU driver fault leaves it in state D) outlives SIGKILL. The
    service used to wait for it for good, and the whole queue with it. Now the kill waits a
    bounded time; the worker's run is settled with the reason (the process, its state, where to
    look) and queued again once; no later service adopts that process for it; its card takes no
    new worker until it is gone, while the queue goes on on the other card, and a service
    restarted meanwhile holds it too; `status` lists it; when the kernel lets go, the card takes
    work again. A task the kernel holds ends the same way."""
    import time

    from backend.core.states import JobState
    from backend.jobs import executor
    from backend.jobs.executor import LocalProcess, process_start_ticks
    from backend.jobs.manager import LiveWorker
    from backend.jobs.tasks import FAILED, RUNNING

    start, thaw = frozen
    monkeypatch.setattr(executor, "KILL_WAIT_SECONDS", 0.5)
    ws = Workspace(tmp_path / "ws")
    store = Store(ws.root / "ltm.duckdb") if ws.ensure() else None
    settings = JobSettings(base={"base": "micro", "preset": "tiny", "device": "cpu"}, scenes=str(tiny_battery),
                           train={**TRAIN, "max_steps": 5})
    manager = JobManager(ws, store, slots=["0", "0", "1", "1"])  # two slots a card (--slots-per-gpu 2)
    sub = manager.submit([corpora["logic"]], settings)
    for baseline in sub.baseline_ids:
        manager.cancel(baseline)
    run_id = sub.run_ids[0]
    for state in (JobState.STARTING, JobState.TRAINING):
        store.transition(run_id, state)
    proc = start()
    store.update_run(run_id, worker_pid=proc.pid, worker_start=process_start_ticks(proc.pid))
    worker = LiveWorker(LocalProcess(proc.pid, process_start_ticks(proc.pid), proc), tmp_path / "session.json",
                        [run_id], 0, stalled="no sign of life from its worker for 30 min")
    worker.stop_requested = time.monotonic() - 3600  # asked to stop long ago: the grace is over
    manager.live[proc.pid] = worker
    said: list[dict] = []
    try:
        manager.tick(said.append)
        assert proc.poll() is None  # SIGKILL sent, and the process is still there
        first = store.attempts(run_id)[0]
        assert first["status"] == "interrupted"
        assert f"process {proc.pid} did not exit after SIGKILL" in first["error"]
        assert "state D" in first["error"] and "no sign of life" in first["error"]
        run = store.get_run(run_id)
        assert run["attempt"] == 1 and run["worker_pid"] != proc.pid  # queued again, and not tied to it
        stuck = [e for e in said if e.get("type") == "worker" and e.get("stuck")]
        assert stuck and "card 0 takes no new worker" in stuck[0]["stuck"]
        # the same tick started the run again, on card 1: both of card 0's slots wait for the stuck process
        assert [manager.slots[w.slot] for w in manager.live.values()] == ["1"]
        assert [manager.slots[i] for i in manager.free_slots()] == ["1"]
        assert manager.stuck_lines() and f"worker {proc.pid} (card 0)" in manager.stuck_lines()[0]
        # a service restarted meanwhile holds the card too: the process outlives any service
        restarted = JobManager(ws, store, slots=["0", "0", "1", "1"])
        assert [restarted.slots[i] for i in restarted.free_slots()] == ["1", "1"]
        assert f"worker {proc.pid} (card 0)" in restarted.stuck_lines()[0]
        manager.cancel(run_id)
        manager.shutdown_workers(said.append, reason="test over")
        thaw()  # the kernel lets go: the SIGKILL takes effect
        wait_for(lambda: proc.poll() is not None, what="the thawed process to die")
        manager.tick(said.append)
        assert not manager.stuck and manager.free_slots() == [0, 1, 2, 3]
        restarted.tick(said.append)
        assert restarted.free_slots() == [0, 1, 2, 3]
        assert JobManager(ws, store, slots=["0", "1"]).free_slots() == [0, 1]  # and no later one holds it
        assert any(e.get("freed") for e in said)
        # a task (a calibration, a judge) the kernel holds: failed with the reason, its card held
        task = manager.submit_task("calibrate", {}, "calibrate micro:tiny")
        held = start()
        task.process = LocalProcess(held.pid, process_start_ticks(held.pid), held)
        task.slot, task.card, task.status = 2, "1", RUNNING
        manager.tasks.cancel(task.task_id, said.append)
        task.stop_asked = time.monotonic() - 3600
        manager.tasks.tick(lambda t, r: r, said.append)
        assert task.status == FAILED and f"process {held.pid} did not exit after SIGKILL" in task.error
        assert manager.free_slots() == [0, 1] and "task calibrate" in manager.stuck_lines()[0]
        thaw()
        wait_for(lambda: held.poll() is not None, what="the thawed task to die")
        manager.tasks.tick(lambda t, r: r, said.append)
        assert manager.free_slots() == [0, 1, 2, 3]
    finally:
        manager.shutdown_workers(said.append, reason="test over")
        store.close()


def test_a_task_silent_past_the_stall_limit_fails_with_the_reason(tmp_path, tiny_battery):
    """A calibration or a judge hung on a card that stopped answering would hold its slot, and
    its client, until morning: silent past the stall limit, it is stopped and fails with the
    reason. One that spoke lately is left alone. (A live process stands in for the task's.)"""
    import subprocess
    import time

    from backend.jobs.executor import LocalProcess, process_start_ticks
    from backend.jobs.tasks import FAILED, RUNNING

    manager, store, _ = _manager(tmp_path, tiny_battery)
    manager.tasks.stall_seconds = 600
    task = manager.submit_task("calibrate", {}, "calibrate micro:tiny")
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    said: list[dict] = []
    try:
        task.process = LocalProcess(hung.pid, process_start_ticks(hung.pid), hung)
        task.slot, task.status = 0, RUNNING
        task.last_sign = time.monotonic() - 300
        manager.tasks.tick(lambda t, r: r, said.append)
        assert task.status == RUNNING and hung.poll() is None
        task.last_sign = time.monotonic() - 900
        manager.tasks.tick(lambda t, r: r, said.append)
        assert exit_code(hung, "the hung task, stopped") == -signal.SIGTERM
        manager.tasks.tick(lambda t, r: r, said.append)
        assert task.status == FAILED and "no sign of life from its worker for 15 min" in task.error
        assert any("no sign of life" in (e.get("message") or "") for e in said)  # its client is told at once
    finally:
        if hung.poll() is None:
            hung.kill()
        hung.wait()
        store.close()


def test_a_worker_that_ended_while_no_service_watched_is_settled_with_its_own_reason(tmp_path, corpora,
                                                                                      tiny_battery):
    """A worker that ends while no service watches it (the service was restarted, or died) is
    not the next service's child, so it cannot read its exit code: the worker leaves it beside
    its session, and its runs say why it ended rather than just that it died. (The real worker
    on a session it cannot read; a full disk or a lost card is named the same way.)"""
    import subprocess

    from backend.core.states import EXIT_BAD_SESSION, JobState
    from backend.jobs.executor import worker_env

    manager, store, settings = _manager(tmp_path, tiny_battery)
    run_id = manager.submit([corpora["logic"]], settings).run_ids[0]
    for state in (JobState.STARTING, JobState.TRAINING):
        store.transition(run_id, state)
    session = manager._write_session([store.get_run(run_id)])
    session.write_text("{}")  # no base, no jobs: the worker ends at once
    proc = subprocess.Popen([sys.executable, "-m", "backend.compute.worker", str(session)],
                            env=worker_env(os.environ, None), stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=WAIT) == EXIT_BAD_SESSION
    store.update_run(run_id, worker_pid=proc.pid, worker_start=12345, session_path=str(session))
    manager.reattach(lambda event: None)
    run = store.get_run(run_id)
    assert run["status"] == "interrupted"
    assert run["error"].startswith(f"worker exited with code {EXIT_BAD_SESSION} while no service watched it")
    store.close()


def test_slots_are_the_cards_cuda_shows(fake_nvml, monkeypatch):
    """A slot for each card CUDA_VISIBLE_DEVICES names, read as CUDA reads it: up to the first
    entry that names no card (the mock has two), a UUID by a unique prefix, no card at all where
    one is named twice; without NVML, the entries up to the first empty one."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert detect_slots(2) == ["0", "0", "1", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0a,2,3")
    assert detect_slots() == ["1", "0"]
    prefix = fake_nvml.uuid(1)[:12]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{prefix},GPU-unknown,{fake_nvml.uuid(0)}")
    assert detect_slots() == [prefix]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{fake_nvml.uuid(0)},{prefix}")
    assert detect_slots() == [fake_nvml.uuid(0), prefix]
    for none in ("-1", "0,1,0", f"{prefix},{fake_nvml.uuid(1)}"):  # a card named twice: CUDA shows none
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", none)
        assert detect_slots() == [None], none
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVML: the entries as given
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,,1")
    assert detect_slots() == ["0"]


@pytest.mark.slow
def test_a_worker_runs_the_gpu_paths_settings_on_the_cpu(tmp_path, corpora, tiny_battery, monkeypatch):
    """`--precision bf16 --compile --grad-checkpointing on` through a real worker process: the
    job trains, the log says what was applied, and result.json records what the steps ran with."""
    monkeypatch.setenv("LTM_COMPILE_BACKEND", "aot_eager")  # the worker inherits it; no C++ toolchain
    manager, store, settings = _manager(tmp_path, tiny_battery)
    settings = JobSettings(base={**settings.base, "precision": "bf16", "compile": True, "kernels": "liger"},
                           scenes=settings.scenes, train={**TRAIN, "max_steps": 12, "grad_checkpointing": "on"},
                           probes=False)
    sub = manager.submit([corpora["logic"]], settings)
    run = store.get_run(sub.run_ids[0])
    assert manager.start_worker(manager._write_session([run])).wait(timeout=WAIT) == 0
    folder = tmp_path / "ws" / "runs" / run["run_id"]
    result = json.loads((folder / "result.json").read_text())
    assert result["steps"] == 12 and result["grad_checkpointing_used"] is True
    assert result["final_loss"] < result["curve"][0]["loss"]
    log = (folder / "train.log").read_text()
    assert "torch.compile: 2 decoder layers" in log
    assert "--kernels liger runs on CUDA only" in log
    store.close()


def test_workers_adopted_on_one_card_hold_a_slot_each(tmp_path, corpora, tiny_battery):
    """A restarted service with two slots on each of two cards finds two live workers that ran
    on card 0: each holds a slot of its own, both of card 0, and the free slots left are card
    1's, so no third worker is started on card 0. (Live processes stand in for the workers.)"""
    import subprocess
    import sys

    from backend.jobs.executor import process_start_ticks

    ws = Workspace(tmp_path / "ws")
    store = Store(ws.root / "ltm.duckdb") if ws.ensure() else None
    settings = JobSettings(base={"base": "micro", "preset": "tiny"}, scenes=str(tiny_battery), train=TRAIN)
    manager = JobManager(ws, store, slots=["0", "0", "1", "1"])
    run_ids = manager.submit([corpora["logic"], corpora["story"]], settings).run_ids
    sleepers = []
    try:
        for run_id in run_ids[:2]:
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            sleepers.append(proc)
            session = tmp_path / f"session-{run_id}.json"
            session.write_text(json.dumps({"slot": "0", "jobs": []}))
            store.update_run(run_id, worker_pid=proc.pid, worker_start=process_start_ticks(proc.pid),
                             session_path=str(session))
        manager.reattach(lambda event: None)
        assert sorted(w.slot for w in manager.live.values()) == [0, 1]
        assert [manager.slots[i] for i in manager.free_slots()] == ["1", "1"]
    finally:
        for proc in sleepers:
            proc.kill()
            proc.wait()


def test_a_run_asked_onto_one_card_waits_for_that_cards_slot(tmp_path, corpora, tiny_battery, monkeypatch):
    """`--device cuda:1` on a box of two cards: the session goes to card 1's slot even with card
    0's free, and its worker, which sees that card alone, trains on it as cuda:0. A card the box
    does not have is refused at submit, in one line."""
    import torch

    from backend.compute.models import pick_device
    from backend.core.devices import SLOT_ENV
    from backend.core.errors import JobError

    ws = Workspace(tmp_path / "ws")
    store = Store(ws.root / "ltm.duckdb") if ws.ensure() else None
    manager = JobManager(ws, store, slots=["0", "1"])
    pinned = JobSettings(base={"base": "micro", "preset": "tiny", "device": "cuda:1"}, scenes=str(tiny_battery),
                         train=TRAIN)
    manager.submit([corpora["logic"]], pinned)
    [group] = manager.sessions()
    assert manager._slot_for_group(group, [0, 1]) == 1 and manager._slot_for_group(group, [0]) is None
    anywhere = JobSettings(base={"base": "micro", "preset": "tiny"}, scenes=str(tiny_battery), train=TRAIN)
    manager.submit([corpora["story"]], anywhere)
    unpinned = next(g for g in manager.sessions() if not g[0]["settings"]["base"].get("device"))
    assert manager._slot_for_group(unpinned, [0, 1]) == 0
    with pytest.raises(JobError) as err:
        manager.submit([corpora["story"]], JobSettings(base={"base": "micro", "device": "cuda:2"},
                                                       scenes=str(tiny_battery), train=TRAIN))
    assert "this service has 2 card(s), cuda:0 to cuda:1" in str(err.value)
    monkeypatch.delenv(SLOT_ENV, raising=False)
    assert pick_device("cuda:1") == torch.device("cuda", 1)  # no slot: as asked
    monkeypatch.setenv(SLOT_ENV, "1")
    assert pick_device("cuda:1") == torch.device("cuda", 0)  # in card 1's slot: its only card
