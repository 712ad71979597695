"""ltm-tui benchmarks: each key is a ratio or a time against a peer measured in the same run.

    python benchmarks/run.py --quick --json

`--quick` sizes every case for a two-core CPU (a few minutes); `--json` prints one JSON object
as the last line. Keys so far:

- `warm_worker_speedup`: 20 one-page corpora on `micro` through one warm worker (the base and
  the batteries loaded once) ÷ the same 20 jobs as 20 cold worker processes. Same model, data,
  settings and battery on both sides. Goal ≥ 5.
- `status_ms_500`: median time of a `jobs` request over the service's socket with 500 jobs in
  the queue (goal < 200 ms).
- `status_during_submit`: the same request, asked over and over while another client submits a
  folder of 2,000 one-page files (the service inspects each file and stores 2,001 runs): the
  median and the slowest answer, against `idle_ms`, the median on the same service before the
  submission (goal: the slowest under 1,000 ms).
- `service_flood`: 2,000 clients connect at once to a service holding 500 finished runs and each
  asks for `results` (0.3 MB a reply): the answers received and the service's resident memory
  idle, at its peak (VmHWM) and after (goal: every answer, peak under 500 MB).
- `train_ratio_vs_hf_trainer`: our training loop's tokens/s ÷ transformers.Trainer + PEFT on the
  same random Llama (built from a config), the same LoRA, packed blocks in the same order, the
  same optimizer, schedule and precision (fp32 on the CPU); `train_vs_hf_trainer.same_loss`
  checks both reach the same loss (goal ≥ 1.2 on the CPU).
- `eval_batched_speedup`: batched, length-sorted scoring of every built-in choice scene ÷ one
  scene at a time, with identical numbers (goal ≥ 3); `eval_batched.speedup_vs_lm_eval` the
  same against lm-evaluation-harness's HF backend, when lm_eval is installed.
- `eval_run_seconds`: one run's whole evaluation (every built-in battery, the general text,
  the scores and their intervals) for the untrained micro `small` network, whose completions
  never stop early: the slowest case (goal: well under 2 minutes on two CPU cores).
- whatever `benchmarks/ui.py`'s `run(quick)` returns, when that file exists (the dashboard's keys).
- `probe_cost_ratio` (`benchmarks/probes_bench.py`): probe seconds ÷ evaluation seconds, the
  worse of a trained micro run and a tiny HF model with LoRA (goal ≤ 0.10).
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

from backend.core.workspace import Workspace  # noqa: E402
from backend.jobs.manager import JobManager  # noqa: E402
from backend.jobs.store import Store  # noqa: E402

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
    from backend.jobs.client import connect

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


def bench_status_submit(quick: bool) -> dict:
    import threading

    from backend.jobs.client import connect

    n = 500 if quick else 2000
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws").ensure()
        folder = Path(tmp) / "books"
        folder.mkdir()
        _one_page_corpora(folder, n)
        settings = {"base": {"base": "micro", "preset": "tiny", "quant": None, "trust_remote_code": False,
                             "device": "cpu"},
                    "scenes": str(REPO / "scenes" / "depth.yaml"), "train": {"max_steps": 1}, "probes": False}
        with connect(ws) as client:
            idle = []
            for _ in range(10):
                t0 = time.perf_counter()
                client.call("jobs")
                idle.append((time.perf_counter() - t0) * 1000)
            submitted: dict = {}

            def submit() -> None:
                with connect(ws) as other:
                    t0 = time.perf_counter()
                    submitted["runs"] = len(other.call("submit", paths=[str(folder)], settings=settings)["run_ids"])
                    submitted["seconds"] = time.perf_counter() - t0

            thread = threading.Thread(target=submit)
            thread.start()
            busy = []
            while thread.is_alive():
                t0 = time.perf_counter()
                client.call("jobs")
                busy.append((time.perf_counter() - t0) * 1000)
                time.sleep(0.05)  # a dashboard or a `watch ltm-tui status`, not a flood
            thread.join()
            assert submitted["runs"] == n, submitted
            client.call("stop", workers=True)
        deadline = time.monotonic() + 60
        while ws.socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    return {"status_during_submit": {
        "files": n, "submit_seconds": round(submitted["seconds"], 1), "asked": len(busy),
        "median_ms": round(statistics.median(busy), 1), "max_ms": round(max(busy), 1),
        "idle_ms": round(statistics.median(idle), 1)}}


def _vm(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_flood(quick: bool) -> dict:
    import socket
    import threading

    from backend.jobs.client import connect

    clients = 500 if quick else 2000
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws").ensure()
        with Store(ws.db_path) as store:
            scores = {m: {"value": 0.5, "n": 40, "lo": 0.4, "hi": 0.6}
                      for m in ("reasoning_depth", "consistency", "pressure", "novelty", "compression")}
            for i in range(500):
                run_id = f"r{i:03d}"
                store.create_run(run_id, kind="adapter", base="micro:tiny", settings={},
                                 corpus_path=f"/books/book-{i:03d}.txt", run_dir=str(ws.run_dir(run_id)))
                for state in ("starting", "training", "evaluating"):
                    store.transition(run_id, state)
                store.ingest_result(run_id, {"scores": scores, "scene_results": [], "overall": 0.5})
                store.transition(run_id, "done")
        with connect(ws) as client:
            pid = client.call("ping")["pid"]
            client.call("results")  # warm: the first answer's caches are not the flood's
        idle = _vm(pid, "VmRSS")
        start = threading.Barrier(clients)
        sizes: list[int] = []

        def ask() -> None:  # one `ltm-tui results`: connect, ask, read its own reply
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                start.wait()
                sock.connect(str(ws.socket_path))  # blocking, as backend.jobs.client does: waits in the backlog
                sock.settimeout(600)
                sock.sendall(b'{"id": 1, "op": "results", "args": {}}\n')
                with sock.makefile("rb") as reader:
                    line = reader.readline()
                if line and json.loads(line)["ok"]:
                    sizes.append(len(line))

        threads = [threading.Thread(target=ask) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        answered, size = len(sizes), max(sizes, default=0)
        peak, after = _vm(pid, "VmHWM"), _vm(pid, "VmRSS")
        with connect(ws) as client:
            client.call("stop", workers=True)
    return {"service_flood": {"clients": clients, "answered": answered, "reply_mb": round(size / 2**20, 2),
                              "idle_rss_mb": round(idle), "peak_rss_mb": round(peak), "after_rss_mb": round(after)}}


# Shapes for the CPU: Llama-proportioned (SwiGLU ffn ≈ 2.7 × hidden, grouped KV heads), small
# enough that both sides of a comparison run in seconds on two cores.
TRAIN_SHAPE = {"hidden": 256, "layers": 4, "heads": 8, "kv": 4, "ffn": 688, "vocab": 4096, "context": 512}
EVAL_SHAPE = {"hidden": 128, "layers": 2, "heads": 4, "kv": 2, "ffn": 344, "context": 512}


def bench_train_vs_hf(quick: bool) -> dict:
    from benchmarks.peers import train_ratio

    out = train_ratio(TRAIN_SHAPE, steps=12 if quick else 40, block=256, micro_batch=4, grad_accum=2,
                      repeats=2 if quick else 3)
    return {"train_ratio_vs_hf_trainer": out["ratio"], "train_vs_hf_trainer": out}


def bench_eval(quick: bool) -> dict:
    from benchmarks.peers import eval_speedup

    out = eval_speedup(EVAL_SHAPE, repeats=5)  # seconds a call: five repeats cost little
    return {"eval_batched_speedup": out["speedup"], "eval_batched": out}


def bench_eval_run(quick: bool) -> dict:
    from benchmarks.peers import eval_run_time

    out = eval_run_time("small", repeats=1 if quick else 3)
    return {"eval_run_seconds": out["seconds"], "eval_run": out}


def _merged(file: str, quick: bool) -> dict:
    """The keys of a sibling benchmark file's `run(quick)`, when that file exists."""
    path = Path(__file__).with_name(file)
    if not path.exists():
        return {}
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmarks_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.run(quick))


