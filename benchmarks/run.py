"""ltm-tui benchmarks: each key is a ratio or a time against a peer measured in the same run.

    python benchmarks/run.py --quick --json

`--quick` sizes every case for a two-core CPU (a few minutes); `--json` prints one JSON object
as the last line. Keys so far:

- `warm_worker_speedup`: 20 one-page corpora on `micro` through one warm worker (the base and
  the batteries loaded once) ÷ the same 20 jobs as 20 cold worker processes. Same model, data,
  settings and battery on both sides. Goal ≥ 5.
- `status_ms_500`: median time of a `jobs` request over the service's socket with 500 jobs in
  the queue (goal < 200 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backend.jobs import JobManager  # noqa: E402
from backend.store import Store  # noqa: E402
from backend.workspace import Workspace  # noqa: E402

PAGE_WORDS = 500


def _one_page_corpora(folder: Path, n: int) -> list[Path]:
    """n different one-page texts cut from the demo story and book of laws (500 words each)."""
    words = []
    for name in ("story.md", "logic.md"):
        words += (REPO / "data" / "demo" / name).read_text(encoding="utf-8").split()
    paths = []
    for i in range(n):
        start = (i * 137) % max(1, len(words) - PAGE_WORDS)
        path = folder / f"page-{i:02d}.txt"
        path.write_text(" ".join(words[start : start + PAGE_WORDS]), encoding="utf-8")
        paths.append(path)
    return paths


def _jobs(run_root: Path, corpora: list[Path], train: dict) -> list[dict]:
    return [
        {"run_id": f"bench-{i:02d}", "kind": "adapter", "corpus_path": str(p),
         "run_dir": str(run_root / f"bench-{i:02d}"), "seed": 0, "train": train, "lora": {}}
        for i, p in enumerate(corpora)
    ]


def _run_sessions(manager: JobManager, base: dict, scenes: str, batches: list[list[dict]]) -> float:
    t0 = time.perf_counter()
    for jobs in batches:
        session = manager.workspace.sessions_dir / f"bench-{time.time_ns()}.json"
        session.write_text(json.dumps({"base": base, "scenes": scenes, "jobs": jobs}))
        code = manager.start_worker(session).wait()
        if code != 0:
            raise SystemExit(f"benchmark worker failed ({code}); see {session.with_suffix('.log')}")
    return time.perf_counter() - t0


def bench_warm_worker(quick: bool) -> dict:
    n = 20
    train = {"block_size": 128, "micro_batch": 8, "min_train_tokens": 0, "epochs": 1,
             "max_steps": 10 if quick else 40, "checkpoint_every": 0, "log_every": 5}
    base = {"base": "micro", "preset": "tiny", "quant": None, "trust_remote_code": False, "device": "cpu"}
    scenes = str(REPO / "scenes" / "depth.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpora = _one_page_corpora(tmp, n)
        ws = Workspace(tmp / "ws").ensure()
        with Store(":memory:") as store:
            manager = JobManager(ws, store, slots=[None])
            warm = _run_sessions(manager, base, scenes, [_jobs(ws.runs_dir / "warm", corpora, train)])
            cold_jobs = _jobs(ws.runs_dir / "cold", corpora, train)
            cold = _run_sessions(manager, base, scenes, [[j] for j in cold_jobs])
    return {
        "warm_worker_speedup": round(cold / warm, 2),
        "warm_worker": {"jobs": n, "warm_seconds": round(warm, 2), "cold_seconds": round(cold, 2),
                        "model": "micro:tiny", "battery": "scenes/depth.yaml", "train": train},
    }


def bench_status(quick: bool) -> dict:
    from backend.client import connect

    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws").ensure()
        with Store(ws.db_path) as store:
            for i in range(500):
                store.create_run(f"r{i:03d}", kind="adapter", base="micro:tiny",
                                 settings={"base": {"base": "micro"}, "scenes": "/nowhere", "train": {}, "lora": {}},
                                 corpus_path=f"/nowhere/c{i}.txt", run_dir=str(ws.run_dir(f"r{i:03d}")))
        times = []
        with connect(ws) as client:
            for _ in range(10 if quick else 50):
                t0 = time.perf_counter()
                rows = client.call("jobs")
                times.append((time.perf_counter() - t0) * 1000)
            assert len(rows) == 500
            client.call("stop", workers=True)
        deadline = time.monotonic() + 30
        while ws.socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    return {"status_ms_500": round(statistics.median(times), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized cases (a few minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
    }
    for case in (bench_warm_worker, bench_status):
        t0 = time.perf_counter()
        out = case(args.quick)
        results.update(out)
        headline = {k: v for k, v in out.items() if not isinstance(v, dict)}
        print(f"{case.__name__}: {headline} ({time.perf_counter() - t0:.0f}s)", flush=True)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
