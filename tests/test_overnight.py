"""A night of queued work, attacked as a careless or hostile user would: retries, cancels, a
killed service, a full disk, bad requests and other users. Real processes, a real socket, real
DuckDB files; every wait is for a state, with a deadline that holds on a loaded machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from backend.core.events import read_events
from backend.core.workspace import Workspace
from backend.jobs import client as client_module
from backend.jobs.client import connect
from backend.jobs.executor import process_alive
from backend.jobs.protocol import ServiceError
from backend.jobs.store import Store
from tests.conftest import REPO, STORY_TEXT, WAIT, cli, exit_code, wait_for

QUICK = ["--preset", "tiny", "--steps", "30", "--block-size", "64", "--micro-batch", "8",
         "--min-train-tokens", "0", "--epochs", "1000", "--quiet"]
# Trains far longer than any test waits: only ever cancelled or killed.
ENDLESS = [*QUICK[:2], "--steps", "1000000", *QUICK[4:]]
OOM = {"LTM_FAULT_OOM_ABOVE": "0"}  # every micro-batch is "out of memory": the job fails


def _jobs(ws: Workspace) -> dict[str, dict]:
    with connect(ws) as client:
        return {j["corpus"] or "baseline": j for j in client.call("jobs")}


def _run_detail(ws: Workspace, run_id: str) -> dict:
    with connect(ws) as client:
        return client.call("run", run_id=run_id)


def _start_run(ws: Workspace, *files, scenes, extra):
    return subprocess.Popen(
        [sys.executable, "-m", "ltm_tui.cli", "run", *map(str, files), "--scenes", str(scenes),
         "--workspace", str(ws.root), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
    )


def _training(ws: Workspace, corpus: str, min_step: int = 3) -> dict:
    def check():
        job = _jobs(ws).get(corpus) if ws.socket_path.exists() else None
        return job if job and job["status"] == "training" and (job["step"] or 0) >= min_step else None

    return wait_for(check, what=f"{corpus} training")


def _stop(ws: Workspace) -> None:
    assert cli("stop", "--workspace", str(ws.root)).returncode == 0
    wait_for(lambda: not ws.socket_path.exists(), what="service stopped")


# --- retry ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_retry_of_a_failed_run_is_a_new_attempt_that_reaches_done_once(tmp_path, corpora, tiny_battery):
    """The old attempt's `error` event stays in events.jsonl; a retry must not read it as its own
    (that sent every retried run straight back to `failed` and dropped its result)."""
    ws = Workspace(tmp_path / "ws")
    args = [str(corpora["logic"]), "--scenes", str(tiny_battery), "--workspace", str(ws.root), *QUICK]
    first = cli("run", *args, env=OOM)
    assert first.returncode == 1 and "out of memory" in first.stderr
    run_id = _jobs(ws)["logic.txt"]["run_id"]
    _stop(ws)  # the next service starts from whichever client comes next, with its environment

    # a second try while the fault is still there fails again, for its own reason
    assert cli("retry", run_id, "--workspace", str(ws.root), env=OOM).returncode == 0
    assert cli("follow", run_id, "--workspace", str(ws.root)).returncode == 1
    _stop(ws)

    assert cli("retry", run_id, "--workspace", str(ws.root)).returncode == 0
    follow = cli("follow", run_id, "--workspace", str(ws.root))
    assert follow.returncode == 0, follow.stderr + follow.stdout

    detail = _run_detail(ws, run_id)
    assert detail["run"]["status"] == "done" and detail["run"]["attempt"] == 2
    assert [(a["attempt"], a["status"]) for a in detail["attempts"]] == [(0, "failed"), (1, "failed"), (2, "done")]
    assert all("out of memory" in a["error"] for a in detail["attempts"][:2])
    assert detail["scores"] and [s for s in detail["scenes"] if s["battery"] == "depth"]
    rows = json.loads(cli("results", "--format", "json", "--workspace", str(ws.root)).stdout)
    assert [r["status"] for r in rows if r["corpus"] == "logic.txt"] == ["done"]
    # the events of all three attempts are kept, each stamped with its own
    events = [json.loads(line) for line in (ws.run_dir(run_id) / "events.jsonl").read_text().splitlines()]
    assert {e["attempt"] for e in events if e["type"] == "error"} == {0, 1}
    assert [e["attempt"] for e in events if e["type"] == "result"] == [2]
    _assert_private(ws.root)


def _assert_private(root: Path) -> None:
    """Database, logs, job files and tokens.bin (from which the corpus can be rebuilt) are 0600
    in a 0700 folder: another user of the GPU box reads none of them."""
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    loose = [str(p) for p in root.rglob("*") if stat.S_IMODE(p.lstat().st_mode) & 0o077]
    assert loose == []
    assert list(root.rglob("tokens.bin")) and (root / "ltm.duckdb").exists()
    if os.geteuid() == 0:  # root can become another user and try
        code = ("import os, sys\nos.setgid(65534); os.setuid(65534)\n"
                f"try:\n    open({str(root / 'ltm.duckdb')!r}, 'rb')\nexcept PermissionError:\n    print('denied')\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT)
        assert out.stdout.strip() == "denied", out.stderr


# --- a lost device ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_job_that_loses_the_device_ends_its_worker_and_the_queue_goes_on(tmp_path, corpora, tiny_battery):
    """After a sticky CUDA error (an illegal memory access: every later call in that process fails
    the same way) a warm worker that took the next job would fail the whole night's queue. The
    job fails with one line that says so, the worker exits, and a fresh worker trains the rest.
    LTM_FAULT_DEVICE_LOST stands in for the card: a job on a corpus whose path holds the value
    fails as such an error would, and the worker reads its device as lost."""
    ws = Workspace(tmp_path / "ws")
    done = cli("run", str(corpora["logic"]), str(corpora["story"]), "--scenes", str(tiny_battery),
               "--workspace", str(ws.root), *QUICK, env={"LTM_FAULT_DEVICE_LOST": "logic"})
    assert done.returncode == 1, done.stderr + done.stdout  # one of the runs failed
    jobs = _jobs(ws)
    assert jobs["logic.txt"]["status"] == "failed" and jobs["story.txt"]["status"] == "done"
    logic = _run_detail(ws, jobs["logic.txt"]["run_id"])["run"]
    story = _run_detail(ws, jobs["story.txt"]["run_id"])["run"]
    assert "illegal memory access" in logic["error"] and "a fresh worker takes the jobs" in logic["error"]
    assert story["worker_pid"] != logic["worker_pid"]  # not the worker whose device was lost
    assert "Traceback" in (ws.run_dir(logic["run_id"]) / "train.log").read_text()  # the detail, for a bug report


# --- cancel ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cancel_touches_only_its_own_run_and_the_warm_worker_goes_on(tmp_path, corpora, tiny_battery):
    """Cancelling a run queued behind a training run, and then the training run itself: the worker
    skips the first, checkpoints and lets go of the second, and trains the third without a restart."""
    ws = Workspace(tmp_path / "ws")
    third = corpora["story"].with_name("third.txt")
    third.write_text(STORY_TEXT.upper(), encoding="utf-8")
    endless = _start_run(ws, corpora["logic"], scenes=tiny_battery, extra=ENDLESS)
    worker_pid = _training(ws, "logic.txt")["pid"]
    later = _start_run(ws, corpora["story"], third, scenes=tiny_battery, extra=QUICK)
    # no free slot: both are handed to the worker that holds their base
    wait_for(lambda: {_jobs(ws).get(c, {}).get("pid") for c in ("story.txt", "third.txt")} == {worker_pid},
             what="both handed over to the warm worker")
    jobs = _jobs(ws)

    assert cli("cancel", jobs["third.txt"]["run_id"], "--workspace", str(ws.root)).returncode == 0
    assert cli("cancel", jobs["logic.txt"]["run_id"], "--workspace", str(ws.root)).returncode == 0
    assert exit_code(endless, "`ltm-tui run` of the cancelled run") == 1  # it returns
    assert exit_code(later, "`ltm-tui run` of story and third") == 1  # story done, third cancelled

    after = _jobs(ws)
    assert {c: after[c]["status"] for c in ("logic.txt", "story.txt", "third.txt")} == {
        "logic.txt": "cancelled", "story.txt": "done", "third.txt": "cancelled"}
    story = _run_detail(ws, jobs["story.txt"]["run_id"])["run"]
    assert story["worker_pid"] == worker_pid  # the same warm worker, not a cold restart
    third_dir = ws.run_dir(jobs["third.txt"]["run_id"])
    assert not (third_dir / "events.jsonl").exists()  # it never started
    logic_dir = ws.run_dir(jobs["logic.txt"]["run_id"])
    assert list((logic_dir / "checkpoints").glob("step-*"))  # a retry resumes from here
    assert "cancelled by the user" in (logic_dir / "train.log").read_text()


@pytest.mark.slow
def test_cancel_during_evaluation_stores_no_result_and_the_worker_goes_on(tmp_path, corpora):
    """A battery long enough to catch a run evaluating: cancelled there, it writes no result,
    and the next corpus on the same worker is trained and scored."""
    battery = tmp_path / "long-battery"
    battery.mkdir()
    scenes = "".join(f"  - {{id: g{i}, kind: generate, prompt: 'All glims are', max_new_tokens: 48,"
                     " checks: [{max_words: 40}]}\n" for i in range(200))
    (battery / "long.yaml").write_text(f"battery: long\ndescription: slow to evaluate\nmetric: novelty\n"
                                       f"scenes:\n{scenes}", encoding="utf-8")
    ws = Workspace(tmp_path / "ws")
    client = _start_run(ws, corpora["logic"], corpora["story"], scenes=battery, extra=[*QUICK, "--no-probes"])
    job = wait_for(lambda: ws.socket_path.exists() and (j := _jobs(ws).get("logic.txt")) and
                   j["status"] == "evaluating" and j, what="logic.txt evaluating")
    with connect(ws) as c:  # at once, not after a CLI's start-up
        c.call("cancel", run_id=job["run_id"])
    assert exit_code(client, "`ltm-tui run` of logic and story") == 1
    jobs = _jobs(ws)
    assert jobs["logic.txt"]["status"] == "cancelled" and jobs["story.txt"]["status"] == "done"
    assert not (ws.run_dir(job["run_id"]) / "result.json").exists()
    story = _run_detail(ws, jobs["story.txt"]["run_id"])["run"]
    assert story["worker_pid"] == job["pid"]  # the same worker went on


@pytest.mark.slow
def test_stop_all_stops_the_workers_a_stopped_service_left_behind(tmp_path, corpora, tiny_battery):
    """`stop` lets the workers go on; `stop --all` later, with no service running, still stops
    them (a service adopts them, then stops them with itself), each saving a checkpoint."""
    ws = Workspace(tmp_path / "ws")
    endless = _start_run(ws, corpora["logic"], scenes=tiny_battery, extra=ENDLESS)
    worker_pid = _training(ws, "logic.txt")["pid"]
    # another base waits for the one slot: the service that stops the workers must not start it
    other = _start_run(ws, corpora["story"], scenes=tiny_battery, extra=[*ENDLESS[:1], "small", *ENDLESS[2:]])
    wait_for(lambda: _jobs(ws).get("story.txt", {}).get("status") == "queued", what="story.txt queued")
    _stop(ws)
    assert process_alive(worker_pid, None)  # `stop` leaves the workers training
    out = cli("stop", "--all", "--workspace", str(ws.root))
    assert out.returncode == 0 and "and its workers" in out.stdout, out.stdout + out.stderr
    wait_for(lambda: not process_alive(worker_pid, None), what="the worker to stop")
    endless.kill()
    other.kill()
    wait_for(lambda: not ws.socket_path.exists(), what="that service stopped")
    # again, with the slot free and a run queued: still nothing is started only to be stopped
    assert cli("stop", "--all", "--workspace", str(ws.root)).returncode == 0
    wait_for(lambda: not ws.socket_path.exists(), what="the second service stopped")
    with Store(ws.root / "ltm.duckdb") as store:
        runs = {Path(r["corpus_path"]).name: r for r in store.list_runs() if r["kind"] == "adapter"}
    assert runs["logic.txt"]["status"] not in ("training", "starting", "evaluating")
    assert list((ws.run_dir(runs["logic.txt"]["run_id"]) / "checkpoints").glob("step-*"))  # a retry resumes here
    assert runs["story.txt"]["status"] == "queued" and runs["story.txt"]["worker_pid"] is None  # never started


@pytest.mark.slow
def test_a_run_queued_again_after_its_worker_hung_is_followed_to_its_end(tmp_path, corpora, tiny_battery):
    """A worker that stops answering (frozen here with SIGSTOP) is stopped after the stall limit
    and its run queued again by itself; `ltm-tui run` says so and follows it to `done`, instead of
    reporting the run as over at `interrupted`."""
    ws = Workspace(tmp_path / "ws")
    longer = [*QUICK[:2], "--steps", "150", *QUICK[4:]]
    client = subprocess.Popen(
        [sys.executable, "-m", "ltm_tui.cli", "run", str(corpora["logic"]), "--scenes", str(tiny_battery),
         "--workspace", str(ws.root), *longer],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "LTM_STALL_SECONDS": "10"},
    )
    pid = _training(ws, "logic.txt")["pid"]
    os.kill(pid, signal.SIGSTOP)  # the stall limit, then the stop's grace, then SIGKILL
    try:
        out, err = client.communicate(timeout=6 * WAIT)
    finally:
        if process_alive(pid, None):
            os.kill(pid, signal.SIGKILL)
    assert client.returncode == 0, err
    assert "queued again by itself" in err and "no sign of life" in err
    assert _jobs(ws)["logic.txt"]["status"] == "done"
    _stop(ws)


# --- a killed service ------------------------------------------------------------------------------


@pytest.mark.slow
def test_status_after_a_killed_service_starts_one_that_settles_dead_workers(tmp_path, corpora, tiny_battery):
    ws = Workspace(tmp_path / "ws")
    client = _start_run(ws, corpora["logic"], scenes=tiny_battery, extra=ENDLESS)
    job = _training(ws, "logic.txt")
    with connect(ws) as c:
        service_pid = c.call("ping")["pid"]
    os.kill(service_pid, signal.SIGKILL)
    os.kill(job["pid"], signal.SIGKILL)
    wait_for(lambda: not process_alive(service_pid, None) and not process_alive(job["pid"], None),
             what="service and worker gone")
    client.kill()

    status = cli("status", "--format", "json", "--workspace", str(ws.root))
    assert status.returncode == 0, status.stderr
    rows = {r["corpus"] or "baseline": r for r in json.loads(status.stdout)}
    # not `training` with no process behind it: the service it started settled the run
    assert rows["logic.txt"]["status"] == "interrupted"
    assert "worker died while no service watched it" in rows["logic.txt"]["error"]
    with connect(ws) as c:
        assert c.call("ping")["pid"] != service_pid


# --- the socket ----------------------------------------------------------------------------------


def _raw(ws: Workspace):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect(str(ws.socket_path))
    return sock, sock.makefile("rb")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_every_malformed_request_gets_one_reply_and_the_connection_lives(tmp_path):
    ws = Workspace(tmp_path / "ws")
    connect(ws).close()
    sock, reader = _raw(ws)
    bad = [
        b"not json",
        b"[1, 2]",
        b'{"op": 5}',
        b'{"op": "submit", "args": "paths"}',
        b'{"id": 1, "op": "cancel", "args": {"run_id": {"nested": 1}}}',
        b'{"id": 2, "op": "log", "args": {"run_id": "../../../etc"}}',
        b'{"id": 3, "op": "jobs", "args": {"runs": 5}}',
        b'{"id": 4, "op": "submit", "args": {"settings": {}}}',
        b'{"id": 5, "op": "submit", "args": {"paths": "/etc/passwd", "settings": {"base": {}, "scenes": "x"}}}',
        b'{"id": 6, "op": "no-such-op"}',
    ]
    for line in bad:
        sock.sendall(line + b"\n")
        reply = json.loads(reader.readline())
        assert reply["ok"] is False, (line, reply)
        assert reply["error"]["message"] and "Traceback" not in reply["error"]["message"]
    assert "not a run id" in _reply_to(sock, reader, b'{"op": "log", "args": {"run_id": "../x"}}')["error"]["message"]
    sock.sendall(b'{"id": 9, "op": "ping"}\n')
    assert json.loads(reader.readline())["ok"] is True  # the same connection still answers
    sock.close()


def _reply_to(sock, reader, line: bytes) -> dict:
    sock.sendall(line + b"\n")
    return json.loads(reader.readline())


def test_a_subscriber_that_stops_reading_is_dropped_and_a_reader_gets_every_event(tmp_path):
    """A client that subscribes and then stops reading (a suspended terminal, `follow | less`)
    would have the night's events pile up in the service: millions of progress lines. Its
    backlog is bounded: past `SUBSCRIBER_BACKLOG` events it is dropped (the dashboard reconnects
    and reads everything afresh), while a client that reads gets every event, in order. (The
    service in this process with its real socket; the events broadcast as the tick does.)"""
    import threading

    from backend import service as service_module
    from backend.jobs.client import try_connect
    from backend.jobs.protocol import request_line

    ws = Workspace(tmp_path / "ws")
    svc = service_module.Service(ws)
    svc._bind()
    threading.Thread(target=svc.server.serve_forever, daemon=True).start()
    stalled = socket.socket(socket.AF_UNIX)
    try:
        stalled.connect(str(ws.socket_path))
        stalled.sendall(request_line(1, "subscribe", {}))  # and never reads again
        reader = try_connect(ws)
        stream = reader.subscribe()
        wait_for(lambda: len(svc.subscribers) == 2, what="both subscriptions")
        got: list[int] = []

        def listen() -> None:
            for event in stream:
                if "i" in event:
                    got.append(event["i"])

        threading.Thread(target=listen, daemon=True).start()
        total, chunk = 3 * service_module.SUBSCRIBER_BACKLOG, 2000
        for start in range(0, total, chunk):  # as fast as the reader reads: only the stalled one falls behind
            for i in range(start, start + chunk):
                svc.broadcast({"type": "log", "run_id": "night-s0-000000", "message": "x" * 200, "i": i})
            wait_for(lambda: len(got) >= start + chunk, what=f"the reader to read {start + chunk} events")
        assert got == list(range(total))
        assert len(svc.subscribers) == 1  # the stalled client's subscription is gone, its backlog with it
    finally:
        stalled.close()
        svc.shutdown()


def test_a_task_ends_with_its_service(tmp_path, tiny_battery):
    """A calibration's client waits on the service, and tasks are not in the database: a task
    that outlived its killed service would report to no one and hold its card beside the next
    service's workers. It ends with the service (a run's worker goes on: see the reattach test)."""
    ws = Workspace(tmp_path / "ws")
    with connect(ws) as client:
        task = client.call("task", kind="calibrate", base={"base": "micro", "preset": "tiny", "device": "cpu"},
                           train={"block_size": 32, "micro_batch": 2, "min_train_tokens": 0}, steps=100_000,
                           scenes=str(tiny_battery))
        service_pid = client.call("ping")["pid"]
        running = wait_for(lambda: next((t for t in client.call("tasks") if t["task_id"] == task["task_id"]
                                         and t["pid"]), None), what="the calibration's process")
    assert process_alive(running["pid"], None)
    os.kill(service_pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(running["pid"], None), what="the task to end with its service")


def test_a_100_mb_request_line_is_refused_without_growing_the_service(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with connect(ws) as c:
        pid = c.call("ping")["pid"]
    before = _rss_kib(pid)
    sock, reader = _raw(ws)
    chunk = b"x" * (1 << 20)
    try:
        for _ in range(100):
            sock.sendall(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the service closed the connection once the line passed its limit
    reply = json.loads(reader.readline() or b"{}")
    sock.close()
    assert reply.get("ok") is False and "at most" in reply["error"]["message"]
    with connect(ws) as c:
        assert c.call("ping")["pid"] == pid
    assert _rss_kib(pid) - before < 48 * 1024  # one line's limit (8 MiB) and change, not 100 MB


def test_a_client_of_another_protocol_is_told_to_restart_the_service(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    connect(ws).close()
    monkeypatch.setattr(client_module, "PROTOCOL_VERSION", client_module.PROTOCOL_VERSION + 1)
    with pytest.raises(ServiceError, match="speaks protocol .* `ltm-tui stop`"):
        connect(ws)


# --- other programs --------------------------------------------------------------------


def _one_done_run(ws: Path, corpus_name: str) -> None:
    with Store(ws / "ltm.duckdb") as store:
        corpus_id = store.add_corpus({"sha256": "ab" * 32, "path": f"/books/{corpus_name}", "name": corpus_name})
        store.create_run("run-a", kind="adapter", base="micro:tiny", settings={}, corpus_id=corpus_id,
                         corpus_path=f"/books/{corpus_name}")
        for state in ("starting", "training", "evaluating"):
            store.transition("run-a", state)
        store.ingest_result("run-a", {"scores": {"reasoning_depth": {"value": 0.5, "n": 4}}, "scene_results": [],
                                      "overall": 0.5})
        store.transition("run-a", "done")


@pytest.mark.parametrize("name", ['=HYPERLINK("http://x.example","click").txt', "@SUM(1+1).md", "+1.txt", "-2.txt"])
def test_exports_never_write_a_live_spreadsheet_formula(tmp_path, name):
    ws = tmp_path / "ws"
    _one_done_run(ws, name)
    target = tmp_path / "out.csv"
    assert cli("export", "--csv", str(target), "--workspace", str(ws)).returncode == 0
    piped = cli("results", "--format", "csv", "--workspace", str(ws)).stdout
    for text in (target.read_text(encoding="utf-8"), piped):
        import csv
        import io

        row = next(r for r in csv.DictReader(io.StringIO(text)) if r["run_id"] == "run-a")
        assert row["corpus"] == "'" + name  # text to a spreadsheet, shown as typed
        assert float(row["overall"]) == 0.5  # numbers stay numbers


def test_a_corpus_name_with_markup_is_shown_as_typed(tmp_path):
    ws = tmp_path / "ws"
    _one_done_run(ws, "[reverse]x[/].txt")
    out = cli("results", "--workspace", str(ws), env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "[reverse]x[/].txt" in out.stdout


# --- a full disk ----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs to fill up; skipped where this process may not mount one."""
    from tests.conftest import small_tmpfs, stop_service

    with small_tmpfs(tmp_path / "disk", "64m") as mount:
        try:
            yield mount
        finally:
            stop_service(mount / "ws")


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_a_full_disk_stops_the_run_not_the_service_and_retry_finishes(small_disk, corpora, tiny_battery):
    ws = Workspace(small_disk / "ws")
    client = _start_run(ws, corpora["logic"], scenes=tiny_battery, extra=[*QUICK[:2], "--steps", "300", *QUICK[4:]])
    job = _training(ws, "logic.txt")
    with connect(ws) as c:
        service_pid = c.call("ping")["pid"]
    filler = _fill(small_disk)
    wait_for(lambda: not process_alive(job["pid"], None), what="the worker to stop on the full disk")
    with connect(ws) as c:
        assert c.call("ping")["pid"] == service_pid  # still up, still answering, while full
    filler.unlink()
    ended = wait_for(lambda: (j := _jobs(ws)["logic.txt"])["status"] in ("failed", "interrupted") and j,
                     what="the run to end")
    assert "free space and retry" in ended["error"], ended["error"]
    exit_code(client, "`ltm-tui run` after its run ended")

    assert cli("retry", ended["run_id"], "--workspace", str(ws.root)).returncode == 0
    follow = cli("follow", ended["run_id"], "--workspace", str(ws.root))
    assert follow.returncode == 0, follow.stderr + follow.stdout
    with connect(ws) as c:
        assert c.call("ping")["pid"] == service_pid  # the same service throughout
        attempts = c.call("run", run_id=ended["run_id"])["attempts"]
    assert [a["status"] for a in attempts] == [ended["status"], "done"]


