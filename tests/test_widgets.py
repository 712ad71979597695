"""The results table's own machinery, in a headless app with rows shaped as the service sends
them: the order against a plain reference, widths, and what a fresh reply keeps."""

from __future__ import annotations

import asyncio
import contextlib
import random

from textual.app import App

from benchmarks.ui import synthetic_rows
from ltm_tui.widgets import ResultsTable


class Holder(App):
    def compose(self):
        yield ResultsTable(id="results")


@contextlib.asynccontextmanager
async def showing(rows: list[dict], size: tuple[int, int]):
    """A headless app with a results table holding these rows: (table, pilot)."""
    app = Holder()
    async with app.run_test(size=size) as pilot:
        table = app.query_one(ResultsTable)
        table.set_rows(rows)
        await pilot.pause()
        yield table, pilot


def rows_with_gaps(n: int) -> list[dict]:
    """Synthetic rows with missing scores, ties, failed runs, long names and Cyrillic."""
    rows = synthetic_rows(n, seed=3)
    rnd = random.Random(5)
    for i, r in enumerate(rows[4:], 4):
        if i % 7 == 0:
            r["overall"] = None
            r["status"] = "failed"
        if i % 5 == 0:
            r["scores"] = {**r["scores"], "consistency": 0.5}  # ties, broken by run id
        if i % 11 == 0:
            r["scores"] = {k: v for k, v in r["scores"].items() if k != "pressure"}
        if i % 3 == 0:
            r["corpus"] = rnd.choice(["Война и мир.epub", "конспект-лекций.pdf", "notes.md"])
    return rows


def reference_order(rows: list[dict], key: str, descending: bool) -> list[str]:
    """The service's SQL order spelt out: baselines first; then present values by the key in
    the direction asked, ties by run id; then missing values by run id."""
    base = {(r["base"], r.get("seed")): r.get("overall") for r in rows if r["kind"] == "baseline"}

    def value(r):
        if key == "delta":  # Δ base: the run's overall less its baseline's
            ref = base.get((r["base"], r.get("seed")))
            ok = r["kind"] != "baseline" and ref is not None and r.get("overall") is not None
            return r["overall"] - ref if ok else None
        return r.get(key) if key in r and key != "scores" else (r.get("scores") or {}).get(key)

    out = []
    for group in ([r for r in rows if r["kind"] == "baseline"], [r for r in rows if r["kind"] != "baseline"]):
        present = sorted((r for r in group if value(r) is not None), key=lambda r: r["run_id"])
        present.sort(key=value, reverse=descending)
        missing = sorted((r for r in group if value(r) is None), key=lambda r: r["run_id"])
        out += [r["run_id"] for r in present + missing]
    return out


def test_the_order_is_the_services_order_for_every_column_and_direction():
    rows = rows_with_gaps(500)
    random.Random(1).shuffle(rows)

    async def scenario():
        async with showing(rows, (120, 30)) as (table, pilot):
            table.move_cursor(row=40)
            await pilot.pause()
            chosen = table.selected_run()
            for key in ("overall", "consistency", "pressure", "corpus", "tokens", "status"):
                for descending in (True, False):
                    table.sort_by(key, descending)
                    await pilot.pause()
                    assert table.displayed() == reference_order(rows, key, descending), (key, descending)
                    assert table.selected_run() == chosen  # the cursor stays on its run
            table.set_filter("война")
            await pilot.pause()
            shown = table.displayed()
            found = [r for r in rows if "Война" in (r.get("corpus") or "")]
            # the runs it finds, and the baseline each is measured against (same base and seed)
            refs = [r for r in rows if r["kind"] == "baseline" and any(r["seed"] == f["seed"] for f in found)]
            assert found and shown == reference_order(found + refs, "status", False)
            assert table.shown_runs() == (len(found), len(rows) - 4)

    asyncio.run(scenario())


