"""`ltm-tui`: the dashboard with no arguments, the headless commands with one.

Nothing here imports torch: the commands queue work for worker subprocesses and read the
results database. Every failure a user can cause ends in one line on stderr and a non-zero
exit code, never a traceback (set LTM_DEBUG=1 to see one anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _add_workspace(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workspace",
        metavar="DIR",
        help="where runs and ltm.duckdb live (env LTM_WORKSPACE, default ./ltm-workspace)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltm-tui",
        description="Which of your texts teach a model to think better, and how long it takes.",
    )
    _add_workspace(parser)
    dash = parser.add_argument_group("the dashboard (ltm-tui with no command): the file picker's defaults")
    dash.add_argument("--base", dest="dash_base", metavar="BASE", help="micro (default), an HF id or a folder")
    dash.add_argument("--preset", dest="dash_preset", metavar="NAME", help="micro size (default small)")
    dash.add_argument("--scenes", dest="dash_scenes", metavar="DIR", help="battery folder (default: built-in)")
    dash.add_argument("--steps", dest="dash_steps", type=int, metavar="N", help="cap on optimizer steps")
    dash.add_argument("--min-train-tokens", dest="dash_min_train_tokens", type=int, metavar="N",
                      help="train on at least this many tokens")
    dash.add_argument("--root", dest="dash_root", metavar="DIR", help="where the file picker opens (default: here)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="train on each file, test, and print the ranked table")
    run.add_argument("files", nargs="+", metavar="FILE", help="corpora: .txt .md .pdf .epub .html, or folders")
    run.add_argument("--base", default="micro", help="micro (default), a Hugging Face id, or a local model folder")
    run.add_argument("--preset", default="small", help="micro size: tiny, small, base, large (default small)")
    run.add_argument("--quant", choices=["4bit"], help="QLoRA: load the HF base in 4-bit nf4")
    run.add_argument("--trust-remote-code", action="store_true", help="let an HF base run its own code")
    run.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    run.add_argument("--scenes", metavar="DIR", help="battery folder or file (default: the built-in scenes/)")
    run.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    run.add_argument("--seeds", type=int, default=1, help="repeats with seeds seed..seed+N-1 (default 1)")
    run.add_argument("--priority", type=int, default=0, help="higher runs first (default 0; FIFO within a priority)")
    run.add_argument("--steps", type=int, help="cap on optimizer steps (default: from epochs and token floor)")
    run.add_argument("--epochs", type=float, help="passes over each corpus")
    run.add_argument("--min-train-tokens", type=int, help="train on at least this many tokens")
    run.add_argument("--lr", type=float, help="peak learning rate")
    run.add_argument("--block-size", type=int, help="tokens per training sequence")
    run.add_argument("--micro-batch", type=int, help="sequences per forward pass")
    run.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    run.add_argument("--lora-r", type=int, help="LoRA rank (HF bases)")
    run.add_argument("--lora-alpha", type=int, help="LoRA alpha (HF bases)")
    run.add_argument("--no-probes", dest="probes", action="store_false",
                     help="skip looking inside each adapted network (weights, attention, drift)")
    run.add_argument("--format", choices=["table", "json"], default="table", help="final output")
    run.add_argument("--weights", metavar="SPEC", help=WEIGHTS_HELP)
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_workspace(run)

    res = sub.add_parser("results", help="the ranked results table")
    res.add_argument("--sort", default="overall", help="column or measure to sort by (default overall)")
    order = res.add_mutually_exclusive_group()
    order.add_argument("--asc", dest="descending", action="store_false", help="ascending")
    order.add_argument("--desc", dest="descending", action="store_true", help="descending (default)")
    res.set_defaults(descending=True)
    res.add_argument("--format", choices=["table", "csv", "json"], default="table")
    res.add_argument("--weights", metavar="SPEC", help=WEIGHTS_HELP)
    res.add_argument("--pool-seeds", action="store_true",
                     help="one row per corpus and base: the mean over its seeds, intervals over seeds and scenes")
    _add_workspace(res)

    exp = sub.add_parser("export", help="write the results as CSV")
    exp.add_argument("--csv", default="ltm_results_table.csv", metavar="PATH", help="default ltm_results_table.csv")
    exp.add_argument("--sort", default="overall")
    _add_workspace(exp)

    st = sub.add_parser("status", help="the jobs and their states")
    st.add_argument("--format", choices=["table", "json"], default="table")
    _add_workspace(st)

    fol = sub.add_parser("follow", help="watch queued and running jobs until they finish")
    fol.add_argument("runs", nargs="*", metavar="RUN", help="runs to follow (default: every unfinished one)")
    _add_workspace(fol)

    for name, text in (("cancel", "cancel a queued or running job"), ("retry", "queue a finished job again; it resumes from its newest checkpoint")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run_id", metavar="RUN")
        _add_workspace(p)

    srv = sub.add_parser("serve", help="run the job service (clients start it on demand)")
    srv.add_argument("--detach", action="store_true", help="start it in the background and return")
    srv.add_argument("--slots-per-gpu", type=int, default=1, help="workers per GPU (default 1)")
    _add_workspace(srv)

    prb = sub.add_parser("probes", help="what training changed inside a run's network")
    prb.add_argument("run_id", metavar="RUN")
    prb.add_argument("--format", choices=["table", "json"], default="table")
    _add_workspace(prb)

    from ltm_tui.attribute_cmd import add_parser as add_attribute

    _add_workspace(add_attribute(sub, run))

    from ltm_tui.estimate_cmd import add_parser as add_estimate

    _add_workspace(add_estimate(sub, run))

    from ltm_tui.search_cmd import add_parser as add_search

    _add_workspace(add_search(sub, run))

    _add_evaluation_commands(sub)

    stop = sub.add_parser("stop", help="stop the job service (workers go on unless --all)")
    stop.add_argument("--all", action="store_true", help="also stop the workers (they checkpoint; retry resumes)")
    _add_workspace(stop)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from backend.errors import LtmError

    try:
        if args.command is None:
            from ltm_tui.app import run_app

            defaults = {
                "base": args.dash_base,
                "preset": args.dash_preset,
                "scenes": args.dash_scenes,
                "steps": args.dash_steps,
                "min_train_tokens": args.dash_min_train_tokens,
            }
            return run_app(args.workspace, {k: v for k, v in defaults.items() if v is not None}, args.dash_root)
        handler = {
            "run": cmd_run,
            "results": cmd_results,
            "export": cmd_export,
            "status": cmd_status,
            "follow": cmd_follow,
            "cancel": cmd_cancel,
            "retry": cmd_retry,
            "serve": cmd_serve,
            "stop": cmd_stop,
            "compare": cmd_compare,
            "attribute": cmd_attribute,
            "scenes": cmd_scenes,
            "judge": cmd_judge,
            "estimate": cmd_estimate,
            "probes": cmd_probes,
            "search": cmd_search,
        }
        return handler[args.command](args)
    except LtmError as exc:
        print(f"ltm-tui: {exc.one_line()}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ltm-tui: interrupted; `ltm-tui status` shows what was kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get("LTM_DEBUG"):
            raise
        print(
            f"ltm-tui: unexpected {type(exc).__name__}: {exc} (set LTM_DEBUG=1 for details)",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _workspace(args):
    from backend.workspace import Workspace

    return Workspace.resolve(args.workspace)


def _ask(args, op: str, direct, **kwargs):
    """Ask the workspace's service, starting it when none runs. The service owns the database:
    read directly, the file would show runs as live that no process moves any more (the service
    settles them when it starts), and a reader holding it keeps a starting service out."""
    from backend.client import connect
    from backend.store import Store

    ws = _workspace(args)
    if not ws.db_path.exists():
        # no workspace yet: an empty in-memory store still checks the request (e.g. the sort column)
        with Store(":memory:") as store:
            return direct(store)
    with connect(ws) as client:
        return client.call(op, **kwargs)


def _job_settings(args):
    from backend.config import LORA_DEFAULTS, MICRO_DEFAULTS
    from backend.errors import LtmError
    from backend.jobs import JobSettings
    from backend.workspace import default_scenes_dir

    micro = args.base == "micro"
    if micro and args.preset not in ("tiny", "small", "base", "large"):
        raise LtmError(f"unknown --preset {args.preset!r}; use tiny, small, base or large", title="usage")
    if micro and args.quant:
        raise LtmError("--quant 4bit is for Hugging Face bases; micro trains in full", title="usage")
    scenes = Path(args.scenes).expanduser().resolve() if args.scenes else default_scenes_dir()
    if not scenes.exists():
        raise LtmError(f"{scenes}: no such battery folder; pass --scenes DIR", title="battery")
    from backend.scenes import load_batteries

    load_batteries(scenes)  # a malformed battery stops here, naming file, line and field
    train = (MICRO_DEFAULTS if micro else LORA_DEFAULTS).to_dict()
    flags = {
        "max_steps": args.steps,
        "epochs": args.epochs,
        "min_train_tokens": args.min_train_tokens,
        "lr": args.lr,
        "block_size": args.block_size,
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
    }
    train.update({k: v for k, v in flags.items() if v is not None})
    train.pop("seed", None)
    lora = {}
    if not micro:
        from backend.config import LoraSettings

        lora = LoraSettings().to_dict()
        if args.lora_r:
            lora["r"] = args.lora_r
        if args.lora_alpha:
            lora["alpha"] = args.lora_alpha
    base = {
        "base": args.base,
        "preset": args.preset if micro else None,
        "quant": args.quant,
        "trust_remote_code": bool(args.trust_remote_code),
        "device": args.device,
    }
    return JobSettings(base=base, scenes=str(scenes), train=train, lora=lora, probes=args.probes)


def cmd_run(args) -> int:
    from dataclasses import asdict

    from backend.client import connect

    settings = _job_settings(args)
    ws = _workspace(args)
    seeds = list(range(args.seed, args.seed + max(1, args.seeds)))
    paths = [str(Path(p).expanduser().absolute()) for p in args.files]
    from ltm_tui.estimate_cmd import forecast_before_queueing

    forecast_before_queueing(ws, settings, paths)  # time and memory per corpus, on stderr
    with connect(ws) as client:
        sub = client.call("submit", paths=paths, settings=asdict(settings), seeds=seeds, priority=args.priority)
    for line in sub["errors"]:
        print(f"ltm-tui: {line}", file=sys.stderr)
    if not sub["run_ids"]:
        print("ltm-tui: no corpus could be read; nothing was queued", file=sys.stderr)
        return EXIT_FAILED
    mine = sub["run_ids"] + sub["baseline_ids"]
    follow(ws, mine, quiet=args.quiet or args.format != "table")
    with connect(ws) as client:
        rows = [r for r in client.call("results") if r["run_id"] in mine]
    if args.format == "json":
        from backend.measures import parse_weights
        from ltm_tui.report import reweigh

        # as `results --format json`: intervals per measure and overall_interval per row
        print(json.dumps(reweigh(rows, parse_weights(args.weights)), ensure_ascii=False, indent=1))
    else:
        from ltm_tui.report import print_ranked

        from backend.measures import parse_weights

        print_ranked(rows, weights=parse_weights(args.weights))
        for r in rows:
            if r["status"] != "done":
                print(f"ltm-tui: {r['run_id']} {r['status']}: {r.get('error')}", file=sys.stderr)
    failed = sub["errors"] or any(r["status"] != "done" for r in rows)
    return EXIT_FAILED if failed else EXIT_OK


TERMINAL = ("done", "failed", "cancelled", "interrupted")


def follow(ws, run_ids: list[str] | None, *, quiet: bool = False) -> dict[str, str]:
    """Progress bars for these runs until each reaches a terminal state; returns their states.
    Ctrl-C or a dropped terminal only detaches: the jobs go on in the service."""
    from backend.client import connect
    from ltm_tui.report import RunProgress

    events = connect(ws)
    stream = events.subscribe()  # subscribe first, then read states: no change falls between
    with connect(ws) as client:
        jobs = client.call("jobs", runs=run_ids)
    if run_ids is None:
        jobs = [j for j in jobs if j["status"] not in TERMINAL]
        if not jobs:
            print("nothing is queued or running", file=sys.stderr)
    states = {j["run_id"]: j["status"] for j in jobs}
    try:
        with RunProgress(jobs, enabled=not quiet) as progress:
            for job in jobs:
                if job.get("step") and job.get("total"):
                    progress.on_event({"type": "progress", **job})
            while any(s not in TERMINAL for s in states.values()):
                event = next(stream)
                if event.get("type") == "service":
                    raise _service_stopped()
                if event.get("run_id") in states:
                    if event.get("type") == "state":
                        states[event["run_id"]] = event["status"]
                    progress.on_event(event)
    except KeyboardInterrupt:
        print(
            f"\nltm-tui: detached; the jobs go on. Follow them again with: ltm-tui follow --workspace {ws.root}",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        events.close()
    return states


def _service_stopped():
    from backend.errors import LtmError

    return LtmError("the service stopped; `ltm-tui status` shows where the jobs are", title="service")


def cmd_estimate(args) -> int:
    from ltm_tui.estimate_cmd import cmd_estimate as run_estimate

    return run_estimate(args)


def cmd_search(args) -> int:
    from ltm_tui.search_cmd import cmd_search as run_search

    return run_search(args)


def cmd_follow(args) -> int:
    states = follow(_workspace(args), args.runs or None)
    return EXIT_OK if all(s == "done" for s in states.values()) else EXIT_FAILED


def cmd_results(args) -> int:
    from ltm_tui.report import print_ranked, rows_to_csv

    try:
        rows = _ask(
            args, "results", lambda st: st.results(sort=args.sort, descending=args.descending),
            sort=args.sort, descending=args.descending,
        )
    except ValueError as exc:
        print(f"ltm-tui: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from backend.measures import parse_weights
    from ltm_tui.report import reweigh

    weights = parse_weights(args.weights)
    if args.pool_seeds:
        rows = _pool_seeds(args, rows)
    if args.format == "json":
        print(json.dumps(reweigh(rows, weights), ensure_ascii=False, indent=1))
    elif args.format == "csv":
        sys.stdout.write(rows_to_csv(reweigh(rows, weights)))
    else:
        print_ranked(rows, sort=args.sort, weights=weights)
    return EXIT_OK


def cmd_export(args) -> int:
    from backend.workspace import file_mode

    target = str(Path(args.csv).expanduser().absolute())
    mode = file_mode()  # the service writes it; the file is the user's, with their usual mode
    try:
        path = _ask(
            args, "export",
            lambda st: st.export_csv(target, sort=args.sort, mode=mode),
            path=target, sort=args.sort, mode=mode,
        )
    except ValueError as exc:
        print(f"ltm-tui: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"ltm-tui: cannot write {args.csv}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {path}")
    return EXIT_OK


def cmd_status(args) -> int:
    from ltm_tui.report import print_status

    jobs = _ask(args, "jobs", lambda st: [])
    pong = _ask(args, "ping", lambda st: {})
    if pong.get("trouble"):  # the queue stands still until it is mended (a full disk, say)
        print(f"ltm-tui: service: {pong['trouble']}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(jobs, ensure_ascii=False, indent=1))
        return EXIT_OK
    print_status(jobs)
    for task in _ask(args, "tasks", lambda st: []):  # calibrations and judges in the worker slots
        if task["status"] in ("waiting", "running"):
            pid = f", pid {task['pid']}" if task["pid"] else ""
            print(f"task {task['task_id']}: {task['what']}: {task['status']}{pid}")
    for study in pong.get("searches") or []:
        print(f"search {study}: running in the service (`ltm-tui search --stop --study {study}` stops it)")
    return EXIT_OK


def cmd_cancel(args) -> int:
    from backend.client import connect

    with connect(_workspace(args)) as client:
        client.call("cancel", run_id=args.run_id)
    print(f"cancelled {args.run_id}")
    return EXIT_OK


def cmd_retry(args) -> int:
    from backend.client import connect

    with connect(_workspace(args)) as client:
        client.call("retry", run_id=args.run_id)
    print(f"queued {args.run_id} again; it resumes from its newest checkpoint (ltm-tui follow shows it)")
    return EXIT_OK


def cmd_serve(args) -> int:
    ws = _workspace(args)
    if args.detach:
        from backend.client import connect

        with connect(ws) as client:
            pid = client.call("ping")["pid"]
        print(f"service running on {ws.root} (pid {pid})")
        return EXIT_OK
    from backend.service import main as serve_main

    return serve_main(["--workspace", str(ws.root), "--slots-per-gpu", str(args.slots_per_gpu)])


def cmd_probes(args) -> int:
    data = _ask(args, "probes", lambda st: st.probes(args.run_id), run_id=args.run_id)
    if args.format == "json":
        print(json.dumps(data, ensure_ascii=False, indent=1))
    elif data.get("error"):
        print(f"ltm-tui: probes of {args.run_id} failed: {data['error']}", file=sys.stderr)
    else:
        print("\n".join(probe_lines(data)))
    return EXIT_FAILED if data.get("error") else EXIT_OK


def cmd_attribute(args) -> int:
    from ltm_tui.attribute_cmd import cmd_attribute as run_attribute

    return run_attribute(args)


def probe_lines(p: dict) -> list[str]:
    """The probe result as plain text: the summary, then per depth and the largest updates."""
    s = p["summary"]

    def f(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    lines = [
        f"probes of {p['run_id']} ({p['method']} update; {p['layers']} layers x {p['heads']} heads;"
        f" {p['prompts']} prompts, {p['tokens']} tokens; {f(s['seconds'], '.2f')}s)",
        f"weight change {f(s['weight_change'])} (relative {f(s['weight_rel_change'])})"
        f"   attention entropy {f(s['attn_entropy_change'], '+.4f')} nats, JS {f(s['attn_js'])}"
        f"   drift layer {f(s['drift_layer'], 'd')} (CKA {f(s['min_cka'])})"
        f"   lens layer base {f(s['lens_layer_base'], '.2f')} -> adapter {f(s['lens_layer_adapter'], '.2f')}",
        "",
        f"{'depth':>5} {'CKA':>7} {'dH nats':>8} {'JS':>7} {'prev b->a':>13} {'first b->a':>13} {'update':>9}",
    ]
    attn = p.get("attention") or {}
    per_layer: dict[int, float] = {}
    for e in p.get("weight") or []:
        if e.get("layer") is not None:
            per_layer[e["layer"]] = per_layer.get(e["layer"], 0.0) + e["norm"] ** 2

    def mean(key, i):
        rows = attn.get(key) or []
        return sum(rows[i]) / len(rows[i]) if i < len(rows) and rows[i] else None

    for depth, cka in enumerate(p.get("cka") or []):
        i = depth - 1  # depth d is the stream after block d; block d is layer index d-1
        attn_cells = (
            f"{f(mean('entropy_delta', i), '+.4f'):>8} {f(mean('js', i)):>7}"
            f" {f(mean('prev_base', i), '.2f'):>6}->{f(mean('prev_adapter', i), '.2f'):<5}"
            f" {f(mean('first_base', i), '.2f'):>6}->{f(mean('first_adapter', i), '.2f'):<5}"
            if i >= 0 else f"{'':>8} {'':>7} {'':>13} {'':>13}"
        )
        update = per_layer.get(i) ** 0.5 if i in per_layer else None
        lines.append(f"{depth:>5} {f(cka):>7} {attn_cells} {f(update, '.4g'):>9}")
    top = sorted(p.get("weight") or [], key=lambda e: -e["norm"])[:5]
    if top:
        lines += ["", f"{'largest updates':<40} {'norm':>9} {'stable r':>8} {'eff. r':>7}"]
        lines += [f"{e['module'][:40]:<40} {e['norm']:>9.4g} {e['stable_rank']:>8.2f} {e['effective_rank']:>7.2f}" for e in top]
    lens = p.get("logit_lens") or {}
    if lens.get("scenes"):
        a = lens.get("answered") or {}
        lines += ["", f"logit lens on {len(lens['scenes'])} depth scenes: answer settled in base {a.get('base')},"
                  f" adapter {a.get('adapter')}; mean first depth base {f(lens['first_layer'].get('base'), '.2f')},"
                  f" adapter {f(lens['first_layer'].get('adapter'), '.2f')}"]
    return lines


def cmd_stop(args) -> int:
    import time

    from backend.client import try_connect
    from backend.executor import process_alive

    ws = _workspace(args)
    client = try_connect(ws)
    if client is None:
        print(f"no service runs on {ws.root}")
        return EXIT_OK
    with client:
        pid = client.call("stop", workers=args.all)["pid"]
    deadline = time.monotonic() + 60
    while process_alive(pid, None) and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"stopped the service on {ws.root}" + (" and its workers" if args.all else "; workers go on"))
    return EXIT_OK


# --- evaluation: compare, scenes check/weak/import-lmeval, judge (docs/measures.md) ------------

WEIGHTS_HELP = "weights of overall: depth=2,novelty=0.5 or a YAML/JSON file (default: 1 each)"


def _add_evaluation_commands(sub) -> None:
    cmp = sub.add_parser("compare", help="two runs scene by scene: what flipped, and an exact test")
    cmp.add_argument("run_a", metavar="RUN_A")
    cmp.add_argument("run_b", metavar="RUN_B")
    cmp.add_argument("--format", choices=["table", "json"], default="table")
    _add_workspace(cmp)

    sc = sub.add_parser("scenes", help="check a battery folder, list weak scenes, import an lm-eval task")
    scs = sc.add_subparsers(dest="scenes_command", metavar="ACTION", required=True)
    chk = scs.add_parser("check", help="validate every battery in DIR and count scenes per measure and language")
    chk.add_argument("dir", metavar="DIR")
    chk.add_argument("--format", choices=["table", "json"], default="table")
    weak = scs.add_parser("weak", help="scenes with no spread across runs, or at chance in every run")
    weak.add_argument("--format", choices=["table", "json"], default="table")
    _add_workspace(weak)
    imp = scs.add_parser("import-lmeval", help="convert an lm-evaluation-harness task (local data) to a battery")
    imp.add_argument("task", metavar="TASK.yaml")
    imp.add_argument("-o", "--output", metavar="FILE", help="write the battery here (default: stdout)")
    imp.add_argument("--metric", help="the measure it feeds (default: the task's name as snake_case)")
    imp.add_argument("--limit", type=int, help="at most this many documents")

    jd = sub.add_parser("judge", help="a second model grades the runs' generations on the scenes' rubrics")
    jd.add_argument("runs", nargs="+", metavar="RUN")
    jd.add_argument("--model", metavar="PATH", help="a local Hugging Face model folder (deterministic yes/no)")
    jd.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    jd.add_argument("--judge-model", metavar="NAME", help="the model name the endpoint serves")
    jd.add_argument("--key-env", metavar="VAR", help="environment variable holding the endpoint's API key")
    jd.add_argument("--device", help="device of a local judge (default: cuda when present)")
    jd.add_argument("--format", choices=["table", "json"], default="table")
    _add_workspace(jd)


def _scene_results(args, run_ids: list[str]) -> dict:
    return _ask(args, "scene_results", lambda st: {r: st.scene_results(r) for r in run_ids}, runs=run_ids)


def _pool_seeds(args, rows: list[dict]) -> list[dict]:
    """Finished runs of one corpus on one base, pooled over their seeds (backend.measures.pooled_scores)."""
    from backend.measures import overall, pooled_scores

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "done":
            groups.setdefault((r.get("corpus_path"), r["base"], r.get("kind")), []).append(r)
    found = _scene_results(args, [r["run_id"] for members in groups.values() for r in members])
    out = []
    for members in groups.values():
        pooled = pooled_scores([found.get(r["run_id"]) or [] for r in members])
        scores = {k: v["value"] for k, v in pooled.items()}
        out.append({
            **members[0],
            "run_id": ",".join(r["run_id"] for r in members),
            "seed": None,
            "seeds": [r["seed"] for r in members],
            "train_seconds": sum(r.get("train_seconds") or 0 for r in members) / len(members),
            "scores": scores,
            "intervals": {k: [v["lo"], v["hi"]] for k, v in pooled.items() if v["lo"] is not None},
            "overall": overall(scores),
        })
    return sorted(out, key=lambda r: (r["overall"] is None, -(r["overall"] or 0)))


def cmd_compare(args) -> int:
    from backend.errors import LtmError
    from backend.stats import compare_runs

    found = _scene_results(args, [args.run_a, args.run_b])
    for run_id in (args.run_a, args.run_b):
        if not found.get(run_id):
            raise LtmError(f"run {run_id} has no scene results (is it done? `ltm-tui status` lists runs)", title="compare")
    result = {"run_a": args.run_a, "run_b": args.run_b, **compare_runs(found[args.run_a], found[args.run_b])}
    if args.format == "json":
        print(json.dumps(result, ensure_ascii=False, indent=1))
        return EXIT_OK
    print(f"{args.run_a} → {args.run_b}: {result['shared']} scenes in both")
    print(f"  right in both {result['both_right']}, wrong in both {result['both_wrong']}")
    for key, label in (("wrong_to_right", "wrong → right"), ("right_to_wrong", "right → wrong")):
        items = result[key]
        print(f"  {label}: {len(items)}" + (f"  ({', '.join(items[:12])}{' …' if len(items) > 12 else ''})" if items else ""))
    print(f"  exact McNemar p = {result['mcnemar_p']:.4g} (two-sided, on the flipped items)")
    print(f"  scores higher in B {result['scores_better']}, lower {result['scores_worse']}:"
          f" sign test p = {result['sign_test_p']:.4g}")
    return EXIT_OK


def cmd_scenes(args) -> int:
    if args.scenes_command == "check":
        from backend.scenes import battery_counts, load_batteries

        counts = battery_counts(load_batteries(args.dir))
        if args.format == "json":
            print(json.dumps(counts, ensure_ascii=False, indent=1))
        else:
            from ltm_tui.report import print_battery_counts

            print_battery_counts(counts)
        return EXIT_OK
    if args.scenes_command == "import-lmeval":
        from backend.scenes import import_lmeval

        text, n = import_lmeval(args.task, metric=args.metric, limit=args.limit)
        if args.output:
            Path(args.output).write_text(text, encoding="utf-8")
            print(f"wrote {args.output}: {n} scenes", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return EXIT_OK
    from backend.stats import weak_scenes

    runs = _ask(args, "jobs", lambda st: [])
    done = [r["run_id"] for r in runs if r["status"] == "done"]
    weak = weak_scenes(_scene_results(args, done)) if done else []
    if args.format == "json":
        print(json.dumps(weak, ensure_ascii=False, indent=1))
    elif not weak:
        print(f"no weak scenes over {len(done)} finished runs")
    else:
        print(f"{len(weak)} weak scenes over {len(done)} finished runs (baselines included):")
        for w in weak:
            print(f"  {w['battery']}/{w['scene_id']}: {', '.join(w['reasons'])}")
    return EXIT_OK


def cmd_judge(args) -> int:
    from backend.judge import judge_rows, make_judge, rescore

    if args.model and not args.endpoint:
        report = _judge_in_a_slot(args)
    else:
        report = _judge_here(args, make_judge(model=args.model, endpoint=args.endpoint, judge_model=args.judge_model,
                                              key_env=args.key_env, device=args.device), judge_rows, rescore)
    if args.format == "json":
        print(json.dumps(report, ensure_ascii=False, indent=1))
    for r in report if args.format == "table" else ():
        print(f"{r['run_id']}: {r['graded']} graded by {r['judge']}: {r['yes']} yes, {r['no']} no,"
              f" {r['parse_failures']} unparsed; overall now {r['overall']}")
    return EXIT_OK if report else EXIT_FAILED


def _judge_in_a_slot(args) -> list[dict]:
    """A local judge model is loaded by a worker in one of the service's slots (backend/tasks.py),
    never beside a run on the same card; the service stores the grades."""
    from backend.client import run_task

    model = str(Path(args.model).expanduser().absolute())
    say = (lambda s: None) if args.format == "json" else (lambda s: print(f"judge: {s}", file=sys.stderr))
    task = run_task(_workspace(args), "judge", say, runs=list(args.runs), model=model, device=args.device)
    for run_id in task.get("skipped") or []:
        print(f"ltm-tui: run {run_id} has no scene results; skipped", file=sys.stderr)
    return task["result"]


def _judge_here(args, judge, judge_rows, rescore) -> list[dict]:
    """An endpoint judge runs on another server: this process only sends the prompts."""
    found = _scene_results(args, args.runs)
    report = []
    for run_id in args.runs:
        rows = found.get(run_id) or []
        if not rows:
            print(f"ltm-tui: run {run_id} has no scene results; skipped", file=sys.stderr)
            continue
        rows, counts = judge_rows(rows, judge)
        scores, overall = rescore(rows)
        _ask(args, "rescore", lambda st: st.rescore_run(run_id, rows, scores, overall),
             run_id=run_id, scene_results=rows, scores=scores, overall=overall)
        report.append({"run_id": run_id, "judge": judge.name, "overall": overall, **counts})
    return report


if __name__ == "__main__":
    sys.exit(main())
