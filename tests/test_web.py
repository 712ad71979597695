"""`ltm-tui web` end to end: the real server as a subprocess, the page in a real headless
Chromium, the dashboard's screen read from the browser's terminal; the token guards every
route; a port in use is one line, not a traceback."""

from __future__ import annotations

import os
import re
import socket
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import psutil
import pytest

from tests import test_results_export
from tests.browser import CHROMIUM, TerminalPage, chromium, free_port, web_server
from tests.conftest import cli

# a real store with a finished baseline and one finished adapter run, seeded without training
workspace = test_results_export.workspace

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"),
    reason=f"no {CHROMIUM}: `apt-get install chromium` (.ci/run installs it; in CI its absence fails)",
)


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def dashboards(server_pid: int) -> list[list[str]]:
    """The command lines of the dashboards the server started (its process group)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if (proc.pid != server_pid and os.getpgid(proc.pid) == server_pid
                    and proc.info["cmdline"][1:3] == ["-m", "ltm_tui.cli"]):
                found.append(proc.info["cmdline"])
        except (ProcessLookupError, TypeError):
            continue
    return found


@needs_chromium
def test_the_dashboard_in_a_browser_behind_its_token(workspace, tmp_path):
    with web_server(workspace, tmp_path / "web.log", "--preset", "tiny") as (url, pid), chromium() as browser:
        token = re.search(r"[?&]token=([^&]+)", url).group(1)
        origin = f"http://{urlsplit(url).netloc}"
        # without the token (or with another) every route is closed: the page, its script, its websocket
        for path in ("/", "/?token=" + token[::-1], "/static/js/textual.js", "/ws?width=80&height=24"):
            assert status(origin + path) == 403, path

        term = TerminalPage(browser.new_page(viewport={"width": 1400, "height": 800}))
        assert term.open(url) == 200
        # the page's script and websocket carried no token, only the cookie the first answer set
        screen = term.wait_for(r"sorted by overall")
        assert term.exposed == 1
        text = "\n".join(screen)
        assert re.search(r"─ queue ─", text) and re.search(r"baseline micro:tiny\s+done", text)
        assert re.search(r"─ results · 1 runs · sorted by overall", text)
        assert re.search(r"\s0\.667\s+\+0\.417\s", text)  # the adapter's overall and its gain over the base
        # the tab's dashboard is this project's, on this workspace, with the picker defaults given
        assert dashboards(pid) == [[sys.executable, "-m", "ltm_tui.cli", "--workspace", str(workspace),
                                    "--preset", "tiny"]]

        # a click on the results' `depth` header sorts by it
        header = next(y for y, row in enumerate(screen) if "sorted by" in row) + 1
        x = re.search(r"\bdepth\b", screen[header]).start() + 1
        term.click_cell(x, header)
        screen = term.wait_for(r"sorted by depth")
        assert not any("sorted by overall" in row for row in screen)
        term.page.screenshot(path=tmp_path / "web.png")

        assert term.page.context.request.get(origin + "/static/css/xterm.css").status == 200  # the cookie
        assert status(origin + "/static/css/xterm.css") == 403  # still closed to a client without it


def test_a_port_in_use_is_one_line_naming_the_port_and_the_fix(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli("web", "--workspace", str(tmp_path / "ws"), "--port", str(port))
    assert done.returncode != 0
    assert done.stderr.strip() == (f"ltm-tui: web: port {port} is in use (another `ltm-tui web`?); "
                                   "choose a free one with --port N")
    assert "open http" not in done.stdout


def test_listening_beyond_loopback_warns_in_one_line(tmp_path):
    log = tmp_path / "web.log"
    with web_server(tmp_path / "ws", log, host="0.0.0.0") as (url, _):
        assert urlsplit(url).hostname == socket.gethostname().lower()  # a wildcard is no address to open
        warnings = [line for line in log.read_text().splitlines() if "warning" in line]
    assert warnings == [("ltm-tui web: warning: listening on 0.0.0.0, reachable from other machines over plain "
                         "http; the token in the URL is the only guard")]


def test_the_dashboards_flags_reach_each_tab_before_or_after_web():
    """`ltm-tui --preset tiny web` and `ltm-tui web --preset tiny` start the same dashboards; a
    flag after `web` is added to those before it, and one not given never hides one that was."""
    from ltm_tui.cli import build_parser
    from ltm_tui.cli.web import dashboard_flags

    parse = build_parser().parse_args
    before = dashboard_flags(parse(["--preset", "tiny", "--root", "/books", "web"]))
    after = dashboard_flags(parse(["web", "--preset", "tiny", "--root", "/books"]))
    mixed = dashboard_flags(parse(["--preset", "tiny", "web", "--root", "/books"]))
    assert before == after == mixed == ["--preset", "tiny", "--root", "/books"]
    assert dashboard_flags(parse(["web", "--steps", "40"])) == ["--steps", "40"]
