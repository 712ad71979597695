"""The dashboard's benchmarks, merged into `benchmarks/run.py --json`.

- `table_sort_ms_10k`: median time to re-sort the results table holding 10,000 runs (a key or a
  header click), measured in the real widget in a headless app. Goal < 100 ms.
- `table_update_ms_10k`: median time to take a fresh `results` reply for 10,000 runs in which 10
  runs changed their overall score (runs finishing overnight), sorted by overall as the dashboard
  opens, so the rows move; cursor, sort and scroll are kept. Goal < 100 ms.
- `table_load_s_10k`: the first fill of that table (once per dashboard start).
- `table_sort_vs_datatable`: the peer's median sort over ours, in the same run. The peer is
  Textual's own `DataTable` as a competent user would sort it: the same 10,000 rows of the same
  cells (`ResultsTable`'s, which render as one segment each), the same pinned first column and
  zebra stripes, the same six columns in turn, each sorted by `DataTable.sort` with a key that
  puts missing values last. It places no baselines on top, so it does a little less than ours.
- `first_paint_ms`: from launching a Python process to the dashboard's first screen, headless,
  with an empty workspace; `ui_imports_torch` says whether torch got imported (it must not).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MEASURES = ("reasoning_depth", "consistency", "pressure", "novelty", "compression", "perplexity")


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """`results` rows shaped as the service sends them: 4 baselines and n-4 adapters."""
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        baseline = i < 4
        scores = {m: (rnd.uniform(5, 500) if m == "perplexity" else rnd.random()) for m in MEASURES}
        rows.append({
            "run_id": f"run-{i:05d}", "corpus": None if baseline else f"book-{i:05d}.pdf",
            "corpus_path": None if baseline else f"/data/book-{i:05d}.pdf", "base": "micro:small",
            "status": "done", "pages": None if baseline else round(rnd.uniform(1, 1000), 1),
            "tokens": 0 if baseline else rnd.randrange(1000, 2_000_000), "train_seconds": rnd.uniform(1, 900),
            "scores": scores, "overall": sum(scores[m] for m in MEASURES[:5]) / 5, "kind": "baseline" if baseline else "adapter",
            "seed": i % 4, "error": None, "created_at": "2026-11-29T00:00:00+00:00",
        })
    return rows


async def _table_bench(n: int, repeats: int) -> dict:
    from textual.app import App

    from ltm_tui.widgets import ResultsTable

    class Bench(App):
        def compose(self):
            yield ResultsTable(id="results")

    rows = synthetic_rows(n)
    app = Bench()
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.query_one(ResultsTable)
        t0 = time.perf_counter()
        table.set_rows(rows)
        await pilot.pause()
        load = time.perf_counter() - t0
        table.move_cursor(row=500)
        sorts = []
        keys = ["reasoning_depth", "corpus", "perplexity", "overall", "delta", "tokens"]
        for i in range(repeats):
            key = keys[i % len(keys)]
            t0 = time.perf_counter()
            table.sort_by(key)
            await pilot.pause()
            sorts.append(time.perf_counter() - t0)
        table.sort_by("overall", descending=True)  # the dashboard's own order, which the changes move
        await pilot.pause()
        updates = []
        for i in range(repeats):
            fresh = [dict(r) for r in rows]
            for r in random.Random(i).sample(fresh[4:], 10):
                r["overall"] = random.random()
                r["scores"] = {**r["scores"], "consistency": random.random()}
            t0 = time.perf_counter()
            table.set_rows(fresh)
            await pilot.pause()
            updates.append(time.perf_counter() - t0)
    return {
        "table_sort_ms_10k": round(statistics.median(sorts) * 1000, 1),
        "table_update_ms_10k": round(statistics.median(updates) * 1000, 1),
        "table_load_s_10k": round(load, 2),
    }


SORT_KEYS = ["reasoning_depth", "corpus", "perplexity", "overall", "tokens", "consistency"]


async def _ours_sorting(rows: list[dict], repeats: int) -> list[float]:
    from textual.app import App

    from ltm_tui.widgets import ResultsTable

    class Bench(App):
        def compose(self):
            yield ResultsTable(id="results")

    async with Bench().run_test(size=(120, 40)) as pilot:
        table = pilot.app.query_one(ResultsTable)
        table.set_rows(rows)
        await pilot.pause()
        table.move_cursor(row=500)
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            table.sort_by(SORT_KEYS[i % len(SORT_KEYS)])
            await pilot.pause()
            times.append(time.perf_counter() - t0)
    return times


async def _datatable_sorting(rows: list[dict], repeats: int) -> list[float]:
    """The peer: Textual's DataTable holding the cells ResultsTable makes, sorted by DataTable.sort."""
    from textual.app import App
    from textual.widgets import DataTable

    from ltm_tui.widgets import ResultsTable

    maker = ResultsTable()  # only its cells and columns: the same text, styles and values
    maker.rows_by_id = {r["run_id"]: r for r in rows}
    maker.column_keys = [k for k, _ in maker.wanted_columns()]
    maker.corpus_width = 16

    class Bench(App):
        def compose(self):
            yield DataTable(cursor_type="row", zebra_stripes=True, fixed_columns=1)

    async with Bench().run_test(size=(120, 40)) as pilot:
        table = pilot.app.query_one(DataTable)
        for key, label in maker.wanted_columns():
            table.add_column(label, key=key, width=16 if key == "corpus" else None)
        deltas = maker._deltas()
        for r in rows:
            table.add_row(*maker._cells(r, deltas.get(r["run_id"])), key=r["run_id"])
        await pilot.pause()
        table.move_cursor(row=500)
        times, descending = [], {}
        for i in range(repeats):
            key = SORT_KEYS[i % len(SORT_KEYS)]
            descending[key] = not descending.get(key, key == "corpus")
            down = descending[key]
            t0 = time.perf_counter()
            # missing values last in both directions
            table.sort(key, key=lambda c: ((c.value is not None) == down, c.value if c.value is not None else 0),
                       reverse=down)
            await pilot.pause()
            times.append(time.perf_counter() - t0)
    return times


