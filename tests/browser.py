"""Chromium driving `ltm-tui web`, for tests/test_web.py and scripts/web_screenshot.py.

The server runs as a real subprocess in its own process group (it, its shell and each browser
session's dashboard), stopped as a group on the way out. The page runs in Debian's headless
Chromium (/usr/bin/chromium) through playwright; `playwright install` is never run. xterm.js
draws the screen on a canvas, so the screen is read from xterm's own buffer, the cells the
canvas shows.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from tests.conftest import REPO, WAIT, wait_for

CHROMIUM = Path("/usr/bin/chromium")
# Headless on a closed network: without the background-networking flags Chromium's connections
# are refused; no GPU, no sandbox (a container's root), nothing fetched for itself.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The page keeps its xterm.js Terminal in a closure; this one statement of textual-serve's script,
# rewritten on its way to the browser, hands it to the window as well.
TERMINAL_STATEMENT = re.compile(r"this\.terminal=new (\w+)\.Terminal\(")
TERMINAL_EXPOSED = r"window.ltmTerminal=this.terminal=new \1.Terminal("
# every cell of the visible screen, one string a row (an empty cell, a wide glyph's tail: a space)
READ_SCREEN = """() => {
    const term = window.ltmTerminal;
    if (!term) return null;
    const buffer = term.buffer.active, rows = [];
    for (let y = 0; y < term.rows; y++) {
        const line = buffer.getLine(buffer.viewportY + y);
        let text = "";
        for (let x = 0; x < term.cols; x++) text += (line && line.getCell(x).getChars()) || " ";
        rows.push(text);
    }
    return rows;
}"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Served(NamedTuple):
    url: str  # as the server printed it, with the token
    pid: int  # the server's, which leads its process group


@contextmanager
def web_server(workspace: Path, log: Path, *flags: str, host: str | None = None,
               timeout: float = WAIT) -> Iterator[Served]:
    """`ltm-tui [flags] web --workspace W` on a free port, its output in `log`, until the URL is
    printed; the group is stopped on the way out, on a failure too."""
    command = [sys.executable, "-m", "ltm_tui.cli", *flags, "web", "--workspace", str(workspace),
               "--port", str(free_port()), *(["--host", host] if host else [])]
    with log.open("wb") as out:  # a file, not a pipe: the server never blocks on a full pipe
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        def printed():
            if proc.poll() is not None:
                raise AssertionError(f"ltm-tui web exited with {proc.returncode}:\n{log.read_text()}")
            found = re.search(r"open (http://\S+)", log.read_text())
            return found and found.group(1)

        yield Served(wait_for(printed, timeout, "`ltm-tui web` to print its URL", poll=0.05), proc.pid)
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group, a wait, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


@contextmanager
def chromium():
    """A headless Chromium (playwright's sync API), closed on the way out."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class TerminalPage:
    """textual-serve's page in a browser tab: open it, read its screen, click a cell."""

    def __init__(self, page) -> None:
        self.page = page
        self.exposed = 0
        page.route("**/static/js/textual.js", self._expose_terminal)

    def _expose_terminal(self, route) -> None:
        response = route.fetch()
        body, self.exposed = TERMINAL_STATEMENT.subn(TERMINAL_EXPOSED, response.text())
        route.fulfill(response=response, body=body)

    def open(self, url: str) -> int:
        """Load the page (not waiting for its web font, which a closed network never serves);
        returns the HTTP status."""
        return self.page.goto(url, wait_until="domcontentloaded").status

    def screen(self) -> list[str]:
        return self.page.evaluate(READ_SCREEN) or []

    def wait_for(self, pattern: str, timeout: float = WAIT) -> list[str]:
        """The screen, once a row of it matches `pattern`."""
        found = re.compile(pattern)
        return wait_for(lambda: (rows := self.screen()) and any(found.search(r) for r in rows) and rows,
                        timeout, f"the browser's screen to show /{pattern}/", poll=0.05)

    def click_cell(self, x: int, y: int) -> None:
        """A mouse click in the middle of the cell at column x, row y."""
        box = self.page.locator(".xterm-screen").bounding_box()
        cols, rows = self.page.evaluate("() => [window.ltmTerminal.cols, window.ltmTerminal.rows]")
        self.page.mouse.click(box["x"] + (x + 0.5) * box["width"] / cols, box["y"] + (y + 0.5) * box["height"] / rows)
