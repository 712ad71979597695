"""Corpus ingestion: find a user's text files, stream their text, measure them.

Formats: plain text (``.txt``), Markdown (``.md``, ``.markdown``; read as plain text), HTML
(``.html``, ``.htm``; tags stripped), PDF (pypdf, page by page) and EPUB (ebooklib, the spine's
documents in reading order, tags stripped with the same HTML parser as ``.html`` files).

Memory stays bounded: text files are read in blocks and decoded incrementally, so a 1 GB text
costs a few MB of RAM, never a copy of the file. ``iter_text`` yields chunks of at most
``chunk_chars`` characters; ``inspect_corpus`` makes one pass over them, hashing the raw bytes
and counting characters and words as they go.

Text encodings are detected, not assumed. A byte-order mark wins (UTF-8, UTF-16, UTF-32).
Otherwise the file is UTF-8 if it decodes strictly as UTF-8. Otherwise it is taken for legacy
Cyrillic: cp1251, koi8-r and cp866 each decode a sample and the one whose decoding shows
Russian letter frequencies wins (the ten most common lowercase letters о е а и н т с р в л make
up about two thirds of the letters of Russian prose; a wrong code page turns them into capitals
or symbols). Text that is not Cyrillic falls back to cp1252, then latin-1. Files whose first
64 KiB are plain ASCII are scanned ahead to the first non-ASCII byte, so a long English preface
does not hide the encoding of the Russian text that follows.

The page rule: one A4 page is ``WORDS_PER_PAGE`` = 500 words (a single-spaced page of 12 pt
prose), so ``pages = words / 500``, rounded to 2 decimals. "1, 10, 100, 1000 pages" in the
estimates therefore means 500, 5 000, 50 000 and 500 000 words. Words are whitespace-separated
runs, exactly what ``str.split()`` would count.

A corpus set (``.corpora``, written by ``ltm-tui attribute`` for a subset of files) is a small
text file naming member corpora, one path a line (``#`` starts a comment; relative paths are
relative to the set's folder). It is read in place: ``iter_text`` streams each member in turn
with a blank line between them, and ``inspect_corpus`` sums the members' counts and hashes their
hashes, so a set's id changes when a member's bytes do. Sets are named explicitly, never found
by a folder walk, and do not nest.

Every failure is a ``CorpusError`` whose one line names the file and the reason, with a fix
where one exists; errors from pypdf, ebooklib and zipfile are wrapped, never re-raised raw.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import IO, Any

from backend.core.errors import CorpusError

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

_log = logging.getLogger(__name__)

_READ_BYTES = 1 << 20  # hashing block size for PDF/EPUB files
_SAMPLE_BYTES = 64 * 1024  # the leading sample an encoding is decided on

# Longest BOMs first: the UTF-32-LE mark starts with the UTF-16-LE one.
_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_LEGACY_CYRILLIC = ("cp1251", "koi8-r", "cp866")
_COMMON_RUSSIAN = "оеаинтсрвл"
_MIN_RUSSIAN_SCORE = 0.2  # Russian prose scores about 0.6, accented French about 0.1
_MAX_CONTROL_SHARE = 0.05  # more C0 control characters than this: a binary file
_TEXT_CONTROLS = frozenset("\t\n\r\f\v\x1b")
_NON_ASCII = re.compile(rb"[\x80-\xff]")
_DECLARED_CHARSET = re.compile(
    rb"""<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._:-]+)"""
    rb"""|<meta[^>]*?charset\s*=\s*["']?([A-Za-z0-9._:-]+)""",
    re.IGNORECASE,
)
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "a PDF; rename it to .pdf"),
    (b"PK\x03\x04", "a zip archive (EPUB, DOCX, ...); convert it to text or .epub"),
)

