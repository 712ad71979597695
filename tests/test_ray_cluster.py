"""The Ray executor on Ray's own multi-node simulator: two nodes of one CPU each (and a head with
none), one cluster for the whole file. Real actors, real worker processes on the nodes, real
files copied back; tiny micro jobs. The node-loss test removes a node, so it runs last."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from backend.core.events import read_events
from backend.core.workspace import Workspace
from backend.jobs.client import connect
from backend.jobs.executor import process_alive
from backend.jobs.manager import JobManager, LiveWorker
from backend.jobs.ray_executor import namespace_of
from backend.jobs.settings import JobSettings
from backend.jobs.store import Store
from tests.conftest import REPO, WAIT, cli, wait_for, write_corpora

ray = pytest.importorskip("ray")
# One simulated cluster at a time on the machine: both Ray files run in one process (`-n auto`
# with `--dist loadgroup`, pyproject.toml).
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.xdist_group("ray")]

BASE = {"base": "micro", "preset": "tiny", "quant": None, "trust_remote_code": False, "device": "cpu"}
TRAIN = {"block_size": 64, "micro_batch": 8, "min_train_tokens": 0, "epochs": 1000, "max_steps": 30,
         "checkpoint_every": 10, "log_every": 5}
LONG = {**TRAIN, "max_steps": 100_000, "checkpoint_every": 10}  # only ever cancelled, killed or lost
# Both sides run their workers with one thread (Ray gives an actor of one CPU one thread), so the
# numbers of a Ray run and of a local run are the same numbers.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", *ONE_THREAD)}
    # the nodes' processes (and the workers their actors start) import this checkout, as a
    # node with the project installed would
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), saved["PYTHONPATH"]]))
    os.environ.update(ONE_THREAD)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def cluster_idle(cluster):
    """Each test ends with every node's CPU free: an actor a test left holding one would keep
    the next test's queued run waiting for ever, so this fails at once instead, saying which."""
    if not ray.is_initialized():
        ray.init(address=cluster.address, log_to_driver=False)
    yield
    try:
        wait_for(lambda: ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0),
                 what="every node's CPU free of this test's actors", timeout=30)
    except AssertionError:
        left = ray.util.list_named_actors(all_namespaces=True)
        raise AssertionError(f"actors left holding CPUs: {left}; {ray.available_resources()}") from None


def _manager(root: Path, cluster, executor: str = "ray") -> JobManager:
    ws = Workspace(root / "ws")
    ws.ensure()
    store = Store(ws.db_path)
    if executor == "local":
        return JobManager(ws, store, slots=[None])
    from backend.jobs.ray_executor import RayExecutor

    ex = RayExecutor(ws.root, cluster.address)
    return JobManager(ws, store, slots=ex.slots(), executor=ex)


def _settings(battery: Path, train: dict = TRAIN) -> JobSettings:
    return JobSettings(base=BASE, scenes=str(battery), train=train, probes=False)


def _rows(store: Store, seed: int | None = None) -> list[tuple]:
    """The results table (and each run's steps and final loss) without what differs between
    any two runs of the same jobs: ids, times, speeds."""
    keep = ("corpus", "kind", "seed", "base", "status", "tokens", "overall", "scores")
    rows = []
    for r in store.results():
        if seed is None or r["seed"] == seed:
            run = store.get_run(r["run_id"])
            rows.append((*(r[k] for k in keep), run["steps"], run["final_loss"]))
    return sorted(rows, key=str)


def _until(manager: JobManager, hook, condition, what: str):
    """Drive the scheduler until a condition of the workspace holds."""
    import time

    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        manager.tick(hook)
        found = condition()
        if found:
            return found
        time.sleep(0.25)
    raise AssertionError(f"timed out after {WAIT:.0f}s waiting for {what}")


def _steps(run_dir: Path, attempt: int) -> list[int]:
    events, _ = read_events(run_dir / "events.jsonl")
    return [e["step"] for e in events if e["type"] == "progress" and e.get("attempt", 0) == attempt]


