"""Pictures of every screen on a real workspace (pytest-textual-snapshot).

The workspace is the `finished` fixture's: two micro runs trained by `ltm-tui run`, times pinned.
The device panel is shown twice: the host's CPU and RAM (a fixed reading, since this machine's
load changes by the second) and NVML with two GPUs (mocked pynvml, the only mock). After a change
that is meant to alter a picture: `python -m pytest tests/test_snapshots.py --snapshot-update`,
then look at the new SVGs in tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

import time

from backend.core.devices import DeviceMonitor, DeviceReading, Snapshot
from ltm_tui.app import LtmApp
from ltm_tui.screens import CompareScreen, ConfirmScreen, HelpScreen, PickerScreen, RunScreen
from ltm_tui.widgets import DevicePanel, ResultsTable
from tests.conftest import WAIT

HOST = Snapshot(
    devices=[DeviceReading(index=0, kind="host", name="host · 2 cores", memory_used=9 * 2**30,
                           memory_total=24 * 2**30, utilization=37.0)],
    source="psutil", note="no GPU driver found: showing CPU and RAM (NVML: nvml shared library not found)", at=0.0,
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
        picker.query_one("#path").value = "~/texts/corpora"  # the temp folder's name changes every run
        await pilot.pause()

    assert snap_compare(dashboard(finished), terminal_size=(80, 24), run_before=before)


# A training, an evaluation, a queued job and a failed one, as the service's `jobs` reply and its
# events give them (fixed numbers: a real run's step and speed change by the second).
QUEUE = [
    {"run_id": "voina-i-mir-s0-a1b2c3", "corpus": "Война и мир.epub", "kind": "adapter", "base": "micro:small",
     "status": "training", "step": 30, "total": 60, "loss": 2.834, "tokens_per_s": 3063.0, "eta_s": 26.0,
     "pid": 4242, "error": None},
    {"run_id": "logic-md-s0-d4e5f6", "corpus": "logic.md", "kind": "adapter", "base": "micro:small",
     "status": "evaluating", "step": 60, "total": 60, "loss": 1.912, "tokens_per_s": 2950.0, "eta_s": None,
     "pid": 4243, "error": None},
    {"run_id": "konspekt-s0-0a0b0c", "corpus": "конспект-лекций-по-теории-вероятностей.pdf", "kind": "adapter",
     "base": "micro:small", "status": "queued", "step": None, "total": None, "loss": None, "tokens_per_s": None,
     "eta_s": None, "pid": None, "error": None},
    {"run_id": "broken-s0-9f8e7d", "corpus": "broken.pdf", "kind": "adapter", "base": "micro:small",
     "status": "failed", "step": None, "total": None, "loss": None, "tokens_per_s": None, "eta_s": None,
     "pid": None, "error": "broken.pdf cannot be read (PDF has no text layer); OCR it first"},
]


def _training():
    async def before(pilot):
        await loaded(pilot)
        app = pilot.app
        app.query_one(DevicePanel).show(HOST, {})
        app.link = None  # the picture holds still: no reply of the service replaces these rows
        queue = app.queue_table
        queue.set_jobs([dict(j) for j in QUEUE])
        queue.on_progress({"type": "eval_progress", "run_id": "logic-md-s0-d4e5f6", "done": 12, "total": 40,
                           "eta_s": 20.0})
        app._update_queue_title()
        await pilot.pause()

    return before


def test_dashboard_during_training_80x24(snap_compare, finished):
    assert snap_compare(dashboard(finished), terminal_size=(80, 24), run_before=_training())


def test_dashboard_during_training_120x36(snap_compare, finished):
    assert snap_compare(dashboard(finished), terminal_size=(120, 36), run_before=_training())


def test_picker_goes_up_by_a_typed_path_and_asks_before_queueing(snap_compare, finished):
    async def before(pilot):
        await loaded(pilot)
        app = pilot.app
        app.query_one(DevicePanel).show(HOST, {})
        await pilot.press("a")
        picker = app.screen
        tree = picker.query_one("#tree")
        await ready(pilot, lambda: tree.root.children)
        await pilot.press("ctrl+l")
        picker.query_one("#path").value = ""
        await pilot.press(*str(finished.corpora.parent), "enter")  # the parent folder, typed
        await ready(pilot, lambda: str(tree.path) == str(finished.corpora.parent) and tree.root.children)
        await pilot.press("c")  # type-to-jump: corpora
        await pilot.press("enter")  # a folder opens
        await ready(pilot, lambda: tree.cursor_node.children)
        await pilot.press("down", "space", "down", "space")
        await ready(pilot, lambda: len(picker.info) == 2)
        picker.query_one("#seeds").value = "3"
        await pilot.pause()
        picker.query_one("#path").value = "~/texts"
        await pilot.press("ctrl+s")
        await ready(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.pause()

    assert snap_compare(dashboard(finished), terminal_size=(100, 30), run_before=before)


def test_cancel_asks_first(snap_compare, finished):
    async def before(pilot):
        await _training()(pilot)
        app = pilot.app
        app.link = object()  # connected, as far as the question goes (nothing is sent before a yes)
        app.queue_table.focus()
        app.queue_table.move_cursor(row=0)
        await pilot.press("c")
        await ready(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.pause()

    assert snap_compare(dashboard(finished), terminal_size=(80, 24), run_before=before)


def test_compare_a_run_with_its_baseline(snap_compare, finished):
    async def before(pilot):
        await loaded(pilot)
        app = pilot.app
        select_logic(app)
        await pilot.press("v")
        await ready(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.details)
        await ready(pilot, lambda: app.screen.query_one("#compare-scores").row_count)
        await pilot.pause()

    assert snap_compare(dashboard(finished), terminal_size=(120, 36), run_before=before)


def select_logic(app) -> None:
    """The cursor on the logic.txt run of the results."""
    table = app.query_one(ResultsTable)
    logic = next(k for k, r in table.rows_by_id.items() if r.get("corpus") == "logic.txt")
    table.move_cursor(row=table.get_row_index(logic))


def _open_logic(tab: str):
    async def before(pilot):
        await loaded(pilot)
        app = pilot.app
        select_logic(app)
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
