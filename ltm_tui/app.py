"""The ltm-tui dashboard (Textual). It never imports torch: it reads results and queues work."""

from __future__ import annotations


from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Header, Static

from ltm_tui.report import _fmt, measure_names

FIXED_COLUMNS = ("corpus", "base", "status", "pages", "tokens", "train_seconds")


class LtmApp(App):
    """Results of a workspace as a sortable table."""

    CSS_PATH = "app.tcss"
    TITLE = "ltm-tui"
    BINDINGS = [
        Binding("s", "cycle_sort", "Sort", tooltip="Sort by the next column"),
        Binding("d", "toggle_direction", "Asc/desc", tooltip="Reverse the sort"),
        Binding("r", "refresh_results", "Refresh", tooltip="Reload results from the workspace"),
        Binding("q", "quit", "Quit", tooltip="Quit (queued jobs are kept)"),
    ]

    def __init__(self, workspace: str | None = None) -> None:
        super().__init__()
        from backend.workspace import Workspace

        self.workspace = Workspace.resolve(workspace)
        self.sort = "overall"
        self.descending = True
        self.rows: list[dict] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="hint")
        yield DataTable(id="results", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.action_refresh_results()

    def columns(self) -> list[str]:
        return [*FIXED_COLUMNS, *measure_names(self.rows), "overall"]

    def action_refresh_results(self) -> None:
        from backend.client import try_connect
        from backend.errors import LtmError
        from backend.store import Store

        hint = self.query_one("#hint", Static)
        client = try_connect(self.workspace)  # the service owns the database while it runs
        if client is not None:
            with client:
                self.rows = client.call("results", sort=self.sort, descending=self.descending)
            hint.update(self._summary())
        elif not self.workspace.db_path.exists():
            self.rows = []
            hint.update(f"No results in {self.workspace.root} yet: `ltm-tui run FILE...` queues corpora.")
        else:
            try:
                with Store(self.workspace.db_path) as store:
                    self.rows = store.results(sort=self.sort, descending=self.descending)
                hint.update(self._summary())
            except (LtmError, ValueError) as exc:
                hint.update(f"Cannot read results: {exc}")
        self._fill()

    def _summary(self) -> str:
        direction = "desc" if self.descending else "asc"
        return f"{self.workspace.root} · {len(self.rows)} runs · sorted by {self.sort} {direction}"

    def _fill(self) -> None:
        table = self.query_one("#results", DataTable)
        table.clear(columns=True)
        cols = self.columns()
        for col in cols:
            table.add_column(col, key=col)
        for r in self.rows:
            scores = r.get("scores") or {}
            cells = [
                _fmt(r.get(c) if c in r else scores.get(c)) if c != "corpus" else (r.get("corpus") or "(baseline)")
                for c in cols
            ]
            table.add_row(*cells, key=r["run_id"])

    def action_cycle_sort(self) -> None:
        cols = ["overall", *[c for c in self.columns() if c != "overall"]]
        self.sort = cols[(cols.index(self.sort) + 1) % len(cols)] if self.sort in cols else "overall"
        self.action_refresh_results()

    def action_toggle_direction(self) -> None:
        self.descending = not self.descending
        self.action_refresh_results()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        if key == self.sort:
            self.descending = not self.descending
        else:
            self.sort = key
        self.action_refresh_results()


def run_app(workspace: str | None = None) -> int:
    LtmApp(workspace).run()
    return 0
