"""Pictures of every screen on a real workspace (pytest-textual-snapshot).

The workspace is the `finished` fixture's: two micro runs trained by `ltm-tui run`, times pinned.
The device panel is shown twice: the host's CPU and RAM (a fixed reading, since this machine's
load changes by the second) and NVML with two GPUs (mocked pynvml, the only mock). After a change
that is meant to alter a picture: `python -m pytest tests/test_snapshots.py --snapshot-update`,
then look at the new SVGs in tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

import time

from ltm_tui.app import LtmApp
from ltm_tui.gpu import DeviceMonitor, DeviceReading, Snapshot
from ltm_tui.screens import HelpScreen, PickerScreen, RunScreen
from ltm_tui.widgets import DevicePanel, ResultsTable
from tests.conftest import WAIT

HOST = Snapshot(
    devices=[DeviceReading(index=0, kind="host", name="CPU (2 cores) · RAM", memory_used=9 * 2**30,
                           memory_total=24 * 2**30, utilization=37.0)],
    source="psutil", note="no NVML: nvml shared library not found", at=0.0,
)


async def ready(pilot, condition, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"the dashboard did not get ready within {timeout:.0f}s")
        await pilot.pause(0.05)


def dashboard(finished, monitor=None) -> LtmApp:
    return LtmApp(str(finished.ws), poll_seconds=0, monitor=monitor, picker_root=str(finished.corpora))


async def loaded(pilot) -> None:
    app = pilot.app
    table = app.query_one(ResultsTable)
    await ready(pilot, lambda: table.row_count == 3 and app.jobs)
    app.sub_title = "~/ltm-workspace"  # the temp folder's name changes every run
    await pilot.pause()


def test_dashboard_without_nvml(snap_compare, finished):
    async def before(pilot):
        await loaded(pilot)
        pilot.app.query_one(DevicePanel).show(HOST, {})

    assert snap_compare(dashboard(finished), terminal_size=(80, 24), run_before=before)


def test_dashboard_with_two_gpus(snap_compare, finished, fake_nvml):
    monitor = DeviceMonitor()

    async def before(pilot):
        await loaded(pilot)
        for _ in range(3):
            snapshot = monitor.read()
        pilot.app.query_one(DevicePanel).show(snapshot, {4242: "logic.txt"})

    assert snap_compare(dashboard(finished, monitor), terminal_size=(120, 32), run_before=before)


def test_file_picker_with_a_marked_file(snap_compare, finished):
    async def before(pilot):
        await loaded(pilot)
        pilot.app.query_one(DevicePanel).show(HOST, {})
        await pilot.press("a")
        picker = pilot.app.screen
        assert isinstance(picker, PickerScreen)
        tree = picker.query_one("#tree")
        await ready(pilot, lambda: tree.root.children)
        await pilot.press("down", "space")
        await ready(pilot, lambda: picker.info)
        await pilot.pause()

    assert snap_compare(dashboard(finished), terminal_size=(80, 24), run_before=before)


def _open_logic(tab: str):
    async def before(pilot):
        await loaded(pilot)
        app = pilot.app
        table = app.query_one(ResultsTable)
        logic = next(k for k, r in table.rows_by_id.items() if r.get("corpus") == "logic.txt")
        table.move_cursor(row=table.get_row_index(logic))
        await pilot.press("enter")
        await ready(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.detail is not None)
        await pilot.press(tab)
        await pilot.pause()

    return before


def test_run_detail_loss_curve(snap_compare, finished):
    assert snap_compare(dashboard(finished), terminal_size=(100, 30), run_before=_open_logic("1"))


def test_run_detail_scenes(snap_compare, finished):
    assert snap_compare(dashboard(finished), terminal_size=(100, 30), run_before=_open_logic("2"))


def test_help(snap_compare, finished):
    async def before(pilot):
        await loaded(pilot)
        pilot.app.query_one(DevicePanel).show(HOST, {})
        await pilot.press("question_mark")
        await ready(pilot, lambda: isinstance(pilot.app.screen, HelpScreen))
        await pilot.pause()

    assert snap_compare(dashboard(finished), terminal_size=(80, 24), run_before=before)
