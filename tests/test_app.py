"""The dashboard driven by Textual's pilot: a real workspace, a real job service, real workers.

Waiting is for real processes (a worker finishing a run, the service answering), done by
letting the app process its messages until a condition holds, never by sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from backend.core.devices import DeviceMonitor
from backend.core.workspace import Workspace
from ltm_tui.app import LtmApp
from ltm_tui.screens import CompareScreen, ConfirmScreen, HelpScreen, LogScreen, PickerScreen, RunScreen
from ltm_tui.widgets import QueueTable, ResultsTable, job_holders
from tests.conftest import LOGIC_TEXT, WAIT, cli, stop_service, write_tiny_battery


async def until(pilot, condition, timeout: float = WAIT, what: str = "condition"):
    """Let the app run (its workers, the service's events) until `condition()` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def run(coro):
    return asyncio.run(coro)


def results_json(ws: Path, *extra: str) -> list[dict]:
    out = cli("results", "--format", "json", "--workspace", str(ws), *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


async def open_picker(app: LtmApp, pilot):
    """Once the service answers, `a`: the picker and its tree, with the folder's files listed."""
    await until(pilot, lambda: app.link is not None, what="the service")
    await pilot.press("a")
    picker = await until(pilot, lambda: isinstance(app.screen, PickerScreen) and app.screen, what="picker")
    tree = picker.query_one("#tree")
    await until(pilot, lambda: tree.root.children, what="the folder's files")
    return picker, tree


def names(app: LtmApp) -> list[str]:
    table = app.query_one(ResultsTable)
    return [table.rows_by_id[k].get("corpus") or "(baseline)" for k in table.displayed()]


# --- results ---------------------------------------------------------------------------------


def test_a_kept_sort_the_service_does_not_know_falls_back_to_overall(finished, tmp_path):
    """A hand-edited dashboard.json (or a measure no run has any more) must not leave the table
    empty: the dashboard says so, sorts by overall, and keeps that for the next time."""
    import shutil

    stop_service(finished.ws)  # a copy of the database is taken while nothing writes it
    ws = tmp_path / "ws"
    shutil.copytree(finished.ws, ws, ignore=shutil.ignore_patterns("service.*"))
    (ws / "dashboard.json").write_text(json.dumps({"sort": "bogus", "descending": False, "filter": "",
                                                   "intervals": False}))

    async def scenario():
        app = LtmApp(str(ws), poll_seconds=0)
        async with app.run_test(size=(120, 30)) as pilot:
            table = app.query_one(ResultsTable)
            await until(pilot, lambda: table.row_count == 3, what="the rows, sorted by overall")
            assert (table.sort_key, table.descending) == ("overall", True)
        stop_service(ws)

    run(scenario())
    assert json.loads((ws / "dashboard.json").read_text())["sort"] == "overall"


def test_results_sort_by_key_and_header_with_the_baseline_pinned(finished):
    sql_order = [r["corpus"] for r in results_json(finished.ws, "--sort", "perplexity", "--asc")]

    async def scenario():
        app = LtmApp(str(finished.ws), poll_seconds=0)
        async with app.run_test(size=(120, 30)) as pilot:
            table = app.query_one(ResultsTable)
            await until(pilot, lambda: table.row_count == 3, what="three rows")
            assert names(app)[0] == "(baseline)"
            by_overall = sorted((r for r in table.rows_by_id.values() if r["kind"] != "baseline"),
                                key=lambda r: -r["overall"])
            assert names(app)[1:] == [r["corpus"] for r in by_overall]
            await pilot.press("d")  # ascending: the baseline stays on top
            assert names(app)[0] == "(baseline)" and names(app)[1:] == [r["corpus"] for r in by_overall][::-1]
            assert table.border_title.endswith("sorted by overall low→high")
            # a click on a header sorts by it; a second click reverses
            column = table.ordered_columns[table.column_keys.index("perplexity")]
            table.post_message(ResultsTable.HeaderSelected(table, column.key, table.column_keys.index("perplexity"), column.label))
            await pilot.pause()
            assert (table.sort_key, table.descending) == ("perplexity", False)  # lower is better
            assert table.border_title.endswith("sorted by ppl low→high")  # one arrow, one meaning
            adapters = [n for n in sql_order if n is not None]
            assert names(app) == ["(baseline)", *adapters]
            table.post_message(ResultsTable.HeaderSelected(table, column.key, table.column_keys.index("perplexity"), column.label))
            await pilot.pause()
            assert names(app) == ["(baseline)", *adapters[::-1]]
            await pilot.press("O")  # Shift+letter: the column whose name starts with it
            assert (table.sort_key, table.descending) == ("overall", True)
            await pilot.press("P")
            assert table.sort_key == "perplexity"
            following = table.column_keys[table.column_keys.index("perplexity") + 1]
            await pilot.press("s")  # the next column
            assert table.sort_key == following
            await pilot.press("i", "slash", *"logic", "enter")
            return following

    following = run(scenario())

    async def reopened():  # the view is kept in the workspace: the next dashboard shows it so
        app = LtmApp(str(finished.ws), poll_seconds=0)
        async with app.run_test(size=(120, 30)) as pilot:
            table = app.query_one(ResultsTable)
            await until(pilot, lambda: table.row_count == 2, what="the filtered rows")
            assert (table.sort_key, table.show_intervals, table.filter_text) == (following, True, "logic")
            assert names(app) == ["(baseline)", "logic.txt"]  # the baseline of the run it finds stays
            await pilot.press("escape")  # Esc clears the filter from the table too
            assert table.row_count == 3 and not app.filter_box.value

    run(reopened())


def test_results_filter_export_and_delta(finished, tmp_path):
    async def scenario():
        app = LtmApp(str(finished.ws), poll_seconds=0)
        async with app.run_test(size=(100, 30)) as pilot:
            table = app.query_one(ResultsTable)
            await until(pilot, lambda: table.row_count == 3, what="rows")
            base = next(r for r in table.rows_by_id.values() if r["kind"] == "baseline")
            logic = next(r for r in table.rows_by_id.values() if r.get("corpus") == "logic.txt")
            delta = table.get_row(logic["run_id"])[table.column_keys.index("delta")]
            assert delta.text == f"{logic['overall'] - base['overall']:+.3f}"

            # the probes' summary: how far training moved the weights (the baseline has none)
            moved = table.get_row(logic["run_id"])[table.column_keys.index("weight_change")]
            assert logic["weight_change"] > 0 and moved.text == f"{logic['weight_change']:.2f}"
            depth = table.column_keys.index("reasoning_depth")
            assert "±" not in table.get_row(logic["run_id"])[depth].text
            await pilot.press("i")  # intervals on: the bootstrap half-width beside each score
            lo, hi = logic["intervals"]["reasoning_depth"]
            assert table.get_row(logic["run_id"])[depth].text.endswith(f"±{(hi - lo) / 2:.2f}")
            await pilot.press("i")
            assert "±" not in table.get_row(logic["run_id"])[depth].text

            await pilot.press("slash")
            await pilot.press(*"logic")
            assert names(app) == ["(baseline)", "logic.txt"]  # the run it finds and its baseline
            assert "1 of 2 runs" in table.border_title
            await pilot.press("escape")
            assert table.row_count == 3 and not app.query_one("#filter-bar").display

            out = tmp_path / "exported.csv"
            await pilot.press("e")
            await until(pilot, lambda: app.screen.query("#export-path"), what="the export box")
            box = app.screen.query_one("#export-path")
            box.value = str(out)
            await pilot.press("enter")
            await until(pilot, out.exists, what="the CSV")
        lines = out.read_text(encoding="utf-8").splitlines()
        assert len(lines) == 4 and "overall" in lines[0]

    run(scenario())


def test_open_a_run_curve_scenes_settings_and_probes(finished):
    async def scenario():
        app = LtmApp(str(finished.ws), poll_seconds=0)
        async with app.run_test(size=(100, 30)) as pilot:
            table = app.query_one(ResultsTable)
            await until(pilot, lambda: table.row_count == 3, what="rows")
            logic = next(k for k, r in table.rows_by_id.items() if r.get("corpus") == "logic.txt")
            table.move_cursor(row=table.get_row_index(logic))
            await pilot.press("enter")
            screen = await until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen, what="the run")
            await until(pilot, lambda: screen.detail is not None, what="the run's detail")
            assert "logic.txt" in _plain(screen.query_one("#run-title"))
            assert screen.detail["curve"], "a trained run has a loss curve"
            await pilot.press("2")
            scenes = screen.query_one("#scene-table")
            ids = {scenes.get_row_at(i)[1] for i in range(scenes.row_count)}
            assert {"d1", "d2", "g1", "p1"} <= ids
            assert scenes.get_row_at(0)[1] in _plain(screen.query_one("#scene-detail"))
            detail = screen.query_one("#scene-detail")
            scenes.move_cursor(row=scenes.get_row_index("depth/d1"))
            await pilot.pause()
            shown = _plain(detail)  # the question and every choice as asked, the answer marked
            assert "All glims are blorps. All blorps are zents. So all glims are" in shown
            assert "zents." in shown and "lamps." in shown and "(answer)" in shown
            scenes.move_cursor(row=scenes.get_row_index(next(k for k in screen.scenes if k.endswith("/g1"))))
            await pilot.pause()
            assert "max_words 8" in _plain(detail)  # a check says what it wanted
            await pilot.press("3")
            await pilot.pause()
            # the Settings tab takes the screen below the tabs, not the picker's 9 lines
            assert screen.query_one("#settings-text").parent.size.height > 20
            settings = _plain(screen.query_one("#settings-text"))
            assert "base.preset" in settings and "tiny" in settings and "train.max_steps" in settings
            await pilot.press("4")
            probes = _plain(screen.query_one("#probes-text"))
            assert "summary" in probes or "No probes" in probes
            await pilot.press("escape")
            assert not isinstance(app.screen, RunScreen)
            assert table.selected_run() == logic  # back where we were

    run(scenario())


def test_compare_a_run_with_its_baseline_or_a_marked_run(finished):
    async def scenario():
        app = LtmApp(str(finished.ws), poll_seconds=0)
        async with app.run_test(size=(120, 36)) as pilot:
            table = app.query_one(ResultsTable)
            await until(pilot, lambda: table.row_count == 3, what="rows")
            rows = table.rows_by_id
            base = next(k for k, r in rows.items() if r["kind"] == "baseline")
            logic = next(k for k, r in rows.items() if r.get("corpus") == "logic.txt")
            story = next(k for k, r in rows.items() if r.get("corpus") == "story.txt")
            table.move_cursor(row=table.get_row_index(logic))
            await pilot.press("v")  # nothing marked: against its baseline
            screen = await until(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen, what="compare")
            scores = screen.query_one("#compare-scores")
            await until(pilot, lambda: scores.row_count, what="the scores")
            assert (screen.run_a, screen.run_b) == (base, logic)
            diff = scores.get_row("overall")[3]
            assert str(diff) == f"{rows[logic]['overall'] - rows[base]['overall']:+.3f}"
            said = str(screen.query_one("#compare-scenes").render())
            out = cli("compare", base, logic, "--format", "json", "--workspace", str(finished.ws))
            flips = json.loads(out.stdout)  # what `ltm-tui compare` says of the same two runs
            assert said.startswith(f"{flips['shared']} scenes in both")
            assert f"wrong → right {len(flips['wrong_to_right'])} · right → wrong {len(flips['right_to_wrong'])}" in said
            await pilot.press("escape")
            table.move_cursor(row=table.get_row_index(story))
            await pilot.press("m")  # story is A of the next comparison
            table.move_cursor(row=table.get_row_index(logic))
            await pilot.press("v")
            screen = await until(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen, what="compare")
            assert (screen.run_a, screen.run_b) == (story, logic)

    run(scenario())


def test_help_lists_every_binding_and_the_palette_offers_the_actions(finished):
    async def scenario():
        app = LtmApp(str(finished.ws), poll_seconds=0)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("question_mark")
            help_screen = await until(pilot, lambda: isinstance(app.screen, HelpScreen) and app.screen, what="help")
            described = {b.tooltip or b.description for _, bindings in help_screen.sections for b in bindings}
            for cls in (LtmApp, QueueTable, ResultsTable, PickerScreen, RunScreen):
                for b in cls.BINDINGS:
                    assert (b.tooltip or b.description) in described
            await pilot.press("escape")
            titles = [c.title for c in app.get_system_commands(app.screen)]
            for wanted in ("Add corpora", "Export results to CSV", "Cancel the selected job", "Retry the selected job",
                           "Open the selected run", "Filter results"):
                assert wanted in titles

    run(scenario())


# --- queueing, live progress, cancel and retry ------------------------------------------------


@pytest.mark.slow
def test_queue_from_the_picker_and_watch_it_finish(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "logic.txt").write_text(LOGIC_TEXT, encoding="utf-8")
    (folder / "notes.bin").write_bytes(b"\x00\x01")  # not a corpus: the picker hides it
    battery = write_tiny_battery(tmp_path / "battery")
    ws = tmp_path / "ws"
    defaults = {"preset": "tiny", "steps": 40, "min_train_tokens": 0, "scenes": str(battery)}

    async def scenario():
        app = LtmApp(str(ws), poll_seconds=0, defaults=defaults, picker_root=str(folder))
        async with app.run_test(size=(100, 30)) as pilot:
            picker, tree = await open_picker(app, pilot)
            assert [c.data.path.name for c in tree.root.children] == ["logic.txt"]
            await pilot.press("down", "space")
            await until(pilot, lambda: picker.info, what="the preview")
            preview = picker.query_one("#marked")
            row = preview.get_row(str(folder / "logic.txt"))
            assert row[2] == f"{len(LOGIC_TEXT.encode()) + 2:,}"  # micro reads bytes, plus BOS and EOS
            await pilot.press("ctrl+s")  # the batch's total first, and a question
            ask = await until(pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen, what="the question")
            assert ask.question == "Queue 1 run?"
            assert str(ask.detail).startswith("1 run (1 file × 1 seed)")
            await pilot.press("enter")
            await until(pilot, lambda: not isinstance(app.screen, (PickerScreen, ConfirmScreen)),
                        what="the picker to close")
            queue = app.query_one(QueueTable)
            await until(pilot, lambda: any(j.get("corpus") == "logic.txt" for j in queue.jobs.values()),
                        what="the job in the queue")
            table = app.query_one(ResultsTable)
            baseline = await until(pilot, lambda: next((k for k, r in table.rows_by_id.items()
                                                        if r["kind"] == "baseline"), None), what="baseline row")
            table.move_cursor(row=table.get_row_index(baseline))
            await pilot.press("question_mark")  # the runs finish while another screen is on top
            await until(pilot, lambda: all(r["status"] == "done" for r in table.rows_by_id.values())
                        and len(table.rows_by_id) == 2, what="both runs done")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            # the rows changed in place: the cursor is still on the baseline, the sort unchanged
            assert table.selected_run() == baseline and table.sort_key == "overall"
            logic = next(r for r in table.rows_by_id.values() if r.get("corpus") == "logic.txt")
            assert logic["scores"] and logic["overall"] is not None
            cells = queue.get_row(logic["run_id"])
            assert cells[1].text == "done"

    run(scenario())
    rows = results_json(ws)
    assert {r["status"] for r in rows} == {"done"} and len(rows) == 2


def test_the_picker_goes_to_any_folder_jumps_by_name_and_keeps_its_marks(tmp_path):
    """Up to the parent with Backspace, anywhere by typing a path, to a name by typing its first
    letters; Esc and reopening keep the folder and the marks; QLoRA on micro is refused with the fix."""
    home = tmp_path / "home" / "me"
    home.mkdir(parents=True)
    (home / "draft.md").write_text("# draft\n" + LOGIC_TEXT, encoding="utf-8")
    docs = tmp_path / "usr" / "share" / "doc" / "bash"
    docs.mkdir(parents=True)
    for name in ("COPYING", "INTRO", "NEWS", "README"):  # plain text without suffixes
        (docs / name).write_text(LOGIC_TEXT, encoding="utf-8")
    (docs / "bash.core").write_bytes(bytes(range(256)))

    async def scenario():
        app = LtmApp(str(tmp_path / "ws"), poll_seconds=0, picker_root=str(home))
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("a")
            picker = await until(pilot, lambda: isinstance(app.screen, PickerScreen) and app.screen, what="picker")
            tree = picker.query_one("#tree")
            await until(pilot, lambda: tree.root.children, what="the folder's files")
            await pilot.press("backspace")  # the parent folder
            await until(pilot, lambda: Path(tree.path) == home.parent and tree.root.children, what="the parent")
            assert [c.data.path.name for c in tree.root.children] == ["me"]
            await pilot.press("ctrl+l")
            picker.query_one("#path").value = ""
            await pilot.press(*str(docs), "enter")  # typed, as over SSH
            await until(pilot, lambda: Path(tree.path) == docs and len(tree.root.children) == 4, what="the docs")
            await pilot.press("r", "e")  # type-to-jump: README
            assert tree.cursor_node.data.path.name == "README"
            await pilot.press("space")
            await pilot.press("n")  # one letter: the next name with it
            assert tree.cursor_node.data.path.name == "NEWS"
            await pilot.press("space", "escape")
            assert not isinstance(app.screen, PickerScreen)
            await pilot.press("a")  # the same picker: its folder and marks as they were
            assert app.screen is picker and Path(tree.path) == docs
            assert [p.name for p in picker.marked] == ["README", "NEWS"]
            await until(pilot, lambda: len(picker.info) == 2, what="the previews")
            assert all("error" not in i for i in picker.info.values())
            picker.query_one("#method").value = "qlora"
            await pilot.pause()
            hint = str(picker.query_one("#picker-hint").render())
            assert "4-bit" in hint and "micro" in hint
            await pilot.press("ctrl+s")
            await pilot.pause()
            assert not isinstance(app.screen, ConfirmScreen)  # refused before the question

    run(scenario())


def test_enter_on_a_file_asks_once_the_file_is_read(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "logic.txt").write_text(LOGIC_TEXT * 200, encoding="utf-8")

    async def scenario():
        app = LtmApp(str(tmp_path / "ws"), poll_seconds=0, defaults={"preset": "tiny"}, picker_root=str(folder))
        async with app.run_test(size=(100, 30)) as pilot:
            picker, tree = await open_picker(app, pilot)
            await pilot.press("down", "enter")  # nothing marked: Enter marks this file and queues it
            ask = await until(pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen, what="the question")
            assert folder / "logic.txt" in picker.info  # read before the question was put
            assert ask.question == "Queue 1 run?" and "reading" not in str(ask.detail)
            await pilot.press("n")

    run(scenario())


def test_an_attribution_study_and_a_search_start_from_the_picker(tmp_path):
    """Ctrl-T over two marked files starts an attribution study, Ctrl-O a search with a space
    file: both in the service, as `ltm-tui attribute` and `ltm-tui search` start them."""
    from backend.jobs.client import connect

    folder = tmp_path / "texts"
    folder.mkdir()
    for name in ("logic.txt", "story.txt"):
        (folder / name).write_text(LOGIC_TEXT, encoding="utf-8")
    battery = write_tiny_battery(tmp_path / "battery")
    space = tmp_path / "space.yaml"
    space.write_text("study: lr-pick\nobjective: overall\nparams:\n  lr: {choices: [0.001, 0.01]}\n",
                     encoding="utf-8")
    ws = tmp_path / "ws"
    defaults = {"preset": "tiny", "steps": 4, "min_train_tokens": 0, "scenes": str(battery)}

    async def scenario():
        app = LtmApp(str(ws), poll_seconds=0, defaults=defaults, picker_root=str(folder))
        async with app.run_test(size=(100, 30)) as pilot:
            picker, tree = await open_picker(app, pilot)
            await pilot.press("down", "space")
            await pilot.press("ctrl+t")  # one file: not a study
            assert "2 or more" in str(picker.query_one("#picker-hint").render())
            await pilot.press("down", "space")
            await until(pilot, lambda: len(picker.info) == 2, what="the previews")
            await pilot.press("ctrl+t")
            ask = await until(pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen, what="question")
            assert ask.question == "Start an attribution study over 2 files?"
            await pilot.press("y")
            with connect(Workspace(ws)) as client:
                studies = await until(pilot, lambda: client.call("attribution"), what="the study")
            assert set(studies[0]["files"]) == {"logic.txt", "story.txt"}
            await pilot.press("a")  # the picker keeps its marks
            await until(pilot, lambda: isinstance(app.screen, PickerScreen), what="picker")
            await pilot.press("ctrl+o")
            await until(pilot, lambda: app.screen.query("#search-space"), what="the search's fields")
            await pilot.press(*str(space), "enter")
            with connect(Workspace(ws)) as client:
                found = await until(pilot, lambda: client.call("search")["studies"], what="the search")
            assert found[0]["study"] == "lr-pick" and found[0]["target_trials"] == 8

    run(scenario())
    stop_service(ws)


@pytest.mark.slow
def test_cancel_and_retry_from_the_queue_and_the_log(tmp_path):
    from dataclasses import asdict

    from backend.jobs.client import connect

    (tmp_path / "long.txt").write_text(LOGIC_TEXT, encoding="utf-8")
    battery = write_tiny_battery(tmp_path / "battery")
    ws = tmp_path / "ws"

    async def scenario():
        app = LtmApp(str(ws), poll_seconds=0)
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: app.link is not None, what="the service")
            from backend.core.config import MICRO_DEFAULTS
            from backend.jobs.settings import JobSettings

            train = {**MICRO_DEFAULTS.to_dict(), "min_train_tokens": 10**9}  # hours of training: it must be cancelled
            train.pop("seed", None)
            settings = JobSettings(base={"base": "micro", "preset": "tiny"}, scenes=str(battery), train=train)
            with connect(Workspace(ws)) as client:
                sub = client.call("submit", paths=[str(tmp_path / "long.txt")], settings=asdict(settings), seeds=[0])
            run_id = sub["run_ids"][0]
            queue = app.query_one(QueueTable)
            await until(pilot, lambda: queue.jobs.get(run_id, {}).get("status") == "training",
                        what="training")
            await until(pilot, lambda: queue.jobs[run_id].get("step"), what="a progress event")
            queue.focus()
            queue.move_cursor(row=queue.get_row_index(run_id))
            await pilot.press("l")
            log = await until(pilot, lambda: isinstance(app.screen, LogScreen) and app.screen, what="the log")
            await until(pilot, lambda: log.shown, what="log lines")
            await pilot.press("escape")
            await pilot.press("c")  # asks first; n keeps the job
            ask = await until(pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen, what="the question")
            assert ask.question.startswith("Cancel long.txt (training at step ")
            await pilot.press("n")
            await pilot.pause(0.5)
            assert queue.jobs[run_id]["status"] == "training"
            await pilot.press("c", "y")
            await until(pilot, lambda: queue.jobs[run_id]["status"] == "cancelled", what="cancelled")
            await pilot.press("t")
            await until(pilot, lambda: queue.jobs[run_id]["status"] in ("queued", "starting", "training"), what="queued again")
            await pilot.press("c", "enter")
            await until(pilot, lambda: queue.jobs[run_id]["status"] == "cancelled", what="cancelled again")

    run(scenario())


