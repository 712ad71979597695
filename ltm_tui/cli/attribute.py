"""`ltm-tui attribute`: which files make the difference, in combination and under noise.

    ltm-tui attribute a.md b.md c.md [--subsets N] [--seeds S] [--scenes DIR] [--format json]

Trains (through the job service, so it survives the night) on the empty set (the baseline),
each file alone, all of them together and N drawn mixed subsets, then prints each file's Data
Banzhaf contribution per measure with its bootstrap interval (backend/studies/attribution.py,
docs/attribution.md). The same command again resumes the same study: runs already queued or
done are reused, interrupted ones resume from their checkpoints, only what is missing is queued.
No torch here: the service plans, the workers train.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ltm_tui.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    battery_flag,
    follow,
    job_settings,
    model_flags,
    queue_flags,
    training_flags,
    usage,
    workspace,
)


def add_parser(sub):
    att = sub.add_parser(
        "attribute", help="which files make the difference: each file's contribution over subsets, with intervals",
        parents=[model_flags(), battery_flag(), queue_flags(), training_flags()],
    )
    att.add_argument("files", nargs="+", metavar="FILE", help="two or more corpora (files or folders)")
    att.add_argument("--subsets", type=int, metavar="N",
                     help="mixed subsets drawn besides each file alone and all together (default 2 per file, at least 8)")
    att.add_argument("--effect", type=float, default=0.05, metavar="DELTA",
                     help="the effect δ the runs-needed hint is for (default 0.05 on a 0..1 measure)")
    att.add_argument("--probes", action="store_true",
                     help="also look inside each network (off by default: attribution needs only scores)")
    att.add_argument("--format", choices=["table", "json"], default="table")
    att.set_defaults(handler=cmd_attribute)
    return att


def cmd_attribute(args) -> int:
    from dataclasses import asdict

    from backend.jobs.client import connect

    if args.seeds < 1:
        raise usage(f"--seeds {args.seeds}: give 1 or more")
    if args.subsets is not None and args.subsets < 0:
        raise usage(f"--subsets {args.subsets}: give 0 or more")
    if not args.effect > 0:
        raise usage(f"--effect {args.effect}: give a positive effect, e.g. 0.05")
    from backend.studies.attribution_study import checked_request

    paths = [str(Path(p).expanduser().absolute()) for p in args.files]
    checked_request(args.files, args.subsets)  # bad files or N: one line, before any service starts
    settings = job_settings(args)
    ws = workspace(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    with connect(ws) as client:
        sub = client.call("attribute", paths=paths, settings=asdict(settings), subsets=args.subsets,
                          seeds=seeds, priority=args.priority)
        jobs = client.call("jobs", runs=sub["run_ids"])
    pending = [j["run_id"] for j in jobs if j["status"] != "done"]
    print(
        f"study {sub['study']}: {sub['files']} files, {sub['subsets']} mixed subsets, seeds "
        f"{','.join(map(str, sub['seeds']))}; {len(sub['run_ids'])} runs: {len(sub['run_ids']) - len(pending)} done, "
        f"{len(sub['queued'])} newly queued, {len(sub['retried'])} resumed",
        file=sys.stderr,
    )
    for note in sub["notes"]:
        print(f"ltm-tui: {note}", file=sys.stderr)
    states = follow(ws, pending, quiet=args.quiet or args.format != "table") if pending else {}
    with connect(ws) as client:
        report = client.call("attribution", study=sub["study"], effect=args.effect)
    if args.format == "json":
        print(json.dumps([{"study": sub["study"], **r} for r in report["rows"]], ensure_ascii=False, indent=1))
    else:
        print("\n".join(table_lines(report)))
    failed = {r: s for r, s in states.items() if s != "done"}
    for run_id, status in failed.items():
        print(f"ltm-tui: {run_id} {status}; the table leaves it out (`ltm-tui retry {run_id}`, or run this "
              "command again)", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _digits(values) -> int:
    """Decimals for one measure's block: 3 on a 0..1 measure, fewer for perplexities in the hundreds."""
    scale = max([abs(v) for v in values if v is not None] + [0.0])
    return 3 if scale < 10 else 2 if scale < 100 else 1


def _signed(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:+.{digits}f}"


def _plain(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table_lines(report: dict) -> list[str]:
    """The study as plain text: a block per measure, files ranked by contribution."""
    runs = report["runs"]
    states = ", ".join(f"{runs[k]} {k}" for k in ("done", "queued", "starting", "training", "evaluating",
                                                    "failed", "interrupted", "cancelled") if runs.get(k))
    drawn = (f"{report['subsets']} of {report['mixed_subsets']} mixed subsets"
             if report["subsets"] < report["mixed_subsets"] else "every subset")
    lines = [
        f"attribution study {report['study']} on {report['base']}: {len(report['files'])} files, {drawn}, seeds "
        f"{','.join(map(str, report['seeds']))}; {runs['distinct']} runs ({states})",
        "contribution: Data Banzhaf (mean score with the file − without it, over subsets); "
        "interval: 95% bootstrap over runs",
    ]
    by_measure: dict[str, list[dict]] = {}
    for r in report["rows"]:
        by_measure.setdefault(r["measure"], []).append(r)
    width = max([len(f["name"]) for f in report["files"]] + [4])
    for measure, rows in by_measure.items():
        info = report["measures"].get(measure, {})
        direction = "lower is better: the contribution is the reduction" if info.get("lower_is_better") \
            else "higher is better"
        base = report["baseline"].get(measure)
        d = _digits([base] + [r[k] for r in rows for k in ("contribution", "ci_low", "ci_high", "standalone")])
        lines += ["", f"{measure} ({direction}; baseline {_plain(base, d)}, σ {_plain(info.get('sigma'), d)} a run)"]
        lines.append(f"  {'rank':>4}  {'file':<{width}}  {'contribution':>12}  {'95% interval':^18}  "
                     f"{'alone':>7}  runs (with/without)")
        for r in rows:
            ci = f"[{_signed(r['ci_low'], d)}, {_signed(r['ci_high'], d)}]" if r["ci_low"] is not None else "-"
            lines.append(
                f"  {r['rank']:>4}  {r['corpus']:<{width}}  {_signed(r['contribution'], d):>12}  {ci:^18}  "
                f"{_plain(r['standalone'], d):>7}  {r['runs']} ({r['runs_with']}/{r['runs_without']})"
            )
    if not report["rows"]:
        lines += ["", "no finished runs yet: `ltm-tui follow` shows them; this command again prints the table"]
    if report.get("advice"):
        lines += ["", report["advice"]]
    return lines
