"""The ltm-tui dashboard (Textual): devices, the queue and the ranked results, live.

It is a client of the workspace's job service (started on demand, so the jobs go on when the
dashboard quits or the SSH connection drops) and never imports torch. Requests go over the
service's Unix socket on asyncio (`ltm_tui.link`), device readings are taken in a thread, and the
service's event stream moves the progress bars and refreshes the results as runs finish.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.markup import escape
from textual.widgets import Footer, Header, Input, Label, Static

from backend.core.devices import DeviceMonitor
from backend.core.states import JobState
from ltm_tui.link import Link
from ltm_tui.report import baseline_for
from ltm_tui.screens import (
    CompareScreen,
    ConfirmScreen,
    ExportScreen,
    HelpScreen,
    LogScreen,
    PickerScreen,
    RunScreen,
)
from ltm_tui.studies import AttributionScreen, SearchScreen, SortTable
from ltm_tui.view import VIEW_FILE, DashboardView
from ltm_tui.widgets import DevicePanel, QueueTable, ResultsTable, job_holders, job_label, run_label

JOBS_POLL_SECONDS = 5.0  # the event stream moves the bars; this catches anything it missed
RECONNECT_SECONDS = 2.0
NODES_POLL_SECONDS = 2.0  # a Ray cluster's nodes: the service reads them no more often


class LtmApp(App):
    """Queue corpora, watch them train, sort what they scored."""

    CSS_PATH = "app.tcss"
    TITLE = "ltm-tui"
    # In the footer's order: 80 columns over SSH show Help and the everyday keys; the rest are in it.
    BINDINGS = [
        Binding("question_mark", "help", "Help", tooltip="Every key"),
        Binding("a", "add", "Add", tooltip="Open the file picker to queue corpora"),
        Binding("s", "cycle_sort", "Sort", tooltip="Sort the results by the next column (Shift+letter: by the "
                "column whose name starts with it, e.g. Shift+O overall; again: the next such column, "
                "Shift+P press then ppl)"),
        Binding("d", "toggle_direction", "Asc/desc", tooltip="Reverse the results' sort"),
        Binding("slash", "filter", "Filter", tooltip="Filter the results by corpus, base or status"),
        Binding("f", "attribution", "Files", show=False, tooltip="Which file makes the difference (attribution)"),
        Binding("o", "search", "Search", show=False, tooltip="Searches over settings: trials and the best"),
        Binding("r", "refresh", "Refresh", show=False, tooltip="Read the queue and the results again"),
        Binding("v", "compare", "Compare", tooltip="Compare the selected run with its baseline or a marked run"),
        Binding("e", "export", "Export", tooltip="Write the results table to CSV"),
        Binding("m", "mark_compare", "Mark", show=False, tooltip="Mark the selected run for a comparison (v)"),
        Binding("escape", "clear_filter", "Clear filter", show=False, tooltip="Clear the results' filter"),
        Binding("q", "quit", "Quit", tooltip="Quit the dashboard (the jobs go on in the service)"),
    ]

    # Keys of the dashboard itself: off while another screen (picker, run, help) is on top.
    DASHBOARD_ACTIONS = frozenset({"add", "cycle_sort", "toggle_direction", "filter", "export", "refresh",
                                   "attribution", "search", "compare", "mark_compare", "clear_filter"})

    def __init__(
        self,
        workspace: str | None = None,
        *,
        defaults: dict[str, Any] | None = None,
        monitor: DeviceMonitor | None = None,
        poll_seconds: float = 1.0,
        picker_root: str | None = None,
    ) -> None:
        super().__init__()
        from backend.core.workspace import Workspace, file_mode

        self.workspace = Workspace.resolve(workspace)
        self.file_mode = file_mode()  # read now, before the app's threads start: exports get it
        self.defaults = defaults or {}
        self.monitor = monitor
        self.poll_seconds = poll_seconds
        self.picker_root = Path(picker_root or os.getcwd())
        self.link: Link | None = None
        self.cluster = False  # the service's workers run on a Ray cluster: the panel lists its nodes
        self.jobs: list[dict] = []
        self.status_line = "connecting to the job service…"
        self._results_due = False
        self.picker: PickerScreen | None = None  # kept: Esc and reopening keep its folder and marks
        self.compare_mark: str | None = None
        self.tasks_waiting: dict[str, Any] = {}  # task id -> what to call when it ends
        self.view = DashboardView.load(self.workspace.root / VIEW_FILE)

    # --- layout ----------------------------------------------------------------------------

    def notify(self, message: str, *, title: str = "", severity="information", timeout: float | None = None,
               markup: bool = False) -> None:
        """A notification names files, runs and errors as they are: never read as markup (a file
        called `[reverse]x.txt` shows as that)."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def action_screenshot(self, filename: str | None = None, path: str | None = None) -> None:
        """An SVG of the screen, saved in the workspace's screenshots/ (Textual's default,
        ~/Downloads, does not exist on a headless box), and a notice that says where it went."""
        import time

        folder = Path(path).expanduser() if path else self.workspace.root / "screenshots"
        target = folder / (filename or f"ltm-tui-{time.strftime('%Y%m%d-%H%M%S')}.svg")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            target.write_text(self.export_screenshot(), encoding="utf-8")
        except OSError as exc:
            self.notify(f"cannot save a screenshot to {target}: {exc.strerror}", title="Screenshot",
                        severity="error")
            return
        self.notify(f"saved {target}", title="Screenshot")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.DASHBOARD_ACTIONS and len(self.screen_stack) > 1:
            return False
        return True

    def compose(self) -> ComposeResult:
        # Held, not queried: the app's queries search the screen on top (a picker, a run), and
        # these are updated by events and workers whatever screen is showing.
        self.device_panel = DevicePanel(self.monitor, id="devices")
        self.queue_table = QueueTable(id="queue")
        self.queue_table.border_title = "queue"
        self.filter_box = Input(placeholder="part of a corpus, base, preset or status · Enter keeps it · Esc clears",
                                id="filter", compact=True)
        self.filter_bar = Horizontal(Label("filter ", id="filter-label"), self.filter_box, id="filter-bar")
        self.results_table = ResultsTable(id="results")
        self.results_table.border_title = "results"
        self.hint_box = Static(self.status_line, id="hint")
        yield Header()
        yield self.device_panel
        yield self.queue_table
        yield self.filter_bar
        yield self.results_table
        yield self.hint_box
        yield Footer()

    def on_mount(self) -> None:
        view, table = self.view, self.results_table
        table.sort_key, table.descending, table.show_intervals = view.sort, view.descending, view.intervals
        table.filter_text = view.filter
        self.filter_box.value = view.filter
        self.filter_bar.display = bool(view.filter)
        self.results_table.focus()
        self.sub_title = str(self.workspace.root)
        if self.monitor is None and self.poll_seconds:
            self.monitor = DeviceMonitor()
            self.device_panel.monitor = self.monitor
        if self.poll_seconds:
            self.poll_devices()
            self.set_interval(self.poll_seconds, self.poll_devices)
            self.set_interval(max(self.poll_seconds, NODES_POLL_SECONDS), self.refresh_nodes)
        self.set_interval(JOBS_POLL_SECONDS, self.refresh_jobs)
        self.set_interval(0.5, self._results_if_due)
        self.connect()

    def on_unmount(self) -> None:
        if self.monitor is not None:
            self.monitor.close()

    # --- the service -----------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="connect")
    def connect(self) -> None:
        """Find the workspace's service, or start it (detached: it outlives the dashboard)."""
        from backend.core.errors import LtmError
        from backend.jobs.client import connect

        try:
            client = connect(self.workspace)
            try:
                cluster = client.call("ping").get("executor") == "ray"
            finally:
                client.close()
        except LtmError as exc:
            self.call_from_thread(self._offline, exc.one_line())
            return
        self.call_from_thread(self._online, cluster)

    def _online(self, cluster: bool = False) -> None:
        self.cluster = cluster
        self.link = Link(self.workspace.socket_path)
        self.listen()
        self.refresh_all()

    def _offline(self, why: str) -> None:
        self.link = None
        self.hint(Text(f"no job service: {why}; retrying", style="bold red"))
        self.set_timer(RECONNECT_SECONDS * 5, self.connect)

    @work(exclusive=True, group="events")
    async def listen(self) -> None:
        from backend.core.errors import LtmError

        try:
            async for event in self.link.events():
                self.on_service_event(event)
        except (LtmError, OSError, ValueError):
            pass
        self.link = None
        self.hint(Text("the job service stopped; reconnecting…", style="yellow"))
        self.set_timer(RECONNECT_SECONDS, self.connect)

    def on_service_event(self, event: dict) -> None:
        kind = event.get("type")
        queue = self.queue_table
        if kind in ("progress", "eval_progress"):
            queue.on_progress(event)
            if queue.selected_run() == event.get("run_id"):
                self._queue_hint()
        elif kind == "state":
            queue.on_state(event)
            self._update_queue_title()
            status = JobState(event["status"])
            if status.is_terminal() or status in (JobState.TRAINING, JobState.EVALUATING):
                self._results_due = True
            if event.get("status") in ("queued", "starting", "done"):
                self.refresh_jobs()
        elif kind == "worker":
            self.refresh_jobs()
            if event.get("stuck"):  # the kernel holds it (a GPU driver fault): its card waits
                self.notify(f"worker {event['pid']}: {event['stuck']}", severity="error", timeout=60)
        elif kind == "task":
            self._task_event(event)
        elif kind == "service" and event.get("status") == "trouble":
            self.notify(event.get("message") or "the job service is in trouble; see service.log",
                        severity="error", timeout=30)

    def _results_if_due(self) -> None:
        if self._results_due and self.link is not None:
            self._results_due = False
            self.refresh_results()

    def refresh_all(self) -> None:
        self.refresh_jobs()
        self.refresh_results()

    @work(exclusive=True, group="jobs")
    async def refresh_jobs(self) -> None:
        from backend.core.errors import LtmError

        if self.link is None:
            return
        try:
            jobs = await self.link.call("jobs")
        except LtmError as exc:
            self.hint(Text(exc.one_line(), style="red"))
            return
        self.jobs = jobs
        self.queue_table.set_jobs(jobs)
        self._update_queue_title()

    @work(exclusive=True, group="results")
    async def refresh_results(self) -> None:
        from backend.core.errors import LtmError

        if self.link is None:
            return
        table = self.results_table
        try:
            rows = await self.link.call("results", sort=table.sort_key, descending=table.descending)
        except LtmError as exc:
            if table.sort_key == "overall" or "cannot sort by" not in str(exc):  # a stopped service, say
                self.hint(Text(exc.one_line(), style="red"))
                return
            # A sort the service does not know (a measure no run has any more, a hand-edited
            # dashboard.json): the table falls back to overall rather than stay empty.
            self.notify(f"cannot sort by {table.sort_key!r}: sorted by overall", severity="warning")
            self.sort_results("overall", True)
            self.refresh_results()
            return
        table.set_rows(rows)
        self._update_results_title()
        self.hint(self._summary())

    def _update_queue_title(self) -> None:
        counts: dict[str, int] = {}
        for j in self.queue_table.jobs.values():  # with the states the events brought since the reply
            counts[j["status"]] = counts.get(j["status"], 0) + 1
        parts = [f"{n} {s}" for s, n in counts.items() if s in ("training", "evaluating", "starting", "queued", "failed")]
        self.queue_table.border_title = "queue" + (f" · {' · '.join(parts)}" if parts else "")

    def _update_results_title(self) -> None:
        table = self.results_table
        label = table.column_labels().get(table.sort_key, table.sort_key).rstrip("↓")
        order = "high→low" if table.descending else "low→high"
        if table.sort_key in ("corpus", "base", "status"):
            order = "Z→A" if table.descending else "A→Z"
        shown, total = table.shown_runs()
        count = f"{shown} of {total} runs" if table.filter_text else f"{total} runs"
        filt = f" · filter “{escape(table.filter_text)}” (Esc clears)" if table.filter_text else ""
        table.border_title = f"results · {count} · sorted by {label} {order}{filt}"

    def _summary(self) -> Text:
        table = self.results_table
        if not table.rows_by_id:
            return Text("No runs yet: press a to pick corpora (or run `ltm-tui run FILE...`).", style="yellow")
        return Text("? keys and columns · a add · Enter opens a run · s/d, Shift+letter or a header click sorts · "
                    "/ filter · v compare", style="dim")

    def hint(self, text: Text | str) -> None:
        self.hint_box.update(text)

    # --- devices ---------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="devices")
    def poll_devices(self) -> None:
        if self.cluster:  # the cluster's nodes, this box among them, come from the service
            return
        snapshot = self.monitor.read()
        self.call_from_thread(self.device_panel.show, snapshot, job_holders(self.jobs))

    @work(exclusive=True, group="nodes")
    async def refresh_nodes(self) -> None:
        """A Ray service's nodes for the device panel (it reads them at most every 2 s)."""
        from backend.core.errors import LtmError

        if self.link is None or not self.cluster:
            return
        try:
            nodes = await self.link.call("devices")
        except LtmError:
            return  # the panel keeps the last reading; the queue's hint says what is wrong
        if nodes is not None:
            self.device_panel.show_nodes(nodes, job_holders(self.jobs))

    # --- actions ---------------------------------------------------------------------------

    def action_add(self) -> None:
        if self.picker is None:  # installed: popping it keeps it, with its folder and marks
            self.picker = PickerScreen(self.picker_root, self.defaults, self.workspace)
            self.install_screen(self.picker, name="picker")
        self.push_screen("picker")

    def submit(self, paths: list[str], settings: dict, seeds: list[int]) -> None:
        self._submit(paths, settings, seeds)

    @work(group="submit")
    async def _submit(self, paths: list[str], settings: dict, seeds: list[int]) -> None:
        from backend.core.errors import LtmError

        if self.link is None:
            self.notify("the job service is not connected yet; try again in a moment", severity="error")
            return
        try:
            sub = await self.link.call("submit", paths=paths, settings=settings, seeds=seeds)
        except LtmError as exc:
            self.notify(exc.one_line(), severity="error", timeout=10)
            return
        for line in sub["errors"]:
            self.notify(line, severity="error", timeout=10)
        if sub["run_ids"]:
            new = sub.get("new_baseline_ids") or []  # a baseline already scored is not queued again
            self.notify(f"queued {len(sub['run_ids'])} run(s)" + (f" and {len(new)} baseline(s)" if new else ""))
        self.refresh_all()

    @work(group="studies")
    async def start_attribution(self, paths: list[str], settings: dict, seeds: list[int]) -> None:
        """Queue an attribution study over these files (the service's `attribute` op)."""
        from backend.core.errors import LtmError

        if self.link is None:
            self.notify("the job service is not connected yet; try again in a moment", severity="error")
            return
        try:
            sub = await self.link.call("attribute", paths=paths, settings=settings, subsets=None, seeds=seeds)
        except LtmError as exc:
            self.notify(exc.one_line(), severity="error", timeout=10)
            return
        self.notify(f"attribution study {sub['study']}: {len(sub['run_ids'])} runs, {len(sub['queued'])} newly "
                    "queued; f shows it")
        for note in sub.get("notes") or []:
            self.notify(note, severity="warning", timeout=10)
        self.refresh_all()

    @work(group="studies")
    async def start_search(self, request: dict) -> None:
        """Start a search in the service (`search_start`); the `o` screen follows it."""
        from backend.core.errors import LtmError

        if self.link is None:
            self.notify("the job service is not connected yet; try again in a moment", severity="error")
            return
        try:
            started = await self.link.call("search_start", **request)
        except LtmError as exc:
            self.notify(exc.one_line(), severity="error", timeout=10)
            return
        self.notify(f"search {started['study']}: {started['status']}, {request['target']} trials; o shows it")
        self.refresh_all()

    def calibrate(self, settings, done) -> None:
        """Measure this machine for these settings in a worker slot (a `calibrate` task, as
        `ltm-tui estimate` starts); `done(None)` when it is stored, `done(error)` if it failed."""
        self._calibrate(settings, done)

    @work(group="calibrate")
    async def _calibrate(self, settings, done) -> None:
        from backend.core.errors import LtmError

        if self.link is None:
            done("the job service is not connected yet; try again in a moment")
            return
        try:
            task = await self.link.call("task", kind="calibrate", base=settings.base, train=settings.train,
                                        lora=settings.lora or None, steps=8, scenes=settings.scenes)
        except LtmError as exc:
            done(exc.one_line())
            return
        if task.get("task_id") is None:  # nothing to do: known already
            done(None)
            return
        self.tasks_waiting[task["task_id"]] = done

    def _task_event(self, event: dict) -> None:
        done = self.tasks_waiting.get(event.get("task_id"))
        if done is None or event.get("status") not in ("done", "failed", "cancelled"):
            return
        del self.tasks_waiting[event["task_id"]]
        done(None if event["status"] == "done" else (event.get("error") or event["status"]))

    def _selected(self) -> tuple[str | None, str]:
        focused = self.focused
        if isinstance(focused, (QueueTable, ResultsTable)):
            run_id = focused.selected_run()
        else:
            run_id = self.results_table.selected_run()
        if run_id in self.queue_table.jobs:
            return run_id, job_label(self.queue_table.jobs[run_id])
        if run_id in self.results_table.rows_by_id:
            return run_id, run_label(self.results_table.rows_by_id[run_id], mixed=True)
        return run_id, run_id or ""

    def action_cancel_selected(self) -> None:
        """Cancelling asks first: a running job stops (its checkpoint is kept for a retry)."""
        run_id, label = self._selected()
        if run_id is None or self.link is None:
            return
        # the queue's copy: it has the progress the events brought since the last reply
        job = self.queue_table.jobs.get(run_id) or next((j for j in self.jobs if j["run_id"] == run_id), None)
        if job is not None and JobState(job["status"]).is_terminal():
            self.notify(f"{label} has ended ({job['status']}): nothing to cancel", severity="warning")
            return
        where = ""
        if job is not None and job.get("step"):
            where = f" at step {job['step']}" + (f" of {job['total']}" if job.get("total") else "")
        status = job["status"] if job else "its job"
        self.push_screen(
            ConfirmScreen(f"Cancel {label} ({status}{where})?",
                          "A running job stops and keeps its checkpoint: t retries it from there."),
            lambda yes: self._job_op("cancel", run_id, label) if yes else None,
        )

    def action_retry_selected(self) -> None:
        run_id, label = self._selected()
        if run_id is not None:
            self._job_op("retry", run_id, label)

    @work(group="job-op")
    async def _job_op(self, op: str, run_id: str, label: str) -> None:
        from backend.core.errors import LtmError

        if self.link is None:
            return
        try:
            await self.link.call(op, run_id=run_id)
        except LtmError as exc:
            self.notify(exc.one_line(), severity="warning", timeout=8)
            return
        self.notify(f"{label}: {'cancelled' if op == 'cancel' else 'queued again'}")
        self.refresh_all()

    def action_show_log(self) -> None:
        run_id, label = self._selected()
        if run_id and self.link is not None:
            self.push_screen(LogScreen(run_id, label))

    def action_mark_compare(self) -> None:
        """`m`: this run is A of the next comparison (`v` on another run opens it)."""
        run_id = self.results_table.selected_run()
        if run_id is None:
            return
        self.compare_mark = None if self.compare_mark == run_id else run_id
        label = run_label(self.results_table.rows_by_id[run_id], mixed=True)
        self.notify(f"{label} marked as A: v on another run compares them" if self.compare_mark
                    else f"{label} unmarked")

    def action_compare(self) -> None:
        """`v`: the selected run against the one marked with `m`, or against its baseline."""
        table = self.results_table
        run_id = table.selected_run()
        if run_id is None or self.link is None:
            return
        other = self.compare_mark if self.compare_mark not in (None, run_id) else None
        if other is None:
            found = baseline_for(list(table.rows_by_id.values()), table.rows_by_id[run_id])
            other = found["run_id"] if found else None
        if other is None:
            self.notify("nothing to compare with: mark a run with m, then press v on another", severity="warning")
            return
        self.push_screen(CompareScreen(other, run_id, dict(table.rows_by_id)))

    def action_open_run(self) -> None:
        run_id = self.results_table.selected_run()
        if run_id and self.link is not None:
            self.push_screen(RunScreen(run_id, self.results_table.rows_by_id.get(run_id)))

    @on(ResultsTable.RowSelected)
    @on(QueueTable.RowSelected)
    def _row_selected(self, event: ResultsTable.RowSelected | QueueTable.RowSelected) -> None:
        if isinstance(event.data_table, (QueueTable, ResultsTable)) and event.row_key is not None and self.link:
            self.push_screen(RunScreen(event.row_key.value, self.results_table.rows_by_id.get(event.row_key.value)))

    @on(ResultsTable.ViewChanged)
    def _view_changed(self) -> None:
        self._keep_view()

    @on(ResultsTable.HeaderSelected, "#results")
    def _header_clicked(self, event: ResultsTable.HeaderSelected) -> None:
        self.sort_results(str(event.column_key.value))

    def sort_results(self, key: str, descending: bool | None = None) -> None:
        table = self.results_table
        table.sort_by(key, descending)
        self._update_results_title()
        self._keep_view()

    def _keep_view(self) -> None:
        """The sort, the filter and ± are kept in the workspace for the next time it opens."""
        table = self.results_table
        self.view = DashboardView(table.sort_key, table.descending, table.filter_text, table.show_intervals)
        self.view.save(self.workspace.root / VIEW_FILE)

    def action_cycle_sort(self) -> None:
        table = self.results_table
        keys = table.column_keys or ["overall"]
        nxt = keys[(keys.index(table.sort_key) + 1) % len(keys)] if table.sort_key in keys else "overall"
        self.sort_results(nxt)

    def action_toggle_direction(self) -> None:
        table = self.results_table
        self.sort_results(table.sort_key, not table.descending)

    def action_filter(self) -> None:
        self.filter_bar.display = True
        self.filter_box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.results_table.set_filter(event.value)
        self._update_results_title()
        self._keep_view()

    @on(Input.Submitted, "#filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        if not event.value.strip():
            self.filter_bar.display = False
        self.results_table.focus()

    def action_clear_filter(self) -> None:
        """Esc: the filter is cleared, wherever the focus is on the dashboard."""
        if self.filter_box.value or self.filter_bar.display:
            self.filter_box.value = ""
            self.results_table.set_filter("")
            self.filter_bar.display = False
            self._update_results_title()
            self._keep_view()
            self.results_table.focus()

    def on_key(self, event) -> None:
        if event.key == "escape" and self.filter_box.has_focus:
            self.action_clear_filter()
            event.stop()
            return
        char = event.character or ""
        if len(self.screen_stack) == 1 and char.isalpha() and char.isupper() and not self.filter_box.has_focus:
            if self.sort_by_letter(char):
                event.stop()

    def sort_by_letter(self, letter: str) -> bool:
        """Shift and a letter: sort by the column whose label starts with it (again: the next such
        column), as a spreadsheet user reaches for a column without cycling through the rest."""
        table = self.results_table
        labels = table.column_labels()
        keys = [k for k in table.column_keys if labels.get(k, k).lstrip("Δ ").lower().startswith(letter.lower())]
        if not keys:
            return False
        nxt = keys[(keys.index(table.sort_key) + 1) % len(keys)] if table.sort_key in keys else keys[0]
        self.sort_results(nxt)
        return True

    @on(QueueTable.RowHighlighted, "#queue")
    def _queue_row(self) -> None:
        self._queue_hint()

    def _queue_hint(self) -> None:
        """The highlighted job, said whole under the tables: its error, or where it stands."""
        job = self.queue_table.selected_job()
        if job is None or not self.queue_table.has_focus:
            return
        name = job_label(job)
        if job.get("error") and job["status"] in ("failed", "interrupted"):
            self.hint(Text(f"{name}: {' '.join(job['error'].split())} (l shows the log, t retries)", style="red"))
        else:
            pid = f" · pid {job['pid']}" if job.get("pid") else ""
            self.hint(Text(f"{name} · {job['status']} · run {job['run_id']}{pid} · c cancels · l log · Enter opens",
                           style="dim"))

    def action_export(self) -> None:
        default = str(Path(os.getcwd()) / "ltm_results_table.csv")
        self.push_screen(ExportScreen(default), self._export)

    @work(group="export")
    async def _export(self, path: str | None) -> None:
        from backend.core.errors import LtmError

        if not path or self.link is None:
            return
        table = self.results_table
        try:  # in the table's order: its column and direction, the baselines on top
            written = await self.link.call("export", path=str(Path(path).expanduser().absolute()),
                                          sort=table.sort_key, descending=table.descending, baselines_first=True,
                                          mode=self.file_mode)
        except LtmError as exc:
            self.notify(exc.one_line(), severity="error", timeout=10)
            return
        self.notify(f"wrote {written}")

    def action_refresh(self) -> None:
        self.refresh_all()

    def action_attribution(self) -> None:
        if self.link is not None:
            self.push_screen(AttributionScreen())

    def action_search(self) -> None:
        if self.link is not None:
            self.push_screen(SearchScreen())

    def action_help(self) -> None:
        from ltm_tui.screens import CorpusTree

        self.push_screen(
            HelpScreen(
                [
                    ("Dashboard", list(self.BINDINGS)),
                    ("Queue panel", list(QueueTable.BINDINGS)),
                    ("Results table", list(ResultsTable.BINDINGS)),
                    ("File picker", list(PickerScreen.BINDINGS) + list(CorpusTree.BINDINGS)
                     + [Binding("enter", "", "Queue", tooltip="Queue this file (or the marked files): asks first")]),
                    ("Run detail", list(RunScreen.BINDINGS)),
                    ("Comparison (v)", list(CompareScreen.BINDINGS)),
                    ("Log (l)", list(LogScreen.BINDINGS)),
                    ("Attribution", list(AttributionScreen.BINDINGS) + list(SortTable.BINDINGS)),
                    ("Search", list(SearchScreen.BINDINGS) + list(SortTable.BINDINGS)),
                    ("Everywhere", [Binding("tab", "", "Next panel"), Binding("ctrl+p", "", "Command palette")]),
                ],
                self.results_table.legend(),
            )
        )

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("Add corpora", "Open the file picker and queue files", self.action_add)
        yield SystemCommand("Open the selected run", "Curve, scenes, settings and probes", self.action_open_run)
        yield SystemCommand("Cancel the selected job", "It stops and keeps its checkpoint", self.action_cancel_selected)
        yield SystemCommand("Retry the selected job", "Queue it again; it resumes", self.action_retry_selected)
        yield SystemCommand("Compare two runs", "The selected run against the marked one (m) or its baseline",
                            self.action_compare)
        yield SystemCommand("Export results to CSV", "ltm_results_table.csv", self.action_export)
        yield SystemCommand("Filter results", "By corpus, base or status", self.action_filter)
        yield SystemCommand("Show a job's log", "The selected job's train.log", self.action_show_log)
        yield SystemCommand("Attribution: which file makes the difference", "Studies of ltm-tui attribute",
                            self.action_attribution)
        yield SystemCommand("Search over settings", "Studies of ltm-tui search: trials, best, importances",
                            self.action_search)
        yield SystemCommand("Help: every key", "All bindings", self.action_help)


def run_app(workspace: str | None = None, defaults: dict[str, Any] | None = None, root: str | None = None) -> int:
    LtmApp(workspace, defaults=defaults, picker_root=root).run()
    return 0