# --- devices ------------------------------------------------------------------------------------


def test_nvml_readings_per_device_with_failures_as_na(fake_nvml):
    monitor = DeviceMonitor()
    monitor.read()
    second = monitor.read()
    assert fake_nvml.inits == 1  # initialised once
    assert second.source == "nvml" and len(second.devices) == 2
    gpu0, gpu1 = second.devices
    assert gpu0.name.endswith("Blackwell") and gpu1.name == "NVIDIA H200"
    assert gpu0.memory_share == pytest.approx(40 / 96) and gpu0.utilization == 87
    assert gpu0.processes == {4242: 30 * 2**30}
    assert gpu1.temperature is None  # a failed reading is n/a, not a crash
    assert len(monitor.history[0]) == 2


def test_device_panel_with_nvml_maps_memory_to_runs(fake_nvml, finished):
    jobs = [{"run_id": "r1", "pid": 4242, "status": "training", "corpus": "book.pdf", "base": "micro"},
            {"run_id": "r2", "pid": 4242, "status": "done", "corpus": "old.pdf", "base": "micro"},
            {"run_id": "r3", "pid": None, "status": "queued", "corpus": "next.pdf", "base": "micro"}]
    assert job_holders(jobs) == {4242: "book.pdf"}

    async def scenario():
        app = LtmApp(str(finished.ws), monitor=DeviceMonitor(), poll_seconds=0.2)
        async with app.run_test(size=(100, 30)) as pilot:
            panel = app.query_one("#devices")
            await until(pilot, lambda: panel.snapshot is not None, what="a reading")
            assert "pid 4242 30.0 GiB" in _plain(panel)  # no job of this workspace holds it
            panel.show(panel.snapshot, job_holders(jobs))
            shown = _plain(panel)
            assert "book.pdf 30.0 GiB" in shown
            assert "40.0/96.0 GiB" in shown and "util 87%" in shown and "61°C" in shown
            assert "n/a" in shown  # the H200's temperature reading failed

    run(scenario())


