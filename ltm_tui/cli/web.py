"""`ltm-tui web`: the dashboard in a browser (ltm_tui/web.py serves it with textual-serve).

    ltm-tui [--base B --preset P --scenes DIR --steps N --min-train-tokens N --root DIR] web \\
        --workspace W [--port 8000] [--host 127.0.0.1]

The dashboard's flags are the top-level ones, before `web`, as for the dashboard itself; every
browser session gets a dashboard started with them.
"""

from __future__ import annotations

from ltm_tui.cli.common import workspace

# the top-level dashboard options (dest → flag) each browser session's dashboard is started with
DASHBOARD_FLAGS = {
    "dash_base": "--base",
    "dash_preset": "--preset",
    "dash_scenes": "--scenes",
    "dash_steps": "--steps",
    "dash_min_train_tokens": "--min-train-tokens",
    "dash_root": "--root",
}


def add_parser(sub):
    p = sub.add_parser("web", help="the dashboard in a browser, at a URL with a one-time token",
                       description="Serve the dashboard to a browser (textual-serve) at a URL with a one-time "
                                   "token. The dashboard's own flags (--base, --preset, ...) go before `web`.")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: reach it through `ssh -L`); "
                        "0.0.0.0 exposes it to the network")
    p.set_defaults(handler=cmd_web)
    return p


def cmd_web(args) -> int:
    from ltm_tui.web import DashboardServer, dashboard_command

    flags = []
    for dest, flag in DASHBOARD_FLAGS.items():
        if getattr(args, dest, None) is not None:
            flags += [flag, str(getattr(args, dest))]
    root = workspace(args).root
    DashboardServer(dashboard_command(root, flags), host=args.host, port=args.port, workspace=root).serve()
    return 0
