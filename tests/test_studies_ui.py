"""The dashboard's study screens on a real workspace: an attribution study and a search made by
the real `ltm-tui attribute` and `ltm-tui search` (micro `tiny`, a few steps, the tiny battery),
read through the real service."""

from __future__ import annotations

import asyncio
import json
import textwrap
import types

import pytest

from ltm_tui.app import LtmApp
from ltm_tui.screens import HelpScreen, RunScreen
from ltm_tui.studies import AttributionScreen, SearchScreen, SortTable
from tests.conftest import TINY_RUN, cli, stop_service, write_corpora
from tests.test_app import until

# Its module-scoped fixture is built once: the file's tests run in one process (`-n auto`
# with `--dist loadgroup`, pyproject.toml).
pytestmark = pytest.mark.xdist_group("studies_ui")


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    corpora, battery = write_corpora(root)
    ws = root / "ws"
    common = ["--scenes", str(battery), "--workspace", str(ws), *TINY_RUN]
    done = cli("attribute", str(corpora / "logic.txt"), str(corpora / "story.txt"), "--subsets", "2",
               "--format", "json", *common, timeout=900)
    assert done.returncode == 0, done.stderr
    attribution = json.loads(done.stdout)
    space = root / "space.yaml"
    space.write_text(textwrap.dedent("""\
        study: lr-sweep
        objective: overall
        params:
          lr: {choices: [0.001, 0.01]}
        """), encoding="utf-8")
    done = cli("search", "--space", str(space), "--trials", "2", "--sampler", "grid", str(corpora / "logic.txt"),
               "--format", "json", *common, timeout=900)
    assert done.returncode == 0, done.stderr
    search = json.loads(done.stdout)
    yield types.SimpleNamespace(ws=ws, attribution=attribution, search=search)
    stop_service(ws)


async def open_screen(app, pilot, key: str, kind: type):
    """Wait for the service, press the screen's key, and return the screen once it shows."""
    await until(pilot, lambda: app.link is not None, what="the service")
    await pilot.press(key)
    return await until(pilot, lambda: isinstance(app.screen, kind) and app.screen, what=kind.__name__)


@pytest.mark.slow  # the module's study: an attribution and a search, trained
def test_attribution_screen_shows_each_file_with_intervals_and_sorts(studies):
    rows = {(r["corpus"], r["measure"]): r for r in studies.attribution}

    async def scenario():
        app = LtmApp(str(studies.ws), poll_seconds=0)
        async with app.run_test(size=(120, 30)) as pilot:
            screen = await open_screen(app, pilot, "f", AttributionScreen)
            grid = screen.query_one(SortTable)
            await until(pilot, lambda: grid.row_count == 2, what="two files")
            shown = {key.value: grid.get_row(key) for key in grid.rows}
            for name in ("logic.txt", "story.txt"):
                overall = rows[(name, "overall")]
                cell = shown[name][[c.key.value for c in grid.ordered_columns].index("overall")]
                assert cell.value == overall["contribution"]
                assert f"{overall['contribution']:+.3f}" in cell.text
                assert f"[{overall['ci_low']:+.3f}, {overall['ci_high']:+.3f}]" in cell.text
                value, lo, hi = (float(x) for x in cell.text.replace("[", " ").replace("]", " ").replace(",", " ").split())
                assert lo <= value <= hi  # as printed, never outside its own interval
            # sorted by overall contribution, best first; `d` reverses, `s` moves on
            by_overall = sorted(("logic.txt", "story.txt"), key=lambda n: -rows[(n, "overall")]["contribution"])
            order = lambda: [grid.coordinate_to_cell_key((i, 0)).row_key.value for i in range(grid.row_count)]  # noqa: E731
            assert order() == by_overall
            grid.focus()
            await pilot.press("d")
            assert order() == by_overall[::-1]
            await pilot.press("m")  # the detail measure moves on: the standalone column follows it
            assert screen.measure != "overall"
            summary = str(screen.query_one("#study-summary").render())
            assert "2 files" in summary and screen.measure in summary
            await pilot.press("escape")
            assert not isinstance(app.screen, AttributionScreen)

    asyncio.run(scenario())


