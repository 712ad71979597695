"""Corpus ingestion: find a user's text files, stream their text, measure them.

Formats: plain text (``.txt``), Markdown (``.md``, ``.markdown``; read as plain text), HTML
(``.html``, ``.htm``; tags stripped), PDF (pypdf, page by page) and EPUB (ebooklib, the spine's
documents in reading order, tags stripped with the same HTML parser as ``.html`` files).

Memory stays bounded: text files are read in blocks and decoded incrementally, so a 1 GB text
costs a few MB of RAM, never a copy of the file. ``iter_text`` yields chunks of at most
``chunk_chars`` characters; ``inspect_corpus`` makes one pass over them, hashing the raw bytes
and counting characters and words as they go.

This module holds the entry points (`expand_paths`, `iter_text`, `iter_documents`,
`inspect_corpus`), the checks they share and corpus sets; each format has its reader:
textfiles.py (plain text and Markdown, and how encodings are detected), markup.py (HTML),
epub.py, pdf.py.

The page rule: one A4 page is ``WORDS_PER_PAGE`` = 500 words (a single-spaced page of 12 pt
prose), so ``pages = words / 500``, rounded to 2 decimals. "1, 10, 100, 1000 pages" in the
estimates therefore means 500, 5 000, 50 000 and 500 000 words. Words are whitespace-separated
runs, exactly what ``str.split()`` would count.

A corpus set (``.corpora``, written by ``ltm-tui attribute`` for a subset of files) is a small
text file naming member corpora, one path a line (``#`` starts a comment; relative paths are
relative to the set's folder). It is read in place: ``iter_text`` streams each member in turn
with a blank line between them, ``iter_documents`` gives each member as a document of its own
(training ends each with EOS, so no file attends to another: packing.py), and
``inspect_corpus`` sums the members' counts and hashes their hashes, so a set's id changes when
a member's bytes do. Sets are named explicitly, never found by a folder walk, and do not nest.

Every failure is a ``CorpusError`` whose one line names the file and the reason, with a fix
where one exists; errors from pypdf, ebooklib and zipfile are wrapped, never re-raised raw.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backend.core.errors import CorpusError
from backend.ingest.epub import epub_chunks
from backend.ingest.markup import html_chunks
from backend.ingest.pdf import pdf_chunks
from backend.ingest.textfiles import (
    READ_BYTES,
    Reading,
    WordCounter,
    library_error,
    looks_like_text,
    open_bytes,
    text_chunks,
)

WORDS_PER_PAGE = 500  # the A4 page rule, see the module docstring

FORMAT_BY_SUFFIX: dict[str, str] = {
    ".txt": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".pdf": "pdf",
    ".epub": "epub",
    ".html": "html",
    ".htm": "html",
}
SUPPORTED_SUFFIXES: frozenset[str] = frozenset(FORMAT_BY_SUFFIX)
SET_SUFFIX = ".corpora"  # a corpus set: member paths, one a line (see the module docstring)
SET_SEPARATOR = "\n\n"  # between members, so the last word of one never joins the next



@dataclass(frozen=True)
class CorpusInfo:
    """What ``inspect_corpus`` learned about one file."""

    path: Path  # resolved absolute path
    name: str  # file name
    format: str  # "text" | "markdown" | "pdf" | "epub" | "html"
    encoding: str | None  # detected for text/markdown/html; None for pdf/epub
    bytes: int  # file size
    sha256: str  # of the raw file bytes, hex
    chars: int  # characters of extracted text
    words: int  # whitespace-separated words of extracted text
    pages: float  # words / WORDS_PER_PAGE, 2 decimals

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


SNIFF_BYTES = 4096  # what a file without a suffix is judged on


def format_of(path: str | os.PathLike[str]) -> str | None:
    """The corpus format for a file name's suffix (case-insensitive), or None if unsupported.

    A file whose name has no suffix, or only a number for one (`GPL-3`, `README`, `notes.2`), is
    plain text when its first bytes read as text (textfiles.looks_like_text)."""
    path = Path(path)
    suffix = path.suffix.lower()
    found = FORMAT_BY_SUFFIX.get(suffix)
    if found is None and (not suffix or suffix[1:].isdigit()):
        try:
            with open(path, "rb") as fh:
                sample = fh.read(SNIFF_BYTES)
        except OSError:  # a folder, a missing file, no permission: not a text file to offer
            return None
        return "text" if looks_like_text(sample) else None
    return found


def expand_paths(
    paths: Iterable[str | os.PathLike[str]],
) -> tuple[list[Path], list[CorpusError]]:
    """Resolve files and folders to the corpus files they name.

    A file with a supported suffix stands for itself; a folder for its supported files,
    recursively, sorted by relative path, skipping hidden files and folders (names starting
    with "."; macOS leaves ``._book.pdf`` copies around). Returned paths are resolved and
    absolute, duplicates dropped, first occurrence kept. Each path that cannot be used
    becomes a ``CorpusError`` in the second list; the usable ones still come back.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    errors: list[CorpusError] = []

    def add(path: Path) -> None:
        if path not in seen:
            seen.add(path)
            found.append(path)

    for raw in paths:
        shown = os.fspath(raw)
        bad = unusable_name(shown)
        if bad is not None:
            errors.append(bad)
            continue
        path = Path(shown).expanduser()
        if path.is_dir():
            files, walk_errors = _folder_files(path, shown)
            errors.extend(walk_errors)
            if not files and not walk_errors:
                errors.append(CorpusError(
                    f"{shown} holds no supported files ({_suffix_list()})"
                ))
            for file in files:
                add(file)
        elif not path.exists():
            errors.append(_missing(path, shown))
        elif not path.is_file():  # before its format is sniffed: reading a pipe would wait forever
            errors.append(CorpusError(f"{shown} is not a regular file"))
        elif is_corpus_set(path):
            add(path.resolve())
        elif format_of(path) is None:
            errors.append(_unsupported(path, shown))
        else:
            add(path.resolve())
    return found, errors


