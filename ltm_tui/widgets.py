"""The dashboard's panels: devices, the queue and the results table."""

from __future__ import annotations

from typing import Any, Iterable

from rich.cells import cell_len
from rich.console import Group
from rich.measure import Measurement
from rich.progress_bar import ProgressBar
from rich.segment import Segment
from rich.table import Table
from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable, Static

from backend.core.devices import DeviceMonitor, Snapshot, reading_of
from backend.core.states import JobState
from ltm_tui.bigtable import BigTable
from ltm_tui.gpu import gib, sparkline
from ltm_tui.report import (
    MEASURE_LABELS,
    PERPLEXITY,
    baseline_group,
    battery_name,
    fit_name,
    format_duration,
    measure_names,
)

STATUS_STYLE = {
    "queued": "dim",
    "starting": "cyan",
    "training": "bold cyan",
    "evaluating": "bold magenta",
    "done": "green",
    "failed": "bold red",
    "cancelled": "yellow",
    "interrupted": "yellow",
    "pruned": "dim yellow",
}
ACTIVE = ("starting", "training", "evaluating")


class Cell:
    """A table cell that shows one line of text and sorts by its raw value."""

    __slots__ = ("text", "value", "style", "justify", "key")

    def __init__(self, text: str, value: Any = None, style: str = "", justify: str = "left",
                 key: str | None = None) -> None:
        self.text, self.value, self.style, self.justify = text, value, style, justify
        self.key = key  # the row's key, on a row's first cell (RunTable.place)

    def __rich_console__(self, console, options):
        """One segment: the text padded to the column, in its style (what rich's Text gives a
        one-line, no-wrap text), without Text's layout, which a sort of a big table repaints for
        every visible cell. A text wider than its column is Text's to cut, with an ellipsis."""
        width = options.max_width
        room = width - cell_len(self.text)
        if room < 0:
            yield Text(self.text, style=self.style, justify=self.justify, no_wrap=True, overflow="ellipsis")
            return
        gap = " " * room
        text = gap + self.text if self.justify == "right" else self.text + gap
        yield Segment(text, console.get_style(self.style) if self.style else None)

    def __rich_measure__(self, console, options) -> Measurement:
        width = cell_len(self.text)
        return Measurement(width, width)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cell) and (self.text, self.style) == (other.text, other.style)

    def __hash__(self) -> int:
        return hash(self.text)


def run_label(r: dict, mixed: bool = False, batteries: bool = False) -> str:
    """A run as the tables name it, so that runs of different kinds never look alike: a
    baseline says which base it is; a run of a corpus set of an attribution study lists the
    files (`subset-03-a+b+c.corpora` reads `a+b+c (3 files)`); a search trial, a second seed and
    (where the table mixes them) a preset or base, and the battery, are added after a `·`."""
    if r.get("kind") == "baseline":
        name = "baseline"
        mixed = True  # a baseline is nothing but its base: always say which
    else:
        name = corpus_name(r.get("corpus"))
    extra = []
    if mixed:
        extra.append(r.get("preset") or _short_base(r.get("base") or ""))
    if batteries and r.get("scenes"):
        extra.append(battery_name(r["scenes"]))
    if r.get("seed"):
        extra.append(f"s{r['seed']}")
    if r.get("trial"):
        extra.append(r["trial"].rsplit(" ", 1)[-1])  # "#3": the study is in the run's detail
    if r.get("attribution") and r.get("kind") != "baseline":
        extra.append(f"study {r['attribution'][:4]}")  # the start of the id the attribution screen shows
    return " · ".join([name, *filter(None, extra)])


def fit_label(label: str, width: int) -> str:
    """A run's name in `width` cells: what tells it apart (`· small · s1 · #3`) is kept whole and
    the corpus's own name is cut in the middle, keeping its extension."""
    if width <= 0 or cell_len(label) <= width:
        return label
    name, sep, rest = label.partition(" · ")
    room = width - cell_len(sep + rest)
    if not sep or room < 6:  # no room for both: the end is cut, as any text is
        return fit_name(label, width)
    return fit_name(name, room) + sep + rest


def corpus_name(corpus: str | None) -> str:
    """A corpus as the tables name it: a corpus set of an attribution study lists its files
    (`subset-03-a+b+c.corpora` reads `a+b+c (3 files)`); any other name is itself."""
    corpus = corpus or ""
    if not corpus.endswith(".corpora"):
        return corpus or "-"
    stem = corpus[: -len(".corpora")]
    parts = stem.split("-", 2)
    if len(parts) == 3 and parts[0] == "subset":
        stem = parts[2]
    return f"{stem} ({stem.count('+') + 1} files)" if "+" in stem else stem


