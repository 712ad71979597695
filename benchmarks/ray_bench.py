"""What the Ray executor costs: the same twenty tiny jobs through Ray and through local workers.

    python benchmarks/ray_bench.py [--quick]

`ray_overhead` = wall seconds of twenty micro:tiny jobs through `RayExecutor` on a local two-node
cluster (`ray.cluster_utils.Cluster`, one CPU a node, a head with none) ÷ wall seconds of the
same jobs through `LocalExecutor` with two slots, in this run, the median of three alternated
tries of each; goal ≤ 1.3. Both sides get the
same parallelism and settings: two sessions of ten jobs (two copies of one battery, so two warm
workers at once), one thread per worker (Ray gives an actor of one CPU one thread; the local
workers are told the same), the job manager driven in-process. The cluster's start is not
counted (it happens once a night, not once a job) and is reported beside the ratio.

With nothing else on the two-core box (7 Dec 2026, `--quick`) five runs read 1.13, 1.19, 1.21,
1.20 and 1.23, median 1.20: about 1.5–2 s more a session, nearly all of it Ray starting the
actor's Python process on its node (the simulated nodes, their raylets and the workers share the
same two cores). A job of minutes amortises it; tiny jobs do not (docs/benchmarks.md, "Ray
executor").
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

JOBS = 20
REPEATS = 3
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _corpora(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    text = (REPO / "data" / "demo").glob("*")
    words = " ".join(p.read_text(encoding="utf-8", errors="ignore") for p in sorted(text) if p.suffix in (".md", ".txt"))
    out = []
    for i in range(n):
        path = folder / f"page-{i:02d}.txt"
        path.write_text(words[i * 1500:(i + 1) * 1500] or words[:1500], encoding="utf-8")  # a page each
        out.append(path)
    return out


def _queue(root: Path, executor, slots, corpora: list[Path], train: dict) -> float:
    """Queue the jobs as two sessions and run them to the end; wall seconds."""
    from backend.core.workspace import Workspace
    from backend.jobs.manager import JobManager
    from backend.jobs.settings import JobSettings
    from backend.jobs.store import Store

    base = {"base": "micro", "preset": "tiny", "quant": None, "trust_remote_code": False, "device": "cpu"}
    batteries = []
    for name in ("a", "b"):
        folder = root / f"battery-{name}"
        folder.mkdir(parents=True)
        shutil.copy(REPO / "scenes" / "depth.yaml", folder / "depth.yaml")
        batteries.append(folder)
    ws = Workspace(root / "ws").ensure()
    with Store(ws.db_path) as store:
        manager = JobManager(ws, store, slots=slots, executor=executor)
        half = len(corpora) // 2
        for battery, files in zip(batteries, (corpora[:half], corpora[half:])):
            manager.submit(files, JobSettings(base=base, scenes=str(battery), train=train, probes=False))
        t0 = time.perf_counter()
        ok = manager.run_queue()
        seconds = time.perf_counter() - t0
        if not ok:
            raise SystemExit(f"a benchmark job did not end done; see {ws.runs_dir}")
    return seconds


def run(quick: bool) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from backend.jobs.ray_executor import RayExecutor

    train = {"block_size": 128, "micro_batch": 8, "min_train_tokens": 0, "epochs": 1,
             "max_steps": 10 if quick else 40, "checkpoint_every": 5 if quick else 20, "log_every": 5}
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", *ONE_THREAD)}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), saved["PYTHONPATH"]]))
    os.environ.update(ONE_THREAD)
    cluster = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            corpora = _corpora(tmp / "corpora", JOBS)
            t0 = time.perf_counter()
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
            for _ in range(2):
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            start = time.perf_counter() - t0
            # alternated: a machine whose load drifts during the run charges neither side alone
            local_times, ray_times = [], []
            for i in range(REPEATS):
                local_times.append(_queue(tmp / f"local-{i}", None, [None, None], corpora, train))
                executor = RayExecutor(tmp / f"ray-{i}" / "ws", cluster.address)
                ray_times.append(_queue(tmp / f"ray-{i}", executor, executor.slots(), corpora, train))
            local, on_ray = statistics.median(local_times), statistics.median(ray_times)
    finally:
        if cluster is not None:
            ray.shutdown()
            cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {
        "ray_overhead": round(on_ray / local, 2),
        "ray": {"jobs": JOBS, "ray_seconds": [round(t, 2) for t in ray_times],
                "local_seconds": [round(t, 2) for t in local_times],
                "cluster_start_seconds": round(start, 2), "nodes": "2 x 1 CPU (simulated, one machine)",
                "model": "micro:tiny", "train": train, "goal": "<= 1.3"},
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv)))