# --- a kill storm --------------------------------------------------------------------------------

LIVE = ("starting", "training", "evaluating")


@pytest.mark.slow
def test_a_kill_storm_ends_every_run_exactly_once(tmp_path, tiny_battery):
    """Six corpora queued; workers and the service are SIGKILLed at random, every 1–3 s, until
    five workers and three services have died (30 s at most). Then every run is retried until
    done: each ends exactly once, with one result, and nothing is left running. While the storm
    lasts, no run shows as live without a process for long."""
    import random
    import time

    from tests.conftest import LOGIC_TEXT

    ws = Workspace(tmp_path / "ws")
    folder = tmp_path / "books"
    folder.mkdir()
    for i in range(6):
        (folder / f"book{i}.txt").write_text(f"Book {i}. " + LOGIC_TEXT, encoding="utf-8")
    client = _start_run(ws, folder, scenes=tiny_battery, extra=QUICK)
    wait_for(lambda: ws.socket_path.exists() and len(_jobs(ws)) == 7, what="seven jobs queued")
    rng = random.Random(14)
    ghost_since: dict[str, float] = {}
    end = time.monotonic() + 30
    kills = {"worker": 0, "service": 0}
    while time.monotonic() < end and not (kills["worker"] >= 5 and kills["service"] >= 3):
        jobs = _jobs(ws)  # connects, so a killed service is started again here
        now = time.monotonic()
        for job in jobs.values():
            ghost = job["status"] in LIVE and not (job["pid"] and process_alive(job["pid"], None))
            if not ghost:
                ghost_since.pop(job["run_id"], None)
            elif now - ghost_since.setdefault(job["run_id"], now) > 20:
                raise AssertionError(f"{job['run_id']} shown {job['status']} with no process for 20 s")
        pids = sorted({j["pid"] for j in jobs.values() if j["pid"]})
        if rng.random() < 0.3:
            with connect(ws) as c:
                os.kill(c.call("ping")["pid"], signal.SIGKILL)
            kills["service"] += 1
        elif pids:
            try:
                os.kill(rng.choice(pids), signal.SIGKILL)
            except ProcessLookupError:
                pass  # it ended between the listing and the kill (a busy machine reads late)
            kills["worker"] += 1
        time.sleep(rng.uniform(1.0, 3.0))
    client.kill()
    assert kills["worker"] >= 3 and kills["service"] >= 2, kills

    for _ in range(4):  # every round retries what the storm left unfinished
        unfinished = [j for j in _jobs(ws).values() if j["status"] != "done"]
        if not unfinished:
            break
        for job in unfinished:
            if job["status"] in ("failed", "interrupted", "cancelled"):
                assert cli("retry", job["run_id"], "--workspace", str(ws.root)).returncode == 0
        cli("follow", "--workspace", str(ws.root))
    jobs = _jobs(ws)
    assert {j["status"] for j in jobs.values()} == {"done"}, {c: j["status"] for c, j in jobs.items()}
    rows = json.loads(cli("results", "--format", "json", "--workspace", str(ws.root)).stdout)
    assert sorted(r["run_id"] for r in rows) == sorted(j["run_id"] for j in jobs.values())  # once each
    with connect(ws) as c:
        for job in jobs.values():
            detail = c.call("run", run_id=job["run_id"])
            assert detail["attempts"][-1]["status"] == "done"
            ids = [(s["battery"], s["scene_id"]) for s in detail["scenes"]]
            assert len(ids) == len(set(ids)) and ("depth", "d1") in ids
    assert cli("stop", "--all", "--workspace", str(ws.root)).returncode == 0
    wait_for(lambda: not ws.socket_path.exists(), what="service stopped")

    def leftover() -> list[str]:  # the service and the workers it stopped, still on their way out
        return subprocess.run(["pgrep", "-f", str(ws.root)], capture_output=True, text=True).stdout.split()

    wait_for(lambda: not leftover(), what="every process of the workspace to exit")


