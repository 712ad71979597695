"""The dashboard's study screens: which file makes the difference (`ltm-tui attribute`) and the
search over settings (`ltm-tui search`).

Both read what the service keeps in DuckDB (ops `attribution` and `search`, shapes in
docs/attribution.md and docs/search.md), so they need neither torch nor optuna, and refresh
every few seconds while open: a study started from the command line overnight fills in here.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Select, Static
from textual_plotext import PlotextPlot

from ltm_tui.widgets import Cell, RunTable

REFRESH_SECONDS = 3.0
STATE_STYLE = {"COMPLETE": "green", "RUNNING": "bold cyan", "PRUNED": "yellow", "FAIL": "bold red", "WAITING": "dim"}


def _num(value: Any, digits: int = 3) -> str:
    """A number as the tables show it: fixed digits, or 3 significant ones when tiny (a
    learning rate of 0.0003 is not 0.000)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value and abs(value) < 10 ** -digits:
            return f"{value:.3g}"
        return f"{value:.{digits}f}"
    return str(value)


class SortTable(RunTable):
    """A small table of `Cell`s sorted by their raw values: a header click or `s` picks the
    column, `d` (or a second click) reverses; missing values stay last either way. Rows are
    keyed by what they show (a file name, a trial number): `selected_run()` returns that key."""

    BINDINGS = [
        Binding("s", "next_sort", "Sort", tooltip="Sort by the next column"),
        Binding("d", "reverse", "Asc/desc", tooltip="Reverse the sort"),
    ]

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.sort_key: str | None = None
        self.descending = True

    def fill(self, columns: list[tuple[str, str]], rows: list[tuple[str, list[Cell]]]) -> None:
        """Replace the contents, keeping the sort and the selected row."""
        keep = self.selected_run()
        if [c.key.value for c in self.ordered_columns] != [k for k, _ in columns]:
            self.clear(columns=True)
            for key, label in columns:
                self.add_column(label, key=key)
        else:
            self.clear()
        for key, cells in rows:
            self.add_row(*cells, key=key)
        self.apply_sort()
        self.follow(keep)

    def apply_sort(self) -> None:
        if self.sort_key is None or not self.row_count or self.sort_key not in self.columns:
            return
        present = lambda c: c.value is not None  # noqa: E731
        # missing last in both directions: (has value, value) reversed puts None first, so flip it
        self.sort(self.sort_key, key=lambda c: (present(c) == self.descending, c.value if present(c) else 0),
                  reverse=self.descending)

    def sort_by(self, key: str, descending: bool | None = None) -> None:
        if descending is None:
            descending = not self.descending if key == self.sort_key else True
        self.sort_key, self.descending = key, descending
        keep = self.selected_run()
        self.apply_sort()
        self.follow(keep)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        self.sort_by(event.column_key.value)

    def action_next_sort(self) -> None:
        keys = [c.key.value for c in self.ordered_columns]
        if keys:
            nxt = keys[(keys.index(self.sort_key) + 1) % len(keys)] if self.sort_key in keys else keys[0]
            self.sort_by(nxt)

    def action_reverse(self) -> None:
        if self.sort_key is not None:
            self.sort_by(self.sort_key, not self.descending)


class StudyScreen(Screen):
    """What both study screens share: a study chooser, a summary, a table, a timer."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("r", "reload", "Reload", tooltip="Read the study again"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.study: str | None = None
        self.reply: Any = None
        self._options: list[tuple[str, str]] = []  # the chooser's (label, study) as last set

    def compose_top(self) -> ComposeResult:
        yield Select([], prompt="study", id="study", allow_blank=True)
        yield Static("loading…", id="study-summary")

    def on_mount(self) -> None:
        self.action_reload()
        self.set_interval(REFRESH_SECONDS, self.action_reload)

    @on(Select.Changed, "#study")
    def _study_chosen(self, event: Select.Changed) -> None:
        value = None if event.value is Select.BLANK else str(event.value)
        if value != self.study:
            self.study = value
            self.action_reload()

    def set_studies(self, options: list[tuple[str, str]], current: str | None) -> None:
        """The chooser's (label, study) pairs; set again only when one changed (a label carries
        the study's progress, so it changes as runs finish)."""
        select = self.query_one("#study", Select)
        if options != self._options:
            self._options = options
            with select.prevent(Select.Changed):
                select.set_options(options)
        if current is not None and select.value != current:
            with select.prevent(Select.Changed):
                select.value = current

    def say(self, text: Text | str) -> None:
        self.query_one("#study-summary", Static).update(text)

    @work(exclusive=True, group="study")
    async def action_reload(self) -> None:
        from backend.core.errors import LtmError

        try:
            reply = await self.fetch()
        except LtmError as exc:
            self.say(Text(exc.one_line(), style="bold red"))
            return
        self.reply = reply
        self.show(reply)

    async def fetch(self) -> Any:
        raise NotImplementedError

    def show(self, reply: Any) -> None:
        raise NotImplementedError


