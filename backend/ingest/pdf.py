"""PDF: pypdf's text layer, page by page; a file without one is told to run OCR first."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backend.core.errors import CorpusError
from backend.ingest.textfiles import library_error, open_bytes

_log = logging.getLogger(__name__)
# pypdf tells its reader of every repair it makes ("EOF marker not found"); a file it cannot read
# ends in one line of ours that names the file and the fix, so its own lines would only repeat
# that, raw, on the user's terminal and in service.log.
logging.getLogger("pypdf").setLevel(logging.CRITICAL)


def pdf_chunks(path: Path, shown: str) -> Iterator[str]:
    from pypdf import PdfReader  # imported here: keeps `import backend` light

    fix = "repair it (e.g. qpdf in.pdf repaired.pdf) or export it again"
    with open_bytes(path, shown) as fh:
        try:
            # The open file, not the path: pypdf then reads objects on demand instead of
            # loading the whole file into memory.
            reader = PdfReader(fh, strict=False)
            encrypted = reader.is_encrypted
        except Exception as exc:  # pypdf raises many types on damaged files
            raise CorpusError(f"{shown} is not a readable PDF ({library_error(exc)}); {fix}") from None
        if encrypted and not _pdf_opens_without_password(reader):
            raise CorpusError(
                f"{shown} is encrypted; decrypt it first, "
                "e.g. qpdf --decrypt --password=PASSWORD in.pdf out.pdf"
            )
        try:
            count = len(reader.pages)
        except Exception as exc:
            raise CorpusError(f"{shown} is not a readable PDF ({library_error(exc)}); {fix}") from None
        if count == 0:
            raise CorpusError(f"{shown} has no text (the PDF has no pages)")
        failures: list[tuple[int, Exception]] = []
        for number in range(count):
            try:
                text = reader.pages[number].extract_text()
            except Exception as exc:
                # One damaged page should not cost the book; skipped pages are logged.
                failures.append((number + 1, exc))
                _log.warning("%s: page %d skipped (%s)", shown, number + 1, library_error(exc))
                continue
            if text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
                yield text if text.endswith("\n") else text + "\n"
        if len(failures) == count:
            page, exc = failures[0]
            raise CorpusError(
                f"{shown} is not a readable PDF (no page could be read; page {page}: "
                f"{library_error(exc)}); {fix}"
            )


def _pdf_opens_without_password(reader: Any) -> bool:
    """Owner-password-only PDFs (common for "no copying" books) open with an empty password."""
    try:
        return bool(reader.decrypt(""))
    except Exception:  # missing AES support or a damaged encryption dictionary
        return False