def test_the_dashboards_queue_names_the_node_of_each_job():
    """A `jobs` row of a Ray service carries `node`; a local one does not, and reads as before."""
    import asyncio

    from textual.app import App

    from ltm_tui.widgets import QueueTable

    rows = [{"run_id": "logic-s0-1", "corpus": "logic.txt", "kind": "adapter", "base": "micro:tiny",
             "status": "training", "step": 5, "total": 30, "node": "gpu-box-2 (7da3b97d)"},
            {"run_id": "story-s0-2", "corpus": "story.txt", "kind": "adapter", "base": "micro:tiny",
             "status": "queued", "step": None, "total": None, "node": None}]

    class Queue(App):
        def compose(self):
            yield QueueTable()

    async def scenario():
        async with Queue().run_test(size=(140, 12)) as pilot:
            table = pilot.app.query_one(QueueTable)
            table.set_jobs(rows)
            await pilot.pause()
            return [table.get_cell(r["run_id"], "corpus").text for r in rows]

    assert asyncio.run(scenario()) == ["logic.txt @ gpu-box-2 (7da3b97d)", "story.txt"]


def test_a_cluster_that_does_not_answer_is_one_line_and_not_remembered(tmp_path):
    ws = tmp_path / "ws"
    for detach in ([], ["--detach"]):
        out = cli("serve", *detach, "--executor", "ray", "--address", "127.0.0.1:1", "--workspace", str(ws))
        assert out.returncode != 0 and "Traceback" not in out.stderr
        assert "no Ray cluster answers at 127.0.0.1:1" in out.stderr.strip().splitlines()[-1]
        assert not (ws / "executor.json").exists()  # the next service started on demand stays local


def test_jobs_spread_over_both_nodes_and_match_the_local_executor(cluster, tmp_path):
    corpora, battery = write_corpora(tmp_path)
    other = shutil.copytree(battery, tmp_path / "battery2")  # a second session, so a second worker
    manager = _manager(tmp_path / "ray", cluster)
    seen: list[dict] = []
    files = [corpora / "logic.txt", corpora / "story.txt"]
    runs = manager.submit(files, _settings(battery)).run_ids + manager.submit(files, _settings(other), seeds=[1]).run_ids
    _until(manager, seen.append, lambda: len(manager.live) == 2, "two workers")
    # both slots busy: a job queued now on the first session's base goes to its warm worker
    extra = tmp_path / "more.txt"
    extra.write_text(corpora.joinpath("logic.txt").read_text()[::-1], encoding="utf-8")
    (warm,) = manager.submit([extra], _settings(battery)).run_ids
    assert manager.run_queue(on_event=seen.append) is True

    # four runs, two workers at once: one on each node (each has one CPU, each worker asks one)
    assert len(runs) == 4
    assert len({manager.nodes[r] for r in runs}) == 2
    assert manager.nodes[warm] == manager.nodes[runs[0]]
    assert any(e.get("type") == "worker" and e.get("warm") and e["runs"] == [warm] for e in seen)
    store = manager.store
    assert [r["status"] for r in store.list_runs()] == ["done"] * len(store.list_runs())
    for run_id in runs:  # everything a local run leaves, in the workspace's own run folder
        run_dir = manager.workspace.run_dir(run_id)
        result = json.loads((run_dir / "result.json").read_text())
        assert result["corpus_path"] in {str(f) for f in files}  # the user's file, not a node's copy
        assert (run_dir / "model" / "model.safetensors").is_file()
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000010", "step-000020"]
        assert store.scene_results(run_id)

    # the events, as a subscriber gets them: each run's states in order, its steps rising
    for run_id in runs:
        states = [e["status"] for e in seen if e.get("type") == "state" and e["run_id"] == run_id]
        assert states == ["starting", "training", "evaluating", "done"], (run_id, states)
        steps = [e["step"] for e in seen if e.get("type") == "progress" and e["run_id"] == run_id
                 and not e.get("timed")]  # a slow step's extra event for the bar is not a point
        assert steps == [5, 10, 15, 20, 25, 30]

    # the first session's jobs through the local executor: the same rows as through Ray
    local = _manager(tmp_path / "local", cluster, executor="local")
    local.submit(files, _settings(battery))
    assert local.run_queue() is True
    assert len(store.results()) == 7  # five runs and a baseline per seed, one row each
    assert _rows(local.store) == [r for r in _rows(store, seed=0) if r[0] != "more.txt"]


