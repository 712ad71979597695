"""Write screenshots/*.svg from the real dashboard on a real workspace.

    ltm-tui run data/demo                       # a workspace with the demo's results
    python scripts/export_screenshots.py [--workspace ltm-workspace]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ltm_tui.app import LtmApp  # noqa: E402


async def shoot(workspace: str | None, out: Path) -> list[Path]:
    written = []
    app = LtmApp(workspace)
    async with app.run_test(size=(120, 24)) as pilot:
        await pilot.pause()
        path = out / "results.svg"
        app.save_screenshot(filename=path.name, path=str(out))
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", help="default: $LTM_WORKSPACE or ./ltm-workspace")
    parser.add_argument("--out", default=str(REPO / "screenshots"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in asyncio.run(shoot(args.workspace, out)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
