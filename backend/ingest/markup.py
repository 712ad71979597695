"""HTML: the text a reader sees, tags stripped, paragraphs and lines kept (also EPUB's XHTML)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from backend.core.errors import CorpusError
from backend.ingest.textfiles import Reading, library_error, text_chunks

_SKIPPED_TAGS = frozenset({"script", "style", "template"})
# An e-book chapter's <title> is the book's or a label ("One"), not a line of the book.
EBOOK_SKIPPED_TAGS = _SKIPPED_TAGS | {"title"}
_PARAGRAPH_TAGS = frozenset(
    "address article aside blockquote body caption dd details dialog div dl dt fieldset "
    "figcaption figure footer form h1 h2 h3 h4 h5 h6 header hr html main nav ol p pre section "
    "summary table tbody tfoot thead title ul".split()
)
_LINE_TAGS = frozenset({"br", "li", "tr"})
_CELL_TAGS = frozenset({"td", "th"})
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")  # HTML's whitespace: &nbsp; (\xa0) is kept


class HtmlText(HTMLParser):
    """Visible text of an HTML stream: tags dropped, entities decoded, paragraphs kept.

    Runs of HTML whitespace collapse to one space (except inside <pre>); block elements end
    a paragraph ("\\n\\n"), <br>, <li> and <tr> a line. Fed in chunks; ``take`` drains it.
    """

    def __init__(self, skipped: frozenset[str] = _SKIPPED_TAGS) -> None:
        super().__init__(convert_charrefs=True)
        self._skipped = skipped  # elements whose text is not the reader's
        self._out: list[str] = []
        self._skip = 0  # depth inside script/style/template
        self._pre = 0  # depth inside <pre>
        self._started = False  # some text has been emitted
        self._breaks = 0  # newlines owed before the next text
        self._space = False  # a space owed before the next text

    def take(self) -> str:
        text = "".join(self._out)
        self._out.clear()
        return text

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._skipped:
            self._skip += 1
            return
        self._mark(tag)
        if tag == "pre":
            self._pre += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self._skipped:
            self._skip = max(0, self._skip - 1)
            return
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag != "br":  # </br> is not a second line break
            self._mark(tag)

    def handle_data(self, data: str) -> None:
        if self._skip or not data:
            return
        if self._pre:
            self._emit(data, lead_space=False)
            return
        collapsed = _HTML_SPACE.sub(" ", data)
        core = collapsed.strip(" ")
        if not core:
            self._space = True
            return
        self._emit(core, lead_space=collapsed.startswith(" "))
        self._space = collapsed.endswith(" ")

    def _mark(self, tag: str) -> None:
        if not self._started:
            return
        if tag in _PARAGRAPH_TAGS:
            self._breaks = 2
        elif tag in _LINE_TAGS:
            self._breaks = max(self._breaks, 1)
        elif tag in _CELL_TAGS:
            self._space = True

    def _emit(self, text: str, *, lead_space: bool) -> None:
        if self._started:
            if self._breaks:
                self._out.append("\n" * self._breaks)
            elif self._space or lead_space:
                self._out.append(" ")
        self._out.append(text)
        self._started = True
        self._breaks = 0
        self._space = False


def feed_html(parser: HtmlText, text: str, shown: str) -> str:
    try:
        parser.feed(text)
    except (AssertionError, ValueError) as exc:  # the stdlib parser is lenient; be safe anyway
        raise CorpusError(f"{shown} cannot be parsed as HTML ({library_error(exc)})") from None
    return parser.take()


def html_chunks(path: Path, shown: str, read_bytes: int, reading: Reading) -> Iterator[str]:
    parser = HtmlText()
    for text in text_chunks(path, shown, read_bytes, reading, html=True):
        out = feed_html(parser, text, shown)
        if out:
            yield out
    try:
        parser.close()
    except (AssertionError, ValueError) as exc:
        raise CorpusError(f"{shown} cannot be parsed as HTML ({library_error(exc)})") from None
    out = parser.take()
    if out:
        yield out