def bench_ui(quick: bool) -> dict:
    """The dashboard's own benchmarks (`benchmarks/ui.py`), run in a process of their own as the
    dashboard is: one that never imports torch and holds none of the other cases' objects (in this
    process a 10,000-row update paid for collecting their garbage: 123 ms against 91 ms)."""
    import subprocess

    path = Path(__file__).with_name("ui.py")
    if not path.exists():
        return {}
    args = [sys.executable, str(path)] + (["--quick"] if quick else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"benchmarks/ui.py failed: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_probes(quick: bool) -> dict:
    """`probe_cost_ratio` from `benchmarks/probes_bench.py`, when it exists."""
    return _merged("probes_bench.py", quick)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized cases (a few minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--only", metavar="NAMES", help="comma-separated cases, e.g. train_vs_hf,eval")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
    }
    cases = (bench_warm_worker, bench_status, bench_status_submit, bench_flood, bench_train_vs_hf, bench_eval, bench_eval_run, bench_ui, bench_probes)
    names = [case.__name__.removeprefix("bench_") for case in cases]
    only = {name.strip() for name in args.only.split(",")} if args.only else None
    if only and only - set(names):
        parser.error(f"unknown case {', '.join(sorted(only - set(names)))}; choose from {', '.join(names)}")
    for case in cases:
        if only and case.__name__.removeprefix("bench_") not in only:
            continue
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
