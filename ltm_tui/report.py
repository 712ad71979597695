"""Terminal output of the headless commands: progress bars while runs train, ranked tables after."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from rich.cells import cell_len, set_cell_size
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

PERPLEXITY = "perplexity"


# Below this many columns the bars leave out tokens/s and the elapsed time, and the names are cut
# shorter, so that a line fits an 80-column SSH terminal whole.
WIDE_PROGRESS = 120


class RunProgress:
    """One bar per run, fed by job-manager events: while it trains, its step/total, loss,
    tokens/s and ETA; while it evaluates, scenes done of all and the ETA (`eval_progress`).
    Under WIDE_PROGRESS columns a line keeps the name, phase, bar, count, loss and ETA."""

    def __init__(self, jobs: Iterable[dict], *, enabled: bool = True, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.wide = self.console.width >= WIDE_PROGRESS
        label = 24 if self.wide else 18
        columns = [
            TextColumn(f"{{task.fields[label]:<{label}}}", markup=False),  # a file name is text, not markup
            TextColumn("{task.fields[phase]:<10}"),
            BarColumn(bar_width=28 if self.wide else 10),
            TextColumn("{task.fields[count]:>13}"),
            TextColumn("{task.fields[detail]}"),
        ]
        self.progress = Progress(
            *columns, *([TimeElapsedColumn()] if self.wide else []),
            console=self.console,
            disable=not enabled or not self.console.is_terminal,
        )
        self.tasks: dict[str, TaskID] = {}
        for job in jobs:
            name = "baseline " + job["base"] if job["kind"] == "baseline" else (job.get("corpus") or "-")
            self.tasks[job["run_id"]] = self.progress.add_task(
                "", total=1, label=fit_name(name, label), phase=job["status"], count="", detail=""
            )

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def on_event(self, event: dict) -> None:
        task = self.tasks.get(event.get("run_id", ""))
        if task is None:
            return
        kind = event.get("type")
        if self.enabled and not self.console.is_terminal:
            # a log file or a pipe: one plain line per state change instead of redrawn bars
            if kind == "state":
                label = self.progress.tasks[task].fields["label"]
                extra = event.get("error") or (f"overall {event['overall']}" if "overall" in event else "")
                self.console.print(f"{label}: {event['status']} {extra}".rstrip(), soft_wrap=True, markup=False)
            return
        if kind == "progress":
            total, step = event.get("total") or 1, event.get("step") or 0
            loss = f"{event['loss']:.4f}" if event.get("loss") is not None else "-"
            speed = f"{event.get('tokens_per_s') or 0:>8,.0f} tok/s · " if self.wide else ""
            self.progress.update(task, total=total, completed=step, count=f"{step}/{total}",
                                 detail=f"loss {loss:<7} · {speed}ETA {format_duration(event.get('eta_s'))}")
        elif kind == "eval_progress":
            total, done = event.get("total") or 1, event.get("done") or 0
            self.progress.update(task, total=total, completed=done, phase="evaluating",
                                 count=f"{done}/{total} scenes", detail=f"ETA {format_duration(event.get('eta_s'))}")
        elif kind == "state":
            status = event["status"]
            fields = {"phase": status}
            if status == "done":
                t = self.progress.tasks[task]
                fields.update(completed=t.total, detail="")
            self.progress.update(task, **fields)


def fit_name(text: str, width: int) -> str:
    """`text` in at most `width` cells: whole when it fits, else its start and its end around an
    ellipsis (a file's name keeps its extension and the words that tell volumes apart)."""
    if cell_len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    tail = (width - 1) * 2 // 5  # at 14 cells: `Sherlock…epub` keeps the dot, `.epub`
    head = width - 1 - tail
    return set_cell_size(text, head) + "…" + _last_cells(text, tail)


def _last_cells(text: str, width: int) -> str:
    out = ""
    for ch in reversed(text):
        if cell_len(ch + out) > width:
            break
        out = ch + out
    return out


def format_duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


# Side numbers shown in the table beside the five (the rest, such as the depth curve's points,
# are in `results --format json` only).
SHOWN_SIDE = ("depth_max", "pressure_drop")
HIDDEN = frozenset({"pressure_clean", "consistency_scenes"})
LOWER_TAIL = (PERPLEXITY, "forgetting")


def measure_names(rows: list[dict]) -> list[str]:
    """The five measures in the plan's order, the side numbers the table shows (largest depth
    above chance, drop under pressure), any measure a battery named, then perplexity and
    forgetting (lower is better)."""
    from backend.scoring.measures import FIVE_MEASURES

    present = {m for r in rows for m in (r.get("scores") or {})}
    fixed = set(FIVE_MEASURES) | set(SHOWN_SIDE) | set(LOWER_TAIL) | HIDDEN
    extra = sorted(m for m in present - fixed if "@" not in m)
    head = [m for m in FIVE_MEASURES if m in present]
    side = [m for m in SHOWN_SIDE if m in present]
    return head + side + extra + [m for m in LOWER_TAIL if m in present]


def fmt_interval(value, interval, digits: int = 2) -> str:
    """`0.74±0.05`: the value and half the width of its 95% interval (`-` when unknown)."""
    text = _fmt(value, digits)
    if value is None or not interval or interval[0] is None or interval[1] is None:
        return text
    half = (float(interval[1]) - float(interval[0])) / 2
    return f"{text}±{half:.{digits}f}".replace("±0.", "±.")  # ±.05: one character less per cell


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def battery_name(scenes: str) -> str:
    """The battery a run was scored on, as the tables name it: `built-in`, or the folder's or
    file's name (`my-battery`, `logic.yaml` → `logic`)."""
    from backend.core.workspace import default_scenes_dir

    path = Path(scenes)
    if path == default_scenes_dir():
        return "built-in"
    return path.stem if path.suffix in (".yaml", ".yml") else path.name


def baseline_group(row: dict) -> tuple:
    """What a run shares with the baseline it is measured against: the service's baseline key
    (the base, the battery's content and the seed), or, for a row without one, its base, preset
    and seed. Two batteries on one base have two baselines, and a run is measured against its own."""
    key = row.get("baseline_key")
    return (key,) if key else (row.get("base"), row.get("preset"), row.get("seed"))


def sort_value(row: dict, key: str):
    """The value a results row has for a sort key: one of its own fields, or a score."""
    return row.get(key) if key in row and key != "scores" else (row.get("scores") or {}).get(key)


def sorted_rows(rows: list[dict], key: str, descending: bool) -> list[dict]:
    """Rows in the service's order: by the key in the direction asked (`delta`: overall less the
    baseline's), missing values last either way, ties by run id."""
    if key == "delta":
        value = {r["run_id"]: _gain(rows, r) for r in rows}
    else:
        value = {r["run_id"]: sort_value(r, key) for r in rows}
    by_id = sorted(rows, key=lambda r: r["run_id"])
    present = [r for r in by_id if value[r["run_id"]] is not None]
    present.sort(key=lambda r: value[r["run_id"]], reverse=descending)  # stable: ties keep run id order
    return present + [r for r in by_id if value[r["run_id"]] is None]


def _gain(rows: list[dict], row: dict) -> float | None:
    """A run's overall less its baseline's, or None (a baseline, or a side without a score)."""
    ref = None if row.get("kind") == "baseline" else baseline_for(rows, row)
    if ref is None or row.get("overall") is None or ref.get("overall") is None:
        return None
    return row["overall"] - ref["overall"]


def baseline_for(rows: list[dict], row: dict) -> dict | None:
    """The baseline a run is measured against: of its group's, the scored one with the highest
    overall (as the service's `delta` sort picks it; a failed baseline beside the one that
    replaced it has none), else any of them."""
    group = baseline_group(row)
    found = [r for r in rows if r.get("kind") == "baseline" and r.get("run_id") != row.get("run_id")
             and baseline_group(r) == group]
    scored = [r for r in found if r.get("overall") is not None]
    return max(scored, key=lambda r: r["overall"]) if scored else (found[0] if found else None)


# Short headers so the ranked table fits 80 columns over SSH.
MEASURE_LABELS = {
    "reasoning_depth": "depth",
    "consistency": "consist",
    "pressure": "press",
    "novelty": "novel",
    "compression": "compr",
    "perplexity": "ppl↓",
    "depth_max": "d.max",
    "pressure_drop": "drop↓",
    "forgetting": "forget↓",
}


def sort_name(text: str) -> str:
    """A sort column as the user may type it: its name, or the label the table shows for it
    (`consist`, `ppl↓` or `ppl`, `train s`), ignoring case."""
    wanted = text.strip().lower()
    labels = {**{v.lower(): k for k, v in MEASURE_LABELS.items()},
              **{v.lower().rstrip("↓"): k for k, v in MEASURE_LABELS.items()},
              "train s": "train_seconds", "δ base": "delta"}  # Δ base, lowered
    return labels.get(wanted, text.strip())


def weights_line(rows: list[dict], weights: dict | None) -> str:
    """`overall = mean of depth×2, consist×1, …` as shown under the table."""
    from backend.scoring.measures import default_weights

    names = {m for r in rows for m in (r.get("scores") or {})}
    use = {**default_weights(names), **(weights or {})}
    parts = [f"{MEASURE_LABELS.get(m, m)}×{use[m]:g}" for m in measure_names(rows) if m in use]
    return "overall = weighted mean of " + ", ".join(parts) if parts else ""


def reweigh(rows: list[dict], weights: dict | None) -> list[dict]:
    """Rows with `overall` recomputed under these weights and `overall_interval` added. A weight
    for a measure no row has (a typo: `dpeth=2`) is one line naming the measures there are."""
    from backend.core.errors import LtmError
    from backend.scoring.measures import overall, overall_interval

    present = {m for r in rows for m in (r.get("scores") or {})}
    unknown = sorted(set(weights or {}) - present) if present else []
    if unknown:
        names = ", ".join(f"{MEASURE_LABELS.get(m, m)} ({m})" if m in MEASURE_LABELS else m for m in measure_names(rows))
        raise LtmError(f"--weights: no run has a measure {', '.join(map(repr, unknown))}; the runs have {names}",
                       title="usage")

    out = []
    for r in rows:
        scores = r.get("scores") or {}
        r = dict(r)
        if weights:
            r["overall"] = overall(scores, weights) if scores else r.get("overall")
        r["overall_interval"] = overall_interval(scores, r.get("intervals") or {}, weights) if scores else None
        out.append(r)
    return out


@dataclass
class FitColumn:
    """One column of a table fitted to the terminal (`fit_columns`): its header, its cells as
    text, and whether it holds names (cut in the middle to fit) or numbers and words (never cut:
    shown whole, or left out whole)."""

    label: str
    cells: list[str]
    names: bool = False
    left: bool = False  # left-justified (names always are); numbers are right-justified

    @property
    def natural(self) -> int:
        return max(cell_len(text) for text in [self.label, *self.cells])


NAME_MIN = 14  # the fewest cells a name column is cut to before columns are left out
NAME_MAX = 40  # and the most it takes however long the names


def table_width(widths: list[int]) -> int:
    """Cells of a Table in print_ranked's style (`ranked_table`): two spaces between columns."""
    return sum(widths) + 2 * (len(widths) - 1) if widths else 0


def fitted_table(columns: list[FitColumn], widths: list[int], *, title: str | None = None,
                 styles: list[str | None] | None = None) -> Table:
    """The shown columns (`fit_columns`) at their widths, names cut in the middle, one line a
    row. No rules but the one under the header, and two spaces between columns: over SSH at 80
    columns every cell a rule or a padding takes is a digit less."""
    from rich import box

    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 0, 0, 1))
    for column, w in zip(columns, widths):
        table.add_column(column.label, justify="left" if column.names or column.left else "right",
                         no_wrap=True, width=w)
    for i in range(len(columns[0].cells) if columns else 0):
        table.add_row(*[Text(fit_name(c.cells[i], w)) for c, w in zip(columns, widths)],
                      style=styles[i] if styles else None)
    return table


