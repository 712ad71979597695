"""`ltm-tui web`: the dashboard in a browser (ltm_tui/web.py serves it with textual-serve).

    ltm-tui web --workspace W [--port 8000] [--host 127.0.0.1] \\
        [--base B --preset P --scenes DIR --steps N --min-train-tokens N --root DIR]

The dashboard's flags (the file picker's defaults) may come before `web` too, as for the
dashboard itself; every browser session gets a dashboard started with them.
"""

from __future__ import annotations

from ltm_tui.cli.common import DASHBOARD_FLAGS, add_dashboard_flags, usage, workspace


def add_parser(sub):
    p = sub.add_parser("web", help="the dashboard in a browser, at a URL with a one-time token",
                       description="Serve the dashboard to a browser (textual-serve) at a URL with a one-time "
                                   "token. Each browser tab gets its own dashboard, with the flags below.")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: reach it through `ssh -L`); "
                        "0.0.0.0 exposes it to the network")
    add_dashboard_flags(p.add_argument_group("each tab's dashboard: the file picker's defaults"), below_a_command=True)
    p.set_defaults(handler=cmd_web)
    return p


def cmd_web(args) -> int:
    from ltm_tui.web import DashboardServer, dashboard_command

    if not 1 <= args.port <= 65535:
        raise usage(f"--port {args.port}: give a TCP port from 1 to 65535")
    flags = dashboard_flags(args)
    root = workspace(args).root
    DashboardServer(dashboard_command(root, flags), host=args.host, port=args.port, workspace=root).serve()
    return 0


def dashboard_flags(args) -> list[str]:
    """The dashboard's flags as given, before or after `web`, for each tab's command line."""
    flags = []
    for dest, flag, *_ in DASHBOARD_FLAGS:
        if getattr(args, dest, None) is not None:
            flags += [flag, str(getattr(args, dest))]
    return flags
