"""The queue and its results: `results`, `export`, `status`, `follow`, `cancel`, `retry`,
`probes`, `serve` and `stop`. Every read goes through the job service (common.ask)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ltm_tui.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    WEIGHTS_HELP,
    add_workspace,
    ask,
    follow,
    scene_results,
    workspace,
)


def add_parsers(sub) -> None:
    res = sub.add_parser("results", help="the ranked results table")
    res.add_argument("--sort", default="overall", help="column or measure to sort by (default overall)")
    order = res.add_mutually_exclusive_group()
    order.add_argument("--asc", dest="descending", action="store_false", help="ascending")
    order.add_argument("--desc", dest="descending", action="store_true", help="descending (default)")
    res.set_defaults(descending=True, handler=cmd_results)
    res.add_argument("--format", choices=["table", "csv", "json"], default="table")
    res.add_argument("--wide", action="store_true",
                     help="every column and whole names, however wide (the table otherwise fits the terminal; "
                          "try `| less -S`)")
    res.add_argument("--weights", metavar="SPEC", help=WEIGHTS_HELP)
    res.add_argument("--pool-seeds", action="store_true",
                     help="one row per corpus and base: the mean over its seeds, intervals over seeds and scenes")

    exp = sub.add_parser("export", help="write the results as CSV")
    exp.add_argument("--csv", default="ltm_results_table.csv", metavar="PATH",
                     help="a file or folder (default ltm_results_table.csv here); - prints it")
    exp.add_argument("--sort", default="overall", help="column or measure to sort by, or its header (default overall)")
    order = exp.add_mutually_exclusive_group()
    order.add_argument("--asc", dest="descending", action="store_false", help="ascending")
    order.add_argument("--desc", dest="descending", action="store_true", help="descending (default)")
    exp.set_defaults(descending=True, handler=cmd_export)

    st = sub.add_parser("status", help="the jobs and their states")
    st.add_argument("--format", choices=["table", "json"], default="table")
    st.set_defaults(handler=cmd_status)

    fol = sub.add_parser("follow", help="watch queued and running jobs until they finish")
    fol.add_argument("runs", nargs="*", metavar="RUN", help="runs to follow (default: every unfinished one)")
    fol.set_defaults(handler=cmd_follow)

    for name, text, handler in (
        ("cancel", "cancel a queued or running job", cmd_cancel),
        ("retry", "queue a finished job again; it resumes from its newest checkpoint", cmd_retry),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("run_id", metavar="RUN")
        p.set_defaults(handler=handler)

    srv = sub.add_parser("serve", help="run the job service (clients start it on demand)")
    srv.add_argument("--detach", action="store_true", help="start it in the background and return")
    srv.add_argument("--slots-per-gpu", type=int, default=1, help="workers per GPU (default 1)")
    srv.add_argument("--executor", choices=["local", "ray"],
                     help="where workers run: this machine, or a Ray cluster (docs/cluster.md); the workspace "
                          "keeps the choice (default: LTM_EXECUTOR, else the last choice, else local)")
    srv.add_argument("--address", metavar="auto|HOST:PORT", help="the Ray cluster (default: RAY_ADDRESS, else auto)")
    srv.add_argument("--max-retries", type=int, default=1,
                     help="times a run whose cluster node was lost, or whose worker hung, is queued again by itself (default 1)")
    srv.set_defaults(handler=cmd_serve)

    prb = sub.add_parser("probes", help="what training changed inside a run's network")
    prb.add_argument("run_id", metavar="RUN")
    prb.add_argument("--format", choices=["table", "json"], default="table")
    prb.set_defaults(handler=cmd_probes)

    stop = sub.add_parser("stop", help="stop the job service (workers go on unless --all)")
    stop.add_argument("--all", action="store_true", help="also stop the workers (they checkpoint; retry resumes)")
    stop.set_defaults(handler=cmd_stop)
    for p in (res, exp, st, fol, srv, prb, stop, *[sub.choices[n] for n in ("cancel", "retry")]):
        add_workspace(p)


def cmd_follow(args) -> int:
    if args.runs:  # a run that is not there is named, as cancel and retry name it
        known = {j["run_id"] for j in ask(args, "jobs", lambda st: [], runs=args.runs)}
        missing = [r for r in args.runs if r not in known]
        if missing:
            print(f"ltm-tui: no run {', '.join(missing)}; `ltm-tui status` lists them", file=sys.stderr)
            return EXIT_USAGE
    states = follow(workspace(args), args.runs or None)
    return EXIT_OK if all(s == "done" for s in states.values()) else EXIT_FAILED


def cmd_results(args) -> int:
    from ltm_tui.report import print_ranked, rows_to_csv, sort_name

    args.sort = sort_name(args.sort)  # the table's own header works too: --sort consist
    try:
        rows = ask(
            args, "results", lambda st: st.results(sort=args.sort, descending=args.descending),
            sort=args.sort, descending=args.descending,
        )
    except ValueError as exc:
        print(f"ltm-tui: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from backend.scoring.measures import parse_weights
    from ltm_tui.report import reweigh

    weights = parse_weights(args.weights)
    if args.pool_seeds:
        rows = pool_seeds(args, rows)
    if args.format == "json":
        print(json.dumps(reweigh(rows, weights), ensure_ascii=False, indent=1))
    elif args.format == "csv":
        sys.stdout.write(rows_to_csv(reweigh(rows, weights)))
    else:
        print_ranked(rows, sort=args.sort, weights=weights, wide=args.wide)
    return EXIT_OK


def pool_seeds(args, rows: list[dict]) -> list[dict]:
    """Finished runs that differ by their seed alone (one corpus, base, battery and training
    settings; a baseline: one base and battery), pooled over their seeds
    (backend.scoring.measures.pooled_scores), in the order asked for."""
    from backend.scoring.measures import overall, pooled_scores
    from ltm_tui.report import sorted_rows

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] != "done":
            continue
        if r.get("kind") == "baseline":
            key = ("baseline", r["base"], r.get("scenes"))
        else:
            key = (r.get("kind"), r.get("corpus_path"), r.get("settings_key") or r["base"])
        groups.setdefault(key, []).append(r)
    found = scene_results(args, [r["run_id"] for members in groups.values() for r in members])
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
            # pooled runs are measured against their pooled baseline (report.baseline_group)
            "baseline_key": f"pooled {members[0]['base']} {members[0].get('scenes')}",
        })
    return sorted_rows(out, args.sort, args.descending)


def cmd_export(args) -> int:
    from backend.core.workspace import file_mode
    from ltm_tui.report import sort_name

    order = {"sort": sort_name(args.sort), "descending": args.descending}  # the table's header works too
    try:
        if args.csv == "-":  # to standard output, as `results --format csv` prints its own
            out = ask(args, "export", lambda st: {"csv": st.csv_text(**order)}, path="-", **order)
            sys.stdout.write(out["csv"])
            return EXIT_OK
        target = str(Path(args.csv).expanduser().absolute())
        mode = file_mode()  # the service writes it; the file is the user's, with their usual mode
        path = ask(args, "export", lambda st: st.export_csv(target, mode=mode, **order), path=target, mode=mode, **order)
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

    jobs = ask(args, "jobs", lambda st: [])
    pong = ask(args, "ping", lambda st: {})
    if pong.get("trouble"):  # the queue stands still until it is mended (a full disk, say)
        print(f"ltm-tui: service: {pong['trouble']}", file=sys.stderr)
    for line in pong.get("stuck") or []:  # a process the kernel holds: the card waits for a reboot
        print(f"ltm-tui: stuck {line}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(jobs, ensure_ascii=False, indent=1))
        return EXIT_OK
    print_status(jobs)
    if pong.get("executor") == "ray":  # where the workers run: every node of the cluster
        nodes = ", ".join(f"{n['node']} {n['cpus']:g} CPU {n['gpus']:g} GPU" for n in pong.get("nodes") or [])
        print(f"executor: ray at {pong.get('address')}; nodes: {nodes or 'none'}")
    for task in ask(args, "tasks", lambda st: []):  # calibrations and judges in the worker slots
        if task["status"] in ("waiting", "running"):
            pid = f", pid {task['pid']}" if task["pid"] else ""
            print(f"task {task['task_id']}: {task['what']}: {task['status']}{pid}")
    for study in pong.get("searches") or []:
        print(f"search {study}: running in the service (`ltm-tui search --stop --study {study}` stops it)")
    return EXIT_OK


def _existing(args):
    """The workspace, when it holds runs: a mistyped --workspace must not become a new one with
    a service of its own, only to answer that the run is not there."""
    from backend.core.errors import JobError

    ws = workspace(args)
    if not ws.db_path.exists():
        raise JobError(f"no run {args.run_id!r} in {ws.root}: it holds no runs (is --workspace right?)")
    return ws


def cmd_cancel(args) -> int:
    from backend.jobs.client import connect

    with connect(_existing(args)) as client:
        client.call("cancel", run_id=args.run_id)
    print(f"cancelled {args.run_id}")
    return EXIT_OK


def cmd_retry(args) -> int:
    from backend.jobs.client import connect

    with connect(_existing(args)) as client:
        client.call("retry", run_id=args.run_id)
    print(f"queued {args.run_id} again; it resumes from its newest checkpoint (ltm-tui follow shows it)")
    return EXIT_OK


def cmd_serve(args) -> int:
    ws = workspace(args)
    if args.detach:
        from backend.core.errors import LtmError
        from backend.jobs.client import connect
        from backend.service import choose_executor, remember_executor

        saved = ws.ensure().root / "executor.json"
        before = saved.read_text() if saved.exists() else None
        if args.executor:  # the service started on demand reads the workspace's choice
            remember_executor(ws, *choose_executor(ws, args.executor, args.address))
        try:
            with connect(ws) as client:
                pong = client.call("ping")
        except LtmError:
            if args.executor and before is None:  # a choice that did not start is not kept
                saved.unlink(missing_ok=True)
            elif args.executor:
                saved.write_text(before)
            raise
        pid = pong["pid"]
        if args.executor and pong.get("executor", "local") != args.executor:
            print(f"ltm-tui: the service already running on {ws.root} uses the {pong.get('executor', 'local')} "
                  f"executor; `ltm-tui stop`, then serve again to use {args.executor}", file=sys.stderr)
        print(f"service running on {ws.root} (pid {pid})")
        return EXIT_OK
    from backend.service import main as serve_main

    extra = [*(["--executor", args.executor] if args.executor else []),
             *(["--address", args.address] if args.address else []), "--max-retries", str(args.max_retries)]
    return serve_main(["--workspace", str(ws.root), "--slots-per-gpu", str(args.slots_per_gpu), *extra])


def cmd_probes(args) -> int:
    data = ask(args, "probes", lambda st: st.probes(args.run_id), run_id=args.run_id)
    if args.format == "json":
        print(json.dumps(data, ensure_ascii=False, indent=1))
    elif data.get("error"):
        print(f"ltm-tui: probes of {args.run_id} failed: {data['error']}", file=sys.stderr)
    else:
        print("\n".join(probe_lines(data)))
    return EXIT_FAILED if data.get("error") else EXIT_OK


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

    from backend.jobs.client import connect, try_connect
    from backend.jobs.executor import process_alive

    ws = workspace(args)
    client = try_connect(ws)
    if client is None:
        if not (args.all and ws.db_path.exists()):
            print(f"no service runs on {ws.root}")
            return EXIT_OK
        # Workers outlive their service (a `stop`, a kill): a service that adopts them and
        # starts nothing (no worker for the queued runs, only to stop it) stops them with itself,
        # each saving a checkpoint.
        client = connect(ws, adopt_only=True)
    with client:
        pid = client.call("stop", workers=args.all)["pid"]
    deadline = time.monotonic() + 60
    while process_alive(pid, None) and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"stopped the service on {ws.root}" + (" and its workers" if args.all else "; workers go on"))
    return EXIT_OK