# Word counting without one object per word (a 1 MB chunk holds ~170 000 words): map every
# whitespace byte to b" " and every other byte to b"x", then count the starts of words.
# Code points >= 0x80 are non-space except these, replaced by a space first.
_UNICODE_SPACES = (
    "\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_WORD_TABLE = bytes(32 if chr(i).isspace() else 120 for i in range(128)) + b"x" * 128


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


def format_of(path: str | os.PathLike[str]) -> str | None:
    """The corpus format for a file name's suffix (case-insensitive), or None if unsupported."""
    return FORMAT_BY_SUFFIX.get(Path(path).suffix.lower())


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
        elif is_corpus_set(path) and path.is_file():
            add(path.resolve())
        elif format_of(path) is None:
            errors.append(_unsupported(path, shown))
        elif not path.is_file():
            errors.append(CorpusError(f"{shown} is not a regular file"))
        else:
            add(path.resolve())
    return found, errors


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
    return _extract(file, shown, fmt, chunk_chars, _Reading())


def inspect_corpus(path: str | os.PathLike[str]) -> CorpusInfo:
    """Hash, decode and count one corpus file in a single streaming pass."""
    shown = os.fspath(path)
    if is_corpus_set(shown):
        return _inspect_set(shown)
    file, fmt = _checked_file(shown)
    reading = _Reading()
    if fmt in ("pdf", "epub"):
        # pypdf and ebooklib seek around the file, so hash it in a pass of its own.
        _hash_file(file, shown, reading)
    else:
        reading.hasher = hashlib.sha256()
    chars = 0
    words = _WordCounter()
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
        raise CorpusError(f"{shown} cannot be read as a corpus set ({_why(exc)})") from None
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
    suffix = path.suffix or "no suffix"
    return CorpusError(f"{shown} has an unsupported type ({suffix}); use one of {_suffix_list()}")


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
            if not name.startswith(".") and format_of(name) and candidate.is_file():
                files.append(candidate)
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


def _open(path: Path, shown: str) -> IO[bytes]:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise CorpusError(f"{shown} cannot be read ({exc.strerror})") from None


def _why(exc: BaseException) -> str:
    """A wrapped library error as a short single line."""
    text = " ".join(str(exc).split()) or "no detail"
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(exc).__name__}: {text}"


class _Reading:
    """What one extraction learns on the way: the encoding, the bytes' hash and count."""

    def __init__(self) -> None:
        self.encoding: str | None = None
        self.hasher: Any = None  # hashlib sha256 object when hashing
        self.nbytes = 0

    def saw(self, block: bytes) -> None:
        self.nbytes += len(block)
        if self.hasher is not None:
            self.hasher.update(block)


def _hash_file(path: Path, shown: str, reading: _Reading) -> None:
    reading.hasher = hashlib.sha256()
    with _open(path, shown) as fh:
        while block := fh.read(_READ_BYTES):
            reading.saw(block)


def _extract(
    path: Path, shown: str, fmt: str, chunk_chars: int, reading: _Reading
) -> Iterator[str]:
    """Every format's text, cut to ``chunk_chars``; raises if no visible text came out."""
    if fmt in ("text", "markdown"):
        pieces = _text_chunks(path, shown, chunk_chars, reading, html=False)
        empty = "has no text (only whitespace)"
    elif fmt == "html":
        pieces = _html_chunks(path, shown, chunk_chars, reading)
        empty = "has no text (only markup)"
    elif fmt == "pdf":
        pieces = _pdf_chunks(path, shown)
        empty = "has no text layer (scanned pages?); run OCR first, e.g. ocrmypdf in.pdf out.pdf"
    else:
        pieces = _epub_chunks(path, shown)
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


# --- text files and their encodings ------------------------------------------------------------


