"""Make the two control corpora from data/demo/logic.md, deterministically, with the standard library.

    python data/make_controls.py           # rewrite data/demo/shuffled.md and data/demo/repetitive.md
    python data/make_controls.py --check   # exit 1 if the committed files are out of date

shuffled.md   every whitespace-separated word of logic.md, shuffled with a fixed seed and
              wrapped to 76 columns: the same words with the same counts, in no order. A model
              that ranks this corpus as high as logic.md learned word frequencies, not laws.
repetitive.md one ordinary sentence repeated to about 6 KB: as many bytes as a real corpus,
              next to nothing to learn.

Run it again after editing logic.md, and commit both outputs.
"""

from __future__ import annotations

import random
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent / "demo"
SEED = 20240901  # fixed, so the shuffle is the same on every machine and Python 3.x
WIDTH = 76
REPEATED_SENTENCE = "The kettle on the stove began to whistle, and someone in the next room laughed."
REPETITIVE_BYTES = 6 * 1024


def shuffled_words(text: str, seed: int = SEED) -> str:
    """The words of ``text`` in a seeded random order, wrapped without splitting any word."""
    words = text.split()
    random.Random(seed).shuffle(words)
    wrapped = textwrap.fill(
        " ".join(words), width=WIDTH, break_long_words=False, break_on_hyphens=False
    )
    return wrapped + "\n"


def repeated(sentence: str = REPEATED_SENTENCE, size: int = REPETITIVE_BYTES) -> str:
    """``sentence`` on its own line, repeated until the text reaches ``size`` bytes."""
    line = sentence + "\n"
    count = -(-size // len(line.encode("utf-8")))  # ceiling division
    return line * count


def controls() -> dict[Path, str]:
    logic = (HERE / "logic.md").read_text(encoding="utf-8")
    return {HERE / "shuffled.md": shuffled_words(logic), HERE / "repetitive.md": repeated()}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, text in controls().items():
        if check:
            current = path.read_text(encoding="utf-8") if path.exists() else None
            if current != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.name} ({len(text.encode('utf-8'))} bytes)")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python data/make_controls.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
