"""Write screenshots/*.svg from the real dashboard on a real workspace.

    ltm-tui run data/demo                       # a workspace with the demo's results
    python scripts/export_screenshots.py [--workspace ltm-workspace]

Pictures: the dashboard (devices, queue, ranked results), the file picker with a corpus marked
and its preview, a run's loss curve and its scenes, the best run against its baseline, the help
screen, and where the workspace
has them, an attribution study (`ltm-tui attribute`) and a search (`ltm-tui search`). The
device panel shows this machine as it is (NVML where present, else CPU and RAM).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ltm_tui.app import LtmApp  # noqa: E402
from ltm_tui.screens import CompareScreen, HelpScreen, PickerScreen, RunScreen  # noqa: E402
from ltm_tui.studies import AttributionScreen, SearchScreen  # noqa: E402

SIZE = (110, 32)


async def _until(pilot, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("the dashboard did not get ready; is the workspace readable?")
        await pilot.pause(0.05)


async def shoot(workspace: str | None, out: Path, picker_root: Path) -> list[Path]:
    written = []
    app = LtmApp(workspace, picker_root=str(picker_root))

    def save(name: str) -> None:
        app.save_screenshot(filename=name, path=str(out))
        written.append(out / name)

    async with app.run_test(size=SIZE) as pilot:
        table = app.results_table
        await _until(pilot, lambda: table.row_count > 0 and app.device_panel.snapshot is not None)
        await pilot.pause(1.5)  # a second device reading for the history
        save("dashboard.svg")

        await pilot.press("a")
        picker = app.screen
        assert isinstance(picker, PickerScreen)
        tree = picker.query_one("#tree")
        await _until(pilot, lambda: tree.root.children)
        await pilot.press("down", "space")
        await _until(pilot, lambda: picker.info)
        await pilot.pause(0.3)
        save("picker.svg")
        await pilot.press("escape")

        best = next((k for k in table.displayed() if table.rows_by_id[k].get("kind") != "baseline"), None)
        if best is not None:
            table.focus()
            table.move_cursor(row=table.get_row_index(best))
            await pilot.press("enter")
            await _until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.detail is not None)
            await pilot.pause(0.3)
            save("run-curve.svg")
            await pilot.press("2")
            await pilot.pause(0.3)
            save("run-scenes.svg")
            await pilot.press("escape")

        if best is not None:  # the best run against its baseline
            table.move_cursor(row=table.get_row_index(best))
            await pilot.press("v")
            await _until(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.details)
            await pilot.pause(0.5)
            save("compare.svg")
            await pilot.press("escape")

        await pilot.press("question_mark")
        await _until(pilot, lambda: isinstance(app.screen, HelpScreen))
        save("help.svg")
        await pilot.press("escape")

        # the study screens, where the workspace has an attribution study or a search
        for key, name, screen_type, table_id in (("f", "attribution.svg", AttributionScreen, "#attribution-table"),
                                                  ("o", "search.svg", SearchScreen, "#trials")):
            await pilot.press(key)
            await _until(pilot, lambda: isinstance(app.screen, screen_type) and app.screen.reply is not None)
            if app.screen.query_one(table_id).row_count:
                await pilot.pause(0.3)
                save(name)
            await pilot.press("escape")
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", help="default: $LTM_WORKSPACE or ./ltm-workspace")
    parser.add_argument("--root", default=str(REPO / "data" / "demo"), help="the folder the picker shows")
    parser.add_argument("--out", default=str(REPO / "screenshots"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in asyncio.run(shoot(args.workspace, out, Path(args.root))):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
