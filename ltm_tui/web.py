"""`ltm-tui web`: the dashboard in a browser, served by textual-serve.

    ltm-tui web --workspace W [--port 8000] [--host 127.0.0.1]

No second UI: each browser session starts its own `ltm-tui` dashboard process (the command
below, the same workspace and picker defaults) whose screen textual-serve streams to xterm.js
over a websocket. Like the terminal dashboard it is a client of the workspace's job service.

Anyone who can open the page drives the dashboard (queue, cancel, read the results), so every
request needs the one-time token printed in the URL: in the query string on the first load,
then in a cookie set by that answer (the page's script, styles and websocket carry no query).
The cookie is HttpOnly and SameSite=Strict, so a page on another site cannot reach the socket
with it. The server listens on the loopback interface unless told otherwise.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import ipaddress
import logging
import secrets
import shlex
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from textual_serve.server import Server

from backend.core.errors import LtmError


class WebError(LtmError):
    """The web view cannot listen where it was asked to."""

    title = "web"


def dashboard_command(workspace: Path, flags: Sequence[str] = ()) -> str:
    """The shell command textual-serve runs for each browser session: this interpreter's own
    `ltm-tui` dashboard (no command), on this workspace, with these dashboard flags."""
    return shlex.join([sys.executable, "-m", "ltm_tui.cli", "--workspace", str(workspace), *flags])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """The host as a browser URL names it: this machine's name for a wildcard address, an IPv6
    address in brackets."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.is_unspecified:
        return socket.gethostname()
    return f"[{host}]" if address.version == 6 else host


def token_middleware(token: str, cookie: str):
    """403 for a request carrying neither `?token=` nor the cookie; the first good `?token=`
    answer sets the cookie, for the page's own requests that follow."""

    def matches(given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), token.encode())

    @web.middleware
    async def check(request: web.Request, handler):
        in_query = matches(request.query.get("token"))
        if not (in_query or matches(request.cookies.get(cookie))):
            raise web.HTTPForbidden(text="ltm-tui web: open the URL with the token that `ltm-tui web` printed\n")
        response = await handler(request)
        if in_query and not response.prepared:  # a websocket's answer has gone out already
            response.set_cookie(cookie, token, path="/", httponly=True, samesite="Strict")
        return response

    return check


class DashboardServer(Server):
    """textual-serve's server with the token check in front of every route."""

    def __init__(self, command: str, *, host: str = "127.0.0.1", port: int = 8000, workspace: Path | None = None,
                 token: str | None = None) -> None:
        super().__init__(command, host=host, port=port, title="ltm-tui")
        self.workspace = workspace
        self.token = token or secrets.token_urlsafe(24)
        # a cookie belongs to a host, not to a port: one name per port keeps two servers apart
        self.cookie = f"ltm-tui-web-{port}"
        self.sessions: set[asyncio.Task] = set()  # one a browser tab: its websocket and its dashboard

    @property
    def url(self) -> str:
        return f"http://{url_host(self.host)}:{self.port}/?token={self.token}"

    def initialize_logging(self) -> None:
        super().initialize_logging()
        # a line per request would bury the URL (and repeat the token); errors still show
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

    async def _make_app(self) -> web.Application:
        app = await super()._make_app()
        app.middlewares.append(token_middleware(self.token, self.cookie))
        return app

    async def handle_index(self, request: web.Request):
        # The page names its script and websocket by absolute URLs built from public_url. Built
        # from the address this browser used instead (localhost, or a forwarded port), they stay
        # on the host the cookie was set for. No await comes between this and their use.
        self.public_url = f"{request.scheme}://{request.host}"
        return await super().handle_index(request)

    async def handle_websocket(self, request: web.Request) -> web.WebSocketResponse:
        task = asyncio.current_task()
        self.sessions.add(task)
        try:
            return await super().handle_websocket(request)
        finally:
            self.sessions.discard(task)

    async def on_shutdown(self, app: web.Application) -> None:
        # aiohttp lets open requests finish before it exits, and a session lasts as long as its
        # tab: cancelled, a session closes its websocket and quits its dashboard (textual-serve's
        # own handling), so Ctrl+C returns at once.
        for task in self.sessions:
            task.cancel()

    async def on_startup(self, app: web.Application) -> None:
        where = f" of {self.workspace}" if self.workspace else ""
        if not is_loopback(self.host):
            print(f"ltm-tui web: warning: listening on {self.host}, reachable from other machines over plain "
                  "http; the token in the URL is the only guard", file=sys.stderr)
        print(f"ltm-tui web: the dashboard{where}, one process per browser tab; Ctrl+C stops it.\n"
              f"open {self.url}", flush=True)

    def serve(self, debug: bool = False) -> None:
        check_port(self.host, self.port)
        try:
            super().serve(debug)
        except OSError as exc:  # taken between the check and the bind
            raise WebError(unavailable(self.host, self.port, exc)) from None


def unavailable(host: str, port: int, exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"--host {host}: not an address of this machine ({exc.strerror})"
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is in use (another `ltm-tui web`?); choose a free one with --port N"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port N or --host"


def check_port(host: str, port: int) -> None:
    """Bind each address of host:port once, as the server is about to, so that a port in use
    ends in one line before anything is printed."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server does
                probe.bind(address)
    except OSError as exc:
        raise WebError(unavailable(host, port, exc)) from None
