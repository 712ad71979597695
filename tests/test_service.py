"""The job service with real processes and a real socket: nothing a crash or a dropped SSH
connection does loses a job."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from backend.core.events import read_events
from backend.core.workspace import Workspace
from backend.jobs.client import connect
from backend.jobs.executor import process_alive
from backend.jobs.store import Store
from tests.conftest import REPO, WAIT, cli, exit_code, stop_service, wait_for

# Long enough to be killed mid-training, short enough for CI.
SLOW = ["--preset", "tiny", "--steps", "200", "--block-size", "64", "--micro-batch", "8",
        "--min-train-tokens", "0", "--epochs", "1000", "--quiet"]


def _jobs(ws: Workspace) -> list[dict]:
    with connect(ws) as client:
        return client.call("jobs")


def _job(ws, corpus):
    """The corpus's job, or None while `ltm-tui run` has not queued it yet."""
    return next((j for j in _jobs(ws) if j["corpus"] == corpus), None)


def _start_run(ws, *files, scenes, extra=SLOW):
    """`ltm-tui run` in the background, as a user would over SSH."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "ltm_tui.cli", "run", *map(str, files), "--scenes", str(scenes),
         "--workspace", str(ws.root), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )


def _training(ws, corpus, min_step=5):
    def check():
        job = _job(ws, corpus) if ws.socket_path.exists() else None
        return job if job and job["status"] == "training" and (job["step"] or 0) >= min_step else None

    return wait_for(check, what=f"{corpus} training")


@pytest.mark.slow
def test_killed_worker_is_interrupted_then_retry_resumes_to_done(tmp_path, corpora, tiny_battery):
    ws = Workspace(tmp_path / "ws")
    client_proc = _start_run(ws, corpora["logic"], scenes=tiny_battery)
    job = _training(ws, "logic.txt", min_step=20)
    os.kill(job["pid"], signal.SIGKILL)
    wait_for(lambda: _job(ws, "logic.txt")["status"] == "interrupted", what="interrupted")
    interrupted = _job(ws, "logic.txt")
    assert "worker exited with code -9" in interrupted["error"]
    assert "step" in interrupted["error"]  # the tail of its train.log
    assert exit_code(client_proc, "`ltm-tui run` after its run was interrupted") == 1

    # retry resumes from the newest checkpoint (none yet: SIGKILL gives no chance) and finishes
    assert cli("retry", job["run_id"], "--workspace", str(ws.root)).returncode == 0
    follow = cli("follow", job["run_id"], "--workspace", str(ws.root))
    assert follow.returncode == 0, follow.stderr
    rows = json.loads(cli("results", "--format", "json", "--workspace", str(ws.root)).stdout)
    assert [r["status"] for r in rows if r["corpus"] == "logic.txt"] == ["done"]


@pytest.mark.slow
def test_retry_after_sigterm_resumes_from_the_checkpoint(tmp_path, corpora, tiny_battery):
    ws = Workspace(tmp_path / "ws")
    _start_run(ws, corpora["logic"], scenes=tiny_battery)
    job = _training(ws, "logic.txt", min_step=20)
    assert cli("cancel", job["run_id"], "--workspace", str(ws.root)).returncode == 0
    log_path = ws.run_dir(job["run_id"]) / "train.log"
    wait_for(lambda: "cancelled by the user" in log_path.read_text(), what="the worker to let go of the run")
    ckpts = list((ws.run_dir(job["run_id"]) / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1  # the cancel saved one
    assert _job(ws, "logic.txt")["status"] == "cancelled"
    assert cli("retry", job["run_id"], "--workspace", str(ws.root)).returncode == 0
    assert cli("follow", job["run_id"], "--workspace", str(ws.root)).returncode == 0
    log = (ws.run_dir(job["run_id"]) / "train.log").read_text()
    assert f"resumed from {ckpts[0].name}" in log
    with connect(ws) as client:
        result = json.loads((ws.run_dir(job["run_id"]) / "result.json").read_text())
        assert result["steps"] == int(SLOW[SLOW.index("--steps") + 1])  # all of them
        assert [r["status"] for r in client.call("results") if r["run_id"] == job["run_id"]] == ["done"]


@pytest.mark.slow
def test_killed_service_leaves_workers_running_and_a_new_one_reattaches(tmp_path, corpora, tiny_battery):
    ws = Workspace(tmp_path / "ws")
    client_proc = _start_run(ws, corpora["logic"], scenes=tiny_battery)
    job = _training(ws, "logic.txt")
    with connect(ws) as client:
        service_pid = client.call("ping")["pid"]
    os.kill(service_pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(service_pid, None), what="service gone")
    assert process_alive(job["pid"], None)  # the worker goes on without a service
    client_proc.kill()

    # any client starts a new service, which adopts the live worker and ingests its result once
    logged = [e["step"] for e in read_events(ws.run_dir(job["run_id"]) / "events.jsonl", 0)[0]
              if e.get("type") == "progress"]
    again = _job(ws, "logic.txt")
    assert again["status"] in ("training", "evaluating", "done")
    if again["status"] != "done":
        assert again["pid"] == job["pid"]  # adopted: the same process, not a new worker
    if again["status"] == "training":  # its first answer is where the worker is, not where its log begins
        assert (again["step"] or 0) >= max(logged), (again["step"], logged)
    assert cli("follow", "--workspace", str(ws.root)).returncode == 0
    with connect(ws) as client:
        rows = [r for r in client.call("results") if r["corpus"] == "logic.txt"]
    assert len(rows) == 1 and rows[0]["status"] == "done"
    with connect(ws) as client:
        assert client.call("run", run_id=rows[0]["run_id"])["run"]["worker_pid"] == job["pid"]
    cli("stop", "--workspace", str(ws.root))  # workers go on, but this one has no run left:
    # it ends with the service, not a linger later (on Ray, no later service would end its actor)
    wait_for(lambda: not process_alive(job["pid"], None), timeout=10, what="the lingering worker to end")
    with Store(ws.db_path) as store:
        scenes = [r for r in store.scene_results(rows[0]["run_id"]) if r["battery"] != "_general"]
        assert len(scenes) == 4  # ingested once, not twice (the general-text rows of forgetting aside)


@pytest.mark.slow
def test_sighup_to_the_client_does_not_stop_the_queue(tmp_path, corpora, tiny_battery):
    ws = Workspace(tmp_path / "ws")
    quick = ["--preset", "tiny", "--steps", "60", "--block-size", "64", "--micro-batch", "8",
             "--min-train-tokens", "0", "--epochs", "1000", "--quiet"]
    client_proc = _start_run(ws, corpora["logic"], corpora["story"], scenes=tiny_battery, extra=quick)
    wait_for(lambda: ws.socket_path.exists() and len(_jobs(ws)) == 3, what="jobs queued")
    os.killpg(client_proc.pid, signal.SIGHUP)  # the SSH connection drops
    exit_code(client_proc, "`ltm-tui run` after SIGHUP")
    wait_for(lambda: all(j["status"] == "done" for j in _jobs(ws)), what="queue drained")


def test_two_clients_share_one_service_and_a_second_service_refuses(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with connect(ws) as a, connect(ws) as b:
        assert a.call("ping")["pid"] == b.call("ping")["pid"]
        assert a.call("jobs") == b.call("jobs") == []
    second = subprocess.run([sys.executable, "-m", "backend.service", "--workspace", str(ws.root)],
                            capture_output=True, text=True, timeout=WAIT, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert second.returncode == 2
    assert "a service already runs on" in second.stderr and "Traceback" not in second.stderr
    mode = stat.S_IMODE(os.stat(ws.socket_path).st_mode)
    assert mode == 0o600


def test_clients_starting_the_service_at_the_same_moment_all_reach_the_one_that_won(tmp_path):
    """Each client that finds no service starts one; one wins the workspace's lock, and the
    others' clients wait for its socket (it may still be opening the store) instead of failing."""
    import threading

    ws = Workspace(tmp_path / "ws")
    for _ in range(3):
        pids, errors = [], []
        go = threading.Barrier(3)

        def client() -> None:
            go.wait()
            try:
                with connect(ws) as c:
                    pids.append(c.call("ping")["pid"])
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=WAIT)
        assert not errors and len(pids) == 3 and len(set(pids)) == 1, (errors, pids)
        stop_service(ws.root)


