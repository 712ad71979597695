"""EPUB: the spine's documents in reading order, through the same HTML reader as .html files."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

from backend.core.errors import CorpusError
from backend.ingest.markup import EBOOK_SKIPPED_TAGS, HtmlText, feed_html
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

    locked = _encrypted_documents(path)
    if locked:
        raise CorpusError(f"{shown} is DRM-protected: its text ({locked[0]}{' and more' if len(locked) > 1 else ''}) "
                          "is encrypted; only a DRM-free copy can be read")
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
        # The bytes as stored: ebooklib's get_content() re-serialises a document as UTF-8 after
        # reading it as UTF-8, which turns a chapter in a legacy encoding into U+FFFD.
        raw = item.content if isinstance(item.content, bytes) and item.content else item.get_content()
        text = decode_document(raw).replace("\r\n", "\n").replace("\r", "\n")
        parser = HtmlText(EBOOK_SKIPPED_TAGS)
        out = feed_html(parser, text, inner)
        parser.close()
        out += parser.take()
        if out:
            yield out + "\n\n"




# Font obfuscation (IDPF, Adobe) also lists files in encryption.xml; it hides fonts, not text.
_FONT_OBFUSCATION = ("http://www.idpf.org/2008/embedding", "http://ns.adobe.com/pdf/enc#RC")


def _encrypted_documents(path: Path) -> list[str]:
    """The text documents META-INF/encryption.xml says are encrypted (DRM), if any."""
    import xml.etree.ElementTree as ET
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            if "META-INF/encryption.xml" not in archive.namelist():
                return []
            root = ET.fromstring(archive.read("META-INF/encryption.xml"))
    except (OSError, zipfile.BadZipFile, ET.ParseError):
        return []  # read_epub has read it already; a part it could not parse does not say DRM
    locked = []
    for data in root.iter():
        if not data.tag.endswith("EncryptedData"):
            continue
        method = next((e.get("Algorithm", "") for e in data.iter() if e.tag.endswith("EncryptionMethod")), "")
        uri = next((e.get("URI", "") for e in data.iter() if e.tag.endswith("CipherReference")), "")
        if method not in _FONT_OBFUSCATION and uri.lower().endswith((".xhtml", ".html", ".htm", ".xml")):
            locked.append(uri)
    return locked
