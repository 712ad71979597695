"""Corpus ingestion on real files in a temp dir: every format, every bad input, the counts."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from ebooklib import epub
from pypdf import PdfReader, PdfWriter

from backend.core.errors import CorpusError
from backend.ingest.corpora import (
    SUPPORTED_SUFFIXES,
    CorpusInfo,
    expand_paths,
    format_of,
    inspect_corpus,
    iter_text,
)
from backend.ingest.textfiles import WordCounter

RUSSIAN = (
    "Исследователь хочет понять, какие из этих текстов действительно учат модель думать.\n"
    "Съешь же ещё этих мягких французских булок, да выпей чаю!\n"
)


def read_all(path: Path, chunk_chars: int = 1 << 20) -> str:
    return "".join(iter_text(path, chunk_chars))


def corpus_error(call, *args) -> CorpusError:
    """Run ``call`` (consuming an iterator if it returns one) and return its CorpusError."""
    with pytest.raises(CorpusError) as caught:
        result = call(*args)
        if not isinstance(result, CorpusInfo):
            list(result)
    error = caught.value
    assert "\n" not in error.one_line()
    assert error.one_line().startswith("corpus: ")
    return error


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF, one Helvetica text line per page, with a correct xref table."""
    font = 3 + 2 * len(pages)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(len(pages)))
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode(),
        font: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    for i, text in enumerate(pages):
        objects[3 + 2 * i] = (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
            f"/Resources << /Font << /F1 {font} 0 R >> >> /Contents {4 + 2 * i} 0 R >>"
        ).encode()
        content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objects[4 + 2 * i] = (
            b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream"
        )
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n" % number + objects[number] + b"\nendobj\n"
    xref = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for number in range(1, size):
        out += b"%010d 00000 n \n" % offsets[number]
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    return bytes(out)


def make_epub(path: Path) -> Path:
    book = epub.EpubBook()
    book.set_identifier("ltm-test-book")
    book.set_title("Test book")
    book.set_language("ru")
    book.add_author("Tester")
    one = epub.EpubHtml(title="One", file_name="one.xhtml", lang="ru")
    one.content = (
        "<h1>Глава первая</h1><p>Логика &amp; смысл.</p><script>alert('no')</script>"
    )
    two = epub.EpubHtml(title="Two", file_name="two.xhtml", lang="en")
    two.content = "<h1>Chapter two</h1><p>Second   chapter\n text.</p>"
    # Added to the manifest in the wrong order: the spine, not the manifest, sets the order.
    book.add_item(two)
    book.add_item(one)
    book.toc = (one, two)
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = ["nav", one, two]
    epub.write_epub(str(path), book)
    return path


# --- text files and encodings ------------------------------------------------------------------


def test_utf8_russian_text_comes_back_exactly(tmp_path: Path) -> None:
    path = tmp_path / "ru.txt"
    path.write_bytes(RUSSIAN.encode("utf-8"))
    assert read_all(path) == RUSSIAN
    assert inspect_corpus(path).encoding == "utf-8"


@pytest.mark.parametrize(
    ("codec", "expected"),
    [
        ("utf-8-sig", "utf-8-sig"),
        ("utf-16", "utf-16"),  # Python's utf-16 writes a BOM
        ("utf-32", "utf-32"),
        ("utf-16-le", "utf-16-le"),  # no BOM: found by the NULs in ASCII's high bytes
        ("cp1251", "cp1251"),
        ("koi8-r", "koi8-r"),
        ("cp866", "cp866"),
    ],
)
def test_encodings_are_detected_and_russian_is_not_mangled(
    tmp_path: Path, codec: str, expected: str
) -> None:
    path = tmp_path / f"{codec}.txt"
    path.write_bytes(RUSSIAN.encode(codec))
    assert read_all(path) == RUSSIAN
    assert inspect_corpus(path).encoding == expected


def test_utf16_with_bom_big_endian(tmp_path: Path) -> None:
    path = tmp_path / "be.txt"
    path.write_bytes(b"\xfe\xff" + RUSSIAN.encode("utf-16-be"))
    assert read_all(path) == RUSSIAN
    assert inspect_corpus(path).encoding == "utf-16"