@pytest.mark.slow
def test_subscription_sees_every_state_change_in_order(tmp_path, corpora, tiny_battery):
    ws = Workspace(tmp_path / "ws")
    listener = connect(ws)
    stream = listener.subscribe()
    quick = ["--preset", "tiny", "--steps", "20", "--block-size", "64", "--micro-batch", "8",
             "--min-train-tokens", "0", "--quiet"]
    done = cli("run", str(corpora["logic"]), "--scenes", str(tiny_battery), "--workspace", str(ws.root), *quick)
    assert done.returncode == 0, done.stderr
    seen: dict[str, list[str]] = {}
    while True:
        event = next(stream)
        if event["type"] == "state":
            seen.setdefault(event["run_id"], []).append(event["status"])
        if len(seen) == 2 and all(v[-1] == "done" for v in seen.values()):
            break
    listener.close()
    by_kind = sorted(seen.values(), key=len)
    assert by_kind[0] == ["starting", "evaluating", "done"]  # the baseline trains nothing
    assert by_kind[1] == ["starting", "training", "evaluating", "done"]


def test_status_lists_500_queued_jobs(tmp_path):
    ws = Workspace(tmp_path / "ws").ensure()
    with Store(ws.db_path) as store:
        for i in range(500):
            store.create_run(f"r{i:03d}", kind="adapter", base="micro:tiny", settings={
                "base": {"base": "micro", "preset": "tiny"}, "scenes": "/nowhere", "train": {}, "lora": {}},
                corpus_path=f"/nowhere/c{i}.txt", run_dir=str(ws.run_dir(f"r{i:03d}")))
    with connect(ws) as client:
        jobs = client.call("jobs")
    # every job comes back; how fast is `status_ms_500` in benchmarks/run.py, not a timed test
    assert len(jobs) == 500 and {j["run_id"] for j in jobs} == {f"r{i:03d}" for i in range(500)}


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_a_client_of_another_user_is_refused(tmp_path):
    ws = Workspace(tmp_path / "ws")
    connect(ws).close()
    os.chmod(tmp_path, 0o755)
    os.chmod(ws.root, 0o755)
    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"try:\n    s.connect({str(ws.socket_path)!r})\nexcept PermissionError:\n    print('denied'); sys.exit(0)\n"
        "s.sendall(b'{\"op\": \"ping\"}\\n'); print(s.recv(4096).decode())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT)
    assert out.stdout.strip() == "denied" or "another user" in out.stdout


