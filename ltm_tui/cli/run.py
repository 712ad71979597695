"""`ltm-tui run FILE...`: queue a run per corpus and seed, follow them, print the ranked table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ltm_tui.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    WEIGHTS_HELP,
    battery_flag,
    follow,
    job_settings,
    model_flags,
    queue_flags,
    training_flags,
    workspace,
)


def add_parser(sub):
    run = sub.add_parser("run", help="train on each file, test, and print the ranked table",
                         parents=[model_flags(), battery_flag(), queue_flags(), training_flags()])
    run.add_argument("files", nargs="+", metavar="FILE", help="corpora: .txt .md .pdf .epub .html, or folders")
    run.add_argument("--no-probes", dest="probes", action="store_false",
                     help="skip looking inside each adapted network (weights, attention, drift)")
    run.add_argument("--format", choices=["table", "json"], default="table", help="final output")
    run.add_argument("--weights", metavar="SPEC", help=WEIGHTS_HELP)
    run.set_defaults(handler=cmd_run)
    return run


def cmd_run(args) -> int:
    from dataclasses import asdict

    from backend.core.errors import LtmError
    from backend.ingest.corpora import unusable_name
    from backend.jobs.client import connect
    from backend.scoring.measures import parse_weights
    from ltm_tui.cli.estimate import forecast_before_queueing
    from ltm_tui.report import print_ranked, reweigh

    settings = job_settings(args)
    ws = workspace(args)
    seeds = list(range(args.seed, args.seed + max(1, args.seeds)))
    paths = []
    for given in args.files:  # an empty path ("$BOOK" unset) is not the current folder
        bad = unusable_name(given)
        if bad is not None:
            print(f"ltm-tui: {bad.one_line()}", file=sys.stderr)
        else:
            paths.append(str(Path(given).expanduser().absolute()))
    if not paths:
        print("ltm-tui: no corpus could be read; nothing was queued", file=sys.stderr)
        return EXIT_FAILED
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
    weights = parse_weights(args.weights)
    try:
        reweigh(rows, weights)  # a weight for a measure no run has: said, not a night's table lost
    except LtmError as exc:
        print(f"ltm-tui: {exc.one_line()}; the table below is weighted as usual", file=sys.stderr)
        weights = {}
    if args.format == "json":
        # as `results --format json`: intervals per measure and overall_interval per row
        print(json.dumps(reweigh(rows, weights), ensure_ascii=False, indent=1))
    else:
        print_ranked(rows, weights=weights)
        for r in rows:
            if r["status"] != "done":
                print(f"ltm-tui: {r['run_id']} {r['status']}: {r.get('error')}", file=sys.stderr)
    failed = sub["errors"] or any(r["status"] != "done" for r in rows)
    return EXIT_FAILED if failed else EXIT_OK