def _short_base(base: str) -> str:
    """`Qwen/Qwen2.5-7B` → `Qwen2.5-7B`; a folder → its name."""
    return base.rstrip("/").rsplit("/", 1)[-1]


def status_text(r: dict) -> str:
    """A run's status as the table shows it: a trial the search pruned reads `pruned`, not the
    `cancelled` its job ended as."""
    if r.get("trial_state") == "PRUNED" and r.get("status") == "cancelled":
        return "pruned"
    return r.get("status") or "-"


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# --- devices -------------------------------------------------------------------------------


class DevicePanel(Static):
    """Memory (a bar and a one-minute history), utilisation and temperature per GPU, with the
    jobs that hold its memory; CPU and RAM of the host, labelled as such, where NVML is absent."""

    DEFAULT_CSS = "DevicePanel { height: auto; padding: 0 1; }"

    def __init__(self, monitor: DeviceMonitor | None = None, **kwargs) -> None:
        super().__init__("reading devices…", **kwargs)
        self.monitor = monitor
        self.snapshot: Snapshot | None = None
        self.holders: dict[int, str] = {}  # worker pid -> the run it works on

    def show(self, snapshot: Snapshot, holders: dict[int, str] | None = None) -> None:
        self.snapshot = snapshot
        if holders is not None:
            self.holders = holders
        self.update(self._render_snapshot())

    def _render_snapshot(self) -> Table | Group:
        snap = self.snapshot
        grid = Table.grid(padding=(0, 1), expand=True)
        grid.add_column(no_wrap=True, max_width=22)  # name
        grid.add_column(no_wrap=True)  # bar
        grid.add_column(no_wrap=True)  # numbers
        grid.add_column(no_wrap=True, ratio=1)  # history
        history = self.monitor.history if self.monitor else {}
        for d in snap.devices:
            hist = sparkline(history.get(d.index, []), 20)
            if d.kind == "host":
                cpu = "n/a" if d.utilization is None else f"{d.utilization:3.0f}%"
                grid.add_row(  # the bar is RAM, the history the CPU's use beside its number
                    Text(d.name, style="bold"),
                    _bar(d.memory_share),
                    Text(f"RAM {gib(d.memory_used)}/{gib(d.memory_total)} GiB · CPU {cpu.strip()}"),
                    Text(hist.strip(), style="cyan"),
                )
                continue
            util = "n/a" if d.utilization is None else f"{d.utilization:.0f}%"
            temp = "n/a" if d.temperature is None else f"{d.temperature:.0f}°C"
            grid.add_row(
                Text(f"{d.index} {d.name}", style="bold"),
                _bar(d.memory_share),
                Text(f"{gib(d.memory_used)}/{gib(d.memory_total)} GiB · util {util} · {temp}"),
                Text(f"mem {hist}", style="cyan"),
            )
            held = [
                f"{self.holders.get(pid, f'pid {pid}')} {gib(used)} GiB"
                for pid, used in sorted(d.processes.items(), key=lambda kv: -(kv[1] or 0))
            ]
            if held:
                grid.add_row("", Text("  " + " · ".join(held), style="dim"), "", "")
        if snap.note:
            return Group(grid, Text(snap.note, style="yellow", overflow="ellipsis", no_wrap=True))
        return grid


    def show_nodes(self, nodes: list[dict], holders: dict[int, str] | None = None) -> None:
        """A Ray cluster's nodes (the service's `devices` reply), one line a node: each GPU's
        memory, use and the run on it, or the node's CPU and RAM where it has no GPU."""
        if holders is not None:
            self.holders = holders
        grid = Table.grid(padding=(0, 1), expand=True)
        grid.add_column(no_wrap=True, max_width=22)  # node
        grid.add_column(no_wrap=True)  # bar: the fullest GPU's memory, or RAM
        grid.add_column(ratio=1, overflow="ellipsis", no_wrap=True)  # numbers
        for node in nodes:
            devices = [reading_of(d) for d in node.get("devices") or []]
            on_node = {int(pid): ours for pid, ours in (node.get("workers") or {}).items()}
            shares = [d.memory_share for d in devices if d.memory_share is not None]
            if not devices:
                text = Text(node.get("note") or "no reading", style="yellow")
            elif devices[0].kind == "host":
                d = devices[0]
                cpu = "n/a" if d.utilization is None else f"{d.utilization:.0f}%"
                text = Text(f"RAM {gib(d.memory_used)}/{gib(d.memory_total)} GiB · CPU {cpu} · no GPU")
            else:
                parts = []
                for d in devices:
                    util = "n/a" if d.utilization is None else f"{d.utilization:.0f}%"
                    runs = [self.holders.get(on_node.get(pid), f"pid {pid}") for pid in d.processes]
                    parts.append(f"GPU{d.index} {gib(d.memory_used)}/{gib(d.memory_total)} GiB {util}"
                                 + (f" {', '.join(runs)}" if runs else ""))
                text = Text(" · ".join(parts))
            grid.add_row(Text(node.get("node") or "?", style="bold"), _bar(max(shares) if shares else None), text)
        self.update(grid if nodes else Text("reading the cluster's nodes…", style="dim"))


