"""Tasks (calibrations, judges) under the Ray executor: on the service's own host, in an actor
that holds the share of a card the task needs, so a task never lands on a card a training actor
holds. A simulated one-host cluster whose head declares two cards (Ray hands cards out by id:
placing actors needs no GPU), numbered 90 and 91, which no machine has, so that the tasks run on
the CPU on a GPU box too; tiny micro calibrations."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from backend.core.workspace import Workspace
from backend.jobs.manager import JobManager
from backend.jobs.store import Store
from tests.conftest import REPO, WAIT, wait_for

ray = pytest.importorskip("ray")
# One simulated cluster at a time on the machine: both Ray files run in one process (`-n auto`
# with `--dist loadgroup`, pyproject.toml).
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.xdist_group("ray")]

CARDS = ["90", "91"]  # CUDA shows no card for them: the tests' work stays on the CPU
CALIBRATE = {"base": {"base": "micro", "preset": "tiny"}, "steps": 2,
             "train": {"block_size": 64, "micro_batch": 4, "min_train_tokens": 0}}


@pytest.fixture(scope="module")
def two_card_host():
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        with pytest.MonkeyPatch.context() as cards:
            cards.setenv("CUDA_VISIBLE_DEVICES", ",".join(CARDS))  # the cards Ray may hand out
            cluster = Cluster(initialize_head=True,
                              head_node_args={"num_cpus": 2, "num_gpus": len(CARDS), "include_dashboard": False})
            cluster.wait_for_nodes()
        yield cluster
        ray.shutdown()
        cluster.shutdown()


def _drive(manager: JobManager, condition, what: str):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        manager.tick(lambda event: None)
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out after {WAIT:.0f}s waiting for {what}")


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_a_task_takes_a_card_no_training_actor_holds_and_waits_while_none_is_free(two_card_host, tmp_path,
                                                                                   tiny_battery):
    """A card is held by another actor (a training session, say): the calibration's actor gets
    the other card, its process sees that card alone, and the calibration is stored in the
    workspace as without a cluster; its card is Ray's again when it ends. With both cards held
    the next task waits in Ray's queue, starting nothing, and a cancel ends it there."""
    from backend.jobs.ray_executor import RayExecutor
    from backend.jobs.tasks import CANCELLED, DONE

    ws = Workspace(tmp_path / "ws")
    ws.ensure()
    store = Store(ws.db_path)
    executor = RayExecutor(ws.root, two_card_host.address)
    manager = JobManager(ws, store, slots=executor.slots(), executor=executor)

    @ray.remote(num_gpus=1, num_cpus=0)
    class Holder:
        def cards(self):
            return [str(g) for g in ray.get_gpu_ids()]

    first = Holder.remote()
    held = ray.get(first.cards.remote())
    try:
        spec = {**CALIBRATE, "scenes": str(tiny_battery)}
        task = manager.submit_task("calibrate", spec, "calibrate micro:tiny")
        handle = _drive(manager, lambda: task.process is not None and task.process.process is not None
                        and task.process, "the calibration's process")
        free = [c for c in CARDS if c not in held]
        assert handle.gpus == free
        env = _environ(handle.pid)
        assert env["CUDA_VISIBLE_DEVICES"] == free[0] and env["LTM_WORKER_SLOT"] == "ray"
        _drive(manager, lambda: task.status != "running", "the calibration to end")
        assert task.status == DONE, task.error
        assert task.result["calibration"]["steps"] >= 1
        assert list((ws.root / "forecast").glob("calib-*.json"))  # the workspace's own cache
        wait_for(lambda: ray.available_resources().get("GPU", 0) == 1, what="the task's card given back", timeout=30)

        second = Holder.remote()
        ray.get(second.cards.remote())  # now both cards are held
        waiting = manager.submit_task("calibrate", spec, "calibrate micro:tiny")
        _drive(manager, lambda: waiting.status == "running", "the task to take a slot")
        for _ in range(10):
            manager.tick(lambda event: None)
            time.sleep(0.1)
        assert waiting.status == "running" and waiting.process.process is None  # Ray holds its actor back
        assert manager.tasks.held_back()  # so warm workers end with their sessions, and a card frees
        manager.tasks.cancel(waiting.task_id, lambda event: None)
        _drive(manager, lambda: waiting.status != "running", "the cancelled task to end")
        assert waiting.status == CANCELLED
        ray.kill(second)
        wait_for(lambda: ray.available_resources().get("GPU", 0) == 1, what="no card left to the cancelled task",
                 timeout=30)
    finally:
        ray.kill(first)
        store.close()