def _text_chunks(
    path: Path, shown: str, read_bytes: int, reading: _Reading, *, html: bool
) -> Iterator[str]:
    """Decode a text file block by block into newline-normalised text."""
    with _open(path, shown) as fh:
        sample = fh.read(_SAMPLE_BYTES)
        if not sample:
            raise CorpusError(f"{shown} has no text (the file is empty)")
        at_eof = len(sample) < _SAMPLE_BYTES
        encoding = _choose_encoding(fh, sample, at_eof, shown, html=html)
        fh.seek(len(sample))
        reading.encoding = encoding
        _reject_controls(sample.decode(encoding, "replace"), shown)

        decoder = codecs.getincrementaldecoder(encoding)("strict")
        newlines = _Newlines()
        offset = 0
        for block in _blocks(fh, sample, read_bytes):
            reading.saw(block)
            try:
                text = decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise CorpusError(
                    f"{shown} is not valid {encoding} text near byte {offset + exc.start}; "
                    "re-save it as UTF-8"
                ) from None
            offset += len(block)
            if "\x00" in text:
                raise CorpusError(f"{shown} looks binary, not text (NUL bytes near byte {offset})")
            text = newlines.feed(text)
            if text:
                yield text
        try:
            tail = decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise CorpusError(
                f"{shown} ends in the middle of a {encoding} character (truncated file?)"
            ) from None
        tail = newlines.feed(tail) + newlines.close()
        if tail:
            yield tail


def _blocks(fh: IO[bytes], sample: bytes, size: int) -> Iterator[bytes]:
    """The sample already read, then the rest of the file, in blocks of ``size`` bytes."""
    for start in range(0, len(sample), size):
        yield sample[start : start + size]
    while block := fh.read(size):
        yield block


def _choose_encoding(
    fh: IO[bytes], sample: bytes, at_eof: bool, shown: str, *, html: bool
) -> str:
    for bom, name in _BOMS:
        if sample.startswith(bom):
            return name
    if b"\x00" in sample:
        name = _bomless_utf16(sample)
        if name is None:
            raise CorpusError(f"{shown} looks binary, not text{_magic_hint(sample)}")
        return name
    probe, probe_eof = sample, at_eof
    if sample.isascii() and not at_eof:
        probe, probe_eof = _first_non_ascii_window(fh)
    if not probe:
        return "utf-8"  # ASCII all the way: every candidate agrees
    if html:
        declared = _declared_charset(sample)
        if declared is not None and _decodes(probe, declared, probe_eof):
            return declared
    if _decodes(probe, "utf-8", probe_eof):
        return "utf-8"
    return _guess_legacy(probe)


def _magic_hint(sample: bytes) -> str:
    for magic, what in _MAGIC:
        if sample.startswith(magic):
            return f" (it starts like {what})"
    return ""


