"""The dashboard on a real workspace: it shows the results and sorts them."""

from __future__ import annotations

import asyncio

from backend.store import Store
from backend.workspace import Workspace
from ltm_tui.app import LtmApp


def _workspace(tmp_path):
    ws = Workspace(tmp_path / "ws").ensure()
    with Store(ws.db_path) as store:
        for name, overall, depth in [("a.txt", 0.2, 0.1), ("b.txt", 0.7, 0.9), ("c.txt", 0.5, 0.4)]:
            cid = store.add_corpus({"path": f"/x/{name}", "name": name, "format": "text", "encoding": "utf-8",
                                    "bytes": 10, "sha256": name * 8, "chars": 10, "words": 2, "pages": 0.01})
            rid = f"run-{name}"
            store.create_run(rid, kind="adapter", base="micro:tiny", settings={}, corpus_id=cid, corpus_path=f"/x/{name}")
            for state in ("starting", "training", "evaluating"):
                store.transition(rid, state)
            store.ingest_result(rid, {"tokens": 12, "steps": 3, "train_seconds": 1.0, "eval_seconds": 0.1,
                                      "final_loss": 1.0, "overall": overall,
                                      "scores": {"reasoning_depth": depth, "perplexity": 10.0}})
            store.transition(rid, "done")
    return ws


def test_dashboard_lists_and_sorts_results(tmp_path):
    ws = _workspace(tmp_path)

    async def scenario():
        app = LtmApp(str(ws.root))
        async with app.run_test(size=(120, 30)) as pilot:
            table = app.query_one("#results")
            order = lambda: [table.get_row_at(i)[0] for i in range(table.row_count)]  # noqa: E731
            assert order() == ["b.txt", "c.txt", "a.txt"]  # overall, descending
            await pilot.press("d")
            assert order() == ["a.txt", "c.txt", "b.txt"]
            await pilot.press("s")  # next sort column: corpus
            assert app.sort == "corpus"
            assert "reasoning_depth" in [str(c.label) for c in table.columns.values()]

    asyncio.run(scenario())


def test_dashboard_on_an_empty_workspace_says_what_to_do(tmp_path):
    async def scenario():
        app = LtmApp(str(tmp_path / "empty"))
        async with app.run_test(size=(80, 24)):
            assert "ltm-tui run" in str(app.query_one("#hint").render())

    asyncio.run(scenario())