def test_a_wider_value_in_place_widens_its_column():
    rows = rows_with_gaps(40)

    async def scenario():
        async with showing(rows, (240, 30)) as (table, pilot):  # the corpus column: up to a third
            async def shown(run_id: str) -> str:
                """The run's line as the table draws it, the cursor on it (so it is in view)."""
                table.follow(run_id)
                await pilot.pause()
                return table.render_line(table.get_row_index(run_id) - round(table.scroll_y) + 1).text

            # One reply at a time: a longer name lays the table out again, which would hide
            # whether a number alone widens its column.
            fresh = [dict(r) for r in rows]
            fresh[11]["tokens"] = 123_456_789_012
            table.set_rows(fresh)
            assert " 123,456,789,012 " in await shown(fresh[11]["run_id"])
            fresh = [dict(r) for r in fresh]
            long_name = "a-much-longer-corpus-name-than-any-before.epub"
            fresh[10]["corpus"] = long_name
            table.set_rows(fresh)
            assert f" {long_name} · s{fresh[10]['seed']} " in await shown(fresh[10]["run_id"])

    asyncio.run(scenario())


def test_rows_that_arrive_or_leave_and_a_filter_keep_the_order():
    rows = rows_with_gaps(120)

    async def scenario():
        async with showing(rows, (120, 30)) as (table, pilot):
            for key in ("overall", "corpus", "tokens"):
                table.sort_by(key)
                await pilot.pause()
                assert table.displayed() == reference_order(rows, key, table.descending), key
            # rows that leave and arrive between placements (a new reply, a filter)
            fresh = [dict(r) for r in rows[:100]] + [{**rows[5], "run_id": "zz-new", "corpus": "new.md"}]
            table.set_rows(fresh)
            await pilot.pause()
            assert table.displayed() == reference_order(fresh, "tokens", table.descending)
            assert "zz-new" in table.displayed() and rows[110]["run_id"] not in table.displayed()
            table.set_filter("new.md")
            await pilot.pause()
            baseline = next(r["run_id"] for r in rows if r["kind"] == "baseline" and r["seed"] == rows[5]["seed"])
            assert table.displayed() == [baseline, "zz-new"]  # its baseline stays on top

    asyncio.run(scenario())


def test_a_fresh_reply_keeps_the_order_right_whether_or_not_rows_move():
    rows = rows_with_gaps(300)

    async def scenario():
        async with showing(rows, (120, 30)) as (table, pilot):
            table.move_cursor(row=30)
            await pilot.pause()
            chosen = table.selected_run()
            current = rows
            for i, (key, descending) in enumerate((("tokens", True), ("overall", True), ("delta", False))):
                table.sort_by(key, descending)
                await pilot.pause()
                current = [dict(r) for r in current]
                rnd = random.Random(i)
                for r in rnd.sample(current[4:], 10):
                    r["overall"] = rnd.random()  # moves rows sorted by overall or Δ base, not by tokens
                current[0]["overall"] = rnd.random()  # a baseline: every Δ base of its runs changes
                table.set_rows(current)
                await pilot.pause()
                assert table.displayed() == reference_order(current, key, descending), key
                assert table.selected_run() == chosen

    asyncio.run(scenario())