def fit_columns(columns: list[FitColumn], width: int, required: int) -> tuple[list[int], list[str]]:
    """Which columns fit `width` cells, in order of priority: the first `required` always, then
    each next one while it fits with every name column at NAME_MIN; the room left goes to the
    name columns, up to their names' length (NAME_MAX at most). Returns (the width of each shown
    column, the labels of the columns left out)."""
    floor = [min(c.natural, NAME_MIN) if c.names else c.natural for c in columns]
    shown = required
    while shown < len(columns) and table_width(floor[: shown + 1]) <= width:
        shown += 1
    widths = floor[:shown]
    for i, column in enumerate(columns[:shown]):
        if column.names:
            room = width - table_width(widths)
            widths[i] = max(widths[i], min(column.natural, NAME_MAX, widths[i] + room))
    return widths, [c.label for c in columns[shown:]]


def ranked_columns(rows: list[dict]) -> tuple[list[FitColumn], int]:
    """The ranked table's columns in order of priority (and of display): rank, corpus, the base
    (several bases only), the status (unfinished rows only), overall, Δ base; then the five
    measures, perplexity and forgetting, the side numbers and any other measure; then pages and
    training seconds. Returns them and how many lead that are always shown."""
    from backend.scoring.measures import FIVE_MEASURES

    names = measure_names(rows)
    first = [m for m in names if m in FIVE_MEASURES] + [m for m in LOWER_TAIL if m in names]
    order = first + [m for m in names if m in SHOWN_SIDE] + [m for m in names if m not in first and m not in SHOWN_SIDE]
    baselines = [r for r in rows if r.get("kind") == "baseline"]
    ordered = baselines + [r for r in rows if r.get("kind") != "baseline"]
    lead = [
        FitColumn("#", ["base" if r in baselines else str(i - len(baselines) + 1) for i, r in enumerate(ordered)]),
        FitColumn("corpus", ["(baseline)" if r in baselines else (r.get("corpus") or "-") for r in ordered], True),
    ]
    if len({r["base"] for r in rows}) > 1:
        lead.append(FitColumn("base", [r["base"] for r in ordered], True))
    if len({r.get("scenes") for r in rows if r.get("scenes")}) > 1:  # each run beside its own baseline's battery
        lead.append(FitColumn("battery", [battery_name(r["scenes"]) if r.get("scenes") else "-" for r in ordered], True))
    if any(r["status"] != "done" for r in rows):
        lead.append(FitColumn("status", [r["status"] for r in ordered], left=True))
    lead += [FitColumn("overall", [fmt_interval(r.get("overall"), r.get("overall_interval"), 3) for r in ordered]),
             FitColumn("Δ base", [_delta(rows, r) for r in ordered])]
    rest = [FitColumn(MEASURE_LABELS.get(m, m), [_cell(m, (r.get("scores") or {}).get(m),
                                                          (r.get("intervals") or {}).get(m)) for r in ordered])
            for m in order]
    rest += [FitColumn("pages", [_fmt(r.get("pages"), 1) for r in ordered]),
             FitColumn("train s", [_fmt(r.get("train_seconds"), 1) for r in ordered])]
    return lead + rest, len(lead)


