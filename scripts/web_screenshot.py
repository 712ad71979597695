"""Write screenshots/web.png: the dashboard as a browser shows it through `ltm-tui web`.

    ltm-tui run data/demo                       # a workspace with the demo's results
    python scripts/web_screenshot.py [--workspace ltm-workspace] [--out screenshots/web.png]

The real server on a free port, opened in headless Chromium (/usr/bin/chromium, as
tests/test_web.py does) with the token it printed; the picture is taken once the results show.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.browser import TerminalPage, chromium, web_server  # noqa: E402

VIEWPORT = {"width": 1280, "height": 720}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=os.environ.get("LTM_WORKSPACE", "ltm-workspace"))
    parser.add_argument("--out", type=Path, default=REPO / "screenshots" / "web.png")
    args = parser.parse_args()
    workspace = Path(args.workspace).expanduser().resolve()
    if not (workspace / "ltm.duckdb").exists():
        raise SystemExit(f"{workspace}: no ltm.duckdb; run `ltm-tui run data/demo --workspace {workspace}` first")
    with tempfile.TemporaryDirectory() as tmp, web_server(workspace, Path(tmp) / "web.log") as (url, _), \
            chromium() as browser:
        term = TerminalPage(browser.new_page(viewport=VIEWPORT))
        term.open(url)
        term.wait_for(r"sorted by")
        # the rows come with the service's first answer; the devices' history with a second reading
        term.wait_for(r"\s\d\.\d{3}\s")
        term.page.wait_for_timeout(1500)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        term.page.screenshot(path=args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