def test_clicks_and_keys_land_on_the_rows_and_headers_drawn_there():
    rows = rows_with_gaps(200)

    async def scenario():
        seen: list = []
        app = Holder()
        async with app.run_test(size=(90, 20), message_hook=seen.append) as pilot:
            table = app.query_one(ResultsTable)
            table.set_rows(rows)
            table.focus()
            await pilot.pause()

            def header_x(label: str) -> int:
                line = table.render_line(0).text
                return line.index(f" {label} ") + 1

            async def click_header(label: str) -> str:
                seen.clear()
                await pilot.click(ResultsTable, offset=(header_x(label), 0))
                await pilot.pause()
                clicked = {id(m): m.column_key.value for m in seen if isinstance(m, ResultsTable.HeaderSelected)}
                assert len(clicked) == 1
                return next(iter(clicked.values()))

            assert await click_header("Δ base") == "delta"
            await pilot.press(*["right"] * 40)  # the measures scroll sideways; the corpus stays
            await pilot.pause()
            assert table.scroll_x > 0 and "tokens" in table.render_line(0).text
            assert await click_header("tokens") == "tokens"
            assert await click_header("corpus") == "corpus"

            # a click moves the cursor to the row drawn on that line; a second click opens it
            line = 5
            assert table.cursor_row != round(table.scroll_y) + line - 1
            await pilot.click(ResultsTable, offset=(5, line))
            await pilot.pause()
            below = table.displayed()[round(table.scroll_y) + line - 1]
            assert table.selected_run() == below
            seen.clear()
            await pilot.click(ResultsTable, offset=(5, line))
            await pilot.pause()
            selected = {id(m): m.row_key.value for m in seen if isinstance(m, ResultsTable.RowSelected)}
            assert list(selected.values()) == [below]  # one message (the hook sees it at each node)

            # keys: a page down moves a screenful, End the last run, which is drawn at the bottom
            before = table.cursor_row
            await pilot.press("pagedown")
            await pilot.pause()
            assert table.cursor_row == before + table.size.height - 2  # the lines below the header
            await pilot.press("end")
            await pilot.pause()
            last = table.displayed()[-1]
            assert table.selected_run() == last
            bottom = table.render_line(table.size.height - 2).text  # the horizontal scrollbar below
            assert rows_by_id(rows)[last]["corpus"] in bottom

    asyncio.run(scenario())


def rows_by_id(rows: list[dict]) -> dict[str, dict]:
    return {r["run_id"]: r for r in rows}


def test_each_run_is_measured_against_its_own_batterys_baseline_in_any_order():
    def row(run_id, kind, battery, overall):
        return {"run_id": run_id, "kind": kind, "corpus": None if kind == "baseline" else f"{run_id}.md",
                "base": "micro:tiny", "preset": "tiny", "seed": 0, "status": "done", "overall": overall,
                "scores": {"reasoning_depth": overall}, "scenes": battery, "baseline_key": f"{battery}|0"}

    rows = [row("base-x", "baseline", "/b/x", 0.50), row("base-y", "baseline", "/b/y", 0.10),
            row("on-x", "adapter", "/b/x", 0.60), row("on-y", "adapter", "/b/y", 0.30)]

    async def scenario():
        for reply in (rows, rows[::-1]):  # the last baseline of a reply must not win
            async with showing(reply, (160, 20)) as (table, pilot):
                for descending in (True, False):
                    table.sort_by("delta", descending)
                    await pilot.pause()
                    delta = {k: table.get_row(k)[table.column_keys.index("delta")].text for k in ("on-x", "on-y")}
                    assert delta == {"on-x": "+0.100", "on-y": "+0.200"}
                    assert table.displayed()[2:] == (["on-y", "on-x"] if descending else ["on-x", "on-y"])
                # the names say which battery each run was scored on
                assert table.get_row("on-x")[0].text.endswith("· x") and table.get_row("base-y")[0].text.endswith("· y")
                table.set_filter("on-y")  # a filter keeps the baseline of the runs it finds, not the other
                await pilot.pause()
                assert table.displayed() == ["base-y", "on-y"]

    asyncio.run(scenario())


def test_a_first_sort_by_a_column_where_lower_is_better_puts_the_lowest_on_top():
    rows = synthetic_rows(40)
    for i, r in enumerate(rows):
        r["scores"] = {**r["scores"], "forgetting": i / 10, "pressure_drop": (40 - i) / 10}

    async def scenario():
        async with showing(rows, (160, 20)) as (table, pilot):
            for key in ("perplexity", "forgetting", "pressure_drop", "corpus"):
                table.sort_by(key)
                assert table.descending is False, key
            table.sort_by("consistency")
            assert table.descending is True

    asyncio.run(scenario())