@pytest.mark.slow  # the module's study: an attribution and a search, trained
def test_search_screen_lists_trials_best_first_and_opens_a_run(studies):
    trials = {t["number"]: t for t in studies.search["trials"]}
    best = studies.search["best"]

    async def scenario():
        app = LtmApp(str(studies.ws), poll_seconds=0)
        async with app.run_test(size=(120, 34)) as pilot:
            screen = await open_screen(app, pilot, "o", SearchScreen)
            grid = screen.query_one("#trials", SortTable)
            await until(pilot, lambda: grid.row_count == 2, what="two trials")
            keys = [c.key.value for c in grid.ordered_columns]
            assert "p:lr" in keys
            for number, t in trials.items():
                row = grid.get_row(str(number))
                assert row[keys.index("value")].value == t["value"]
                assert row[keys.index("p:lr")].value == t["params"]["lr"]
            summary = str(screen.query_one("#study-summary").render())
            assert screen.query_one("#study").value == "lr-sweep"  # the chooser shows the study
            assert f"trial {best['number']}" in summary
            # sort by score, best first, then open the best trial's run
            grid.focus()
            grid.sort_by("value", descending=True)
            grid.move_cursor(row=0)
            await pilot.pause()
            assert grid.selected_run() == str(max(trials.values(), key=lambda t: t["value"])["number"])
            await pilot.press("enter")
            run_screen = await until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen, what="run")
            assert run_screen.run_id == trials[int(grid.selected_run())]["run_id"]
            await pilot.press("escape")
            await until(pilot, lambda: isinstance(app.screen, SearchScreen), what="back")

    asyncio.run(scenario())


def test_empty_workspace_study_screens_say_how_to_start(tmp_path):
    async def scenario():
        app = LtmApp(str(tmp_path / "ws"), poll_seconds=0)
        async with app.run_test(size=(100, 30)) as pilot:
            for key, screen_type, says in (("f", AttributionScreen, "ltm-tui attribute"),
                                            ("o", SearchScreen, "ltm-tui search")):
                screen = await open_screen(app, pilot, key, screen_type)
                await until(pilot, lambda: says in str(screen.query_one("#study-summary").render()), what=says)
                await pilot.press("escape")
            await pilot.press("question_mark")
            help_screen = await until(pilot, lambda: isinstance(app.screen, HelpScreen) and app.screen, what="help")
            titles = [title for title, _ in help_screen.sections]
            assert "Attribution" in titles and "Search" in titles
        stop_service(tmp_path / "ws")

    asyncio.run(scenario())


@pytest.mark.slow  # the module's study: an attribution and a search, trained
def test_an_unfinished_attribution_study_calls_no_file_helpful_or_harmful(studies):
    """While runs of a study are still to come, its contributions move with each one: the screen
    colours no file green or red and the advice counts what is in so far (issue 18's item 9)."""
    from backend.studies.attribution_study import advice

    async def scenario():
        app = LtmApp(str(studies.ws), poll_seconds=0)
        async with app.run_test(size=(120, 30)) as pilot:
            screen = await open_screen(app, pilot, "f", AttributionScreen)
            grid = screen.query_one(SortTable)
            await until(pilot, lambda: grid.row_count == 2, what="two files")
            table = screen.reply["table"]
            assert table["settled"]  # every run of the module's study has ended
            runs = table["runs"]
            # the same study as it was with one run still training
            unfinished = {**table, "settled": False, "runs": {**runs, "done": runs["done"] - 1, "training": 1}}
            screen.show({**screen.reply, "table": unfinished})
            await pilot.pause()
            styles = {cell.style for key in grid.rows for cell in grid.get_row(key)[3:]}
            assert styles <= {"dim"}
            said = str(screen.query_one("#attribution-advice").render())
            assert said.startswith(f"unfinished: {runs['done'] - 1} of {runs['distinct']} runs done")

    asyncio.run(scenario())
    overall = {"sigma": 0.05}
    line = advice(overall, 5, {"seeds": [0]}, 3, 0.05, unfinished=3)
    assert line.endswith("this study has 5 so far, 3 more to come: wait for them before reading the colours")
    assert advice(overall, 64, {"seeds": [0]}, 3, 0.05).endswith(": enough")


@pytest.mark.slow  # the module's study: an attribution and a search, trained
def test_runs_of_studies_are_named_so_that_none_look_alike(studies):
    """In the results, a search trial's run says its trial, an attribution study's runs say the
    study, and a corpus set says its files; no two runs share a name (issue 18's item 11)."""
    from backend.core.workspace import Workspace
    from backend.jobs.client import connect
    from ltm_tui.widgets import run_label

    with connect(Workspace(studies.ws)) as client:
        rows = client.call("results")
        study = client.call("attribution")[0]["study"]
        trials = client.call("search", study="lr-sweep")["trials"]
    mixed = len({(r["base"], r.get("preset")) for r in rows}) > 1
    names = {r["run_id"]: run_label(r, mixed) for r in rows}
    assert len(set(names.values())) == len(names), sorted(names.values())
    for t in trials:
        assert names[t["run_id"]].endswith(f"#{t['number']}")
    served = [r for r in rows if r.get("attribution") == study and r["kind"] != "baseline"]
    assert served and all(f"study {study[:4]}" in names[r["run_id"]] for r in served)
    assert any(names[r["run_id"]].startswith("all") for r in served)  # the set of every file
