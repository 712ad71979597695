"""The dashboard's other screens: the file picker, a run's detail, a job's log, export, help."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, DirectoryTree, Footer, Input, Label, Log, Select, Static, TabbedContent, TabPane
from textual_plotext import PlotextPlot

from ltm_tui.report import format_duration

# --- the file picker -----------------------------------------------------------------------


class CorpusTree(DirectoryTree):
    """Folders and the files ltm-tui can read; space marks a file, `a` every file in a folder,
    Backspace goes up to the parent folder, and typing a name's first letters jumps to it."""

    BINDINGS = [
        Binding("space", "toggle_mark", "Mark", tooltip="Mark or unmark the file (a folder opens)"),
        Binding("a", "mark_folder", "Mark folder", tooltip="Mark every readable file in the folder"),
        Binding("backspace", "parent", "Up", tooltip="Show the parent folder"),
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]
    JUMP_SECONDS = 1.0  # letters typed within this long of each other make one name to jump to

    def __init__(self, path: str | Path, marked: dict[Path, None], **kwargs) -> None:
        self.marked = marked  # ordered set, shared with the screen
        self._typed, self._typed_at = "", 0.0
        super().__init__(path, **kwargs)

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        from backend.ingest.corpora import format_of

        return [p for p in paths if not p.name.startswith(".") and (_is_dir(p) or format_of(p))]

    def render_label(self, node, base_style, style):
        label = super().render_label(node, base_style, style)
        if node.data is not None and node.data.path in self.marked:
            return Text.assemble(("✓ ", "bold green"), label)
        return label

    def _highlighted(self) -> Path | None:
        node = self.cursor_node
        return None if node is None or node.data is None else node.data.path

    def action_toggle_mark(self) -> None:
        path = self._highlighted()
        if path is None:
            return
        if _is_dir(path):
            self.action_toggle_node()
            return
        self.screen.toggle([path])
        self._refresh_labels()

    def action_mark_folder(self) -> None:
        path = self._highlighted()
        if path is None:
            return
        folder = path if _is_dir(path) else path.parent
        from backend.ingest.corpora import format_of

        files = sorted(p for p in folder.rglob("*") if not p.name.startswith(".") and p.is_file() and format_of(p))
        self.screen.toggle(files, mark=True)
        self._refresh_labels()

    def action_parent(self) -> None:
        self.screen.open_folder(Path(self.path).parent)

    def on_key(self, event) -> None:
        """A printable key jumps to the next entry whose name starts with what was typed."""
        import time

        char = event.character
        if not char or not char.isprintable() or char == " " or event.key in self._bound_keys():
            return
        now = time.monotonic()
        self._typed = (self._typed if now - self._typed_at < self.JUMP_SECONDS else "") + char.lower()
        self._typed_at = now
        if self.jump_to(self._typed) or self.jump_to(char.lower()):
            event.stop()
            event.prevent_default()

    def _bound_keys(self) -> set[str]:
        return {key.strip() for b in self.BINDINGS for key in b.key.split(",")}

    def jump_to(self, prefix: str) -> bool:
        """Move the cursor to the first line after it (wrapping) whose name starts with `prefix`."""
        count = self.last_line + 1
        start = self.cursor_line
        for step in range(1, count + 1):
            line = (start + step) % count if len(prefix) == 1 else (start + step - 1) % count
            node = self.get_node_at_line(line)
            if node is not None and str(node.label).lower().startswith(prefix):
                self.move_cursor(node, animate=False)
                return True
        return False

    def _refresh_labels(self) -> None:
        self._invalidate()  # labels are drawn from `marked`


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


PREVIEW_COLUMNS = (("file", "file"), ("pages", "pages"), ("tokens", "tokens"), ("time", "time≈"), ("memory", "memory≈"))
BIG_BATCH_RUNS = 20  # a batch of more runs than this says so in red before it is queued