# --- attribution ------------------------------------------------------------------------------


class AttributionScreen(StudyScreen):
    """Files × measures: each file's marginal contribution (Data Banzhaf) with its 95% interval,
    its score alone, and how many runs back it. The measure shown in detail is chosen with `m`."""

    BINDINGS = [
        *StudyScreen.BINDINGS,
        Binding("m", "next_measure", "Measure", tooltip="Show the next measure's standalone score and runs"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.measure = "overall"

    def compose(self) -> ComposeResult:
        yield from self.compose_top()
        yield SortTable(id="attribution-table")
        yield Static(id="attribution-advice")
        yield Footer()

    async def fetch(self) -> Any:
        link = self.app.link
        studies = await link.call("attribution")
        if not studies:
            return {"studies": [], "table": None}
        study = self.study if self.study in {s["study"] for s in studies} else studies[0]["study"]
        return {"studies": studies, "table": await link.call("attribution", study=study)}

    def show(self, reply: dict) -> None:
        studies, table = reply["studies"], reply["table"]
        if table is None:
            self.say(Text("No attribution study in this workspace yet. Start one with\n"
                          "  ltm-tui attribute FILE FILE… --subsets 8", style="dim"))
            return
        self.study = table["study"]
        self.set_studies([(f"{s['study']} · {len(s['files'])} files · {s['done']}/{s['runs']} runs", s["study"])
                          for s in studies], self.study)
        measures = list(table["measures"])
        if self.measure not in measures and measures:
            self.measure = measures[0]
        runs = table["runs"]
        self.say(Text.assemble(
            (f"{len(table['files'])} files", "bold"), f" · base {table['base']} · ",
            f"{runs.get('done', 0)} of {runs.get('distinct', 0)} runs done · {table['subsets']} subsets · ",
            f"seeds {', '.join(map(str, table['seeds']))} · detail: ", (self.measure, "bold cyan"),
        ))
        settled = table.get("settled", True)
        by_file: dict[str, dict[str, dict]] = {}
        for row in table["rows"]:
            by_file.setdefault(row["corpus"], {})[row["measure"]] = row
        columns = [("corpus", "corpus"), ("standalone", f"{self.measure} alone"), ("runs", "runs")]
        columns += [(m, f"{m} ±CI") for m in measures]
        rows = []
        for name, per in by_file.items():
            chosen = per.get(self.measure, {})
            cells = [Cell(name, name), Cell(_num(chosen.get("standalone")), chosen.get("standalone"), "", "right"),
                     Cell(_num(chosen.get("runs")), chosen.get("runs"), "dim", "right")]
            for m in measures:
                r = per.get(m) or {}
                c, lo, hi = r.get("contribution"), r.get("ci_low"), r.get("ci_high")
                lower_better = table["measures"][m].get("lower_is_better")
                style = ""
                if not settled:
                    style = "dim"  # runs still to come move it: no verdict before the study ends
                elif lo is not None and hi is not None and (lo > 0 or hi < 0):  # the interval excludes 0
                    helps = (lo > 0) != bool(lower_better)
                    style = "green" if helps else "red"
                # the interval at the value's precision: rounding keeps lo ≤ value ≤ hi as printed
                text = "-" if c is None else f"{c:+.3f} [{lo:+.3f}, {hi:+.3f}]" if lo is not None else f"{c:+.3f}"
                cells.append(Cell(text, c, style, "right"))
            rows.append((name, cells))
        grid = self.query_one("#attribution-table", SortTable)
        if grid.sort_key is None:
            grid.sort_key = "overall" if "overall" in measures else (measures[0] if measures else None)
        grid.fill(columns, rows)
        advice = table.get("advice") or ""
        legend = ("green/red: the 95% interval excludes 0 (helps/hurts) · " if settled else
                  f"unfinished: {runs.get('done', 0)} of {runs.get('distinct', 0)} runs done, so no file is called "
                  "helpful or harmful yet · ")
        self.query_one("#attribution-advice", Static).update(Text(legend + advice, style="dim" if settled else "yellow"))

    def action_next_measure(self) -> None:
        if self.reply and self.reply.get("table"):
            measures = list(self.reply["table"]["measures"])
            if measures:
                self.measure = measures[(measures.index(self.measure) + 1) % len(measures)] if self.measure in measures else measures[0]
                self.show(self.reply)


# --- search -------------------------------------------------------------------------------------


class SearchScreen(StudyScreen):
    """A search's trials (parameters, state, score, latest eval loss), the best so far, the
    parameters' importances, and the score against the trial number. Enter opens a trial's run."""

    BINDINGS = [
        *StudyScreen.BINDINGS,
        Binding("enter", "open_trial", "Open run", tooltip="Open the selected trial's run"),
    ]

    def compose(self) -> ComposeResult:
        yield from self.compose_top()
        yield SortTable(id="trials")
        yield PlotextPlot(id="search-plot")
        yield Footer()

    async def fetch(self) -> Any:
        args = {"study": self.study} if self.study else {}
        return await self.app.link.call("search", **args)

    def show(self, reply: dict) -> None:
        study = reply.get("study")
        if study is None:
            self.say(Text("No search in this workspace yet. Start one with\n"
                          "  ltm-tui search --space SPACE.yaml --trials 20 FILE…", style="dim"))
            return
        self.study = study["study"]
        self.set_studies([(f"{s['study']} · {s['sampler']} · {s['objective']}", s["study"]) for s in reply["studies"]],
                         self.study)
        trials = reply.get("trials") or []
        best = reply.get("best")
        counts = " · ".join(f"{n} {k.lower()}" for k, n in sorted((study.get("counts") or {}).items()))
        parts: list[Any] = [
            (f"{study['objective']} ({study['direction']})", "bold"),
            f" · {study['sampler']} · {len(trials)} of {study['target_trials']} trials · {counts or 'none yet'}",
        ]
        if best is not None:
            params = ", ".join(f"{k}={_num(v, 4)}" for k, v in best["params"].items())
            parts += ["\nbest: ", (f"trial {best['number']} · {_num(best['value'])}", "bold green"), f" · {params}"]
        imp = study.get("importances")
        if imp:
            parts += ["\nimportance: " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items())]
        self.say(Text.assemble(*parts))
        names = sorted({k for t in trials for k in t["params"]})
        columns = [("number", "#"), ("state", "state"), ("value", study["objective"]),
                   *((f"p:{n}", n) for n in names), ("last_value", "eval loss"), ("run_id", "run")]
        rows = []
        for t in trials:
            style = "bold green" if best is not None and t["number"] == best["number"] else ""
            cells = [Cell(str(t["number"]), t["number"], style, "right"),
                     Cell(t["state"].lower(), t["state"], STATE_STYLE.get(t["state"], "")),
                     Cell(_num(t.get("value")), t.get("value"), style, "right")]
            cells += [Cell(_num(t["params"].get(n), 4), t["params"].get(n), "", "right") for n in names]
            cells += [Cell(_num(t.get("last_value")), t.get("last_value"), "dim", "right"),
                      Cell(t.get("run_id") or "-", t.get("run_id"), "dim")]
            rows.append((str(t["number"]), cells))
        grid = self.query_one("#trials", SortTable)
        if grid.sort_key is None:
            grid.sort_key, grid.descending = "number", False
        grid.fill(columns, rows)
        self._plot(trials, study["direction"])

    def _plot(self, trials: list[dict], direction: str) -> None:
        plot = self.query_one("#search-plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        done = [(t["number"], t["value"]) for t in sorted(trials, key=lambda t: t["number"]) if t.get("value") is not None]
        if done:
            plt.scatter([n for n, _ in done], [v for _, v in done], marker="●", label="trial")
            pick = max if direction == "maximize" else min
            running, best_so_far = None, []
            for _, v in done:
                running = v if running is None else pick(running, v)
                best_so_far.append(running)
            plt.plot([n for n, _ in done], best_so_far, marker="braille", label="best so far")
            plt.title("score against trial")
            plt.xlabel("trial")
        else:
            plt.title("no finished trial yet")
        plot.refresh()

    def action_open_trial(self) -> None:
        from ltm_tui.screens import RunScreen

        grid = self.query_one("#trials", SortTable)
        key = grid.selected_run()
        trial = next((t for t in (self.reply or {}).get("trials") or [] if str(t["number"]) == key), None)
        if trial and trial.get("run_id"):
            self.app.push_screen(RunScreen(trial["run_id"]))
        elif trial:
            self.app.notify(f"trial {trial['number']} has no run yet", severity="warning")

    @on(DataTable.RowSelected, "#trials")
    def _trial_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open_trial()