def unusable_name(shown: str) -> CorpusError | None:
    """Why a path cannot stand for a corpus whatever the file holds: it is empty (an unset shell
    variable would otherwise mean the current folder), or its name is not valid UTF-8 (a name
    written in a legacy encoding: the store, the socket and the tables all speak UTF-8)."""
    if not shown.strip():
        return CorpusError("an empty path names no file (an unset shell variable?); give a file or folder")
    try:
        shown.encode("utf-8")
    except UnicodeEncodeError:
        readable = shown.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return CorpusError(f"{readable}: its name is not valid UTF-8; rename it "
                           "(for a Cyrillic name: convmv -f cp1251 -t utf-8 --notest FILE)")
    return None


def iter_text(path: str | os.PathLike[str], chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Stream a corpus file's extracted text as chunks of at most ``chunk_chars`` characters.

    Newlines are normalised to "\\n". The file is checked (exists, supported, not empty)
    before this returns; decoding problems raise ``CorpusError`` while iterating.
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be at least 1, got {chunk_chars}")
    shown = os.fspath(path)
    if is_corpus_set(shown):
        members = read_corpus_set(shown)
        return _set_text(members, chunk_chars)
    file, fmt = _checked_file(shown)
    return _extract(file, shown, fmt, chunk_chars, Reading())


def iter_documents(
    path: str | os.PathLike[str], chunk_chars: int = 1 << 20
) -> Iterator[Iterator[str]]:
    """A corpus's documents, each streamed as ``iter_text`` streams a file: a set's members in
    its order (each checked when its turn comes), any other file as one document."""
    shown = os.fspath(path)
    if is_corpus_set(shown):
        return (iter_text(member, chunk_chars) for member in read_corpus_set(shown))
    return iter([iter_text(shown, chunk_chars)])


def inspect_corpus(path: str | os.PathLike[str]) -> CorpusInfo:
    """Hash, decode and count one corpus file in a single streaming pass."""
    shown = os.fspath(path)
    if is_corpus_set(shown):
        return _inspect_set(shown)
    file, fmt = _checked_file(shown)
    reading = Reading()
    if fmt in ("pdf", "epub"):
        # pypdf and ebooklib seek around the file, so hash it in a pass of its own.
        _hash_file(file, shown, reading)
    else:
        reading.hasher = hashlib.sha256()
    chars = 0
    words = WordCounter()
    for chunk in _extract(file, shown, fmt, 1 << 20, reading):
        chars += len(chunk)
        words.feed(chunk)
    assert reading.hasher is not None
    return CorpusInfo(
        path=file,
        name=file.name,
        format=fmt,
        encoding=reading.encoding,
        bytes=reading.nbytes,
        sha256=reading.hasher.hexdigest(),
        chars=chars,
        words=words.words,
        pages=round(words.words / WORDS_PER_PAGE, 2),
    )


# --- corpus sets: several files read in place as one corpus -------------------------------------


def is_corpus_set(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() == SET_SUFFIX


def write_corpus_set(path: str | os.PathLike[str], members: Iterable[str | os.PathLike[str]], note: str = "") -> Path:
    """Write a set naming these files (absolute paths, in this order); atomic (temp + rename)."""
    target = Path(path)
    lines = ["# ltm-tui corpus set: these files, read in place, in this order"]
    lines += [f"# {line}" for line in note.splitlines() if line.strip()]
    lines += [str(Path(m).expanduser().resolve()) for m in members]
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(target)
    return target


def read_corpus_set(path: str | os.PathLike[str]) -> list[Path]:
    """The member files a set names, checked: each exists, is a supported file, is no set."""
    shown = os.fspath(path)
    file = Path(shown).expanduser()
    if not file.is_file():
        raise CorpusError(f"{shown} does not exist")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{shown} cannot be read as a corpus set ({library_error(exc)})") from None
    members: list[Path] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        member = Path(line).expanduser()
        if not member.is_absolute():
            member = file.parent / member
        where = f"{shown}:{number}"
        if is_corpus_set(member):
            raise CorpusError(f"{where} names another corpus set ({line}); list its files instead")
        if not member.is_file():
            raise CorpusError(f"{where} names {line}, which does not exist; "
                              "restore the file or delete the set to rebuild it")
        if format_of(member) is None:
            raise CorpusError(f"{where} names {line}, which has an unsupported type; use {_suffix_list()}")
        members.append(member.resolve())
    if not members:
        raise CorpusError(f"{shown} names no files (one path a line)")
    return members


def _set_text(members: list[Path], chunk_chars: int) -> Iterator[str]:
    for i, member in enumerate(members):
        if i:
            yield SET_SEPARATOR
        yield from iter_text(member, chunk_chars)


_MEMBER_INFO: dict[tuple[str, int, int], CorpusInfo] = {}  # (path, size, mtime_ns) -> its inspection


def inspect_cached(member: Path) -> CorpusInfo:
    """A member's inspection, remembered while its size and mtime stay: the sets of one study
    share their files, and a PDF should be read once, not once per subset."""
    member = Path(member)
    try:
        st = member.stat()
    except OSError:
        return inspect_corpus(member)  # says what is wrong with the path, in one line
    key = (str(member), st.st_size, st.st_mtime_ns)
    info = _MEMBER_INFO.get(key)
    if info is None:
        info = inspect_corpus(member)
        if len(_MEMBER_INFO) > 4096:
            _MEMBER_INFO.clear()
        _MEMBER_INFO[key] = info
    return info


def content_id(path: str | os.PathLike[str]) -> str:
    """The `sha256` `inspect_corpus` gives this file (or corpus set) now, from its bytes alone:
    a worker checks that what it trains on is what was queued."""
    shown = os.fspath(path)
    if is_corpus_set(shown):
        return corpus_set_id([content_id(m) for m in read_corpus_set(shown)])
    reading = Reading()
    _hash_file(Path(shown).expanduser(), shown, reading)
    assert reading.hasher is not None
    return reading.hasher.hexdigest()


def corpus_set_id(member_hashes: Iterable[str]) -> str:
    """A set's id (its `sha256`): a hash of its members' hashes, in the set's order."""
    digest = hashlib.sha256(b"ltm-tui corpus set\n")
    for h in member_hashes:
        digest.update(h.encode() + b"\n")
    return digest.hexdigest()


def _inspect_set(shown: str) -> CorpusInfo:
    members = [inspect_cached(m) for m in read_corpus_set(shown)]
    words = sum(m.words for m in members)
    file = Path(shown).expanduser().resolve()
    return CorpusInfo(
        path=file,
        name=file.name,
        format="corpora",
        encoding=None,
        bytes=sum(m.bytes for m in members),
        sha256=corpus_set_id([m.sha256 for m in members]),
        chars=sum(m.chars for m in members) + len(SET_SEPARATOR) * (len(members) - 1),
        words=words,
        pages=round(words / WORDS_PER_PAGE, 2),
    )


# --- checks shared by the entry points ---------------------------------------------------------


def _suffix_list() -> str:
    return " ".join(sorted(SUPPORTED_SUFFIXES))


def _unsupported(path: Path, shown: str) -> CorpusError:
    if not path.suffix or path.suffix[1:].isdigit():
        return CorpusError(f"{shown} does not read as text (it has no suffix to say what it is); "
                           f"use a text file or one of {_suffix_list()}")
    return CorpusError(f"{shown} has an unsupported type ({path.suffix}); use one of {_suffix_list()}")


def _folder_files(folder: Path, shown: str) -> tuple[list[Path], list[CorpusError]]:
    errors: list[CorpusError] = []

    def on_error(exc: OSError) -> None:
        errors.append(CorpusError(f"{exc.filename or shown} cannot be listed ({exc.strerror})"))

    root = folder.resolve()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            candidate = Path(dirpath, name)
            if not name.startswith(".") and candidate.is_file() and format_of(candidate):
                bad = unusable_name(str(candidate))
                if bad is None:
                    files.append(candidate)
                else:
                    errors.append(bad)
    files.sort(key=lambda p: p.relative_to(root).parts)
    return files, errors


def _missing(path: Path, shown: str) -> CorpusError:
    """Why a path cannot be opened: missing, a link to nothing, or a loop of links."""
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return CorpusError(f"{shown} is a loop of symbolic links; point it at a file")
        return CorpusError(f"{shown} is a link to {os.readlink(path)}, which does not exist")
    return CorpusError(f"{shown} does not exist")


def _checked_file(shown: str) -> tuple[Path, str]:
    path = Path(shown).expanduser()
    fmt = format_of(path)
    if not path.exists():
        raise _missing(path, shown)
    if path.is_dir():
        raise CorpusError(f"{shown} is a folder; pass the files in it, or use expand_paths")
    if fmt is None:
        raise _unsupported(path, shown)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CorpusError(f"{shown} cannot be read ({exc.strerror})") from None
    if size == 0:
        raise CorpusError(f"{shown} has no text (the file is empty)")
    return path.resolve(), fmt


def _hash_file(path: Path, shown: str, reading: Reading) -> None:
    reading.hasher = hashlib.sha256()
    with open_bytes(path, shown) as fh:
        while block := fh.read(READ_BYTES):
            reading.saw(block)


def _extract(
    path: Path, shown: str, fmt: str, chunk_chars: int, reading: Reading
) -> Iterator[str]:
    """Every format's text, cut to ``chunk_chars``; raises if no visible text came out."""
    if fmt in ("text", "markdown"):
        pieces = text_chunks(path, shown, chunk_chars, reading, html=False)
        empty = "has no text (only whitespace)"
    elif fmt == "html":
        pieces = html_chunks(path, shown, chunk_chars, reading)
        empty = "has no text (only markup)"
    elif fmt == "pdf":
        pieces = pdf_chunks(path, shown)
        empty = "has no text layer (scanned pages?); run OCR first, e.g. ocrmypdf in.pdf out.pdf"
    else:
        pieces = epub_chunks(path, shown)
        empty = "has no text (no readable chapters)"
    visible = False
    for piece in pieces:
        if not visible and piece and not piece.isspace():
            visible = True
        if len(piece) <= chunk_chars:
            if piece:
                yield piece
        else:
            for start in range(0, len(piece), chunk_chars):
                yield piece[start : start + chunk_chars]
    if not visible:
        raise CorpusError(f"{shown} {empty}")