def test_legacy_cyrillic_after_a_long_ascii_preface(tmp_path: Path) -> None:
    # The first 64 KiB are ASCII: detection must look further, at the Russian text.
    preface = "An English preface, long enough to fill the whole sample.\n" * 2000
    path = tmp_path / "late.txt"
    path.write_bytes(preface.encode("ascii") + RUSSIAN.encode("koi8-r"))
    assert read_all(path) == preface + RUSSIAN
    assert inspect_corpus(path).encoding == "koi8-r"


def test_non_cyrillic_legacy_text_falls_back_to_cp1252(tmp_path: Path) -> None:
    french = "Le café est très bon à Paris, où l'été dure. Ça va? Première élève, déjà là.\n"
    path = tmp_path / "fr.txt"
    path.write_bytes(french.encode("cp1252"))
    assert read_all(path) == french
    assert inspect_corpus(path).encoding == "cp1252"


def test_newlines_are_normalised_even_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"one\r\ntwo\rthree\r\n\r\nfour\r")
    expected = "one\ntwo\nthree\n\nfour\n"
    for chunk_chars in (1, 2, 3, 4, 1 << 20):
        assert read_all(path, chunk_chars) == expected


@pytest.mark.parametrize("chunk_chars", [1, 2, 3, 5, 7])
def test_multibyte_characters_split_across_chunks(tmp_path: Path, chunk_chars: int) -> None:
    # Cyrillic is 2 bytes, CJK 3, emoji 4: every small block size cuts some character in two.
    text = "Ёж и 漢字 😀 — логика!\n" * 3
    path = tmp_path / "split.txt"
    path.write_bytes(text.encode("utf-8"))
    chunks = list(iter_text(path, chunk_chars))
    assert "".join(chunks) == text
    assert all(0 < len(chunk) <= chunk_chars for chunk in chunks)
    assert len(chunks) > 1


def test_markdown_is_read_as_text(tmp_path: Path) -> None:
    text = "# Заголовок\n\nSome *markdown* with `code`.\n"
    path = tmp_path / "notes.md"
    path.write_text(text, encoding="utf-8")
    assert read_all(path) == text
    info = inspect_corpus(path)
    assert (info.format, info.encoding, info.words) == ("markdown", "utf-8", 6)
    assert inspect_corpus(path.rename(tmp_path / "notes.MARKDOWN")).format == "markdown"


# --- HTML --------------------------------------------------------------------------------------


def test_html_drops_tags_script_and_style_and_keeps_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "page.html"
    path.write_text(
        "<!DOCTYPE html><html><head><title>Заглавие</title>"
        "<style>p { color: red; }</style>"
        "<script>var secret = '<p>not text</p>';</script></head>"
        "<body><h1>Heading</h1>\n<p>First   paragraph,\n  wrapped &amp; joined.</p>"
        "<p>Second<br>line &laquo;two&raquo;&nbsp;end</p>"
        "<ul><li>one</li><li>two</li></ul><!-- a comment --></body></html>",
        encoding="utf-8",
    )
    text = read_all(path)
    assert text == (
        "Заглавие\n\nHeading\n\nFirst paragraph, wrapped & joined.\n\n"
        "Second\nline «two»\xa0end\n\none\ntwo"
    )
    assert "secret" not in text and "color" not in text
    info = inspect_corpus(path)
    assert (info.format, info.encoding) == ("html", "utf-8")


def test_html_in_cp1251_with_a_meta_charset(tmp_path: Path) -> None:
    path = tmp_path / "old.htm"
    html = (
        '<html><head><meta http-equiv="Content-Type" content="text/html; charset=windows-1251">'
        f"</head><body><p>{RUSSIAN}</p></body></html>"
    )
    path.write_bytes(html.encode("cp1251"))
    assert read_all(path) == " ".join(RUSSIAN.split())
    assert inspect_corpus(path).encoding == "cp1251"


def test_html_parsed_in_tiny_chunks_gives_the_same_text(tmp_path: Path) -> None:
    path = tmp_path / "chunks.html"
    path.write_text(
        "<p>Alpha &amp; beta</p><script>x = 1 < 2;</script><p>Гамма&nbsp;дельта</p>",
        encoding="utf-8",
    )
    whole = read_all(path)
    assert whole == "Alpha & beta\n\nГамма\xa0дельта"
    assert read_all(path, 3) == whole