def job_holders(jobs: list[dict]) -> dict[int, str]:
    """Worker pid -> the run it works on now, to name the processes that hold device memory."""
    holders = {}
    for j in jobs:
        if j.get("pid") and j["status"] in ACTIVE:
            holders[j["pid"]] = j.get("corpus") or f"baseline {j['base']}"
    return holders


def _bar(share: float | None, width: int = 16) -> ProgressBar | Text:
    if share is None:
        return Text("n/a".center(width), style="dim")
    return ProgressBar(total=1.0, completed=min(1.0, share), width=width)


class RunTable(DataTable):
    """A table with one row per run (or per file, per trial), keyed by its id, on DataTable's
    public API only. Its first column's cells carry their row's key, so that `place` can put the
    rows in an order computed elsewhere (the service's order, with ties by run id) through
    `DataTable.sort`."""

    def place(self, order: Iterable[str]) -> None:
        """Show the rows in this order of keys (rows it does not name go last, as they were)."""
        rank = {key: i for i, key in enumerate(dict.fromkeys(order))}
        last = len(rank)
        first = self.ordered_columns[0].key
        self.sort(first, key=lambda cell: rank.get(getattr(cell, "key", None), last))

    def selected_run(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:  # the cursor is outside the rows while they change
            return None

    def displayed(self) -> list[str]:
        """Run ids as the table shows them, top to bottom."""
        return [self.coordinate_to_cell_key((i, 0)).row_key.value for i in range(self.row_count)]

    def follow(self, run_id: str | None) -> None:
        """Put the cursor back on this run, wherever the rows moved it."""
        if run_id is not None and run_id in self.rows:  # row keys compare equal to their strings
            self.move_cursor(row=self.get_row_index(run_id), animate=False)


# --- the queue ------------------------------------------------------------------------------

QUEUE_COLUMNS = (("corpus", "job"), ("status", "status"), ("bar", "progress"), ("step", "step"),
                 ("loss", "loss"), ("tps", "tok/s"), ("eta", "ETA"))
RECENT_FINISHED = 50  # finished jobs kept in the queue panel (all of them are in the results)
CELL_PADDING = 2  # DataTable's padding: one column either side of a cell
SCROLLBAR = 2  # the vertical scrollbar's width, kept free so a long queue never cuts the last column
SHORTEST = {"corpus": 8, "bar": 5}  # the two columns that give way when the terminal is narrow


def queue_widths(room: int, natural: dict[str, int]) -> dict[str, int]:
    """Each column's width in a queue `room` cells wide: the status, step and numbers as wide as
    their widest text (so `evaluating` and `1200/1200` are never cut), the bar from 5 to 14
    cells, and the job's name the rest; at 80 columns every column shows."""
    widths = {key: max(natural.get(key, 0), len(label)) for key, label in QUEUE_COLUMNS}
    widths["status"] = max(widths["status"], max(len(s) for s in STATUS_STYLE))
    free = room - SCROLLBAR - CELL_PADDING * len(QUEUE_COLUMNS)
    fixed = sum(w for k, w in widths.items() if k not in SHORTEST)
    left = free - fixed
    widths["bar"] = max(SHORTEST["bar"], min(14, left - SHORTEST["corpus"]))
    widths["corpus"] = max(SHORTEST["corpus"], min(natural.get("corpus", 0) + 1, left - widths["bar"]))
    return widths


class QueueTable(RunTable):
    """Every unfinished job and the most recent finished ones, with live progress: training's
    steps, then the evaluation's scenes. Its columns are fitted to the terminal as it is now
    (a resize or a wider value fits them again), the job's name taking what the numbers leave."""

    BINDINGS = [
        Binding("c", "app.cancel_selected", "Cancel", tooltip="Cancel the selected job (asks first)"),
        Binding("t", "app.retry_selected", "Retry", tooltip="Queue the selected job again (resumes)"),
        Binding("l", "app.show_log", "Log", tooltip="The selected job's log"),
        Binding("enter", "select_cursor", "Open", show=False, tooltip="Open the selected run"),
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.jobs: dict[str, dict] = {}
        self.widths: dict[str, int] = {}
        self._mixed = (False, False)  # jobs of several bases or presets, of several batteries

    def on_mount(self) -> None:
        self._fit()

    def on_resize(self) -> None:
        self._fit()

    def _fit(self, cells: dict[str, list] | None = None) -> bool:
        """Lay the columns out for this width and these cells (each job's, by default); when
        the widths change, the rows are added again (a queue is short). True if they were."""
        if cells is None:
            cells = {run_id: self._cells(job) for run_id, job in self.jobs.items()}
        natural = {key: max((_text_width(c[i]) for c in cells.values()), default=0)
                   for i, (key, _) in enumerate(QUEUE_COLUMNS)}
        widths = queue_widths(self.size.width or 80, natural)
        if widths == self.widths and self.columns:
            return False
        keep = self.selected_run()
        self.widths = widths
        self.clear(columns=True)
        for key, label in QUEUE_COLUMNS:
            self.add_column(label, key=key, width=widths[key])
        for run_id, job in self.jobs.items():  # made again: the bar is as wide as its new column
            self.add_row(*self._cells(job), key=run_id)
        self.follow(keep)
        return True

    def set_jobs(self, jobs: list[dict]) -> None:
        unfinished = [j for j in jobs if not JobState(j["status"]).is_terminal()]
        finished = [j for j in jobs if JobState(j["status"]).is_terminal()][-RECENT_FINISHED:]
        order = sorted(unfinished, key=lambda j: (j["status"] not in ACTIVE, j["status"] != "queued")) + finished[::-1]
        old = self.jobs
        self.jobs = {}
        for j in order:  # what the events told since the last reply is kept until the service has it
            live = {k: v for k, v in old.get(j["run_id"], {}).items() if k in LIVE_KEYS and j.get(k) is None}
            self.jobs[j["run_id"]] = {**j, **(live if j["status"] == old.get(j["run_id"], {}).get("status") else {})}
        self._mixed = (len({(j.get("base"), j.get("preset")) for j in self.jobs.values()}) > 1,
                       len({j.get("scenes") for j in self.jobs.values() if j.get("scenes")}) > 1)
        keep = self.selected_run()
        wanted = list(self.jobs)
        cells = {run_id: self._cells(self.jobs[run_id]) for run_id in wanted}
        if not self._fit(cells):  # the same widths: the rows change in place
            for key in [k.value for k in list(self.rows)]:
                if key not in self.jobs:
                    self.remove_row(key)
            present = {k.value for k in self.rows}
            for run_id in wanted:
                if run_id in present:
                    for (col, _), cell in zip(QUEUE_COLUMNS, cells[run_id]):
                        self.update_cell(run_id, col, cell)
                else:
                    self.add_row(*cells[run_id], key=run_id)
        self.place(wanted)
        self.follow(keep)

    def on_progress(self, event: dict) -> None:
        """A training step (`progress`) or scenes scored (`eval_progress`)."""
        run_id = event.get("run_id")
        if run_id not in self.jobs:
            return
        job = self.jobs[run_id]
        if event.get("type") == "eval_progress":
            job.update(eval_done=event.get("done"), eval_total=event.get("total"), eval_eta_s=event.get("eta_s"))
        else:
            for k in ("step", "total", "loss", "tokens_per_s", "eta_s"):
                if event.get(k) is not None:
                    job[k] = event[k]
        self._refresh_row(run_id)

    def on_state(self, event: dict) -> None:
        run_id = event.get("run_id")
        if run_id in self.jobs:
            self.jobs[run_id]["status"] = event["status"]
            if event.get("error"):
                self.jobs[run_id]["error"] = event["error"]
            self._refresh_row(run_id)

    def _refresh_row(self, run_id: str) -> None:
        cells = self._cells(self.jobs[run_id])
        if any(_text_width(c) > self.widths.get(key, 0) for c, (key, _) in zip(cells, QUEUE_COLUMNS)
               if key not in SHORTEST):
            self._fit()  # a wider number: fit the columns again
        for (col, _), cell in zip(QUEUE_COLUMNS, cells):
            self.update_cell(run_id, col, cell)

    def selected_job(self) -> dict | None:
        run_id = self.selected_run()
        return None if run_id is None else self.jobs.get(run_id)

    def _cells(self, job: dict) -> list:
        status = job["status"]
        label = job_label(job, *self._mixed)
        if job.get("node"):  # a Ray cluster: the node it runs on, after its name
            label = f"{label} @ {job['node']}"
        total, step = job.get("total"), job.get("step")
        scenes, scored = job.get("eval_total"), job.get("eval_done")
        evaluating = status == "evaluating" and scenes
        if status == "done":
            share = 1.0
        elif evaluating:
            share = min(1.0, (scored or 0) / scenes)
        elif total:
            share = min(1.0, (step or 0) / total)
        else:
            share = 0.0
        bar = ProgressBar(total=1.0, completed=share, width=self.widths.get("bar", 14), pulse=status == "starting",
                          complete_style="magenta" if evaluating else "bar.complete")
        tps = job.get("tokens_per_s")
        if evaluating:
            where = f"{scored or 0}/{scenes}"
        else:
            where = f"{step or 0}/{total}" if total else (str(step) if step else "-")
        if status == "training":
            eta = format_duration(job.get("eta_s"))
        elif evaluating:
            eta = format_duration(job.get("eval_eta_s"))
        else:
            eta = "-"
        return [
            Cell(label, key=job["run_id"]),
            Cell(status, style=STATUS_STYLE.get(status, "")),
            bar,
            Cell(where, justify="right", style="magenta" if evaluating else ""),
            Cell(_num(job.get("loss"), 3), justify="right"),
            Cell("-" if not tps else f"{tps:,.0f}", justify="right"),
            Cell(eta, justify="right"),
        ]


LIVE_KEYS = ("step", "total", "loss", "tokens_per_s", "eta_s", "eval_done", "eval_total", "eval_eta_s")


def job_label(job: dict, mixed: bool = False, batteries: bool = False) -> str:
    """A job as the queue names it: `baseline` and its base, or its corpus; then, as the results
    name runs (`run_label`), what tells it from the queue's other jobs: its seed, and where the
    queue mixes them its preset or base and its battery."""
    if job.get("kind") != "baseline":
        return run_label(job, mixed, batteries)
    extra = [battery_name(job["scenes"])] if batteries and job.get("scenes") else []
    if job.get("seed"):
        extra.append(f"s{job['seed']}")
    return " · ".join([f"baseline {job['base']}", *extra])


def _text_width(cell) -> int:
    return cell_len(cell.text) if isinstance(cell, Cell) else 0


# --- results -------------------------------------------------------------------------------

# What matters first comes first, so that 80 columns over SSH show the ranking: the corpus, its
# overall score and its gain over the baseline, then each measure, then the bookkeeping.
HEAD = (("corpus", "corpus"), ("overall", "overall"), ("delta", "Δ base"))
TAIL = (("base", "base"), ("status", "status"), ("pages", "pages"), ("tokens", "tokens"),
        ("train_seconds", "train s"))
# The probes' summary (docs/probes.md): how much the weights moved, how the attention's entropy
# changed, and the layer whose representations drifted most from the base.
PROBES = (("weight_change", "Δweights"), ("attn_entropy_change", "Δattn H"), ("drift_layer", "drift L"))
ROW_KEYS = {k for k, _ in (*HEAD, *TAIL, *PROBES)} - {"delta"}  # a row's own fields; the rest are scores

# What each column of the results means, for the help screen (docs/measures.md and docs/probes.md
# define them in full). A label ending in ↓: lower is better.
COLUMN_MEANINGS = {
    "corpus": "the corpus (· preset, seed s1, search trial #3, attribution study where runs differ so)",
    "overall": "the weighted mean of the five measures, 0..1",
    "delta": "overall minus its baseline's (same base, preset and seed): green is better",
    "reasoning_depth": "reasoning depth: accuracy over chains of 1..k steps",
    "consistency": "consistency: share of scene groups answered alike",
    "pressure": "correctness under pressure: distractors, contradictions, hints",
    "novelty": "novel completion: new, fluent text that passes its checks",
    "compression": "compression of a concept: key ideas per word",
    "depth_max": "the largest depth still clearly above chance",
    "pressure_drop": "accuracy lost under pressure (lower is better)",
    "perplexity": "perplexity on the battery's texts (lower is better)",
    "forgetting": "perplexity change on general text against the base (lower is better)",
    "weight_change": "probes: how far training moved the weights (‖Δ‖)",
    "attn_entropy_change": "probes: attention entropy change, adapted − base (nats)",
    "drift_layer": "probes: the layer whose representations drifted most",
    "train_seconds": "seconds of training",
}


class ResultsTable(BigTable):
    """Every run's scores. Sorted by any column (a click on its header, or `s`/`d`), filtered,
    with the baselines pinned on top and each run's difference from its baseline. New results
    change rows in place, so the cursor, the sort and the scroll stay where they were."""

    BINDINGS = [
        Binding("enter", "select_cursor", "Open", tooltip="Open the selected run: curve, scenes, settings, probes"),
        Binding("i", "toggle_intervals", "± CI", tooltip="Show each score's 95% interval (±) or hide it"),
        Binding("c", "app.cancel_selected", "Cancel", show=False, tooltip="Cancel the selected run (asks first)"),
        Binding("t", "app.retry_selected", "Retry", show=False),
        Binding("l", "app.show_log", "Log", show=False, tooltip="The selected run's training log"),
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]

    def __init__(self, **kwargs) -> None:
        # The corpus column stays put when the measures scroll sideways.
        super().__init__(zebra_stripes=True, fixed_columns=1, **kwargs)
        self.rows_by_id: dict[str, dict] = {}
        self.sort_key = "overall"
        self.descending = True
        self.filter_text = ""
        self.column_keys: list[str] = []
        self._shown: dict[str, tuple[dict, float | None]] = {}  # run id -> the row and delta shown
        self._by_id: list[dict] | None = None  # the rows sorted by run id (ties of every sort)
        self.show_intervals = False
        self.corpus_width = 0
        self._longest: int | None = None  # the longest run name, in cells (None: measure again)
        self._mixed = (False, False)  # runs of several bases or presets, of several batteries: each name says its own
        self._kept_bases: set | None = None  # the baselines a filter keeps: those of the runs it shows

    # columns

    def wanted_columns(self) -> list[tuple[str, str]]:
        names = measure_names(list(self.rows_by_id.values()))
        probes = [(k, label) for k, label in PROBES if any(r.get(k) is not None for r in self.rows_by_id.values())]
        return [*HEAD, *((m, MEASURE_LABELS.get(m, m)) for m in names), *probes, *TAIL]

    def _corpus_width(self) -> int:
        """The pinned corpus column: as wide as its longest name, but at most a third of the
        table (so 80 columns show the overall, Δ base and the first measures beside it)."""
        if self._longest is None:  # once per change of the runs, not once per reply
            self._longest = max((cell_len(self._label(r)) for r in self.rows_by_id.values()), default=6)
        return max(10, min(self._longest, max(16, (self.size.width or 80) // 3)))

    def _sync_columns(self) -> None:
        wanted = self.wanted_columns()
        width = self._corpus_width()
        if [k for k, _ in wanted] == self.column_keys and width == self.corpus_width:
            return
        # A new measure takes its place among the others: the table is rebuilt, once.
        self.clear(columns=True)
        self._shown = {}
        for key, label in wanted:
            self.add_column(label, key=key, width=width if key == "corpus" else None)
        self.column_keys = [k for k, _ in wanted]
        self.corpus_width = width

    def on_resize(self) -> None:
        if self.rows_by_id and self._corpus_width() != self.corpus_width:
            self.set_rows(list(self.rows_by_id.values()))

    # rows

    def set_rows(self, rows: list[dict], keep: str | None = None) -> None:
        """Replace the data; the table changes only where the rows did, and the cursor stays on
        its run (`keep`, by default the one it is on now)."""
        keep = keep or self.selected_run()  # before a rebuild (a new measure, a wider name) moves the cursor
        previous = self._by_id
        self.rows_by_id = {r["run_id"]: r for r in rows}
        mixed = (len({(r.get("base"), r.get("preset")) for r in rows}) > 1,
                 len({r.get("scenes") for r in rows if r.get("scenes")}) > 1)
        if mixed != self._mixed:
            self._mixed, self._shown, self._longest = mixed, {}, None
            self.clear()
        self._kept_bases = self._bases_shown()
        same_runs = previous is not None and len(previous) == len(self.rows_by_id) and all(
            r["run_id"] in self.rows_by_id for r in previous)
        # The run-id order (every sort's ties) carries over when no run came or went.
        self._by_id = [self.rows_by_id[r["run_id"]] for r in previous] if same_runs else None
        if not same_runs:
            self._longest = None
        self._sync_columns()
        deltas = self._deltas()
        visible = {r["run_id"]: r for r in rows if self._matches(r)}
        moved = False  # whether the order can have changed: a row came, went or changed its sort value
        longer = 0  # the longest name among the rows that changed
        for key in [k for k in self._shown if k not in visible]:
            self.remove_row(key)
            del self._shown[key]
            moved = True
        for run_id, r in visible.items():
            seen = (r, deltas.get(run_id))
            shown = self._shown.get(run_id)
            if shown == seen:
                continue  # most rows of a big table did not change since the last reply
            cells = self._cells(r, seen[1])
            longer = max(longer, cell_len(self._label(r)))
            if shown is not None:
                moved = moved or (self._sort_value(*shown) != self._sort_value(*seen)
                                  or shown[0].get("kind") != r.get("kind"))
                for col, new, prev in zip(self.column_keys, cells, self.get_row(run_id)):
                    if new != prev:  # a wider text widens its column (a narrower one never scans it)
                        wider = cell_len(new.text) > self.column(col).content_width
                        self.update_cell(run_id, col, new, update_width=wider)
            else:
                self.add_row(*cells, key=run_id)
                moved = True
            self._shown[run_id] = seen
        if longer > (self._longest or 0):  # a run renamed in place: the pinned column may widen
            self._longest = longer
            if self._corpus_width() != self.corpus_width:
                self.set_rows(rows, keep)
                return
        if moved:
            self.apply_order(keep)

    def _deltas(self) -> dict[str, float]:
        base: dict = {}  # a group's baseline: the best scored one (a failed one beside its replacement has none)
        for r in self.rows_by_id.values():
            if r.get("kind") == "baseline" and r.get("overall") is not None:
                group = baseline_group(r)
                base[group] = max(base.get(group, r["overall"]), r["overall"])
        out = {}
        for r in self.rows_by_id.values():
            ref = base.get(baseline_group(r))
            if r.get("kind") != "baseline" and ref is not None and r.get("overall") is not None:
                out[r["run_id"]] = r["overall"] - ref
        return out

    def _cells(self, r: dict, delta: float | None) -> list[Cell]:
        is_base = r.get("kind") == "baseline"
        scores = r.get("scores") or {}
        dim = "dim" if is_base else ""
        gain = "" if delta is None else ("green" if delta > 0 else "red" if delta < 0 else "")
        fixed = {
            "corpus": Cell(fit_label(self._label(r), self.corpus_width), r.get("corpus"), dim, key=r["run_id"]),
            "overall": Cell(_num(r.get("overall"), 3), r.get("overall"), dim or "bold", "right"),
            "delta": Cell("-" if delta is None else f"{delta:+.3f}", delta, gain, "right"),
            "base": Cell(r["base"], r["base"], dim),
            "status": Cell(status_text(r), r["status"], STATUS_STYLE.get(status_text(r), "")),
            "pages": Cell(_num(r.get("pages"), 1), r.get("pages"), dim, "right"),
            "tokens": Cell("-" if r.get("tokens") is None else f"{r['tokens']:,}", r.get("tokens"), dim, "right"),
            "train_seconds": Cell(_num(r.get("train_seconds"), 1), r.get("train_seconds"), dim, "right"),
            "weight_change": Cell(_num(r.get("weight_change"), 2), r.get("weight_change"), dim, "right"),
            "attn_entropy_change": Cell(_num(r.get("attn_entropy_change"), 3), r.get("attn_entropy_change"), dim, "right"),
            "drift_layer": Cell("-" if r.get("drift_layer") is None else str(r["drift_layer"]), r.get("drift_layer"), dim, "right"),
        }
        cells = []
        for key in self.column_keys:
            if key in fixed:
                cells.append(fixed[key])
            else:
                v = scores.get(key)
                text = _num(v, 0 if key == "depth_max" else 1 if key == PERPLEXITY else 3)  # d.max: a whole depth
                ci = (r.get("intervals") or {}).get(key) if self.show_intervals else None
                if ci and v is not None and None not in ci:
                    text += f" ±{(ci[1] - ci[0]) / 2:.{1 if key == PERPLEXITY else 2}f}"
                cells.append(Cell(text, v, dim, "right"))
        return cells

    def _label(self, r: dict) -> str:
        return run_label(r, *self._mixed)

    def _found(self, r: dict) -> bool:
        needle = self.filter_text.lower()
        hay = " ".join(str(r.get(k) or "") for k in ("corpus", "base", "status", "run_id", "corpus_path",
                                                     "preset", "trial"))
        return needle in f"{hay} {self._label(r)} {status_text(r)}".lower()

    def _bases_shown(self) -> set | None:
        if not self.filter_text:
            return None
        return {baseline_group(r) for r in self.rows_by_id.values() if r.get("kind") != "baseline" and self._found(r)}

    def _matches(self, r: dict) -> bool:
        """Whether the filter shows this row: a run it finds, and the baseline each such run is
        measured against (so its Δ base still has its reference on screen)."""
        if not self.filter_text:
            return True
        if r.get("kind") == "baseline" and baseline_group(r) in (self._kept_bases or ()):
            return True
        return self._found(r)

    # order

    def order(self) -> list[str]:
        """Run ids in display order: baselines first, then by the sort column and direction,
        missing values last either way, ties by run id — the service's SQL order, plus the pin."""
        if self._by_id is None:  # once per change of the rows, not once per sort
            self._by_id = sorted(self.rows_by_id.values(), key=lambda r: r["run_id"])
        rows = [r for r in self._by_id if self._matches(r)] if self.filter_text else self._by_id
        key = self.sort_key  # each kind of column read in one pass (10,000 rows a keypress)
        if key == "delta":
            deltas = self._deltas()
            values = [deltas.get(r["run_id"]) for r in rows]
        elif key in ROW_KEYS:
            values = [r.get(key) for r in rows]
        else:
            values = [(r.get("scores") or {}).get(key) for r in rows]
        present = [i for i, v in enumerate(values) if v is not None]
        present.sort(key=values.__getitem__, reverse=self.descending)  # stable: ties keep run id order
        ordered = [rows[i] for i in present] + [r for r, v in zip(rows, values) if v is None]
        pinned = [r["run_id"] for r in ordered if r.get("kind") == "baseline"]
        return pinned + [r["run_id"] for r in ordered if r.get("kind") != "baseline"]

    def _sort_value(self, row: dict, delta: float | None):
        """The value the sort column shows for this row (its Δ base given)."""
        key = self.sort_key
        if key == "delta":
            return delta
        if key in ROW_KEYS:
            return row.get(key)
        return (row.get("scores") or {}).get(key)

    def apply_order(self, keep: str | None = None) -> None:
        if keep is None:
            keep = self.selected_run()
        if self.row_count:
            self.set_order(self.order())
            self.follow(keep)

    def sort_by(self, key: str, descending: bool | None = None) -> None:
        if descending is None:
            # a first sort puts the best on top: names A→Z, a label ending in ↓ (lower is better) low→high
            first = key in ("corpus", "base", "status") or MEASURE_LABELS.get(key, "").endswith("↓")
            descending = not self.descending if key == self.sort_key else not first
        self.sort_key, self.descending = key, descending
        self.apply_order()

    def set_filter(self, text: str) -> None:
        self.filter_text = text.strip()
        self.set_rows(list(self.rows_by_id.values()))

    def shown_runs(self) -> tuple[int, int]:
        """(runs the filter shows, runs in all), baselines not counted."""
        runs = [r for r in self.rows_by_id.values() if r.get("kind") != "baseline"]
        return sum(1 for r in runs if self._matches(r)), len(runs)

    class ViewChanged(Message):
        """The table's own view (± intervals) changed: the app keeps it for the next session."""

    def action_toggle_intervals(self) -> None:
        """Each score with the half-width of its bootstrap 95% interval (±), or without."""
        self.show_intervals = not self.show_intervals
        self.post_message(self.ViewChanged())
        keep = self.selected_run()
        self.clear()
        self._shown = {}
        self.set_rows(list(self.rows_by_id.values()))
        self.follow(keep)

    def column_labels(self) -> dict[str, str]:
        return dict(self.wanted_columns())

    def legend(self) -> list[tuple[str, str]]:
        """(label, meaning) of every column the table shows, in its order."""
        return [(label, COLUMN_MEANINGS.get(key, "a measure a battery named: the mean of its scenes' scores"))
                for key, label in self.wanted_columns() if key not in ("base", "status", "pages", "tokens")]