def left_out_line(left_out: list[str], width: int) -> str:
    """One line under a fitted table: the columns left out (as many names as fit, then how many
    more) and how to see everything."""
    how = " · `ltm-tui results --wide` or --format csv shows all"
    if not left_out:
        return "names shortened to fit" + how
    for shown in range(len(left_out), 0, -1):
        more = f" +{len(left_out) - shown} more" if shown < len(left_out) else ""
        line = f"left out: {', '.join(left_out[:shown])}{more}{how}"
        if cell_len(line) <= width:
            return line
    return line


def _at_least(console: Console, width: int) -> Console:
    """The console, or one on the same output as wide as `width` when it is narrower (a wide
    table goes out whole, for `less -S` or a file, instead of folded at the terminal's edge)."""
    if console.width >= width:
        return console
    return Console(file=console.file, width=width, color_system=console.color_system,
                   force_terminal=console.is_terminal, no_color=console.no_color)


def _delta(rows: list[dict], row: dict) -> str:
    gain = _gain(rows, row)
    return "-" if gain is None else f"{gain:+.3f}"


def print_ranked(
    rows: list[dict], *, sort: str = "overall", console: Console | None = None, weights: dict | None = None,
    wide: bool = False,
) -> None:
    """Baselines first (the rows every adapter is compared with), then runs in the given order,
    with each run's overall score and its difference from its baseline. Each measure shows its
    bootstrap 95% interval as ±half its width; the weights of `overall` are printed below.

    The table fits the terminal: a name is cut in the middle rather than wrapped, a number is
    never cut, and the columns that do not fit are left out from the right (`ranked_columns`
    gives the order), with a line saying which and how to see them. `wide` (and any output that
    is not a terminal) shows every column and whole names, however wide."""
    if console is None:
        console = Console()
        wide = wide or not console.is_terminal  # a pipe or a file: no screen width to respect
    if not rows:
        console.print("no runs yet: `ltm-tui run FILE...` queues some")
        return
    rows = reweigh(rows, weights)
    bases = sorted({r["base"] for r in rows})
    columns, required = ranked_columns(rows)
    if wide:
        widths, left_out = [c.natural for c in columns], []
        console = _at_least(console, table_width(widths))
    else:
        widths, left_out = fit_columns(columns, console.width, required)
    title = f"ltm-tui results · sorted by {sort}" + (f" · base {bases[0]}" if len(bases) == 1 else "")
    console.print(Text(title, style="bold"), no_wrap=True, overflow="ellipsis")
    baselines = sum(r.get("kind") == "baseline" for r in rows)
    styles = ["dim" if i < baselines else None for i in range(len(rows))]
    console.print(fitted_table(columns[: len(widths)], widths, styles=styles))
    cut = any(c.names and c.natural > w for c, w in zip(columns, widths))
    if left_out or cut:
        console.print(left_out_line(left_out, console.width), style="dim", markup=False, no_wrap=True,
                      overflow="ellipsis")
    line = weights_line(rows, weights)
    if line:
        console.print(f"{line}; ± is half the bootstrap 95% interval", style="dim")