def test_device_panel_without_nvml_shows_this_machine(finished, monkeypatch):
    # NVML made absent (an import that fails, as without nvidia-ml-py), so the host's real CPU
    # and RAM are read on any machine, a GPU box included
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monitor = DeviceMonitor()
    snap = monitor.read()
    host = snap.devices[0]
    assert snap.source == "psutil" and "showing CPU and RAM" in snap.note
    assert host.kind == "host" and host.memory_total > 0 and host.name.startswith("host")

    async def scenario():
        app = LtmApp(str(finished.ws), poll_seconds=0.2)
        async with app.run_test(size=(80, 24)) as pilot:
            panel = app.query_one("#devices")
            await until(pilot, lambda: panel.snapshot is not None, what="a reading")
            shown = _plain(panel)
            assert "RAM" in shown and "GiB" in shown and "showing CPU and RAM" in shown
            assert shown.count("RAM") == 2  # the numbers and the note, never the same word twice in a row

    run(scenario())


def _plain(widget) -> str:
    import io

    from rich.console import Console

    console = Console(width=widget.size.width or 100, record=True, file=io.StringIO())
    console.print(widget.content)  # what the Static was given: a Rich renderable or text
    return console.export_text()


def test_an_empty_workspace_says_what_to_do(tmp_path):
    async def scenario():
        app = LtmApp(str(tmp_path / "empty"), poll_seconds=0)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: "press a" in _plain(app.query_one("#hint")), what="the hint")

    run(scenario())


def test_a_screenshot_goes_to_the_workspace_and_says_where(tmp_path, monkeypatch):
    """The palette's screenshot on a box without ~/Downloads: an SVG in WORKSPACE/screenshots/,
    and a notice naming the file; a folder it cannot write says so, naming the folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "no-home"))  # no Downloads folder here

    async def scenario():
        app = LtmApp(str(tmp_path / "ws"), poll_seconds=0)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: "press a" in _plain(app.query_one("#hint")), what="the hint")
            notices: list[str] = []
            shown = app.notify
            app.notify = lambda message, **kw: (notices.append(message), shown(message, **kw))[1]
            app.action_screenshot()
            await pilot.pause()
            [svg] = list((tmp_path / "ws" / "screenshots").glob("*.svg"))
            assert svg.read_text(encoding="utf-8").lstrip().startswith("<svg")
            assert notices == [f"saved {svg}"]
            blocked = tmp_path / "file-not-folder"
            blocked.write_text("x")
            app.action_screenshot(path=str(blocked))
            await pilot.pause()
            assert notices[-1].startswith(f"cannot save a screenshot to {blocked}")

    run(scenario())