class PickerScreen(Screen):
    """Choose corpora, see what each costs, set the batch's settings, queue them.

    The dashboard keeps one picker: Esc goes back to the dashboard with its folder, marks and
    settings as they were. Queueing always shows the batch's total first (runs, time, peak
    memory and whether it fits) and waits for a yes."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", tooltip="Back to the dashboard (the marks are kept)"),
        Binding("ctrl+s", "queue", "Queue", tooltip="Queue the marked files: shows the total first"),
        Binding("ctrl+l", "focus_path", "Path", tooltip="Type a folder or file to go to"),
        Binding("ctrl+e", "calibrate", "Calibrate", tooltip="Measure this machine for the time≈ and memory≈ columns"),
        Binding("ctrl+x", "clear_marks", "Clear", tooltip="Unmark every file"),
        Binding("ctrl+t", "attribute", "Attribute", tooltip="Which of the marked files makes the difference: "
                "an attribution study over them (f shows it)"),
        Binding("ctrl+o", "search", "Search", tooltip="Search settings over the marked files with a space file "
                "(o shows it)"),
    ]

    def __init__(self, root: Path, defaults: dict[str, Any], workspace) -> None:
        super().__init__()
        self.root = Path(root).expanduser().absolute()
        self.defaults = defaults
        self.workspace = workspace
        self._checked = None  # (RunOptions, the JobSettings they gave): see settings()
        self.marked: dict[Path, None] = {}
        self.info: dict[Path, dict] = {}
        self.forecasts: dict[Path, dict | None] = {}
        self._free = None  # (the settings, when, (free bytes, where)): see _free_memory
        self.calibrating = False
        self._queue_when_read = False  # Enter on a file: the question waits for the files' reading

    def compose(self) -> ComposeResult:
        d = self.defaults
        yield Input(str(self.root), id="path", compact=True,
                    tooltip="A folder to show or a file to mark: Enter goes there (~ works)")
        with Horizontal(id="picker"):
            tree = CorpusTree(self.root, self.marked, id="tree")
            tree.border_title = escape(self.root.name or str(self.root))
            yield tree
            with Vertical(id="picker-side"):
                table = DataTable(id="marked", cursor_type="row")
                table.border_title = "marked: none (space marks, a marks a folder)"
                yield table
                with VerticalScroll(id="picker-settings"):
                    yield _field("base", Input(d.get("base") or "micro", id="base", compact=True,
                                               tooltip="micro, a Hugging Face id, or a local model folder"))
                    yield _field("method", Select([("LoRA", "lora"), ("QLoRA 4-bit", "qlora")],
                                                  value=d.get("method") or "lora", allow_blank=False, id="method",
                                                  compact=True))
                    yield _field("preset", Select([(p, p) for p in ("tiny", "small", "base", "large")],
                                                  value=d.get("preset") or "small", allow_blank=False, id="preset",
                                                  compact=True))
                    yield _field("battery", Input(d.get("scenes") or "", placeholder="built-in scenes/", id="scenes",
                                                  compact=True))
                    yield _field("seeds", Input(str(d.get("seeds") or 1), id="seeds", type="integer", compact=True,
                                                tooltip="runs of each file, each with its own seed"))
                    yield _field("steps", Input(_opt(d.get("steps")), placeholder="auto", id="steps", type="integer",
                                                compact=True))
                    yield _field("tokens", Input(_opt(d.get("min_train_tokens")), placeholder="auto",
                                                 id="min_train_tokens", type="integer", compact=True,
                                                 tooltip="train on at least this many tokens"))
                yield Static(id="picker-total")
                yield Static("", id="picker-hint")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#marked", DataTable)
        for key, label in PREVIEW_COLUMNS:
            table.add_column(label, key=key)
        self.query_one("#tree").focus()
        self._show_total()

    # the folder shown

    def open_folder(self, folder: Path) -> None:
        tree = self.query_one("#tree", CorpusTree)
        folder = folder.expanduser().absolute()
        tree.path = folder
        tree.border_title = escape(folder.name or str(folder))
        self.query_one("#path", Input).value = str(folder)
        tree.focus()

    def action_focus_path(self) -> None:
        self.query_one("#path", Input).focus()

    @on(Input.Submitted, "#path")
    def _path_entered(self, event: Input.Submitted) -> None:
        """A folder is shown; a file is shown in its folder and marked."""
        event.stop()
        text = event.value.strip()
        if not text:
            return
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = Path(self.query_one("#tree", CorpusTree).path) / path
        if _is_dir(path):
            self.open_folder(path)
        elif path.is_file():
            self.open_folder(path.parent)
            self.toggle([path.absolute()], mark=True)
        else:
            self._hint(f"{text}: no such folder or file", "bold red")

    # marking

    def toggle(self, paths: list[Path], mark: bool | None = None) -> None:
        table = self.query_one("#marked", DataTable)
        for path in paths:
            on_now = path in self.marked
            want = (not on_now) if mark is None else mark
            if want and not on_now:
                self.marked[path] = None
                table.add_row(path.name, "…", "…", "…", "…", key=str(path))
                self.inspect(path)
            elif not want and on_now:
                del self.marked[path]
                table.remove_row(str(path))
        table.border_title = f"marked: {len(self.marked)}" if self.marked else "marked: none"
        self._show_total()

    def action_clear_marks(self) -> None:
        self.toggle(list(self.marked), mark=False)
        self.query_one("#tree", CorpusTree)._refresh_labels()

    @work(thread=True, group="inspect")
    def inspect(self, path: Path) -> None:
        from backend.core.errors import LtmError
        from backend.ingest.corpora import inspect_corpus

        try:
            info = inspect_corpus(path).to_dict()
        except LtmError as exc:
            info = {"error": exc.one_line()}
        except Exception as exc:  # noqa: BLE001 - a reader library's own failure: this file is unreadable, the picker stays
            info = {"error": f"{path.name} could not be read ({type(exc).__name__}: {exc})"}
        self.app.call_from_thread(self._show_info, path, info)

    def _show_info(self, path: Path, info: dict) -> None:
        self.info[path] = info
        self._update_preview(path)
        self._show_total()
        if self._queue_when_read and all(p in self.info for p in self.marked):
            self._queue_when_read = False
            self.action_queue()

    def _update_preview(self, path: Path) -> None:
        table = self.query_one("#marked", DataTable)
        if path not in self.marked:
            return
        info = self.info.get(path)
        if info is None:
            return
        key = str(path)
        if "error" in info:
            self.forecasts[path] = None
            table.update_cell(key, "pages", Text("unreadable", style="red"))
            table.update_cell(key, "tokens", Text(info["error"][:60], style="red"), update_width=True)
            return
        tokens, exact = self._tokens(info)
        table.update_cell(key, "pages", f"{info['pages']:.1f}", update_width=True)
        table.update_cell(key, "tokens", f"{tokens:,}" if exact else f"≈{tokens:,}", update_width=True)
        guess = self._forecast(tokens)
        self.forecasts[path] = guess
        if guess:
            table.update_cell(key, "time", format_duration(guess.get("total_seconds")), update_width=True)
            peak = guess.get("peak_memory_bytes")
            mem = "-" if peak is None else f"{peak / 2**30:.1f} GiB"
            table.update_cell(key, "memory", Text(mem, style="bold red") if guess.get("too_big") else mem,
                              update_width=True)
        else:
            table.update_cell(key, "time", Text("?", style="yellow"))
            table.update_cell(key, "memory", Text("?", style="yellow"))

    def _tokens(self, info: dict) -> tuple[int, bool]:
        """The micro model reads UTF-8 bytes: exact for plain text. Otherwise the words times the
        tokens a word this base's tokenizer makes, as the workspace's calibration measured it
        (before any calibration, the forecast's default): shown as an estimate."""
        from backend.core.errors import LtmError
        from backend.studies.forecast import tokens_per_word

        base = self.value("base") or "micro"
        if base == "micro" and info.get("format") in ("text", "markdown"):
            return int(info["bytes"]) + 2, True
        try:
            settings = self.settings()
            spec, train = settings.base, settings.train
        except LtmError:  # a field being typed: the base's default rate
            spec, train = {"base": base}, {}
        per_word, _ = tokens_per_word(self.workspace, spec, train)
        return int(info["words"] * per_word), False

    def _forecast(self, tokens: int) -> dict | None:
        """Predicted time and peak memory from this workspace's calibration and finished runs
        (`ltm-tui estimate` explains them); a peak above the free memory is flagged, with the fix."""
        from backend.studies.forecast import memory_fix, predict

        try:
            settings = self.settings()
            guess = predict(self.workspace, settings.base, settings.train, tokens)
            if guess and guess.get("peak_memory_bytes"):
                free, where = self._free_memory(settings)
                fix = memory_fix(guess["peak_memory_bytes"], free, settings.base, settings.train, where)
                if fix:
                    guess["too_big"] = True
                    guess["fix"] = fix
            return guess
        except Exception:  # a forecast is a courtesy: a field being typed must not break the picker
            return None

    def _free_memory(self, settings) -> tuple[int | None, str]:
        """The free memory the forecasts compare with: read once for all the marked files (on a
        GPU it asks NVML and the service), again when the settings change or after 5 s."""
        import time

        from backend.studies.forecast import free_memory

        now = time.monotonic()
        if self._free is None or self._free[0] is not settings or now - self._free[1] > 5.0:
            self._free = (settings, now, free_memory(settings.base, self.workspace))
        return self._free[2]

    # the batch's total

    def batch(self) -> dict:
        """What queueing the marked files would start: runs, the time and peak memory the
        forecast gives (None where it knows nothing yet), and whether any run would not fit."""
        seeds = max(1, _int(self.value("seeds")) or 1)
        readable = [p for p in self.marked if "error" not in self.info.get(p, {})]
        known = [self.forecasts.get(p) for p in readable]
        times = [g.get("total_seconds") for g in known if g and g.get("total_seconds") is not None]
        peaks = [g.get("peak_memory_bytes") for g in known if g and g.get("peak_memory_bytes")]
        return {
            "files": len(readable),
            "unreadable": len(self.marked) - len(readable),
            "seeds": seeds,
            "runs": len(readable) * seeds,
            "seconds": sum(times) * seeds if times and len(times) == len(readable) else None,
            "peak_bytes": max(peaks) if peaks else None,
            "too_big": next((g["fix"] for g in known if g and g.get("too_big")), None),
            "pending": sum(1 for p in self.marked if p not in self.info),
        }

    def _show_total(self) -> None:
        box = self.query_one("#picker-total", Static)
        if not self.marked:
            box.update(Text("Mark files with space (a marks a folder); ctrl+s queues them.", style="dim"))
            problem = self.problem()
            if problem:
                self._hint(problem, "bold red")
            return
        box.update(batch_line(self.batch()))
        problem = self.problem()
        if problem:
            self._hint(problem, "bold red")

    def _hint(self, text: str, style: str = "") -> None:
        self.query_one("#picker-hint", Static).update(Text(text, style=style))

    # settings

    def value(self, field: str) -> str:
        widget = self.query_one(f"#{field}")
        val = widget.value
        return "" if val is None or val is Select.BLANK else str(val).strip()

    def settings(self):
        """The batch's JobSettings, made and checked exactly as `ltm-tui run` makes them
        (backend.jobs.settings): the picker's fields on top of the dashboard's defaults. QLoRA on
        the micro model is refused there, with the fix, rather than quietly ignored."""
        from backend.jobs.settings import RunOptions

        base = self.value("base") or "micro"
        chosen = {key: self.defaults[key] for key in ("trust_remote_code", "device", "epochs", "block_size",
                                                     "micro_batch") if self.defaults.get(key) is not None}
        options = RunOptions(
            base=base,
            preset=self.value("preset") or None,
            quant="4bit" if self.value("method") == "qlora" else None,
            scenes=self.value("scenes") or None,
            steps=_int(self.value("steps")),
            min_train_tokens=_int(self.value("min_train_tokens")),
            **chosen,
        )
        # checking reads every battery: once per change of the fields, not once per previewed file
        if self._checked is None or self._checked[0] != options:
            self._checked = (options, options.job_settings())
        return self._checked[1]

    def problem(self) -> str | None:
        """The first thing wrong with the fields, as one line, or None."""
        from backend.core.errors import LtmError

        if self.value("method") == "qlora" and (self.value("base") or "micro") == "micro":
            return ("QLoRA (4-bit) is for Hugging Face bases; micro trains in full: "
                    "choose LoRA, or a Hugging Face base")
        try:
            self.settings()
        except LtmError as exc:
            return exc.one_line()
        return None

    @on(Input.Changed, "#base, #seeds, #steps, #min_train_tokens")
    @on(Select.Changed)
    def _settings_changed(self) -> None:
        self._hint("")
        for path in self.marked:
            self._update_preview(path)
        self._show_total()

    @on(DirectoryTree.FileSelected)
    def _file_entered(self, event: DirectoryTree.FileSelected) -> None:
        if not self.marked:
            self.toggle([event.path], mark=True)
            self.query_one("#tree", CorpusTree)._refresh_labels()
        unread = [path for path in self.marked if path not in self.info]
        if unread:  # the question shows the batch's time and memory: ask once the files are read
            self._queue_when_read = True
            self._hint(f"reading {unread[0].name}{' and more' if len(unread) > 1 else ''}…", "yellow")
            return
        self.action_queue()

    @on(Input.Submitted, "#picker-settings Input")
    def _field_entered(self) -> None:
        self.action_queue()

    def action_queue(self) -> None:
        """Check the settings, then ask with the batch's total; the files are queued on a yes."""
        from backend.core.errors import LtmError

        if not self.marked:
            self._hint("Mark a file first: space on a file, a on a folder.", "yellow")
            return
        self._checked = None  # queueing checks the batteries as they are now
        problem = self.problem()
        if problem:
            self._hint(problem, "bold red")
            return
        try:
            settings = self.settings()
        except LtmError as exc:
            self._hint(exc.one_line(), "bold red")
            return
        batch = self.batch()
        if not batch["runs"]:
            self._hint("None of the marked files can be read; ctrl+x clears the marks.", "bold red")
            return
        paths = [str(p) for p in self.marked if "error" not in self.info.get(p, {})]
        seeds = list(range(batch["seeds"]))

        def answer(yes: bool | None) -> None:
            if yes:
                self.app.submit(paths, asdict(settings), seeds)
                self.action_clear_marks()
                self.app.pop_screen()

        self.app.push_screen(ConfirmScreen(f"Queue {_plural(batch['runs'], 'run')}?", batch_line(batch),
                                           yes="Queue", danger=batch["runs"] > BIG_BATCH_RUNS or bool(batch["too_big"])),
                             answer)

    def _study_ready(self, least: int) -> tuple[Any, list[str]] | None:
        """The settings and readable marked files for a study, or None with the reason shown."""
        from backend.core.errors import LtmError

        self._checked = None
        problem = self.problem()
        if problem:
            self._hint(problem, "bold red")
            return None
        paths = [str(p) for p in self.marked if "error" not in self.info.get(p, {})]
        if len(paths) < least:
            self._hint(f"mark {least} or more readable files first (space marks, a marks a folder)", "yellow")
            return None
        try:
            return self.settings(), paths
        except LtmError as exc:
            self._hint(exc.one_line(), "bold red")
            return None

    def action_attribute(self) -> None:
        """An attribution study over the marked files (as `ltm-tui attribute`), after a question
        that says how many runs it takes; the `f` screen follows it."""
        from backend.studies.attribution_study import default_subsets

        ready = self._study_ready(2)
        if ready is None:
            return
        settings, paths = ready
        seeds = max(1, _int(self.value("seeds")) or 1)
        subsets = default_subsets(len(paths))
        runs = (len(paths) + 2 + subsets) * seeds

        def answer(yes: bool | None) -> None:
            if yes:
                self.app.start_attribution(paths, asdict(settings), list(range(seeds)))
                self.app.pop_screen()

        self.app.push_screen(ConfirmScreen(
            f"Start an attribution study over {len(paths)} files?",
            f"Up to {_plural(runs, 'run')}: the baseline, each file alone, all together and {subsets} mixed "
            f"subsets, × {_plural(seeds, 'seed')} (runs the workspace has already are reused). "
            "f shows each file's contribution as the runs finish.", yes="Start", danger=runs > BIG_BATCH_RUNS),
            answer)

    def action_search(self) -> None:
        """A search over the marked files (as `ltm-tui search`): a space file, trials, sampler."""
        ready = self._study_ready(1)
        if ready is None:
            return
        settings, paths = ready

        def asked(answer: dict | None) -> None:
            if answer:
                self._start_search(settings, paths, answer)

        self.app.push_screen(SearchAskScreen(self.defaults.get("space") or ""), asked)

    def _start_search(self, settings, paths: list[str], answer: dict) -> None:
        from backend.core.errors import LtmError
        from backend.studies.search import study_request

        try:
            request, notes = study_request(answer["space"], paths, asdict(settings), answer["trials"],
                                           root=self.workspace.root, sampler=answer["sampler"])
        except LtmError as exc:
            self._hint(exc.one_line(), "bold red")
            return
        for note in notes:
            self.app.notify(note)
        self.app.start_search(request)
        self.app.pop_screen()

    def action_calibrate(self) -> None:
        """Measure this machine for these settings, in a worker slot of the service (as
        `ltm-tui estimate` does); the time≈ and memory≈ columns fill in when it is done."""
        from backend.core.errors import LtmError

        try:
            settings = self.settings()
        except LtmError as exc:
            self._hint(exc.one_line(), "bold red")
            return
        if self.calibrating:
            self._hint("calibrating already: the columns fill in when it is done", "yellow")
            return
        self.calibrating = True
        self._hint("calibrating: a few training steps and an evaluation, in a worker slot…", "cyan")
        self.app.calibrate(settings, self._calibrated)

    def _calibrated(self, error: str | None) -> None:
        self.calibrating = False
        if error:
            self._hint(f"calibration failed: {error}", "bold red")
            return
        self._hint("calibrated: time≈ and memory≈ are this machine's", "green")
        for path in self.marked:
            self._update_preview(path)
        self._show_total()


def batch_line(batch: dict) -> Text:
    """`12 runs (3 files × 4 seeds) · ≈ 2h10m · peak ≈ 3.1 GiB: fits` and what is not known yet."""
    out = Text()
    runs = batch["runs"]
    out.append(_plural(runs, "run"), style="bold red" if runs > BIG_BATCH_RUNS else "bold")
    out.append(f" ({_plural(batch['files'], 'file')} × {_plural(batch['seeds'], 'seed')})")
    out.append(" + baselines")
    if batch["seconds"] is not None:
        out.append(f" · ≈ {format_duration(batch['seconds'])} in all")
    else:
        out.append(" · time ? until this machine is calibrated for these settings: ctrl+e (about a minute)"
                   if not batch["pending"] else " · reading files…", style="yellow")
    if batch["peak_bytes"]:
        out.append(f" · peak ≈ {batch['peak_bytes'] / 2**30:.1f} GiB")
        if batch["too_big"]:
            out.append(f": does not fit. {batch['too_big']}", style="bold red")
        else:
            out.append(": fits", style="green")
    if batch["unreadable"]:
        out.append(f" · {_plural(batch['unreadable'], 'unreadable file')} left out", style="red")
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _field(label: str, widget) -> Horizontal:
    return Horizontal(Label(f"{label:>8} "), widget, classes="field")


def _opt(value) -> str:
    return "" if value is None else str(value)


def _int(text: str) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


class SearchAskScreen(ModalScreen[dict | None]):
    """What a search needs besides the files: its space file, how many trials, which sampler."""

    BINDINGS = [Binding("escape", "dismiss_none", "Back")]

    def __init__(self, space: str = "") -> None:
        super().__init__()
        self.space = space

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Label(Text("Search settings over the marked files", style="bold"))
            yield Static(Text("A space file names the settings to try and the objective (docs/search.md; "
                              "docs/search-demo.yaml is an example). Each trial is a run in the queue; o shows "
                              "the trials and the best.", style="dim"), id="confirm-detail")
            yield _field("space", Input(self.space, placeholder="SPACE.yaml", id="search-space", compact=True))
            yield _field("trials", Input("8", id="search-trials", type="integer", compact=True))
            yield _field("sampler", Select([("TPE", "tpe"), ("grid", "grid")], value="tpe", allow_blank=False,
                                           id="search-sampler", compact=True))
            yield Label(Text.assemble(("Enter", "bold"), " starts · ", ("Esc", "bold"), " back"), id="confirm-keys")

    def on_mount(self) -> None:
        self.query_one("#search-space", Input).focus()

    @on(Input.Submitted)
    def _submit(self, event: Input.Submitted) -> None:
        event.stop()
        space = self.query_one("#search-space", Input).value.strip()
        trials = _int(self.query_one("#search-trials", Input).value.strip())
        if not space or not trials or trials < 1:
            self.query_one("#confirm-detail", Static).update(
                Text("give a space file and a number of trials (1 or more)", style="bold red"))
            return
        self.dismiss({"space": str(Path(space).expanduser()), "trials": trials,
                      "sampler": self.query_one("#search-sampler", Select).value})

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """A question before something that costs: Enter or y says yes, Esc or n says no."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("enter", "answer(True)", "Yes", show=False),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "No", show=False),
    ]

    def __init__(self, question: str, detail: str | Text = "", *, yes: str = "Yes", danger: bool = True) -> None:
        super().__init__()
        self.question, self.detail, self.yes, self.danger = question, detail, yes, danger

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box", classes="danger" if self.danger else ""):
            yield Label(Text(self.question, style="bold"), id="confirm-question")
            if self.detail:
                yield Static(self.detail, id="confirm-detail")
            yield Label(Text.assemble(("Enter/y", "bold"), f" {self.yes.lower()} · ", ("Esc/n", "bold"), " back"),
                        id="confirm-keys")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


# --- a run's detail ------------------------------------------------------------------------


class RunScreen(Screen):
    """One run: its loss curve, every scene's result, its settings, and its probes."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("r", "reload", "Reload", tooltip="Read the run again"),
        Binding("1", "tab('curve')", "Curve", show=False),
        Binding("2", "tab('scenes')", "Scenes", show=False),
        Binding("3", "tab('settings')", "Settings", show=False),
        Binding("4", "tab('probes')", "Probes", show=False),
    ]

    def __init__(self, run_id: str, row: dict | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.row = row or {}  # the run's results row: its intervals
        self.detail: dict | None = None

    def compose(self) -> ComposeResult:
        yield Static("loading…", id="run-title")
        with TabbedContent(id="run-tabs"):
            with TabPane("Curve", id="curve"):
                yield PlotextPlot(id="loss")
            with TabPane("Scenes", id="scenes"):
                yield DataTable(id="scene-table", cursor_type="row", zebra_stripes=True)
                yield Static(id="scene-detail")
            with TabPane("Settings", id="settings"):
                with VerticalScroll():
                    yield Static(id="settings-text")
            with TabPane("Probes", id="probes"):
                with VerticalScroll():
                    yield Static(id="probes-text")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#scene-table", DataTable)
        for key, label in (("battery", "battery"), ("scene", "scene"), ("kind", "kind"), ("pass", "pass"),
                           ("score", "score"), ("detail", "answer / text")):
            table.add_column(label, key=key)
        self.action_reload()

    def action_tab(self, tab: str) -> None:
        self.query_one("#run-tabs", TabbedContent).active = tab

    @work(exclusive=True, group="run-detail")
    async def action_reload(self) -> None:
        from backend.core.errors import LtmError

        try:
            detail = await self.app.link.call("run", run_id=self.run_id)
        except LtmError as exc:
            self.query_one("#run-title", Static).update(Text(exc.one_line(), style="bold red"))
            return
        self.show(detail)
        try:
            probes = await self.app.link.call("probes", run_id=self.run_id)
        except LtmError as exc:
            probes = {"error": exc.message}
        self.show_probes(probes)

    def show(self, detail: dict) -> None:
        self.detail = detail
        run = detail["run"]
        corpus = detail.get("corpus") or {}
        name = corpus.get("name") or ("baseline" if run["kind"] == "baseline" else "-")
        overall = "-" if run.get("overall") is None else f"{run['overall']:.3f}"
        title = Text.assemble(
            (name, "bold"), f" · {run['base']} · seed {run['seed']} · ",
            (run["status"], "bold"), f" · overall {overall}",
        )
        if run.get("error"):  # its first line here; the whole of it is in Settings and the log
            first = " ".join(run["error"].split())
            title.append(f"\n{first[:150]}{'…' if len(first) > 150 else ''}", style="red")
        self.query_one("#run-title", Static).update(title)
        self._plot(detail.get("curve") or [])
        self._scenes(detail.get("scenes") or [])
        self.query_one("#settings-text", Static).update(
            _settings_table(run, corpus, detail.get("scores") or {}, self.row.get("intervals") or {})
        )

    def _plot(self, curve: list[dict]) -> None:
        plot = self.query_one("#loss", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        points = [(p["step"], p["loss"]) for p in curve if p.get("loss") is not None]
        if points:
            plt.plot([s for s, _ in points], [v for _, v in points], marker="braille")
            plt.title("training loss")
            plt.xlabel("step")
        else:
            plt.title("no training curve (a baseline, or not trained yet)")
        plot.refresh()

    def _scenes(self, scenes: list[dict]) -> None:
        table = self.query_one("#scene-table", DataTable)
        table.clear()
        # the user's batteries first (the general texts every run reads, `_general`, last); k2 before k10
        ordered = sorted(scenes, key=lambda s: (s["battery"].startswith("_"), natural_key(s["battery"]),
                                                natural_key(s["scene_id"])))
        self.scenes = {f"{s['battery']}/{s['scene_id']}": s for s in ordered}
        for key, s in self.scenes.items():
            ok = s.get("correct")
            mark = Text("✓", style="green") if ok else Text("✗", style="red") if ok is False else Text("-")
            table.add_row(s["battery"], s["scene_id"], s.get("kind") or "-", mark,
                          "-" if s.get("score") is None else f"{s['score']:.3f}", _scene_summary(s), key=key)
        if scenes:
            self._scene_detail(next(iter(self.scenes)))

    @on(DataTable.RowHighlighted, "#scene-table")
    def _scene_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value in getattr(self, "scenes", {}):
            self._scene_detail(event.row_key.value)

    def _scene_detail(self, key: str) -> None:
        """The scene as it was asked: the question and every choice with its log-likelihood (→
        the model's pick, the answer in green), or the prompt, the completion and each check with
        what it wanted."""
        s = self.scenes[key]
        detail = s.get("detail") or {}
        lines = Text()
        lines.append(f"{key}", style="bold")
        lines.append(f"  {s.get('metric') or ''}\n")
        if detail.get("question"):
            lines.append(" ".join(str(detail["question"]).split())[:400] + "\n", style="italic")
        lls = detail.get("loglik") or []
        if lls:
            choices = detail.get("choices") or [f"choice {i}" for i in range(len(lls))]
            for i, c in enumerate(choices):
                ll = lls[i] if i < len(lls) else None
                picked = i == detail.get("pred")
                right = i == detail.get("answer")
                line = f"{'→' if picked else ' '} {c}  {'' if ll is None else f'{ll:.3f}'}"
                lines.append(line + ("  (answer)" if right else "") + "\n", style="green" if right else "")
        if detail.get("prompt") and not lls:
            lines.append("prompt: ", style="bold")
            lines.append(" ".join(str(detail["prompt"]).split())[:300] + "\n")
        if detail.get("text") is not None:
            lines.append("generated: ", style="bold")
            lines.append(detail["text"] + "\n")
        for check in detail.get("checks") or []:
            wanted = check.get("value")
            what = f"{check.get('check')} {wanted!r}" if isinstance(wanted, str) else f"{check.get('check')} {wanted}"
            if wanted is None:
                what = str(check.get("check"))
            lines.append(f"  {'✓' if check.get('passed') else '✗'} {what}\n",
                         style="green" if check.get("passed") else "red")
        self.query_one("#scene-detail", Static).update(lines)

    def show_probes(self, probes: dict | None) -> None:
        box = self.query_one("#probes-text", Static)
        if not probes or probes.get("error"):
            why = (probes or {}).get("error") or "no probes stored"
            box.update(Text(f"No probes for this run yet ({why}).\n"
                            "Probes (weight change, attention, drift) are stored when a run finishes with them on.",
                            style="dim"))
            return
        box.update(probe_view(probes))


def natural_key(text: str) -> tuple:
    """`k2` before `k10`: digits compare as numbers."""
    import re

    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text))