# --- PDF and EPUB ------------------------------------------------------------------------------


def test_pdf_text_is_extracted_page_by_page(tmp_path: Path) -> None:
    path = tmp_path / "paper.pdf"
    path.write_bytes(make_pdf(["Hello logic", "Second page words"]))
    assert list(iter_text(path)) == ["Hello logic\n", "Second page words\n"]
    info = inspect_corpus(path)
    assert (info.format, info.encoding, info.words, info.chars) == ("pdf", None, 5, 30)
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_pdf_with_only_an_owner_password_is_read(tmp_path: Path) -> None:
    # "No copying" books: encrypted, but they open with an empty user password.
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(["Hello logic"]))))
    writer.encrypt(user_password="", owner_password="owner")
    path = tmp_path / "locked.pdf"
    writer.write(path)
    assert read_all(path) == "Hello logic\n"


def test_epub_chapters_in_spine_order_without_markup(tmp_path: Path) -> None:
    path = make_epub(tmp_path / "book.epub")
    text = read_all(path)
    assert text == (
        "Глава первая\n\nЛогика & смысл.\n\nChapter two\n\nSecond chapter text.\n\n"
    )
    info = inspect_corpus(path)
    assert (info.format, info.encoding, info.words) == ("epub", None, 10)
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# --- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["empty.txt", "empty.pdf", "empty.epub", "empty.html"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"")
    for call in (iter_text, inspect_corpus):
        error = corpus_error(call, path)
        assert str(path) in error.message
        assert "has no text" in error.message


def test_whitespace_only_and_markup_only(tmp_path: Path) -> None:
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n  ", encoding="utf-8")
    error = corpus_error(inspect_corpus, blank)
    assert error.message == f"{blank} has no text (only whitespace)"
    markup = tmp_path / "markup.html"
    markup.write_text("<html><script>only()</script><p> </p></html>", encoding="utf-8")
    error = corpus_error(iter_text, markup)
    assert error.message == f"{markup} has no text (only markup)"


def test_binary_file_named_txt(tmp_path: Path) -> None:
    path = tmp_path / "image.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 20)
    error = corpus_error(inspect_corpus, path)
    assert error.message == f"{path} looks binary, not text"


def test_control_characters_without_nul_look_binary(tmp_path: Path) -> None:
    path = tmp_path / "controls.txt"
    path.write_bytes(bytes(range(1, 9)) * 100 + b"some words")
    error = corpus_error(iter_text, path)
    assert str(path) in error.message
    assert "looks binary, not text" in error.message


def test_pdf_renamed_to_txt_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "paper.txt"
    path.write_bytes(make_pdf(["Hello"]) + b"\x00binary tail")
    error = corpus_error(iter_text, path)
    assert error.message == (
        f"{path} looks binary, not text (it starts like a PDF; rename it to .pdf)"
    )


def test_undecodable_text_names_the_byte(tmp_path: Path) -> None:
    # Valid UTF-8 for the whole 64 KiB sample, then a byte that is not UTF-8.
    good = ("ё" * 40_000).encode("utf-8")
    path = tmp_path / "mixed.txt"
    path.write_bytes(good + b"\xff tail")
    error = corpus_error(inspect_corpus, path)
    assert error.message == (
        f"{path} is not valid utf-8 text near byte {len(good)}; re-save it as UTF-8"
    )


def test_truncated_utf8_at_the_end(tmp_path: Path) -> None:
    # UTF-8 for the whole sample, then the file stops inside a two-byte character.
    path = tmp_path / "cut.txt"
    path.write_bytes(("привет " * 20_000).encode("utf-8") + "ж".encode("utf-8")[:1])
    error = corpus_error(iter_text, path)
    assert error.message == f"{path} ends in the middle of a utf-8 character (truncated file?)"