# --- calibration and judging wait for a worker slot ----------------------------------------------


def _popen_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ltm_tui.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            start_new_session=True)


@pytest.mark.slow
def test_estimate_and_judge_wait_for_the_slot_of_a_training_worker(tmp_path, finished, tiny_hf_model):
    """With the only slot training, `estimate`'s calibration and `judge --model` load nothing: they
    wait as tasks, say why, and start once the worker has let go of the slot."""
    import shutil

    from tests.conftest import stop_service

    stop_service(finished.ws)  # a copy of a database is taken while nothing writes it
    shutil.copytree(finished.ws, tmp_path / "ws", ignore=shutil.ignore_patterns("service.*"))
    ws = Workspace(tmp_path / "ws")
    done = [r for r in json.loads(cli("status", "--format", "json", "--workspace", str(ws.root)).stdout)
            if r["kind"] == "adapter"]
    endless = _start_run(ws, finished.corpora / "logic.txt", scenes=finished.battery, extra=ENDLESS)
    training = _training(ws, "logic.txt")
    estimate = _popen_cli("estimate", "--preset", "tiny", "--block-size", "64", "--micro-batch", "8",
                          "--recalibrate", "--calibration-steps", "2", "--pages", "1,10",
                          "--scenes", str(finished.battery), "--workspace", str(ws.root))
    judge = _popen_cli("judge", done[0]["run_id"], "--model", str(tiny_hf_model), "--device", "cpu",
                       "--workspace", str(ws.root))
    with connect(ws) as client:
        tasks = wait_for(lambda: [t for t in client.call("tasks") if t["status"] == "waiting"][1:]
                         and client.call("tasks"), what="both tasks queued")
    assert {t["kind"] for t in tasks} == {"calibrate", "judge"} and all(t["pid"] is None for t in tasks)
    assert _jobs(ws)["logic.txt"]["status"] == "training"  # nothing loaded beside it
    assert cli("cancel", training["run_id"], "--workspace", str(ws.root)).returncode == 0
    assert exit_code(endless, "`ltm-tui run` of the cancelled run") == 1
    assert exit_code(estimate, "`ltm-tui estimate` behind the worker") == 0, estimate.stderr.read()
    assert exit_code(judge, "`ltm-tui judge` behind the worker") == 0, judge.stderr.read()
    said = estimate.stderr.read()
    assert "calibrating: waiting: every worker slot is busy (worker " in said
    assert "tokens/s" in estimate.stdout.read()
    assert "graded by local:" in judge.stdout.read()
    cancelled = max(e["ts"] for e in read_events(ws.run_dir(training["run_id"]) / "events.jsonl")[0])
    for task in tasks:
        first = read_events(ws.root / "tasks" / task["task_id"] / "events.jsonl")[0]
        assert first and first[0]["ts"] >= cancelled  # it started only after the worker let go
        assert (ws.root / "tasks" / task["task_id"] / "result.json").is_file()


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    """A cancelled run its worker never lets go of: past the cancel grace the worker is asked to
    stop (SIGTERM), and past the stop grace it is killed (SIGKILL), whatever it does with SIGTERM."""
    import time

    from backend.jobs.executor import LocalProcess, process_start_ticks
    from backend.jobs.manager import LiveWorker

    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
         " print('ready', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert stubborn.stdout.readline().strip() == "ready"
        worker = LiveWorker(LocalProcess(stubborn.pid, process_start_ticks(stubborn.pid), stubborn),
                            tmp_path / "session.json", ["r1"], 0)
        worker.stopping["r1"] = time.monotonic()
        worker.enforce_cancel(grace=60)
        assert worker.stop_requested is None  # within the grace: still its to let go of
        worker.stopping["r1"] -= 120
        worker.enforce_cancel(grace=60)
        assert worker.stop_requested is not None  # SIGTERM sent, and ignored
        worker.enforce_stop(grace=60)
        assert worker.exit_code() is None
        worker.stop_requested -= 120
        worker.enforce_stop(grace=60)
        assert wait_for(lambda: worker.exit_code(), what="the stubborn worker to die") == -signal.SIGKILL
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
        stubborn.wait()