def _long_run_training(tmp_path: Path, cluster) -> tuple[JobManager, str, LiveWorker, list[dict]]:
    """A manager on the cluster with one long run past its third step on a node: (the manager,
    the run, its worker, the events seen so far)."""
    corpora, battery = write_corpora(tmp_path)
    manager = _manager(tmp_path, cluster)
    run_id = manager.submit([corpora / "logic.txt"], _settings(battery, LONG)).run_ids[0]
    run_dir = manager.workspace.run_dir(run_id)
    seen: list[dict] = []
    _until(manager, seen.append, lambda: len(_steps(run_dir, 0)) >= 3, "training on a node")
    (worker,) = manager.live.values()
    return manager, run_id, worker, seen


def test_cancel_on_a_remote_node_checkpoints_and_ends_the_actor(cluster, tmp_path):
    manager, run_id, worker, seen = _long_run_training(tmp_path, cluster)
    run_dir = manager.workspace.run_dir(run_id)
    scratch = Path(ray.get(worker.process.actor.where.remote())["scratch"])

    manager.cancel(run_id, seen.append)
    manager.run_queue(on_event=seen.append)  # until the worker has let go and exited
    run = manager.store.get_run(run_id)
    assert run["status"] == "cancelled"
    events, _ = read_events(run_dir / "events.jsonl")
    assert any(e.get("phase") == "cancelled" for e in events)  # the remote worker let go of it
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    assert ckpts, "the checkpoint saved on the node came back"
    assert int(ckpts[-1].name.split("-")[1]) >= _steps(run_dir, 0)[-1] - 1
    with pytest.raises(ValueError):  # the detached actor is gone, with its scratch folder
        ray.get_actor(f"ltm-worker-{worker.pid}", namespace=manager.executor.namespace)
    assert not scratch.exists()


def test_a_worker_stuck_on_its_node_keeps_that_node_and_the_queue_goes_on(cluster, tmp_path, freezer, monkeypatch):
    """A worker the kernel holds on its node (a GPU driver fault leaves it in state D) outlives
    SIGKILL there. Its actor used to be killed all the same, which gave the node's share back to
    Ray for the next actor, onto the card the stuck process still holds. Now the run is settled
    with the reason as the node reads it and queued again, and the actor stays, holding its
    node's share, so the run starts again on the other node; `status` lists the worker, and a
    restarted service keeps it. When the kernel lets go, the actor ends and the share is free."""
    import time

    from backend.jobs import executor
    from backend.jobs.ray_executor import ACTOR_NAME

    monkeypatch.setattr(executor, "KILL_WAIT_SECONDS", 0.5)
    manager, run_id, worker, seen = _long_run_training(tmp_path, cluster)
    name = ACTOR_NAME.format(pid=worker.pid)
    namespace = manager.executor.namespace
    stuck_on = worker.process.node
    scratch = Path(ray.get(worker.process.actor.where.remote())["scratch"])
    freezer.freeze(worker.process.node_pid)
    try:
        # the stall watchdog asked it to stop long ago (a card that faulted stops the steps), and
        # its grace is over
        worker.stalled = "no sign of life from its worker for 30 min"
        worker.stop_requested = time.monotonic() - 3600
        manager.tick(seen.append)

        first = manager.store.attempts(run_id)[0]
        assert first["status"] == "interrupted"
        assert "did not exit after SIGKILL" in first["error"] and "state D" in first["error"]
        assert f"(on {os.uname().nodename})" in first["error"]  # read on its node
        assert manager.store.get_run(run_id)["attempt"] == 1  # a hung run is queued again once
        assert [e for e in seen if e.get("type") == "worker" and e.get("stuck")]
        assert f"worker {worker.pid} (a share Ray placed)" in manager.stuck_lines()[0]
        ray.get_actor(name, namespace=namespace)  # still there, holding its share
        # what is left on its node belongs to the settled attempt: nothing more comes back
        (scratch / "runs" / run_id / "late.json").write_text("{}")
        again = _until(manager, seen.append, lambda: [w for w in manager.live.values() if w.process.node],
                       "the run started again")[0]
        assert again.process.node != stuck_on  # not beside the stuck process
        assert manager.free_slots() == []  # one slot a share: the stuck actor's is held
        assert not (manager.workspace.run_dir(run_id) / "late.json").exists()
        # a restarted service keeps it (stuck.json), and does not end its actor with the idle ones
        restarted = JobManager(manager.workspace, manager.store, slots=manager.slots, executor=manager.executor)
        assert f"worker {worker.pid}" in restarted.stuck_lines()[0] and "state D" in restarted.stuck_lines()[0]
        restarted.reattach(seen.append)
        ray.get_actor(name, namespace=namespace)

        manager.cancel(run_id, seen.append)
        freezer.thaw()  # the kernel lets go: the SIGKILL takes effect
        _until(manager, seen.append, lambda: not manager.stuck and not manager.live, "the stuck worker gone")
        assert any(e.get("freed") for e in seen)
        with pytest.raises(ValueError):  # its actor ended, and with it the node's share
            ray.get_actor(name, namespace=namespace)
    finally:  # a failure leaves no actor holding a node's CPU for the next tests
        freezer.thaw()
        for left in [*manager.live.values(), *manager.stuck.values()]:
            ray.kill(left.process.actor, no_restart=True)