def test_encrypted_pdf(tmp_path: Path) -> None:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(["Hello logic"]))))
    writer.encrypt(user_password="secret", owner_password="owner")
    path = tmp_path / "secret.pdf"
    writer.write(path)
    error = corpus_error(inspect_corpus, path)
    assert error.message.startswith(f"{path} is encrypted; decrypt it first, e.g. qpdf --decrypt")


@pytest.mark.parametrize("keep", [0.2, 0.6, 0.95])
def test_truncated_pdf(tmp_path: Path, keep: float) -> None:
    data = make_pdf(["Hello logic", "Second page"])
    path = tmp_path / "cut.pdf"
    path.write_bytes(data[: int(len(data) * keep)])
    error = corpus_error(iter_text, path)
    assert error.message.startswith(f"{path} is not a readable PDF (")
    assert "repair it" in error.message


def test_pdf_that_is_not_a_pdf(tmp_path: Path) -> None:
    path = tmp_path / "fake.pdf"
    path.write_text("just some words, no PDF structure", encoding="utf-8")
    error = corpus_error(inspect_corpus, path)
    assert error.message.startswith(f"{path} is not a readable PDF (")


def test_pdf_without_text_suggests_ocr(tmp_path: Path) -> None:
    writer = PdfWriter()
    writer.add_blank_page(595, 842)
    path = tmp_path / "scan.pdf"
    writer.write(path)
    error = corpus_error(inspect_corpus, path)
    assert error.message.startswith(f"{path} has no text layer")
    assert "OCR" in error.message


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no_container"])
def test_broken_epub(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "broken.epub"
    if damage == "garbage":
        path.write_bytes(b"this is not a zip archive " * 10)
    elif damage == "truncated":
        data = make_epub(tmp_path / "good.epub").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("mimetype", "application/epub+zip")
    error = corpus_error(inspect_corpus, path)
    assert error.message.startswith(f"{path} is not a readable EPUB (")
    assert "ebook-convert" in error.message


def test_missing_file_and_folder_and_unsupported_suffix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.txt"
    for call in (iter_text, inspect_corpus):
        assert corpus_error(call, missing).message == f"{missing} does not exist"
    assert corpus_error(iter_text, tmp_path).message.startswith(f"{tmp_path} is a folder")
    docx = tmp_path / "report.docx"
    docx.write_bytes(b"PK\x03\x04")
    assert corpus_error(inspect_corpus, docx).message.startswith(
        f"{docx} has an unsupported type (.docx); use one of .epub .htm .html"
    )


def test_bad_chunk_size_is_a_programming_error(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("words", encoding="utf-8")
    with pytest.raises(ValueError):
        iter_text(path, 0)


# --- expand_paths ------------------------------------------------------------------------------


def test_expand_paths_recursive_sorted_hidden_skipped(tmp_path: Path) -> None:
    root = tmp_path / "corpora"
    for rel in [
        "b.txt", "a.md", "sub/z.pdf", "sub/deeper/c.epub", "zz.html", "A.TXT",
        "notes.docx", ".hidden.txt", "._b.pdf", ".git/x.txt", "sub/.cache/y.md",
    ]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x", encoding="utf-8")
    single = tmp_path / "single.htm"
    single.write_text("x", encoding="utf-8")

    found, errors = expand_paths([single, str(root), root / "b.txt", str(single)])
    assert errors == []
    assert found == [
        single.resolve(),
        *(root.resolve() / rel for rel in
          ["A.TXT", "a.md", "b.txt", "sub/deeper/c.epub", "sub/z.pdf", "zz.html"]),
    ]
    assert all(path.is_absolute() for path in found)


def test_expand_paths_reports_bad_paths_and_keeps_the_rest(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("x", encoding="utf-8")
    docx = tmp_path / "report.docx"
    docx.write_bytes(b"x")
    no_suffix = tmp_path / "README"
    no_suffix.write_text("x", encoding="utf-8")  # plain text without a suffix: a corpus
    blob = tmp_path / "core"
    blob.write_bytes(bytes(range(256)) * 4)  # binary without a suffix: refused
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    missing = tmp_path / "missing.pdf"

    found, errors = expand_paths([missing, docx, good, no_suffix, blob, empty_dir])
    assert found == [good.resolve(), no_suffix.resolve()]
    suffixes = ".epub .htm .html .markdown .md .pdf .txt"
    assert [error.message for error in errors] == [
        f"{missing} does not exist",
        f"{docx} has an unsupported type (.docx); use one of {suffixes}",
        f"{blob} does not read as text (it has no suffix to say what it is); use a text file or one of {suffixes}",
        f"{empty_dir} holds no supported files ({suffixes})",
    ]
    assert all(isinstance(error, CorpusError) for error in errors)
    assert SUPPORTED_SUFFIXES == {".txt", ".md", ".markdown", ".pdf", ".epub", ".html", ".htm"}


# --- counts ------------------------------------------------------------------------------------


def test_counts_hash_and_page_rule(tmp_path: Path) -> None:
    words = [f"слово{i}" for i in range(1250)]
    text = "\n".join(" ".join(words[i : i + 10]) for i in range(0, 1250, 10)) + "\n"
    path = tmp_path / "count.txt"
    path.write_bytes(text.encode("utf-8"))
    info = inspect_corpus(str(path))
    assert info.path == path.resolve()
    assert info.name == "count.txt"
    assert info.format == "text"
    assert info.bytes == len(text.encode("utf-8"))
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.chars == len(text)
    assert info.words == 1250
    assert info.pages == 1250 / 500  # an A4 page is 500 words (the mission's measure)
    data = json.loads(json.dumps(info.to_dict()))
    assert data == {
        "path": str(path.resolve()), "name": "count.txt", "format": "text", "encoding": "utf-8",
        "bytes": info.bytes, "sha256": info.sha256, "chars": len(text), "words": 1250,
        "pages": 2.5,
    }


def test_pages_are_rounded_to_two_decimals(tmp_path: Path) -> None:
    path = tmp_path / "seven.txt"
    path.write_text("one two three four five six seven", encoding="utf-8")
    assert inspect_corpus(path).pages == 0.01  # 7 / 500 = 0.014


def test_word_count_matches_split_across_any_chunking() -> None:
    text = "a  bb\u00a0ccc\u3000дд\tе\u2028ж\n\n  end. x" * 7
    for size in (1, 2, 3, 5, 8, 1000):
        counter = WordCounter()
        for start in range(0, len(text), size):
            counter.feed(text[start : start + size])
        assert counter.words == len(text.split()), size


# --- bounded memory ----------------------------------------------------------------------------


def test_a_60_mb_text_streams_in_bounded_memory(tmp_path: Path) -> None:
    line = "Teaching a small model to think: логика, смысл и порядок слов.\n"
    block = (line * (1_000_000 // len(line.encode("utf-8")))).encode("utf-8")
    path = tmp_path / "big.txt"
    with open(path, "wb") as out:
        for _ in range(60):
            out.write(block)
    size = path.stat().st_size
    assert size > 59_000_000

    tracemalloc.start()
    try:
        info = inspect_corpus(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 30_000_000, f"peak traced memory {peak / 1e6:.1f} MB"
    lines = 60 * (1_000_000 // len(line.encode("utf-8")))
    assert info.bytes == size
    assert info.words == lines * len(line.split())
    assert info.chars == lines * len(line)
    assert info.encoding == "utf-8"


# --- import hygiene ----------------------------------------------------------------------------


def test_module_imports_no_ui_no_torch_and_no_parsers_up_front() -> None:
    code = (
        "import sys, backend.ingest.corpora; "
        "print(sorted(m for m in ('textual', 'torch', 'pypdf', 'ebooklib') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.stdout.strip() == "[]"


def test_a_link_loop_and_a_dangling_link_say_what_they_are(tmp_path: Path) -> None:
    (tmp_path / "a.txt").symlink_to(tmp_path / "b.txt")
    (tmp_path / "b.txt").symlink_to(tmp_path / "a.txt")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    _, errors = expand_paths([tmp_path / "a.txt", tmp_path / "gone.txt"])
    assert [e.message for e in errors] == [
        f"{tmp_path / 'a.txt'} is a loop of symbolic links; point it at a file",
        f"{tmp_path / 'gone.txt'} is a link to {tmp_path / 'nowhere.txt'}, which does not exist",
    ]


def test_a_newline_in_a_file_name_keeps_the_error_on_one_line(tmp_path: Path) -> None:
    odd = tmp_path / "two\nlines.txt"
    odd.write_bytes(b"")
    with pytest.raises(CorpusError) as info:
        inspect_corpus(odd)
    assert "\n" not in info.value.one_line() and "two\\nlines.txt" in info.value.one_line()


def test_a_text_file_without_a_suffix_is_a_corpus_in_its_encoding(tmp_path: Path) -> None:
    """`GPL-3`, `README`, `notes.2`: plain text whose name does not say so is read as text, in
    its own encoding; a binary file without a suffix is not offered."""
    licence = tmp_path / "GPL-3"
    licence.write_text("GNU GENERAL PUBLIC LICENSE\nVersion 3, 29 June 2007\n" * 50, encoding="utf-8")
    russian = tmp_path / "notes.2"
    russian.write_bytes(("Война и мир. Том первый.\n" * 40).encode("cp1251"))
    binary = tmp_path / "core-dump"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(4000))
    assert [format_of(p) for p in (licence, russian, binary)] == ["text", "text", None]
    info = inspect_corpus(russian)
    assert info.encoding == "cp1251" and info.words == 40 * 5
    found, errors = expand_paths([tmp_path])
    assert found == [licence.resolve(), russian.resolve()] and not errors


def test_names_that_cannot_stand_for_a_corpus_are_one_error_each_and_the_rest_go_on(tmp_path):
    import os

    from backend.jobs.protocol import request_line

    good = tmp_path / "good.md"
    good.write_text("Every rule has a reason. " * 20, encoding="utf-8")
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "fine.txt").write_text("A fine text to read. " * 20, encoding="utf-8")
    raw = os.fsencode(folder) + b"/\xcf\xf0\xe8\xe2\xe5\xf2.txt"  # "Привет" in cp1251: not UTF-8
    with open(raw, "wb") as fh:
        fh.write("Привет, мир. ".encode("cp1251") * 20)
    pipe = tmp_path / "notes"  # no suffix: its format would be sniffed by reading it
    os.mkfifo(pipe)
    bad_name = os.fsdecode(raw)
    found, errors = expand_paths([str(good), "", bad_name, str(folder), str(pipe)])
    assert found == [good.resolve(), (folder / "fine.txt").resolve()]
    lines = [e.one_line() for e in errors]
    assert len(lines) == 4, lines  # "", the bad name given, the same name in the folder, the pipe
    assert "an empty path names no file" in lines[0]
    assert all("not valid UTF-8; rename it" in line for line in lines[1:3])
    assert "notes is not a regular file" in lines[3]
    # the request that carries such a name is ASCII, and the name comes back as it was
    line = request_line(1, "submit", {"paths": [bad_name]})
    assert json.loads(line.decode("ascii"))["args"]["paths"] == [bad_name]


@pytest.mark.parametrize("declared", ["zlib", "hex", "base64", "rot13", "utf-16be"])
def test_a_page_declaring_a_byte_codec_or_utf16_is_read_as_a_browser_reads_it(tmp_path, declared):
    page = tmp_path / "page.html"
    body = "<p>Каждое правило имеет причину. Every rule has a reason.</p>" * 5
    page.write_bytes(f'<html><head><meta charset="{declared}"></head><body>{body}</body></html>'.encode("utf-8"))
    text = "".join(iter_text(page))
    assert "Каждое правило имеет причину." in text and "Every rule has a reason." in text


def raw_epub(path: Path, chapter: bytes, extra: dict[str, bytes] | None = None) -> Path:
    """An EPUB written by hand, its one chapter's bytes exactly as given (ebooklib would re-encode)."""
    opf = (b'<?xml version="1.0" encoding="utf-8"?><package xmlns="http://www.idpf.org/2007/opf" version="3.0" '
           b'unique-identifier="id"><metadata xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:identifier id="id">x'
           b'</dc:identifier><dc:title>t</dc:title><dc:language>ru</dc:language></metadata><manifest>'
           b'<item id="c1" href="c1.xhtml" media-type="application/xhtml+xml"/></manifest>'
           b'<spine><itemref idref="c1"/></spine></package>')
    container = (b'<?xml version="1.0"?><container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:container">'
                 b'<rootfiles><rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/>'
                 b'</rootfiles></container>')
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mimetype", "application/epub+zip")
        z.writestr("META-INF/container.xml", container)
        z.writestr("OEBPS/content.opf", opf)
        z.writestr("OEBPS/c1.xhtml", chapter)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path


def _encryption(uri: str, algorithm: str) -> bytes:
    return (f'<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container" '
            f'xmlns:enc="http://www.w3.org/2001/04/xmlenc#"><enc:EncryptedData>'
            f'<enc:EncryptionMethod Algorithm="{algorithm}"/><enc:CipherData>'
            f'<enc:CipherReference URI="{uri}"/></enc:CipherData></enc:EncryptedData></encryption>').encode()


def test_an_epub_chapter_in_a_legacy_encoding_is_read_as_its_declaration_says(tmp_path):
    body = "<p>Привет, мир. Это глава книги.</p>" * 5
    chapter = ('<?xml version="1.0" encoding="windows-1251"?><html xmlns="http://www.w3.org/1999/xhtml">'
               f"<head><title>1</title></head><body>{body}</body></html>").encode("cp1251")
    text = "".join(iter_text(raw_epub(tmp_path / "cp1251.epub", chapter)))
    assert "Привет, мир. Это глава книги." in text and "\ufffd" not in text


def test_a_drm_epub_is_refused_and_obfuscated_fonts_are_not_drm(tmp_path):
    chapter = b'<html xmlns="http://www.w3.org/1999/xhtml"><body><p>' + b"Plain words here. " * 10 + b"</p></body></html>"
    locked = raw_epub(tmp_path / "drm.epub", os.urandom(400),
                      {"META-INF/encryption.xml": _encryption("OEBPS/c1.xhtml", "http://www.w3.org/2001/04/xmlenc#aes128-cbc")})
    with pytest.raises(CorpusError, match="is DRM-protected: its text .* is encrypted; only a DRM-free copy"):
        "".join(iter_text(locked))
    fonts = raw_epub(tmp_path / "fonts.epub", chapter,
                     {"META-INF/encryption.xml": _encryption("OEBPS/font.otf", "http://www.idpf.org/2008/embedding")})
    assert "Plain words here." in "".join(iter_text(fonts))


def test_english_with_russian_names_in_cp1251_and_accented_latin_in_cp1252_each_read_right(tmp_path):
    texts = {
        "cp1251": "The elder Иван Петрович said that the village was quiet. " * 3
                  + "Then Мария answered him. We walked home in the rain and talked about the harvest. " * 4,
        "cp1252": "Le café était fermé; nous avons mangé une crème brûlée près de la fenêtre. Où était-il? " * 4
                  + "Über die Brücke gingen wir, während die Kühe grasten. Schöne Grüße aus München. " * 4,
    }
    for encoding, text in texts.items():
        path = tmp_path / f"{encoding}.txt"
        path.write_bytes(text.encode(encoding))
        assert inspect_corpus(path).encoding == encoding
        assert read_all(path) == text


def test_a_files_content_id_is_the_sha256_it_was_queued_with(tmp_path):
    from backend.ingest.corpora import content_id, write_corpus_set

    text = tmp_path / "ru.txt"
    text.write_bytes(b"\xef\xbb\xbf" + RUSSIAN.encode("utf-8"))  # a BOM, which the hash counts too
    legacy = tmp_path / "cp.txt"
    legacy.write_bytes(RUSSIAN.encode("cp1251"))
    page = tmp_path / "page.html"
    page.write_text(f"<p>{RUSSIAN}</p>", encoding="utf-8")
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(make_pdf(["First page of the document.", "Second page."]))
    book = make_epub(tmp_path / "book.epub")
    files = [text, legacy, page, pdf, book]
    both = write_corpus_set(tmp_path / "both.corpora", files)
    for path in [*files, both]:
        assert content_id(path) == inspect_corpus(path).sha256, path.name
    before = content_id(both)
    legacy.write_bytes(RUSSIAN.upper().encode("cp1251"))  # a member edited: the set is other text
    assert content_id(both) != before
