"""`ltm-tui search`: hyperparameters (and corpus subsets) searched with Optuna, one job a trial.

    ltm-tui search --space SPACE.yaml --trials N [--sampler tpe|grid] [FILE...] [--scenes DIR]
    ltm-tui search --stop --study NAME

This command checks the space, the files and the settings (one line for the first problem),
then hands the study to the job service (op `search_start`), which runs the ask-and-tell loop
(backend/studies/search_study.py), and follows its lines until the study has its trials. The study
lives in the service, so Ctrl-C, a closed terminal or a dropped SSH connection stops only the
following: the same command follows it again (or resumes it, after a restart), and
`--stop` ends it. The study is a journal file in WORKSPACE/search/<study>/ (docs/search.md).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from ltm_tui.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    battery_flag,
    job_settings,
    model_flags,
    queue_flags,
    training_flags,
    workspace,
)


def add_parser(sub):
    # run's flags set the settings every trial starts from; a space parameter overrides its own
    p = sub.add_parser("search", help="search hyperparameters (and file subsets) with Optuna; runs in the service",
                       parents=[model_flags(), battery_flag(), queue_flags(seeds=False), training_flags()])
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="corpora searched over (default on resume: the study's own)")
    p.add_argument("--space", metavar="SPACE.yaml", help="the search space (docs/search.md)")
    p.add_argument("--trials", type=int, metavar="N",
                   help="trials in the study; a resumed study runs only the ones missing")
    p.add_argument("--sampler", choices=["tpe", "grid"], default="tpe", help="tpe (default) or grid")
    p.add_argument("--study", metavar="NAME", help="the study's name (default: the space's study: or file name)")
    p.add_argument("--stop", action="store_true",
                   help="stop the study (its running trial's job is cancelled); give --study or --space")
    p.add_argument("--probes", action="store_true", help="also look inside each trial's network (slower)")
    p.add_argument("--format", choices=["table", "json"], default="table", help="final output")
    p.set_defaults(handler=cmd_search)
    return p


def cmd_search(args) -> int:
    from backend.core.errors import SpaceError
    from backend.studies import search as S

    if args.study and not S.STUDY_NAME.fullmatch(args.study):
        raise SpaceError(f"--study {args.study!r}: use letters, digits, _ . - (at most 64)")
    if args.stop:
        return _stop(args, workspace(args))
    if not args.space or args.trials is None:
        raise SpaceError("search needs --space SPACE.yaml and --trials N (docs/search.md)")
    settings = job_settings(args)
    ws = workspace(args)
    request, notes = S.study_request(args.space, args.files, asdict(settings), args.trials, root=ws.root,
                                     sampler=args.sampler, study=args.study, seed=args.seed,
                                     priority=args.priority)
    ws.ensure()
    for note in notes:
        _say(note)
    report = follow_study(ws, request, quiet=args.quiet)
    if report is None:
        return EXIT_INTERRUPTED
    if args.format == "json":
        print(json.dumps(report, ensure_ascii=False, indent=1))
    else:
        print("\n".join(report_lines(report)))
    return EXIT_OK if report["best"] is not None else EXIT_FAILED


def follow_study(ws, request: dict, *, quiet: bool) -> dict | None:
    """Start (or find) the study in the service and print its lines until it ends; its report,
    or None when the following stopped first (Ctrl-C: the study goes on)."""
    from backend.core.errors import LtmError
    from backend.jobs.client import connect
    from backend.jobs.protocol import ServiceError

    name = request["study"]
    say = (lambda line: None) if quiet else _say
    with connect(ws) as watch:
        events = watch.subscribe()  # before the start: no line of the study can fall between
        with connect(ws) as client:
            started = client.call("search_start", **request)
        last = 0
        for line in started["lines"]:
            say(line["message"])
            last = line["seq"]
        try:
            for event in events:
                if event.get("type") == "service" and event.get("status") == "stopped":
                    raise ServiceError(f"the service stopped; study {name} goes on when it starts again "
                                       "(this command starts it and follows the study)")
                if event.get("type") != "search" or event.get("study") != name or event["seq"] <= last:
                    continue
                last = event["seq"]
                say(event["message"])
                if event.get("status") in ("finished", "stopped"):
                    return event["report"]
                if event.get("status") == "failed":
                    raise LtmError(event["error"], title="search")
        except KeyboardInterrupt:
            _say(f"stopped following search {name}; it goes on in the service. The same command follows it "
                 f"again; `ltm-tui search --stop --study {name}` stops it.")
            return None
    raise ServiceError(f"the service closed the connection while search {name} ran; see its service.log")


def _stop(args, ws) -> int:
    from backend.core.errors import SpaceError
    from backend.jobs.client import connect
    from backend.studies import search as S

    name = args.study or (S.load_space(args.space).study if args.space else None)
    if not name:
        raise SpaceError("search --stop needs --study NAME (or the --space that names it)")
    with connect(ws) as client:
        out = client.call("search_stop", study=name)
    _say(f"search {name}: {out['status']}")
    return 0


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def report_lines(report: dict) -> list[str]:
    """The trials as a table, then the best trial and the importances."""
    from backend.studies.search import fmt_value as _fmt
    from backend.studies.search import params_text as _params_text

    s = report["study"]
    rows = report["trials"]
    names = list(dict.fromkeys(k for r in rows for k in r["params"]))
    head = ["trial", "state", s["objective"], *names, "eval loss", "run"]
    cells = [
        [str(r["number"]), r["state"], "-" if r["value"] is None else f"{r['value']:.4f}",
         *[_fmt(r["params"].get(k, "-")) for k in names],
         "-" if r["last_value"] is None else f"{r['last_value']:.3f}@{r['last_step']}", r["run_id"] or "-"]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]
    lines = [f"study {s['study']}: {len(rows)} trials, {s['sampler']} sampler, {s['direction']} {s['objective']}",
             "  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    best = report["best"]
    if best is None:
        lines.append("no trial finished with a score")
    else:
        lines.append(f"best: trial {best['number']}, {s['objective']} {best['value']:.4f}, run {best['run_id']}:"
                     f" {_params_text(best['params'])}")
    if report["importances"]:
        lines.append("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in report["importances"].items()))
    else:
        lines.append(f"importance: n/a ({report['importances_note']})")
    for r in rows:
        if r["state"] == "FAIL" and r["error"]:
            lines.append(f"trial {r['number']} failed: {r['error']}")
    return lines