def _cell(name: str, value, interval) -> str:
    if name == "depth_max":
        return _fmt(None if value is None else int(value))
    if name == PERPLEXITY:
        return fmt_interval(value, interval, 1)
    return fmt_interval(value, interval, 2)


def rows_to_csv(rows: list[dict]) -> str:
    names = measure_names(rows)
    out = io.StringIO()
    writer = _SafeWriter(out)
    head = ["run_id", "corpus", "corpus_path", "base", "kind", "status", "pages", "tokens", "train_seconds"]
    probes = ["weight_change", "attn_entropy_change", "drift_layer"]
    bounds = [f"{n}_{end}" for n in names for end in ("lo", "hi")]
    writer.writerow(head + names + ["overall"] + bounds + ["overall_lo", "overall_hi"] + probes)
    for r in rows:
        ci = r.get("intervals") or {}
        writer.writerow(
            [r.get(k) for k in head] + [(r.get("scores") or {}).get(n) for n in names] + [r.get("overall")]
            + [(ci.get(n) or (None, None))[i] for n in names for i in (0, 1)]
            + list(r.get("overall_interval") or (None, None)) + [r.get(k) for k in probes]
        )
    return out.getvalue()


def print_status(jobs: list[dict], console: Console | None = None) -> None:
    """`ltm-tui status`: each job with its step, ETA and worker pid, then each error whole.
    Run ids, states and numbers are never cut (`cancel` and `retry` take a run id whole); the
    corpus column shows only where it fits (a run id begins with its corpus's name anyway),
    then the pid and the ETA go before anything is cut."""
    console = console or Console()

    def step(j: dict) -> str:
        done, total = j.get("step"), j.get("total")
        return f"{done or 0}/{total}" if total else (str(done) if done else "-")

    columns = [  # in order of priority; the corpus is shown second where it fits
        FitColumn("run_id", [j["run_id"] for j in jobs], left=True),
        FitColumn("status", [j["status"] for j in jobs], left=True),
        FitColumn("step", [step(j) for j in jobs]),
        FitColumn("ETA", [format_duration(j.get("eta_s")) for j in jobs]),
        FitColumn("pid", [str(j["pid"]) if j.get("pid") else "-" for j in jobs]),
        FitColumn("corpus", [j.get("corpus") or f"({j['kind']})" for j in jobs], names=True),
    ]
    if any(j.get("node") for j in jobs):  # a Ray cluster: where each job runs, before the corpus
        columns.insert(-1, FitColumn("node", [j.get("node") or "-" for j in jobs], left=True))
    widths, _ = fit_columns(columns, console.width, required=3)
    shown = list(zip(columns, widths))
    if len(shown) == len(columns):
        shown.insert(1, shown.pop())
    console.print(fitted_table([c for c, _ in shown], [w for _, w in shown], title="jobs"))
    for j in jobs:
        if j.get("error"):
            console.print(f"{j['run_id']}: {escape(j['error'])}", style="red" if j["status"] == "failed" else "yellow",
                          highlight=False)