def _panel_lines(nodes: list[dict], jobs: list[dict]) -> list[str]:
    """The device panel as it shows a `devices` reply, line by line."""
    import asyncio
    import io

    from rich.console import Console
    from textual.app import App

    from ltm_tui.widgets import DevicePanel, job_holders

    class Panel(App):
        def compose(self):
            yield DevicePanel()

    async def scenario():
        async with Panel().run_test(size=(140, 8)) as pilot:
            panel = pilot.app.query_one(DevicePanel)
            panel.show_nodes(nodes, job_holders(jobs))
            await pilot.pause()
            console = Console(width=140, record=True, file=io.StringIO())
            console.print(panel.content)
            return [line.rstrip() for line in console.export_text().splitlines() if line.strip()]

    return asyncio.run(scenario())


def _node_readings_come_through_the_socket_and_show_one_line_a_node(ws: Workspace, job: dict) -> None:
    """The service reads every node (no GPU here: CPU and RAM, read on the node) and names the
    worker process of the node that runs `job`; the panel gives each node one line."""
    import psutil

    with connect(ws) as client:
        labels = {n["node"] for n in client.call("ping")["nodes"]}

        def all_nodes():
            nodes = client.call("devices")
            return nodes if {n["node"] for n in nodes} == labels else None

        nodes = wait_for(all_nodes, what="a device reading from every node")
    assert len(nodes) == len(labels) == 3  # the head (no CPU for jobs) and the two nodes
    for node in nodes:
        [host] = node["devices"]
        assert node["source"] == "psutil" and host["kind"] == "host"
        assert host["memory_total"] == psutil.virtual_memory().total  # simulated nodes: this machine
    workers = {n["node"]: n["workers"] for n in nodes}
    [(node_pid, ours)] = workers.pop(job["node"]).items()
    assert ours == job["pid"]
    assert "backend.compute.worker" in psutil.Process(int(node_pid)).cmdline()  # the node's real worker
    assert not any(workers.values())
    lines = _panel_lines(nodes, [job])
    assert len(lines) == 3
    for node, line in zip(nodes, lines):
        assert line.startswith(node["node"][:20]) and "RAM" in line and "no GPU" in line, line


