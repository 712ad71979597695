"""Plain-text files (and HTML's bytes): read in blocks, decoded incrementally, words counted.

Text encodings are detected, not assumed. A byte-order mark wins (UTF-8, UTF-16, UTF-32).
Otherwise the file is UTF-8 if it decodes strictly as UTF-8. Otherwise it is taken for legacy
Cyrillic: cp1251, koi8-r and cp866 each decode a sample and the one whose decoding shows
Russian letter frequencies wins (the ten most common lowercase letters о е а и н т с р в л make
up about two thirds of the letters of Russian prose; a wrong code page turns them into capitals
or symbols). Text that is not Cyrillic falls back to cp1252, then latin-1. Files whose first
64 KiB are plain ASCII are scanned ahead to the first non-ASCII byte, so a long English preface
does not hide the encoding of the Russian text that follows. Also the helpers every reader of
backend/ingest shares: `Reading` (what an extraction learns), `open_bytes`, `library_error`.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from backend.core.errors import CorpusError

READ_BYTES = 1 << 20  # a block read at a time (and hashed)
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
_NON_ASCII_WORD = re.compile(r"(?<![A-Za-z])[^\W\d_A-Za-z]{2,}(?![A-Za-z])")  # a word of no ASCII letter
_MIN_WORD_LETTERS = 20  # enough letters in such words to judge them alone
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


def open_bytes(path: Path, shown: str) -> IO[bytes]:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise CorpusError(f"{shown} cannot be read ({exc.strerror})") from None


def library_error(exc: BaseException) -> str:
    """A wrapped library error as a short single line."""
    text = " ".join(str(exc).split()) or "no detail"
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(exc).__name__}: {text}"


class Reading:
    """What one extraction learns on the way: the encoding, the bytes' hash and count."""

    def __init__(self) -> None:
        self.encoding: str | None = None
        self.hasher: Any = None  # hashlib sha256 object when hashing
        self.nbytes = 0

    def saw(self, block: bytes) -> None:
        self.nbytes += len(block)
        if self.hasher is not None:
            self.hasher.update(block)


# --- text files and their encodings ------------------------------------------------------------


def text_chunks(
    path: Path, shown: str, read_bytes: int, reading: Reading, *, html: bool
) -> Iterator[str]:
    """Decode a text file block by block into newline-normalised text."""
    with open_bytes(path, shown) as fh:
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
    while block := fh.read(READ_BYTES):
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
        "a".encode(name)  # a text encoding, not one of Python's byte codecs (zlib, hex, base64…)
    except (LookupError, UnicodeError):  # ("undefined" is a codec that refuses everything)
        return None
    # As browsers do (WHATWG encoding standard): latin-1 and ASCII labels mean windows-1252, and
    # a page that says UTF-16 in its own (ASCII-readable) bytes is not UTF-16: read it as UTF-8.
    if name.startswith(("utf-16", "utf-32")):
        return "utf-8"
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
    score = (common - symbols) / (letters + symbols)
    # English with Russian names or quotes: the ASCII letters would drown the Russian ones, so
    # the words made only of non-ASCII letters are scored on their own. Accented Latin text
    # read in a Cyrillic code page has no such words: its odd letters sit inside ASCII words.
    words = "".join(_NON_ASCII_WORD.findall(text))
    if len(words) >= _MIN_WORD_LETTERS:
        in_words = sum(words.count(ch) for ch in _COMMON_RUSSIAN)
        score = max(score, (in_words - symbols) / (len(words) + symbols))
    return score


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


def looks_like_text(sample: bytes) -> bool:
    """Whether a file's first bytes read as text: no NUL, and UTF-8 (a character cut at the end
    of the sample is fine) or a legacy Cyrillic code page without a binary file's control
    characters. For files whose name does not say (`GPL-3`, `README`, `notes`)."""
    if not sample or b"\0" in sample:
        return False
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        text = sample.decode(_guess_legacy(sample), errors="replace")
    return _control_share(text) <= _MAX_CONTROL_SHARE


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


class WordCounter:
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


def decode_document(data: bytes) -> str:
    """Decode one whole (small) HTML/XHTML document held in memory."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            return data.decode(name, "replace")
    candidates = [_declared_charset(data[:_SAMPLE_BYTES]), "utf-8"]
    for name in candidates:
        if name is not None and _decodes(data, name, True):
            return data.decode(name)
    return data.decode(_guess_legacy(data[:_SAMPLE_BYTES]), "replace")