async def _sort_against_datatable(n: int, repeats: int) -> dict:
    rows = synthetic_rows(n)
    ours, peer = [], []
    for _ in range(2):  # alternated, so that both see the same load
        ours += await _ours_sorting(rows, repeats)
        peer += await _datatable_sorting(rows, repeats)
    ours_ms, peer_ms = statistics.median(ours) * 1000, statistics.median(peer) * 1000
    return {"table_sort_vs_datatable": round(peer_ms / ours_ms, 2),
            "table_sort_vs_datatable_ms": {"ours": round(ours_ms, 1), "datatable": round(peer_ms, 1)}}


PAINT = r"""
import sys, time, json
from pathlib import Path
from ltm_tui.app import LtmApp
import asyncio

class Once(LtmApp):
    CSS_PATH = str(Path(sys.modules[LtmApp.__module__].__file__).with_name("app.tcss"))
    def on_mount(self):
        super().on_mount()
        self.call_after_refresh(self.painted)
    def painted(self):
        self.painted_at = time.time()
        self.exit()
    def connect(self):  # the first paint does not wait for the service; leave it out here
        pass

async def main():
    app = Once(sys.argv[1], poll_seconds=0)
    async with app.run_test(size=(80, 24)) as pilot:
        while not hasattr(app, "painted_at"):
            await pilot.pause(0.01)
    print(json.dumps({"painted_at": app.painted_at, "torch": "torch" in sys.modules}))
asyncio.run(main())
"""


def first_paint(repeats: int) -> dict:
    times, torch = [], False
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            start = time.time()
            out = subprocess.run([sys.executable, "-c", PAINT, str(Path(tmp) / "ws")], cwd=REPO,
                                 capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                raise RuntimeError(out.stderr.strip().splitlines()[-1])
            result = json.loads(out.stdout.strip().splitlines()[-1])
            times.append(result["painted_at"] - start)
            torch = torch or result["torch"]
    return {"first_paint_ms": round(statistics.median(times) * 1000), "ui_imports_torch": torch}


def run(quick: bool) -> dict:
    out = asyncio.run(_table_bench(10_000, 6 if quick else 12))
    out.update(asyncio.run(_sort_against_datatable(10_000, 6 if quick else 12)))
    out.update(first_paint(3 if quick else 5))
    return out


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv)))
