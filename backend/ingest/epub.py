"""EPUB: the spine's documents in reading order, through the same HTML reader as .html files."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

from backend.core.errors import CorpusError
from backend.ingest.markup import HtmlText, feed_html
from backend.ingest.textfiles import decode_document, library_error


def epub_chunks(path: Path, shown: str) -> Iterator[str]:
    from ebooklib import (  # imported here: keeps `import backend` light
        ITEM_DOCUMENT,
        epub,
    )

    fix = "re-export it, or convert it to text, e.g. ebook-convert in.epub out.txt"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ebooklib warns about options it will change
            book = epub.read_epub(str(path), options={"ignore_ncx": True})
    except Exception as exc:  # zipfile, lxml, KeyError for a missing part: all mean "broken"
        raise CorpusError(f"{shown} is not a readable EPUB ({library_error(exc)}); {fix}") from None

    documents = []
    for entry in book.spine:
        idref = entry[0] if isinstance(entry, tuple) else entry
        item = book.get_item_with_id(idref) if isinstance(idref, str) else None
        if item is not None and item.get_type() == ITEM_DOCUMENT:
            documents.append(item)
    if not documents:  # no usable spine: fall back to the manifest's order
        documents = list(book.get_items_of_type(ITEM_DOCUMENT))
    for item in documents:
        if isinstance(item, epub.EpubNav):
            continue  # the table of contents is navigation, not prose
        inner = f"{shown} ({item.get_name()})"
        text = decode_document(item.get_content()).replace("\r\n", "\n").replace("\r", "\n")
        parser = HtmlText()
        out = feed_html(parser, text, inner)
        parser.close()
        out += parser.take()
        if out:
            yield out + "\n\n"