def _scene_summary(s: dict) -> str:
    d = s.get("detail") or {}
    if d.get("text") is not None:
        return d["text"].replace("\n", " ")[:60]
    pred = d.get("pred")
    if not isinstance(pred, int):
        return ""
    choices = d.get("choices")
    picked = choices[pred] if choices and pred < len(choices) else f"choice {pred}"
    lls = d.get("loglik") or []
    return (f"→ {picked}" + (f"  ll {lls[pred]:.2f}" if pred < len(lls) else ""))[:60]


def _settings_table(run: dict, corpus: dict, scores: dict, intervals: dict) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold", no_wrap=True)
    t.add_column()
    rows = [
        ("run", run["run_id"]),
        ("corpus", corpus.get("path") or run.get("corpus_path") or "-"),
        ("pages / words", f"{corpus.get('pages', '-')} / {corpus.get('words', '-')}" if corpus else "-"),
        ("base", run["base"]),
        ("kind", run["kind"]),
        ("seed", str(run["seed"])),
        ("status", run["status"] + (f" ({run['error']})" if run.get("error") else "")),
        ("tokens / steps", f"{run.get('tokens') or '-'} / {run.get('steps') or '-'}"),
        ("train / eval s", f"{_f(run.get('train_seconds'))} / {_f(run.get('eval_seconds'))}"),
        ("final loss", _f(run.get("final_loss"), 4)),
    ]
    for k, v in sorted(scores.items()):
        ci = intervals.get(k)
        span = f"  [{ci[0]:.4f}, {ci[1]:.4f}] 95%" if ci and None not in ci else ""
        rows.append((f"score {k}", _f(v, 4) + span))
    settings = run.get("settings") or {}
    for section in ("base", "train", "lora"):
        for k, v in sorted((settings.get(section) or {}).items()):
            rows.append((f"{section}.{k}", str(v)))
    rows.append(("run folder", run.get("run_dir") or "-"))
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def _f(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


HEAT = " ░▒▓█"


def heatmap(title: str, grid: list[list[float]], *, signed: bool = False, names: list[str] | None = None) -> Text:
    """Rows of cells shaded by magnitude: one line a layer (`L0`: the first block, unless
    `names` say otherwise), one cell a head."""
    flat = [abs(v) for row in grid for v in row if v is not None]
    top = max(flat) if flat else 0.0
    out = Text(f"{title} (max {top:.3g})\n", style="bold")
    for i, row in enumerate(grid):
        out.append(f"{names[i] if names else f'L{i}':<4}")
        for v in row:
            if v is None:
                out.append("  ")
                continue
            level = 0 if top == 0 else min(len(HEAT) - 1, int(abs(v) / top * (len(HEAT) - 1) + 0.5))
            style = ("red" if v < 0 else "green") if signed else "cyan"
            out.append(HEAT[level] * 2, style=style)
        out.append("\n")
    return out


# The probes' summary as a person reads it (docs/probes.md defines each number).
PROBE_LABELS = {
    "weight_change": "weights moved (‖Δ‖, all modules)",
    "weight_rel_change": "weights moved, relative to the base's",
    "attn_entropy_change": "attention entropy change (nats, adapted − base)",
    "attn_js": "attention JS distance to the base",
    "drift_layer": "depth that drifted most (lowest CKA; 0 = embeddings, d = after L(d-1))",
    "min_cka": "lowest CKA with the base (1 = unchanged)",
    "mean_cka": "mean CKA with the base",
    "lens_layer_base": "layer where the answer settles: base",
    "lens_layer_adapter": "layer where the answer settles: adapted",
    "seconds": "seconds the probes took",
}


def depth_name(depth: int) -> str:
    """A depth of the residual stream as the heatmaps name it: `emb`, then `>L0` (after block 0)…"""
    return "emb" if depth == 0 else f">L{depth - 1}"


def probe_view(probes: dict) -> Text:
    out = Text()
    summary = probes.get("summary") or {}
    if summary:
        out.append("summary\n", style="bold")
        width = max(len(PROBE_LABELS.get(k, k)) for k in summary)
        for k, v in summary.items():
            value = "-" if v is None else f"{v:.4g}" if isinstance(v, (int, float)) else str(v)
            out.append(f"  {PROBE_LABELS.get(k, k):<{width}}  {value}\n")
    attention = probes.get("attention") or {}
    for key, title, signed in (("entropy_delta", "attention entropy change, layer × head", True),
                               ("js", "attention JS distance to the base, layer × head", False)):
        if attention.get(key):
            out.append_text(heatmap(title, attention[key], signed=signed))
    cka = probes.get("cka")
    if cka:  # one value a depth: 0 the embeddings, d the output of block d-1 (the L of the rows above)
        out.append_text(heatmap("CKA with the base, per depth (1 = unchanged)", [[v] for v in cka],
                                names=[depth_name(d) for d in range(len(cka))]))
    return out


# --- two runs side by side ----------------------------------------------------------------


class CompareScreen(Screen):
    """Two runs side by side: every score with its interval and the difference, both loss
    curves on one plot, and the scenes that flipped with an exact test (as `ltm-tui compare`)."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("x", "swap", "Swap A/B", tooltip="Swap the two runs"),
    ]

    def __init__(self, run_a: str, run_b: str, rows: dict[str, dict] | None = None) -> None:
        super().__init__()
        self.run_a, self.run_b = run_a, run_b
        self.rows = rows or {}  # the results rows: intervals and labels
        self.details: dict[str, dict] = {}

    def compose(self) -> ComposeResult:
        yield Static("loading…", id="compare-title")
        yield DataTable(id="compare-scores", cursor_type="row", zebra_stripes=True)
        yield Static(id="compare-scenes")
        yield PlotextPlot(id="compare-loss")
        yield Footer()

    def on_mount(self) -> None:
        self.load()

    def action_swap(self) -> None:
        self.run_a, self.run_b = self.run_b, self.run_a
        self.show()

    @work(exclusive=True, group="compare")
    async def load(self) -> None:
        from backend.core.errors import LtmError

        try:
            for run_id in (self.run_a, self.run_b):
                self.details[run_id] = await self.app.link.call("run", run_id=run_id)
        except LtmError as exc:
            self.query_one("#compare-title", Static).update(Text(exc.one_line(), style="bold red"))
            return
        self.show()

    def _run_name(self, run_id: str) -> str:
        from ltm_tui.widgets import run_label

        row = self.rows.get(run_id)
        if row is not None:  # the battery named where the two runs were scored on different ones
            pair = [self.rows.get(k) or {} for k in (self.run_a, self.run_b)]
            return run_label(row, mixed=True, batteries=pair[0].get("scenes") != pair[1].get("scenes"))
        run = self.details[run_id]["run"]
        return (self.details[run_id].get("corpus") or {}).get("name") or run["kind"]

    def show(self) -> None:
        from backend.scoring.stats import compare_runs
        from ltm_tui.report import MEASURE_LABELS, measure_names

        a, b = self.details[self.run_a], self.details[self.run_b]
        name_a, name_b = self._run_name(self.run_a), self._run_name(self.run_b)
        self.query_one("#compare-title", Static).update(Text.assemble(
            ("A ", "bold cyan"), (name_a, "bold"), "  against  ", ("B ", "bold magenta"), (name_b, "bold"),
            ("   x swaps them", "dim")))
        table = self.query_one("#compare-scores", DataTable)
        table.clear(columns=True)
        for key, label in (("measure", "measure"), ("a", "A"), ("b", "B"), ("diff", "B − A"), ("sure", "")):
            table.add_column(label, key=key)
        rows = [{"scores": a.get("scores") or {}}, {"scores": b.get("scores") or {}}]
        ia = (self.rows.get(self.run_a) or {}).get("intervals") or {}
        ib = (self.rows.get(self.run_b) or {}).get("intervals") or {}
        names = ["overall", *measure_names(rows)]
        for m in names:
            va = a["run"].get("overall") if m == "overall" else rows[0]["scores"].get(m)
            vb = b["run"].get("overall") if m == "overall" else rows[1]["scores"].get(m)
            digits = 0 if m == "depth_max" else 1 if m == "perplexity" else 3  # d.max: a whole depth
            lower = MEASURE_LABELS.get(m, "").endswith("↓")  # lower is better
            diff = None if va is None or vb is None else vb - va
            style = "" if not diff else ("green" if (diff > 0) != lower else "red")
            apart = _apart(ia.get(m), ib.get(m))
            table.add_row(MEASURE_LABELS.get(m, m), _with_ci(va, ia.get(m), digits), _with_ci(vb, ib.get(m), digits),
                          Text("-" if diff is None else f"{diff:+.{digits}f}", style=style, justify="right"),
                          Text("intervals apart" if apart else "", style="bold" if apart else "dim"), key=m)
        scenes = compare_runs(a.get("scenes") or [], b.get("scenes") or [])
        line = Text()
        line.append(f"{scenes['shared']} scenes in both · right in both {scenes['both_right']}, "
                    f"wrong in both {scenes['both_wrong']} · ")
        line.append(f"wrong → right {len(scenes['wrong_to_right'])}", style="green")
        line.append(" · ")
        line.append(f"right → wrong {len(scenes['right_to_wrong'])}", style="red")
        line.append(f" · exact McNemar p = {scenes['mcnemar_p']:.3g}")
        flipped = scenes["wrong_to_right"][:6] + scenes["right_to_wrong"][:6]
        if flipped:
            line.append("\nflipped: " + ", ".join(flipped), style="dim")
        self.query_one("#compare-scenes", Static).update(line)
        plot = self.query_one("#compare-loss", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        drawn = 0
        for detail, label, color in ((a, f"A {name_a}", "cyan"), (b, f"B {name_b}", "magenta")):
            points = [(p["step"], p["loss"]) for p in detail.get("curve") or [] if p.get("loss") is not None]
            if points:
                plt.plot([x for x, _ in points], [y for _, y in points], marker="braille", label=label, color=color)
                drawn += 1
        plt.title("training loss" if drawn else "no training curves (baselines, or not trained yet)")
        plt.xlabel("step")
        plot.refresh()


def _with_ci(value, ci, digits: int) -> Text:
    if value is None:
        return Text("-", justify="right")
    text = f"{value:.{digits}f}"
    if ci and None not in ci:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return Text(text, justify="right")


def _apart(ci_a, ci_b) -> bool:
    """Whether two 95% intervals do not overlap (a difference the runs' own noise does not explain)."""
    if not ci_a or not ci_b or None in ci_a or None in ci_b:
        return False
    return ci_a[1] < ci_b[0] or ci_b[1] < ci_a[0]


# --- a job's log ---------------------------------------------------------------------------


class LogScreen(ModalScreen):
    """The last lines of a job's train.log, followed while the screen is open."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back"), Binding("l", "app.pop_screen", "Close", show=False)]

    def __init__(self, run_id: str, label: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.label = label
        self.shown = 0

    def compose(self) -> ComposeResult:
        log = Log(id="log", auto_scroll=True)
        log.border_title = f"log · {escape(self.label)} · Esc closes"
        yield log

    def on_mount(self) -> None:
        self.fetch()
        self.set_interval(1.0, self.fetch)

    @work(exclusive=True, group="log")
    async def fetch(self) -> None:
        from backend.core.errors import LtmError

        log = self.query_one("#log", Log)
        try:
            reply = await self.app.link.call("log", run_id=self.run_id, lines=500)
        except LtmError as exc:
            log.clear()
            log.write_line(exc.one_line())
            return
        lines = reply["lines"]
        if not lines:
            if not self.shown:
                log.clear()
                log.write_line(f"nothing logged yet ({reply['path']})")
            return
        if len(lines) != self.shown or self.shown == 0:
            log.clear()
            log.write_lines(lines)
            self.shown = len(lines)


# --- export and help -----------------------------------------------------------------------


class ExportScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]

    def __init__(self, default: str) -> None:
        super().__init__()
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical(id="export-box"):
            yield Label("Export every run, sorted as the table is, to CSV:")
            yield Input(self.default, id="export-path")
            yield Label("Enter writes the file · Esc cancels", classes="dim")

    @on(Input.Submitted)
    def _submit(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen):
    """Every key of every screen, read from the bindings themselves."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Close"), Binding("question_mark", "app.pop_screen", "Close", show=False)]

    def __init__(self, sections: list[tuple[str, list[Binding]]], legend: list[tuple[str, str]] | None = None) -> None:
        super().__init__()
        self.sections = sections
        self.legend = legend or []

    def compose(self) -> ComposeResult:
        t = Table.grid(padding=(0, 2))
        t.add_column(style="bold cyan", no_wrap=True)
        t.add_column()
        for title, bindings in self.sections:
            t.add_row(Text(title, style="bold underline"), "")
            for b in bindings:
                keys = ", ".join(_key_name(k) for k in b.key.split(","))
                t.add_row(keys, b.tooltip or b.description)
        if self.legend:
            t.add_row(Text("Results columns", style="bold underline"), "")
            for label, meaning in self.legend:
                t.add_row(label, meaning)
        with VerticalScroll(id="help-box") as box:
            box.border_title = "keys and columns · Esc closes · ctrl+p: command palette"
            yield Static(t)


def _key_name(key: str) -> str:
    return {"question_mark": "?", "slash": "/", "space": "space", "enter": "Enter", "escape": "Esc"}.get(key.strip(), key.strip())
