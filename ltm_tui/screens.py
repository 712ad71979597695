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
    """Folders and the files ltm-tui can read; space marks a file, `a` every file in a folder."""

    BINDINGS = [
        Binding("space", "toggle_mark", "Mark", tooltip="Mark or unmark the file (a folder opens)"),
        Binding("a", "mark_folder", "Mark folder", tooltip="Mark every readable file in the folder"),
    ]

    def __init__(self, path: str | Path, marked: dict[Path, None], **kwargs) -> None:
        self.marked = marked  # ordered set, shared with the screen
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

        files = sorted(p for p in folder.rglob("*") if p.is_file() and format_of(p) and not p.name.startswith("."))
        self.screen.toggle(files, mark=True)
        self._refresh_labels()

    def _refresh_labels(self) -> None:
        self._invalidate()  # labels are drawn from `marked`


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


PREVIEW_COLUMNS = (("file", "file"), ("pages", "pages"), ("tokens", "tokens"), ("time", "time≈"), ("memory", "memory≈"))


class PickerScreen(Screen):
    """Choose corpora, see what each costs, set the batch's settings, queue them."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", tooltip="Close the picker without queueing"),
        Binding("ctrl+s", "queue", "Queue", tooltip="Queue the marked files with these settings"),
        Binding("x", "clear_marks", "Clear", tooltip="Unmark every file"),
    ]

    def __init__(self, root: Path, defaults: dict[str, Any], workspace) -> None:
        super().__init__()
        self.root = root
        self.defaults = defaults
        self.workspace = workspace
        self._checked = None  # (RunOptions, the JobSettings they gave): see settings()
        self.marked: dict[Path, None] = {}
        self.info: dict[Path, dict] = {}

    def compose(self) -> ComposeResult:
        d = self.defaults
        with Horizontal(id="picker"):
            tree = CorpusTree(self.root, self.marked, id="tree")
            tree.border_title = escape(self.root.name or str(self.root))
            yield tree
            with Vertical(id="picker-side"):
                table = DataTable(id="marked", cursor_type="row")
                table.border_title = "marked: none (space marks, a marks a folder)"
                yield table
                with VerticalScroll(id="settings"):
                    yield _field("base", Input(d.get("base", "micro"), id="base", compact=True,
                                               tooltip="micro, a Hugging Face id, or a local model folder"))
                    yield _field("method", Select([("LoRA", "lora"), ("QLoRA 4-bit", "qlora")],
                                                  value=d.get("method", "lora"), allow_blank=False, id="method", compact=True))
                    yield _field("preset", Select([(p, p) for p in ("tiny", "small", "base", "large")],
                                                  value=d.get("preset", "small"), allow_blank=False, id="preset", compact=True))
                    yield _field("battery", Input(d.get("scenes", ""), placeholder="built-in scenes/", id="scenes", compact=True))
                    yield _field("seeds", Input(str(d.get("seeds", 1)), id="seeds", type="integer", compact=True))
                    yield _field("steps", Input(_opt(d.get("steps")), placeholder="auto", id="steps", type="integer", compact=True))
                    yield _field("tokens", Input(_opt(d.get("min_train_tokens")), placeholder="auto",
                                                 id="min_train_tokens", type="integer", compact=True,
                                                 tooltip="train on at least this many tokens"))
                yield Static("Enter on a file or in a field queues; Esc goes back.", id="picker-hint")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#marked", DataTable)
        for key, label in PREVIEW_COLUMNS:
            table.add_column(label, key=key)
        self.query_one("#tree").focus()

    # marking

    def toggle(self, paths: list[Path], mark: bool | None = None) -> None:
        table = self.query_one("#marked", DataTable)
        for path in paths:
            on_now = path in self.marked
            if mark is None:
                want = not on_now
            else:
                want = mark
            if want and not on_now:
                self.marked[path] = None
                table.add_row(path.name, "…", "…", "…", "…", key=str(path))
                self.inspect(path)
            elif not want and on_now:
                del self.marked[path]
                table.remove_row(str(path))
        table.border_title = f"marked: {len(self.marked)}" if self.marked else "marked: none"

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
        self.app.call_from_thread(self._show_info, path, info)

    def _show_info(self, path: Path, info: dict) -> None:
        self.info[path] = info
        self._update_preview(path)

    def _update_preview(self, path: Path) -> None:
        table = self.query_one("#marked", DataTable)
        if path not in self.marked:
            return
        info = self.info.get(path)
        if info is None:
            return
        key = str(path)
        if "error" in info:
            table.update_cell(key, "pages", Text("unreadable", style="red"))
            table.update_cell(key, "tokens", Text(info["error"][:60], style="red"), update_width=True)
            return
        tokens, exact = self._tokens(info)
        table.update_cell(key, "pages", f"{info['pages']:.1f}")
        table.update_cell(key, "tokens", f"{tokens:,}" if exact else f"≈{tokens:,}")
        guess = self._forecast(tokens)
        if guess:
            table.update_cell(key, "time", format_duration(guess.get("total_seconds")))
            peak = guess.get("peak_memory_bytes")
            mem = "-" if peak is None else f"{peak / 2**30:.1f} GiB"
            table.update_cell(key, "memory", Text(mem, style="bold red") if guess.get("too_big") else mem)
        else:
            table.update_cell(key, "time", "-")
            table.update_cell(key, "memory", "-")

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
        from backend.studies.forecast import free_memory, memory_fix, predict

        try:
            settings = self.settings()
            guess = predict(self.workspace, settings.base, settings.train, tokens)
            if guess and guess.get("peak_memory_bytes"):
                free, where = free_memory(settings.base)
                fix = memory_fix(guess["peak_memory_bytes"], free, settings.base, settings.train, where)
                if fix:
                    guess["too_big"] = True
                    self.query_one("#picker-hint", Static).update(Text(fix, style="bold red"))
            return guess
        except Exception:  # a forecast is a courtesy: a field being typed must not break the picker
            return None

    # settings

    def value(self, field: str) -> str:
        widget = self.query_one(f"#{field}")
        val = widget.value
        return "" if val is None or val is Select.BLANK else str(val).strip()

    def settings(self):
        """The batch's JobSettings, made and checked exactly as `ltm-tui run` makes them
        (backend.jobs.settings): the picker's fields on top of the dashboard's defaults."""
        from backend.jobs.settings import RunOptions

        base = self.value("base") or "micro"
        chosen = {key: self.defaults[key] for key in ("trust_remote_code", "device", "epochs", "block_size",
                                                     "micro_batch") if self.defaults.get(key) is not None}
        options = RunOptions(
            base=base,
            preset=self.value("preset") or None,
            quant="4bit" if self.value("method") == "qlora" and base != "micro" else None,
            scenes=self.value("scenes") or None,
            steps=_int(self.value("steps")),
            min_train_tokens=_int(self.value("min_train_tokens")),
            **chosen,
        )
        # checking reads every battery: once per change of the fields, not once per previewed file
        if self._checked is None or self._checked[0] != options:
            self._checked = (options, options.job_settings())
        return self._checked[1]

    @on(Input.Changed, "#base")
    def _base_changed(self) -> None:
        for path in self.marked:
            self._update_preview(path)

    @on(DirectoryTree.FileSelected)
    def _file_entered(self, event: DirectoryTree.FileSelected) -> None:
        if not self.marked:
            self.toggle([event.path], mark=True)
        self.action_queue()

    @on(Input.Submitted)
    def _field_entered(self) -> None:
        self.action_queue()

    def action_queue(self) -> None:
        from backend.core.errors import LtmError

        hint = self.query_one("#picker-hint", Static)
        if not self.marked:
            hint.update(Text("Mark a file first: space on a file, a on a folder.", style="yellow"))
            return
        try:
            self._checked = None  # queueing checks the batteries as they are now
            settings = self.settings()
            seeds = max(1, _int(self.value("seeds")) or 1)
        except LtmError as exc:
            hint.update(Text(exc.one_line(), style="bold red"))
            return
        paths = [str(p) for p in self.marked]
        self.app.submit(paths, asdict(settings), list(range(seeds)))
        self.app.pop_screen()


def _field(label: str, widget) -> Horizontal:
    return Horizontal(Label(f"{label:>8} "), widget, classes="field")


def _opt(value) -> str:
    return "" if value is None else str(value)


def _int(text: str) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


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
        self.scenes = {f"{s['battery']}/{s['scene_id']}": s for s in scenes}
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
        s = self.scenes[key]
        detail = s.get("detail") or {}
        lines = Text()
        lines.append(f"{key}", style="bold")
        lines.append(f"  {s.get('metric') or ''}\n")
        lls = detail.get("loglik") or []
        if lls:
            choices = detail.get("choices") or [f"choice {i}" for i in range(len(lls))]
            for i, c in enumerate(choices):
                ll = lls[i] if i < len(lls) else None
                picked = i == detail.get("pred")
                right = i == detail.get("answer")
                line = f"{'→' if picked else ' '} {c}  {'' if ll is None else f'{ll:.3f}'}"
                lines.append(line + ("  (answer)" if right else "") + "\n", style="green" if right else "")
        if detail.get("text") is not None:
            lines.append("generated: ", style="bold")
            lines.append(detail["text"] + "\n")
        for check in detail.get("checks") or []:
            lines.append(f"  {'✓' if check.get('passed') else '✗'} {check.get('check')}\n",
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


def heatmap(title: str, grid: list[list[float]], *, signed: bool = False) -> Text:
    """Rows of cells shaded by magnitude: one line a layer, one cell a head."""
    flat = [abs(v) for row in grid for v in row if v is not None]
    top = max(flat) if flat else 0.0
    out = Text(f"{title} (max {top:.3g})\n", style="bold")
    for i, row in enumerate(grid):
        out.append(f"L{i:<3}")
        for v in row:
            if v is None:
                out.append("  ")
                continue
            level = 0 if top == 0 else min(len(HEAT) - 1, int(abs(v) / top * (len(HEAT) - 1) + 0.5))
            style = ("red" if v < 0 else "green") if signed else "cyan"
            out.append(HEAT[level] * 2, style=style)
        out.append("\n")
    return out


def probe_view(probes: dict) -> Text:
    out = Text()
    summary = probes.get("summary") or {}
    if summary:
        out.append("summary\n", style="bold")
        for k, v in summary.items():
            out.append(f"  {k}: {v:.4g}\n" if isinstance(v, (int, float)) else f"  {k}: {v}\n")
    attention = probes.get("attention") or {}
    for key, title, signed in (("entropy_delta", "attention entropy change, layer × head", True),
                               ("js", "attention JS distance to the base, layer × head", False)):
        if attention.get(key):
            out.append_text(heatmap(title, attention[key], signed=signed))
    cka = probes.get("cka")
    if cka:
        out.append_text(heatmap("CKA with the base, per layer (1 = unchanged)", [[v] for v in cka]))
    return out


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

    def __init__(self, sections: list[tuple[str, list[Binding]]]) -> None:
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        t = Table.grid(padding=(0, 2))
        t.add_column(style="bold cyan", no_wrap=True)
        t.add_column()
        for title, bindings in self.sections:
            t.add_row(Text(title, style="bold underline"), "")
            for b in bindings:
                keys = ", ".join(_key_name(k) for k in b.key.split(","))
                t.add_row(keys, b.tooltip or b.description)
        with VerticalScroll(id="help-box") as box:
            box.border_title = "keys · Esc closes · ctrl+p: command palette"
            yield Static(t)


def _key_name(key: str) -> str:
    return {"question_mark": "?", "slash": "/", "space": "space", "enter": "Enter", "escape": "Esc"}.get(key.strip(), key.strip())