def test_the_queue_tells_apart_jobs_of_one_corpus():
    from ltm_tui.widgets import QueueTable

    def job(run_id, preset, seed, battery, kind="adapter"):
        return {"run_id": run_id, "kind": kind, "corpus": None if kind == "baseline" else "story.md",
                "base": f"micro:{preset}", "preset": preset, "seed": seed, "scenes": battery, "status": "queued"}

    jobs = [job("a", "tiny", 0, "/b/x"), job("b", "small", 0, "/b/x"), job("c", "tiny", 1, "/b/x"),
            job("d", "tiny", 0, "/b/y"), job("e", "tiny", 0, "/b/y", kind="baseline")]

    class Queue(App):
        def compose(self):
            yield QueueTable(id="queue")

    async def scenario():
        async with Queue().run_test(size=(160, 20)) as pilot:
            table = pilot.app.query_one(QueueTable)
            table.set_jobs(jobs)
            await pilot.pause()
            names = [table.get_row(j["run_id"])[0].text for j in jobs]
            assert len(set(names)) == len(names), names
            assert names[4] == "baseline micro:tiny · y"
            table.set_jobs(jobs[:1])  # alone in the queue, a job is its corpus's name
            await pilot.pause()
            assert table.get_row("a")[0].text == "story.md"

    asyncio.run(scenario())


def test_a_failed_baseline_beside_its_replacement_takes_no_runs_delta():
    def row(run_id, kind, overall, status="done"):
        return {"run_id": run_id, "kind": kind, "corpus": None if kind == "baseline" else f"{run_id}.md",
                "base": "micro:tiny", "preset": "tiny", "seed": 0, "status": status, "overall": overall,
                "scores": {} if overall is None else {"reasoning_depth": overall}, "baseline_key": "k"}

    rows = [row("base-failed", "baseline", None, "failed"), row("base-done", "baseline", 0.25), row("run", "adapter", 0.5)]

    async def scenario():
        for reply in (rows, rows[::-1]):
            async with showing(reply, (160, 20)) as (table, pilot):
                for descending in (True, False):  # whichever baseline comes last in the order
                    table.sort_by("overall", descending)
                    await pilot.pause()
                    assert table.get_row("run")[table.column_keys.index("delta")].text == "+0.250"

    asyncio.run(scenario())
    from ltm_tui.report import baseline_for

    assert baseline_for(rows, rows[2])["run_id"] == baseline_for(rows[::-1], rows[2])["run_id"] == "base-done"


def test_a_cursor_stays_on_its_run_when_a_new_measure_rebuilds_the_table():
    rows = rows_with_gaps(60)

    async def scenario():
        async with showing(rows, (160, 30)) as (table, pilot):
            table.move_cursor(row=20)
            await pilot.pause()
            chosen = table.selected_run()
            fresh = [dict(r) for r in rows]
            fresh[7]["scores"] = {**fresh[7]["scores"], "style": 0.5}  # a battery's own measure: a new column
            table.set_rows(fresh)
            await pilot.pause()
            assert "style" in table.column_keys and table.selected_run() == chosen

    asyncio.run(scenario())


def test_a_row_removed_and_added_again_is_one_row():
    from ltm_tui.bigtable import BigTable

    class Bare(App):
        def compose(self):
            yield BigTable()

    async def scenario():
        async with Bare().run_test(size=(60, 10)) as pilot:
            table = pilot.app.query_one(BigTable)
            table.add_column("name", key="name")
            for key in "abc":
                table.add_row(key, key=key)
            table.remove_row("a")
            table.add_row("a again", key="a")
            await pilot.pause()
            assert table.displayed() == ["b", "c", "a"] and table.row_count == 3
            assert [table.render_line(y).text.strip() for y in (1, 2, 3, 4)] == ["b", "c", "a again", ""]

    asyncio.run(scenario())