@pytest.mark.slow
def test_a_warm_worker_takes_the_next_corpus_on_its_base(tmp_path, corpora, tiny_battery):
    """A corpus queued while a worker runs on the same base goes to that worker, not a new one."""
    ws = Workspace(tmp_path / "ws")
    first = _start_run(ws, corpora["logic"], scenes=tiny_battery)
    job = _training(ws, "logic.txt")
    second = cli("run", str(corpora["story"]), "--scenes", str(tiny_battery), "--workspace", str(ws.root),
                 *SLOW[:2], "--steps", "30", *SLOW[4:])  # training settings travel with each job
    assert second.returncode == 0, second.stderr
    assert exit_code(first, "`ltm-tui run` of the first corpus") == 0
    with connect(ws) as client:
        jobs = {j["corpus"]: j for j in client.call("jobs")}
    assert jobs["story.txt"]["status"] == "done"
    with connect(ws) as client:
        client.call("stop", workers=True)
    wait_for(lambda: not ws.socket_path.exists(), what="service stopped")
    with Store(ws.db_path) as store:
        runs = {r["corpus_path"].rsplit("/", 1)[-1]: r for r in store.list_runs() if r["corpus_path"]}
    assert runs["story.txt"]["worker_pid"] == runs["logic.txt"]["worker_pid"] == job["pid"]
    # result.json says which job started the worker (the forecast counts only such loads): the
    # baseline runs first, then the two corpora in the same worker
    with Store(ws.db_path) as store:
        warm = {(r["corpus_path"] or "baseline").rsplit("/", 1)[-1]:
                json.loads((Path(r["run_dir"]) / "result.json").read_text())["warm"] for r in store.list_runs()}
    assert warm == {"baseline": False, "logic.txt": True, "story.txt": True}


def test_a_subscriber_that_leaves_does_not_keep_the_service_busy(tmp_path):
    """On-demand services exit when idle; a client that dropped its subscription must not
    count as someone watching."""
    ws = Workspace(tmp_path / "ws").ensure()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "backend.service", "--workspace", str(ws.root),
                             "--idle-exit", "2"], env=env, start_new_session=True)
    wait_for(lambda: ws.socket_path.exists(), what="service up")
    listener = connect(ws)
    listener.subscribe()
    listener.close()  # the SSH session that was following drops
    assert exit_code(proc, "the idle service") == 0  # it exits once idle; with the subscriber counted, never
