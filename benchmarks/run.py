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
  same random Llama (built from a config), the same LoRA (`LoraSettings()`'s dropout), packed
  blocks in the same order, the same optimizer, schedule, precision (fp32 on the CPU) and
  allocator setting; the median of 3 pairs (5 without `--quick`), each pair's ratio in
  `train_vs_hf_trainer.ratios`; `same_loss` and `same_schedule` check both sides (goal ≥ 1.0).
- `hf_load_ratio`: seconds from a saved bf16 safetensors folder (Llama-3.2-1B's shape; 4 of its
  16 layers with `--quick`) to the first optimizer step, plain `from_pretrained` + `.to()` +
  `get_peft_model` + AdamW ÷ our worker, each side a fresh process that finds the folder's files
  out of the page cache (as a base's first load of the day), median of 2 pairs (3) (goal ≥ 1.3);
  `hf_load_ratio_warm_cache` the same with the files read just before each side.
- `warm_worker_speedup_hf`: ten one-page corpora on a saved HF base (31M parameters with
  `--quick`, the 1B without) through one warm worker ÷ ten cold workers, two training steps and a
  two-scene battery a job, probes off (goal ≥ 3).
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
                      repeats=3 if quick else 5)
    return {"train_ratio_vs_hf_trainer": out["ratio"], "train_vs_hf_trainer": out}


# The saved Hugging Face bases of this run, by shape: written once (a 1B in bf16 is 2.5 GB and
# takes most of a minute to write here), removed at exit.
_HF_BASES: dict[str, Path] = {}


def _hf_base(shape: dict[str, int]) -> Path:
    import atexit
    import shutil

    from benchmarks.hf_load import save_llama_folder

    key = json.dumps(shape, sort_keys=True)
    if key not in _HF_BASES:
        folder = Path(tempfile.mkdtemp(prefix="ltm-bench-hf-"))
        atexit.register(shutil.rmtree, folder, True)
        _HF_BASES[key] = save_llama_folder(folder / "base", shape)
    return _HF_BASES[key]


def _hf_load_shape(quick: bool) -> dict[str, int]:
    from benchmarks.hf_load import LLAMA_1B

    # --quick: Llama-3.2-1B's width, heads and vocabulary with 4 of its 16 layers (0.51B, 1 GB):
    # each side's process takes about 20 s instead of 50 s on two shared cores
    return {**LLAMA_1B, "layers": 4} if quick else LLAMA_1B


def bench_hf_load(quick: bool) -> dict:
    from benchmarks.hf_load import load_ratio

    shape = _hf_load_shape(quick)
    t0 = time.perf_counter()
    folder = _hf_base(shape)
    saved = time.perf_counter() - t0
    out = load_ratio(folder, shape, repeats=2 if quick else 3, block=64, micro_batch=1, cache="cold")
    out["settings"]["save_seconds"] = round(saved, 1)
    warm = load_ratio(folder, shape, repeats=2 if quick else 3, block=64, micro_batch=1, cache="warm")
    return {"hf_load_ratio": out["ratio"], "hf_load": out,
            "hf_load_ratio_warm_cache": warm["ratio"], "hf_load_warm_cache": warm}


# --quick: a base a quarter of the 1B's width (hidden 512, 4 layers, GQA 8/2, vocabulary 32,000:
# 31M parameters). Each job's evaluation puts the general text (data/general, ~560 tokens)
# through the model and its base; on the 1B that is 80-100 s a job on two shared cores, so ten
# and ten jobs would take over half an hour. The full mode runs the 1B.
WARM_HF_QUICK_SHAPE = {"hidden": 512, "layers": 4, "heads": 8, "kv": 2, "ffn": 2048, "vocab": 32000, "context": 2048}


def bench_warm_worker_hf(quick: bool) -> dict:
    """Ten one-page corpora on a saved HF base through one warm worker (the base loaded once)
    against ten cold workers, each job a fresh LoRA adapter trained a few steps and scored on a
    two-scene battery, probes off: what stays is what a cold start costs."""
    from benchmarks.hf_load import LLAMA_1B, TINY_BATTERY, params

    n = 10
    shape = WARM_HF_QUICK_SHAPE if quick else LLAMA_1B
    folder = _hf_base(shape)
    train = {"block_size": 64, "micro_batch": 1, "grad_accum": 1, "lr": 2e-4, "warmup_frac": 0.0,
             "min_train_tokens": 0, "epochs": 1, "max_steps": 2, "checkpoint_every": 0, "log_every": 1}
    base = {"base": str(folder), "quant": None, "trust_remote_code": False, "device": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpora = _one_page_corpora(tmp, n)
        scenes = tmp / "tiny.yaml"
        scenes.write_text(TINY_BATTERY, encoding="utf-8")
        ws = Workspace(tmp / "ws").ensure()

        def jobs(root: Path) -> list[dict]:
            return [{**job, "probes": False} for job in _jobs(root, corpora, train)]

        with Store(":memory:") as store:
            manager = JobManager(ws, store, slots=[None])
            warm_jobs, cold_jobs = jobs(ws.runs_dir / "warm"), jobs(ws.runs_dir / "cold")
            warm = _run_sessions(manager, base, str(scenes), [warm_jobs])
            cold = _run_sessions(manager, base, str(scenes), [[j] for j in cold_jobs])
        per_job = {side: [json.loads((Path(j["run_dir"]) / "result.json").read_text()) for j in side_jobs]
                   for side, side_jobs in (("warm", warm_jobs), ("cold", cold_jobs))}

    def median(side: str, key: str, skip_first: bool = False) -> float:
        rows = per_job[side][1:] if skip_first else per_job[side]
        return round(statistics.median(r[key] for r in rows), 2)

    return {
        "warm_worker_speedup_hf": round(cold / warm, 2),
        "warm_worker_hf": {
            "jobs": n, "warm_seconds": round(warm, 1), "cold_seconds": round(cold, 1),
            # from each job's result.json: the base's load (0 once warm), training and scoring
            "cold_load_s": median("cold", "load_seconds"), "warm_load_s": median("warm", "load_seconds", True),
            "train_s": median("cold", "train_seconds"), "eval_s": median("cold", "eval_seconds"),
            "settings": {"shape": shape, "params": params(shape), "dtype": "float32 (bf16 on disk)",
                         "battery": "2 choice scenes (benchmarks/hf_load.py TINY_BATTERY)", "probes": False,
                         "train": train, "device": "cpu"},
        },
    }


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


def bench_ray(quick: bool) -> dict:
    return _merged("ray_bench.py", quick)


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
    cases = (bench_warm_worker, bench_status, bench_status_submit, bench_flood, bench_train_vs_hf, bench_hf_load,
             bench_warm_worker_hf, bench_eval, bench_eval_run, bench_ui, bench_probes, bench_ray)
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
