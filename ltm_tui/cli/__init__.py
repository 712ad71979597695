"""`ltm-tui`: the dashboard with no arguments, the headless commands with one.

One module a command family: `run`, `queue` (results, export, status, follow, cancel, retry,
probes, serve, stop), `evaluation` (compare, scenes, judge), `estimate`, `search`, `attribute`,
`web` (the dashboard in a browser);
`common` holds what they share (the run flags as argparse parents, the service, following).
Nothing here imports torch: the commands queue work for worker subprocesses and read the
results through the job service. Every failure a user can cause ends in one line on stderr
and a non-zero exit code, never a traceback (set LTM_DEBUG=1 to see one anyway).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ltm_tui.cli import attribute, estimate, evaluation, queue, run, search, web
from ltm_tui.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, add_dashboard_flags, add_workspace


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltm-tui",
        description="Which of your texts teach a model to think better, and how long it takes.",
    )
    add_workspace(parser)
    add_dashboard_flags(parser.add_argument_group("the dashboard (ltm-tui with no command): the file picker's defaults"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_workspace(run.add_parser(sub))
    queue.add_parsers(sub)
    add_workspace(attribute.add_parser(sub))
    add_workspace(estimate.add_parser(sub))
    add_workspace(search.add_parser(sub))
    evaluation.add_parsers(sub)
    add_workspace(web.add_parser(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from backend.core.errors import LtmError

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
        code = args.handler(args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
        return code
    except LtmError as exc:
        print(f"ltm-tui: {exc.one_line()}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ltm-tui: interrupted; `ltm-tui status` shows what was kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `ltm-tui results | head`: the reader has what it wanted
        # Python flushes stdout again at exit and would complain to stderr; point it nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get("LTM_DEBUG"):
            raise
        print(f"ltm-tui: unexpected {type(exc).__name__}: {exc} (set LTM_DEBUG=1 for details)", file=sys.stderr)
        return EXIT_FAILED