def _bomless_utf16(sample: bytes) -> str | None:
    """UTF-16 without a BOM: NULs as the high byte of ASCII letters, all on one side."""
    if len(sample) < 4:
        return None
    even = sample[0::2].count(0)
    odd = sample[1::2].count(0)
    total = even + odd
    # Spaces and punctuation alone give Russian UTF-16 a NUL in about 1 byte of 15; binary
    # data with that many NULs has them on both sides.
    if total < max(2, len(sample) // 50):
        return None
    if odd >= 0.95 * total:
        name = "utf-16-le"
    elif even >= 0.95 * total:
        name = "utf-16-be"
    else:
        return None
    try:
        text = sample[: len(sample) // 2 * 2].decode(name, "strict")
    except UnicodeDecodeError:
        return None
    return None if _control_share(text) > _MAX_CONTROL_SHARE else name


def _first_non_ascii_window(fh: IO[bytes]) -> tuple[bytes, bool]:
    """Read past an ASCII prefix; return up to a sample's worth from the first non-ASCII byte."""
    while block := fh.read(_READ_BYTES):
        found = _NON_ASCII.search(block)
        if found is None:
            continue
        window = block[found.start() : found.start() + _SAMPLE_BYTES]
        if len(window) < _SAMPLE_BYTES:
            window += fh.read(_SAMPLE_BYTES - len(window))
        return window, len(window) < _SAMPLE_BYTES
    return b"", True


def _declared_charset(sample: bytes) -> str | None:
    found = _DECLARED_CHARSET.search(sample)
    if found is None:
        return None
    label = (found.group(1) or found.group(2)).decode("ascii")
    try:
        name = codecs.lookup(label).name
    except LookupError:
        return None
    # As browsers do (WHATWG encoding standard): latin-1 and ASCII labels mean windows-1252.
    return "cp1252" if name in ("ascii", "iso8859-1", "latin-1") else name


def _decodes(data: bytes, encoding: str, at_eof: bool) -> bool:
    """Strict decode; a multi-byte character cut at the end of a sample is allowed."""
    try:
        codecs.getincrementaldecoder(encoding)("strict").decode(data, final=at_eof)
    except (UnicodeDecodeError, LookupError):
        return False
    return True


def _russian_score(text: str) -> float:
    """Share of the common Russian lowercase letters, less a penalty for non-ASCII symbols.

    A wrong Cyrillic code page turns those letters into capitals (koi8-r vs cp1251) or into
    symbols such as ¤ § © (cp866 read as cp1251); the penalty makes the second case lose.
    """
    letters = sum(map(str.isalpha, text))
    if not letters:
        return 0.0
    non_ascii = len(text) - sum(map(str.isascii, text))
    symbols = non_ascii - sum(1 for ch in text if ch >= "\x80" and ch.isalpha())
    common = sum(text.count(ch) for ch in _COMMON_RUSSIAN)
    return (common - symbols) / (letters + symbols)


def _guess_legacy(sample: bytes) -> str:
    scores: dict[str, float] = {}
    for name in _LEGACY_CYRILLIC:
        try:
            scores[name] = _russian_score(sample.decode(name, "strict"))
        except UnicodeDecodeError:
            continue
    if scores:
        best = max(scores, key=scores.__getitem__)
        runners_up = [score for name, score in scores.items() if name != best]
        if scores[best] >= _MIN_RUSSIAN_SCORE and all(scores[best] >= 2 * s for s in runners_up):
            return best
    try:
        sample.decode("cp1252", "strict")
    except UnicodeDecodeError:
        return "latin-1"
    return "cp1252"


def _control_share(text: str) -> float:
    if not text:
        return 0.0
    controls = sum(1 for ch in text if ch < " " and ch not in _TEXT_CONTROLS)
    return controls / len(text)


def _reject_controls(text: str, shown: str) -> None:
    if _control_share(text) > _MAX_CONTROL_SHARE:
        raise CorpusError(f"{shown} looks binary, not text (mostly control characters)")


class _Newlines:
    """\\r\\n and lone \\r become \\n, also when a \\r\\n pair is split between chunks."""

    def __init__(self) -> None:
        self._cr = False

    def feed(self, text: str) -> str:
        if self._cr:
            text = "\r" + text
            self._cr = False
        if text.endswith("\r"):
            text = text[:-1]
            self._cr = True
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        return text

    def close(self) -> str:
        cr, self._cr = self._cr, False
        return "\n" if cr else ""


class _WordCounter:
    """Counts whitespace-separated words over chunks, joining words split between chunks."""

    def __init__(self) -> None:
        self.words = 0
        self._in_word = False

    def feed(self, text: str) -> None:
        if not text:
            return
        if not text.isascii():
            for space in _UNICODE_SPACES:
                if space in text:
                    text = text.replace(space, " ")
        marks = text.encode("utf-8", "surrogatepass").translate(_WORD_TABLE)
        self.words += marks.count(b" x")
        if marks[:1] == b"x" and not self._in_word:
            self.words += 1
        self._in_word = marks[-1:] == b"x"


# --- HTML and EPUB -----------------------------------------------------------------------------

_SKIPPED_TAGS = frozenset({"script", "style", "template"})
_PARAGRAPH_TAGS = frozenset(
    "address article aside blockquote body caption dd details dialog div dl dt fieldset "
    "figcaption figure footer form h1 h2 h3 h4 h5 h6 header hr html main nav ol p pre section "
    "summary table tbody tfoot thead title ul".split()
)
_LINE_TAGS = frozenset({"br", "li", "tr"})
_CELL_TAGS = frozenset({"td", "th"})
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")  # HTML's whitespace: &nbsp; (\xa0) is kept


class _HtmlText(HTMLParser):
    """Visible text of an HTML stream: tags dropped, entities decoded, paragraphs kept.

    Runs of HTML whitespace collapse to one space (except inside <pre>); block elements end
    a paragraph ("\\n\\n"), <br>, <li> and <tr> a line. Fed in chunks; ``take`` drains it.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
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
        if tag in _SKIPPED_TAGS:
            self._skip += 1
            return
        self._mark(tag)
        if tag == "pre":
            self._pre += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS:
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


def _feed_html(parser: _HtmlText, text: str, shown: str) -> str:
    try:
        parser.feed(text)
    except (AssertionError, ValueError) as exc:  # the stdlib parser is lenient; be safe anyway
        raise CorpusError(f"{shown} cannot be parsed as HTML ({_why(exc)})") from None
    return parser.take()


def _html_chunks(path: Path, shown: str, read_bytes: int, reading: _Reading) -> Iterator[str]:
    parser = _HtmlText()
    for text in _text_chunks(path, shown, read_bytes, reading, html=True):
        out = _feed_html(parser, text, shown)
        if out:
            yield out
    try:
        parser.close()
    except (AssertionError, ValueError) as exc:
        raise CorpusError(f"{shown} cannot be parsed as HTML ({_why(exc)})") from None
    out = parser.take()
    if out:
        yield out


def _decode_document(data: bytes) -> str:
    """Decode one whole (small) HTML/XHTML document held in memory."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            return data.decode(name, "replace")
    candidates = [_declared_charset(data[:_SAMPLE_BYTES]), "utf-8"]
    for name in candidates:
        if name is not None and _decodes(data, name, True):
            return data.decode(name)
    return data.decode(_guess_legacy(data[:_SAMPLE_BYTES]), "replace")


def _epub_chunks(path: Path, shown: str) -> Iterator[str]:
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
        raise CorpusError(f"{shown} is not a readable EPUB ({_why(exc)}); {fix}") from None

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
        text = _decode_document(item.get_content()).replace("\r\n", "\n").replace("\r", "\n")
        parser = _HtmlText()
        out = _feed_html(parser, text, inner)
        parser.close()
        out += parser.take()
        if out:
            yield out + "\n\n"


# --- PDF ---------------------------------------------------------------------------------------


def _pdf_chunks(path: Path, shown: str) -> Iterator[str]:
    from pypdf import PdfReader  # imported here: keeps `import backend` light

    fix = "repair it (e.g. qpdf in.pdf repaired.pdf) or export it again"
    with _open(path, shown) as fh:
        try:
            # The open file, not the path: pypdf then reads objects on demand instead of
            # loading the whole file into memory.
            reader = PdfReader(fh, strict=False)
            encrypted = reader.is_encrypted
        except Exception as exc:  # pypdf raises many types on damaged files
            raise CorpusError(f"{shown} is not a readable PDF ({_why(exc)}); {fix}") from None
        if encrypted and not _pdf_opens_without_password(reader):
            raise CorpusError(
                f"{shown} is encrypted; decrypt it first, "
                "e.g. qpdf --decrypt --password=PASSWORD in.pdf out.pdf"
            )
        try:
            count = len(reader.pages)
        except Exception as exc:
            raise CorpusError(f"{shown} is not a readable PDF ({_why(exc)}); {fix}") from None
        if count == 0:
            raise CorpusError(f"{shown} has no text (the PDF has no pages)")
        failures: list[tuple[int, Exception]] = []
        for number in range(count):
            try:
                text = reader.pages[number].extract_text()
            except Exception as exc:
                # One damaged page should not cost the book; skipped pages are logged.
                failures.append((number + 1, exc))
                _log.warning("%s: page %d skipped (%s)", shown, number + 1, _why(exc))
                continue
            if text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
                yield text if text.endswith("\n") else text + "\n"
        if len(failures) == count:
            page, exc = failures[0]
            raise CorpusError(
                f"{shown} is not a readable PDF (no page could be read; page {page}: "
                f"{_why(exc)}); {fix}"
            )


def _pdf_opens_without_password(reader: Any) -> bool:
    """Owner-password-only PDFs (common for "no copying" books) open with an empty password."""
    try:
        return bool(reader.decrypt(""))
    except Exception:  # missing AES support or a damaged encryption dictionary
        return False