def print_battery_counts(counts: dict, console: Console | None = None) -> None:
    """`ltm-tui scenes check`: scenes per battery, then per measure, split by language."""
    console = console or Console()
    langs = sorted({lang for b in counts["batteries"] for lang in b["langs"]})
    table = Table(title="batteries", pad_edge=False, padding=(0, 1))
    for col in ("battery", "measure", "scenes", "kinds", *langs):
        table.add_column(col, justify="right" if col in ("scenes", *langs) else "left")
    for b in counts["batteries"]:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(b["kinds"].items()))
        table.add_row(b["battery"], b["metric"], str(b["scenes"]), kinds, *(str(b["langs"].get(lang, 0)) for lang in langs))
    console.print(table)
    per = Table(title="per measure", pad_edge=False, padding=(0, 1))
    for col in ("measure", "batteries", "scenes", *langs):
        per.add_column(col, justify="left" if col == "measure" else "right")
    for metric, m in sorted(counts["measures"].items()):
        per.add_row(metric, str(m["batteries"]), str(m["scenes"]), *(str(m["langs"].get(lang, 0)) for lang in langs))
    console.print(per)
    console.print("every battery loaded and validated (`-`: scenes without a lang field)", style="dim")


class _SafeWriter:
    """csv.writer whose text cells can never be read as a formula by a spreadsheet."""

    def __init__(self, out) -> None:
        from backend.jobs.store import csv_cell

        self._writer, self._cell = csv.writer(out), csv_cell

    def writerow(self, row: Iterable) -> None:
        self._writer.writerow([self._cell(v) for v in row])
