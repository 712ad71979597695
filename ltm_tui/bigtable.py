"""A table drawn line by line, for the results of thousands of runs.

Textual's `DataTable` renders each visible cell through rich's layout (a `Padding` around the
cell, then lines cut to the column), and its `sort` orders every row again by a Python key. A
sort of the results table, or a fresh reply that moves a few rows, repaints every visible cell
that way: 140–190 ms a keypress at 10,000 runs on a 2-core machine, whatever the table's size
(docs/benchmarks.md). `BigTable` keeps what the results table needs and no more: rows of
one-line cells, an order computed by its owner, a row cursor, a pinned first column, zebra
stripes and a header that sorts on a click. It draws each visible row as one strip of segments
(Textual's Line API, `render_line`), caches a row's strip until that row or the layout changes,
and takes a new order as a list: nothing is sorted twice.

Its surface follows `DataTable`'s names where it has the same thing (`add_column`, `add_row`,
`update_cell`, `get_row`, `get_row_index`, `move_cursor`, `row_count`, `RowSelected`,
`HeaderSelected`), so code and tests read the same against either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets.data_table import ColumnKey, RowKey

PAD = 1  # blank cells either side of a cell's text, as DataTable's cell padding


@dataclass
class Column:
    """A column: its key, its header, a fixed width or None (as wide as its widest text)."""

    key: ColumnKey
    label: str
    width: int | None = None
    content_width: int = 0  # the widest text seen in it (its header included), in cells

    @property
    def text_width(self) -> int:
        return self.width if self.width is not None else self.content_width

    @property
    def render_width(self) -> int:
        return self.text_width + 2 * PAD


def cell_parts(cell: Any) -> tuple[str, str, str]:
    """(text, style, justify) of a cell: a `Cell` of ltm_tui.widgets or anything with `text`,
    else its `str()`."""
    text = getattr(cell, "text", None)
    if text is None:
        return str(cell), "", "left"
    return str(text), getattr(cell, "style", "") or "", getattr(cell, "justify", "left")


def fit(text: str, width: int, justify: str) -> str:
    """The text in exactly `width` cells: padded on the side its justification leaves free, or
    cut with an ellipsis."""
    length = cell_len(text)
    if length > width:
        return set_cell_size(text, width - 1) + "…" if width > 1 else set_cell_size(text, width)
    gap = " " * (width - length)
    return gap + text if justify == "right" else text + gap


class BigTable(ScrollView, can_focus=True):
    """Rows of one-line cells keyed by a string, shown in an order set with `set_order`, with a
    row cursor, `fixed_columns` pinned on the left and a header row that stays on top."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "bigtable--header",
        "bigtable--even-row",
        "bigtable--cursor",
        "bigtable--fixed",
    }

    # The look of the library's own tables (theme variables), so the dashboard's panels match.
    DEFAULT_CSS = """
    BigTable {
        background: $surface;
        color: $foreground;
        height: auto;
        max-height: 100%;
        & > .bigtable--header { text-style: bold; background: $panel; color: $foreground; }
        & > .bigtable--even-row { background: $surface-lighten-1 50%; }
        & > .bigtable--fixed { background: $secondary-muted; color: $foreground; }
        & > .bigtable--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
        &:dark > .bigtable--even-row { background: $surface-darken-1 40%; }
        &:focus {
            background-tint: $foreground 5%;
            & > .bigtable--header { background-tint: $foreground 5%; }
            & > .bigtable--cursor {
                background: $block-cursor-background;
                color: $block-cursor-foreground;
                text-style: $block-cursor-text-style;
            }
        }
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "select_cursor", "Select", show=False),
        Binding("up", "cursor_up", "Up", show=False),
        Binding("down", "cursor_down", "Down", show=False),
        Binding("left", "scroll_left", "Left", show=False),
        Binding("right", "scroll_right", "Right", show=False),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
        Binding("home,ctrl+home", "first_row", "Top", show=False),
        Binding("end,ctrl+end", "last_row", "Bottom", show=False),
    ]

    cursor_row: reactive[int] = reactive(0, repaint=False, always_update=True)

    class RowHighlighted(Message):
        """The cursor moved to a row."""

        def __init__(self, data_table: BigTable, cursor_row: int, row_key: RowKey) -> None:
            super().__init__()
            self.data_table, self.cursor_row, self.row_key = data_table, cursor_row, row_key

        @property
        def control(self) -> BigTable:
            return self.data_table

    class RowSelected(RowHighlighted):
        """Enter, or a click on the row the cursor is on."""

    class HeaderSelected(Message):
        """A click on a column's header."""

        def __init__(self, data_table: BigTable, column_key: ColumnKey, column_index: int, label: Any) -> None:
            super().__init__()
            self.data_table, self.column_key, self.column_index, self.label = data_table, column_key, column_index, label

        @property
        def control(self) -> BigTable:
            return self.data_table

    def __init__(self, *, fixed_columns: int = 0, zebra_stripes: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fixed_columns = fixed_columns
        self.zebra_stripes = zebra_stripes
        self.ordered_columns: list[Column] = []
        self._column_index: dict[str, int] = {}
        self.rows: dict[str, list] = {}  # row key -> its cells, one per column
        self._keys: list[str] = []  # row keys top to bottom; a removed row leaves until `_order`
        self._removed = False
        self._position: dict[str, int] | None = {}  # row key -> its line (None: count again)
        # Each row as drawn, (pinned part, the rest), by (cursor on it, zebra stripe).
        self._strips: dict[str, dict[tuple[bool, bool], tuple[Strip, Strip]]] = {}
        self._header: tuple[Strip, Strip] | None = None
        self._base_style: Style | None = None  # the widget's own style, read once per change
        self._styles: dict[str, Style] = {}  # a cell's style string, parsed once

    # columns

    def add_column(self, label: str, *, key: str, width: int | None = None) -> ColumnKey:
        column = Column(ColumnKey(key), label, width, cell_len(label))
        for cells in self.rows.values():
            cells.append("")
        self._column_index[key] = len(self.ordered_columns)
        self.ordered_columns.append(column)
        self._layout_changed()
        return column.key

    def column(self, key: str) -> Column:
        return self.ordered_columns[self._column_index[key]]

    # rows

    @property
    def _order(self) -> list[str]:
        if self._removed:  # rows removed one by one (a filter removes thousands) leave at once
            self._keys = [k for k in self._keys if k in self.rows]
            self._removed = False
        return self._keys

    @property
    def row_count(self) -> int:
        return len(self.rows)

    def add_row(self, *cells: Any, key: str) -> RowKey:
        if key in self.rows:
            raise KeyError(f"a row keyed {key!r} is already in the table")
        cells_ = list(cells) + [""] * (len(self.ordered_columns) - len(cells))
        order = self._order  # rows removed before leave first: a key removed and added again is one row
        self.rows[key] = cells_
        order.append(key)
        if self._position is not None:
            self._position[key] = len(order) - 1
        if self._widen(cells_):
            self._layout_changed()
        else:
            self._resize()
        if len(self._order) == 1:
            self._highlight()
        return RowKey(key)

    def remove_row(self, key: str) -> None:
        del self.rows[key]
        self._removed = True
        self._position = None
        self._forget(key)
        if self.cursor_row >= self.row_count:  # quietly: a filter removes thousands of rows
            self.set_reactive(BigTable.cursor_row, max(0, self.row_count - 1))
        self._resize()

    def update_cell(self, row_key: str, column_key: str, value: Any, *, update_width: bool = False) -> None:
        self.rows[row_key][self._column_index[column_key]] = value
        self._forget(row_key)
        if update_width and self._widen(self._only(column_key, value)):
            self._layout_changed()
        else:
            self._refresh_row(row_key)

    def get_row(self, key: str) -> list:
        return list(self.rows[key])

    def get_row_index(self, key: str) -> int:
        if self._position is None:
            self._position = {k: i for i, k in enumerate(self._order)}
        return self._position[key]

    def displayed(self) -> list[str]:
        """Row keys as the table shows them, top to bottom."""
        return list(self._order)

    def selected_run(self) -> str | None:
        """The key of the row the cursor is on (a run id, in the dashboard's tables)."""
        return self._order[self.cursor_row] if self.row_count else None

    def follow(self, key: str | None) -> None:
        """Put the cursor back on this row, wherever the rows moved it."""
        if key is not None and key in self.rows:
            self.cursor_row = self.get_row_index(key)

    def clear(self, columns: bool = False) -> None:
        self.rows.clear()
        self._keys, self._removed = [], False
        self._position = {}
        if columns:
            self.ordered_columns, self._column_index = [], {}
        self.cursor_row = 0
        self._layout_changed()

    def set_order(self, order: Iterable[str]) -> None:
        """Show the rows in this order of keys; rows it does not name go last, as they were."""
        named = [k for k in dict.fromkeys(order) if k in self.rows]
        if len(named) < len(self._order):
            seen = set(named)
            named += [k for k in self._order if k not in seen]
        if named != self._order:
            self._keys = named
            self._position = None
            self.refresh()

    # the cursor

    def move_cursor(self, *, row: int, animate: bool = False) -> None:
        self.cursor_row = row

    def validate_cursor_row(self, row: int) -> int:
        return max(0, min(row, self.row_count - 1))

    def watch_cursor_row(self, old: int, new: int) -> None:
        if old != new:
            for index in (old, new):
                self._refresh_line(index)
        self._scroll_to_cursor()
        self._highlight()

    def _highlight(self) -> None:
        if self.row_count:
            self.post_message(self.RowHighlighted(self, self.cursor_row, RowKey(self._order[self.cursor_row])))

    def _scroll_to_cursor(self) -> None:
        lines = self._body_height()
        top = round(self.scroll_y)
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False)
        elif lines and self.cursor_row >= top + lines:
            self.scroll_to(y=self.cursor_row - lines + 1, animate=False)

    def _body_height(self) -> int:
        return max(0, self.scrollable_content_region.height - 1)  # less the header

    def action_cursor_up(self) -> None:
        self.cursor_row -= 1

    def action_cursor_down(self) -> None:
        self.cursor_row += 1

    def action_page_up(self) -> None:
        self.cursor_row -= max(1, self._body_height())

    def action_page_down(self) -> None:
        self.cursor_row += max(1, self._body_height())

    def action_first_row(self) -> None:
        self.cursor_row = 0

    def action_last_row(self) -> None:
        self.cursor_row = self.row_count - 1

    def action_select_cursor(self) -> None:
        if self.row_count:
            self.post_message(self.RowSelected(self, self.cursor_row, RowKey(self._order[self.cursor_row])))

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        if offset.y == 0:
            index = self._column_at(offset.x)
            if index is not None:
                column = self.ordered_columns[index]
                self.post_message(self.HeaderSelected(self, column.key, index, column.label))
            return
        row = round(self.scroll_y) + offset.y - 1
        if row < self.row_count:
            if row == self.cursor_row:
                self.action_select_cursor()
            else:
                self.cursor_row = row
            event.stop()

    def _column_at(self, x: int) -> int | None:
        """The column under the x-th cell of the widget's width, the scroll counted."""
        pinned = self._pinned_width()
        left = 0 if x < pinned else round(self.scroll_x) + pinned
        for i, column in enumerate(self.ordered_columns):
            if i == self.fixed_columns and x >= pinned:
                left = pinned - round(self.scroll_x)
            if (i < self.fixed_columns) == (x < pinned) and left <= x < left + column.render_width:
                return i
            left += column.render_width
        return None

    # drawing

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        base = self._base()
        if y == 0:
            pinned, rest = self._header_strips()
        else:
            index = round(self.scroll_y) + y - 1
            if index >= self.row_count:
                return Strip.blank(width, base)
            pinned, rest = self._row_strips(index)
        left = pinned.cell_length
        scroll_x = round(self.scroll_x)
        shown = rest.crop(scroll_x, scroll_x + max(0, width - left))
        line = Strip([*pinned, *shown], left + shown.cell_length)
        return line.crop(0, width).extend_cell_length(width, base)

    def _header_strips(self) -> tuple[Strip, Strip]:
        if self._header is None:
            style = self._base() + self.get_component_rich_style("bigtable--header")
            segs = [Segment(" " * PAD + fit(c.label, c.text_width, "left") + " " * PAD, style)
                    for c in self.ordered_columns]
            self._header = self._split(segs)
        return self._header

    def _row_strips(self, index: int) -> tuple[Strip, Strip]:
        row_key = self._order[index]
        look = (index == self.cursor_row, self.zebra_stripes and index % 2 == 0)
        drawn = self._strips.get(row_key)
        if drawn is None:
            if len(self._strips) > 4096:  # a long scroll through a big table: start again
                self._strips.clear()
            drawn = self._strips[row_key] = {}
        strips = drawn.get(look)
        if strips is None:
            strips = drawn[look] = self._draw(self.rows[row_key], *look)
        return strips

    def _draw(self, cells: list, cursor: bool, even: bool) -> tuple[Strip, Strip]:
        row = self._base()
        if even:
            row += self.get_component_rich_style("bigtable--even-row")
        over = self.get_component_rich_style("bigtable--cursor") if cursor else None
        fixed = None if cursor or not self.fixed_columns else row + self.get_component_rich_style("bigtable--fixed")
        segs = []
        for i, (column, cell) in enumerate(zip(self.ordered_columns, cells)):
            text, name, justify = cell_parts(cell)
            style = fixed if fixed is not None and i < self.fixed_columns else row
            if name:
                style += self._style(name)
            if over is not None:
                style += over
            pad = " " * PAD
            segs.append(Segment(pad + fit(text, column.text_width, justify) + pad, style))
        return self._split(segs)

    def _split(self, segs: list[Segment]) -> tuple[Strip, Strip]:
        """The pinned columns' segments and the rest's, each one cell-exact segment a column."""
        n = self.fixed_columns
        widths = [c.render_width for c in self.ordered_columns]
        return Strip(segs[:n], sum(widths[:n])), Strip(segs[n:], sum(widths[n:]))

    def _base(self) -> Style:
        if self._base_style is None:
            self._base_style = self.rich_style
        return self._base_style

    def _style(self, name: str) -> Style:
        style = self._styles.get(name)
        if style is None:
            style = self._styles[name] = self.app.console.get_style(name, default=Style())
        return style

    def _pinned_width(self) -> int:
        return sum(c.render_width for c in self.ordered_columns[: self.fixed_columns])

    # what invalidates what

    def _only(self, column_key: str, value: Any) -> list:
        """A row of blanks with this value in this column: what `_widen` measures."""
        cells: list = [""] * len(self.ordered_columns)
        cells[self._column_index[column_key]] = value
        return cells

    def _widen(self, cells: list) -> bool:
        """Widen the auto-width columns to these cells; True if any grew."""
        grew = False
        for column, cell in zip(self.ordered_columns, cells):
            if column.width is None:
                width = cell_len(cell_parts(cell)[0])
                if width > column.content_width:
                    column.content_width, grew = width, True
        return grew

    def _forget(self, row_key: str) -> None:
        self._strips.pop(row_key, None)

    def _refresh_row(self, row_key: str) -> None:
        if self._position is not None or len(self._order) < 64:
            self._refresh_line(self.get_row_index(row_key))
        else:
            self.refresh()  # counting the positions again costs more than a repaint

    def _refresh_line(self, index: int) -> None:
        line = index - round(self.scroll_y) + 1
        if 0 < line <= self._body_height():
            self.refresh_line(line)

    def _layout_changed(self) -> None:
        self._strips.clear()
        self._header = None
        self._resize()
        self.refresh()

    def _resize(self) -> None:
        width = sum(c.render_width for c in self.ordered_columns)
        self.virtual_size = Size(width, self.row_count + 1)

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._forget_looks()

    def on_focus(self) -> None:  # the cursor's colours differ with the focus
        self._forget_looks()
        self.refresh()

    def on_blur(self) -> None:
        self._forget_looks()
        self.refresh()

    def _forget_looks(self) -> None:
        self._strips.clear()
        self._styles.clear()
        self._header = self._base_style = None