def test_an_actor_asks_for_a_share_of_one_card_at_most(tmp_path):
    """A micro model asks for a quarter of a card, a small base for the quarters its weights
    need, and a 13B base in bf16 (26 GB of safetensors, more than a 24 GiB card's worth) for one
    whole card: its worker trains on one device, and three cards would never be free on a node
    of one or two."""
    from backend.jobs.ray_executor import base_memory_bytes, gpu_share

    card = 24 * 2**30
    assert gpu_share(base_memory_bytes({"base": "micro"}), card, 1) == 0.25
    small = tmp_path / "small"
    small.mkdir()
    with open(small / "model.safetensors", "wb") as fh:
        fh.truncate(3 * 2**30)  # a sparse file: its size is what is read
    assert gpu_share(base_memory_bytes({"base": str(small)}), card, 1) == 0.5  # 2 × 3 + 2 GiB of 24
    assert gpu_share(base_memory_bytes({"base": str(small), "quant": "4bit"}), card, 1) == 0.25
    big = tmp_path / "llama-2-13b"
    big.mkdir()
    for i in range(3):
        with open(big / f"model-0000{i + 1}-of-00003.safetensors", "wb") as fh:
            fh.truncate(26 * 10**9 // 3)
    assert gpu_share(base_memory_bytes({"base": str(big)}), card, 1) == 1.0  # asked for 3 cards before
    assert gpu_share(None, card, 2) == 0.5  # weights not on this host: a slot's share


def test_a_node_with_gpus_shows_each_card_and_the_run_on_it(fake_nvml, monkeypatch):
    """The reading a node sends where NVML answers (the mocked pynvml: two cards, a worker of
    pid 4242 on the first), through JSON, as the panel shows it. Not through Ray: the mock
    cannot be put into a node's own process cleanly; the CPU/RAM path above runs on the nodes."""
    from backend.jobs import ray_executor

    monkeypatch.setattr(ray_executor, "_node_monitor", None)
    reading = json.loads(json.dumps(ray_executor.read_node_devices()))
    assert reading["source"] == "nvml" and len(reading["devices"]) == 2
    node = {"node": "gpu-box-2 (7da3b97d)", **reading, "workers": {"4242": 777}}
    job = {"run_id": "logic-s0-1", "pid": 777, "status": "training", "corpus": "logic.txt"}
    [line] = _panel_lines([node], [job])
    assert "GPU0 40.0/96.0 GiB 87% logic.txt · GPU1 10.0/141.0 GiB 3%" in line, line
    assert line.startswith("gpu-box-2 (7da3b97d)")


def _serve(ws: Path, address: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ltm_tui.cli", "serve", "--executor", "ray", "--address", address,
         "--workspace", str(ws)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_a_killed_service_is_followed_by_one_that_reattaches_and_ingests_once(cluster, tmp_path):
    corpora, battery = write_corpora(tmp_path)
    ws = Workspace(tmp_path / "ws")
    service = _serve(ws.root, cluster.address)
    wait_for(lambda: ws.socket_path.exists(), what="the Ray service's socket")
    train = {**TRAIN, "max_steps": 360, "checkpoint_every": 120}  # long enough to outlive a restart
    with connect(ws) as client:
        assert client.call("ping")["executor"] == "ray"
        run_id = client.call("submit", paths=[str(corpora / "logic.txt")],
                             settings=asdict(_settings(battery, train)))["run_ids"][0]

    def training():
        with connect(ws) as client:
            job = {j["run_id"]: j for j in client.call("jobs")}[run_id]
        return job if job["status"] == "training" and (job["step"] or 0) >= 10 else None

    before = wait_for(training, what="the run training on a node")
    assert before["node"] and before["pid"]  # `status --format json` says where it runs
    _node_readings_come_through_the_socket_and_show_one_line_a_node(ws, before)
    shown = cli("status", "--workspace", str(ws.root))
    assert f"executor: ray at {cluster.address}; nodes: " in shown.stdout and before["node"] in shown.stdout
    os.kill(service.pid, signal.SIGKILL)  # no goodbye: the actor and its worker go on
    service.wait()

    # the next client starts a service on demand; the workspace remembers its executor
    def done():
        with connect(ws) as client:
            job = {j["run_id"]: j for j in client.call("jobs")}[run_id]
        return job if job["status"] in ("done", "failed", "interrupted") else None

    after = wait_for(done, what="the run to end under the second service")
    assert after["status"] == "done", after["error"]
    with connect(ws) as client:
        rows = [r for r in client.call("results") if r["run_id"] == run_id]
        detail = client.call("run", run_id=run_id)
    assert len(rows) == 1 and detail["run"]["steps"] == 360
    assert detail["run"]["attempt"] == 0  # adopted, never interrupted nor retried
    assert [p["step"] for p in detail["curve"]] == sorted({p["step"] for p in detail["curve"]})
    events, _ = read_events(ws.run_dir(run_id) / "events.jsonl")
    assert sum(e["type"] == "result" for e in events) == 1  # each line copied back once
    assert len(events) == len({json.dumps(e, sort_keys=True) for e in events})
    # The second service dies too, while the worker lingers for more jobs with its run ended: no
    # run names that actor any more, so the next service ends it as it starts (else it would hold
    # its node's CPU for ever), and the next test has both nodes.
    namespace = namespace_of(ws.root)

    def ours():
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace]

    with connect(ws) as client:
        second = client.call("ping")["pid"]
    os.kill(second, signal.SIGKILL)
    wait_for(lambda: not process_alive(second, None), what="the second service to die")
    with connect(ws) as client:
        assert client.call("ping")["pid"] != second
    wait_for(lambda: not ours(), what="the third service to end the actor no run needs")
    assert "a worker no run needs any more" in ws.log_path.read_text()


def test_a_lost_node_interrupts_and_the_run_resumes_on_the_other(cluster, tmp_path):
    corpora, battery = write_corpora(tmp_path)
    manager = _manager(tmp_path, cluster)
    train = {**TRAIN, "max_steps": 60, "checkpoint_every": 20}
    run_id = manager.submit([corpora / "logic.txt"], _settings(battery, train)).run_ids[0]
    run_dir = manager.workspace.run_dir(run_id)
    seen: list[dict] = []

    def copied():
        steps = sorted(run_dir.glob("checkpoints/step-*"))
        return steps if steps and manager.store.get_run(run_id)["status"] == "training" else None

    steps = _until(manager, seen.append, copied, "a checkpoint copied back from the node")
    newest = int(steps[-1].name.split("-")[1])  # at least this one is in the workspace
    (worker,) = manager.live.values()
    where = ray.get(worker.process.actor.where.remote())
    node_id = where["node_id"]
    (node,) = [n for n in cluster.list_all_nodes() if n.node_id == node_id]
    cluster.remove_node(node)

    assert manager.run_queue(on_event=seen.append) is True
    run = manager.store.get_run(run_id)
    assert run["status"] == "done" and run["attempt"] == 1
    first = manager.store.attempts(run_id)[0]
    assert first["attempt"] == 0 and first["status"] == "interrupted"
    assert node_id[:8] in first["error"] and "lost" in first["error"]
    states = [e["status"] for e in seen if e.get("type") == "state" and e["run_id"] == run_id]
    lost = states.index("interrupted")
    assert states[lost:] == ["interrupted", "queued", "starting", "training", "evaluating", "done"]
    # the second attempt began where the newest copied checkpoint left off (one the node wrote
    # while it was being removed may have come back too), and ended once
    events, _ = read_events(run_dir / "events.jsonl")
    (resumed,) = [e["step"] for e in events if e.get("attempt") == 1 and "resumed from" in e.get("message", "")]
    assert newest <= resumed < 60 and resumed % train["checkpoint_every"] == 0
    second = _steps(run_dir, 1)
    assert resumed < second[0] <= resumed + TRAIN["log_every"] and second[-1] == 60
    assert len([r for r in manager.store.results() if r["run_id"] == run_id]) == 1
    assert manager.nodes[run_id] != worker.process.node
    assert not process_alive(where["worker_pid"], None)  # the lost node's worker ended with its actor
