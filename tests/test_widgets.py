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
            fresh = [dict(r) for r in rows]
            long_name = "a-much-longer-corpus-name-than-any-before.epub"
            fresh[10]["corpus"] = long_name
            fresh[11]["tokens"] = 123_456_789_012
            table.set_rows(fresh)
            await pilot.pause()

            def shown(run_id: str, key: str) -> str:
                col = table.get_column_index(key)
                width = table.ordered_columns[col].get_render_width(table)
                style = table._get_row_style(table.get_row_index(run_id), table.rich_style)
                lines = table._render_cell(table.get_row_index(run_id), col, style, width)
                return "".join(seg.text for seg in lines[0]).strip()

            assert shown(fresh[10]["run_id"], "corpus") == f"{long_name} · s{fresh[10]['seed']}"
            assert shown(fresh[11]["run_id"], "tokens") == "123,456,789,012"

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
