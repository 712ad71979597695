"""Corpus → token file → fixed-length training blocks, with no padding.

The corpus is tokenized as it streams (chunk by chunk, split at whitespace so no token is cut)
into a flat uint32 file on disk; training reads blocks from a memory map of it. Blocks are
contiguous runs of real tokens: every epoch starts at a different offset (so sentences cut at a
block edge in one epoch are whole in another) and drops only the last partial block, so the
share of real tokens in a batch is 1.0, never less.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from backend.core.errors import CorpusError

TOKEN_DTYPE = np.uint32
MIN_TOKENS = 16  # below this nothing worth training on remains


def _whitespace_cut(chunks: Iterable[str], max_chars: int = 1 << 18) -> Iterator[str]:
    """Re-chunk text so that each piece ends at whitespace (tokenizers merge across spaces rarely)."""
    carry = ""
    for chunk in chunks:
        text = carry + chunk
        while len(text) > max_chars:
            cut = max(text.rfind(" ", 0, max_chars), text.rfind("\n", 0, max_chars))
            cut = cut if cut > 0 else max_chars
            yield text[:cut]
            text = text[cut:]
        cut = max(text.rfind(" "), text.rfind("\n"))
        if cut > 0:
            yield text[:cut]
            carry = text[cut:]
        else:
            carry = text
    if carry:
        yield carry


def tokenize_to_file(
    chunks: Iterable[str],
    encode: Callable[[str], list[int]],
    out_path: Path,
    *,
    bos_id: int | None,
    eos_id: int | None,
) -> int:
    """Stream text chunks through `encode` into `out_path` (uint32); returns the token count."""
    n = 0
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        if bos_id is not None:
            fh.write(np.asarray([bos_id], dtype=TOKEN_DTYPE).tobytes())
            n += 1
        for piece in _whitespace_cut(chunks):
            ids = encode(piece)
            if ids:
                fh.write(np.asarray(ids, dtype=TOKEN_DTYPE).tobytes())
                n += len(ids)
        if eos_id is not None:
            fh.write(np.asarray([eos_id], dtype=TOKEN_DTYPE).tobytes())
            n += 1
    tmp.replace(out_path)
    return n


def load_tokens(path: Path) -> np.ndarray:
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


@dataclass
class PackedBlocks:
    """Fixed-length blocks over a token array; `epoch_blocks(e)` gives a shuffled epoch."""

    tokens: np.ndarray
    block_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n < MIN_TOKENS:
            raise CorpusError(f"only {n} tokens after tokenizing; give a longer text")
        # A corpus shorter than a block trains on itself as one block (still no padding).
        self.block_size = min(self.block_size, n)

    def offset(self, epoch: int) -> int:
        spare = len(self.tokens) - self.blocks_per_epoch_at(0) * self.block_size
        if spare <= 0:
            return 0
        return int(np.random.default_rng((self.seed, epoch, 1)).integers(0, spare + 1))

    def blocks_per_epoch_at(self, offset: int) -> int:
        return (len(self.tokens) - offset) // self.block_size

    @property
    def blocks_per_epoch(self) -> int:
        return self.blocks_per_epoch_at(0)

    def epoch_blocks(self, epoch: int) -> np.ndarray:
        """Start indices of this epoch's blocks, in a seeded random order."""
        off = self.offset(epoch)
        starts = off + self.block_size * np.arange(self.blocks_per_epoch_at(off), dtype=np.int64)
        return np.random.default_rng((self.seed, epoch, 2)).permutation(starts)

    def batch(self, starts: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(self.tokens[s : s + self.block_size]) for s in starts]).astype(
            np.int64
        )


def batches(
    blocks: PackedBlocks, micro_batch: int, start_batch: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """Endless (global batch index, batch) over epochs; resumes exactly at `start_batch`.

    Within an epoch the last batch may hold fewer blocks (never padding); a corpus with fewer
    blocks than a batch gives batches of all its blocks.
    """
    per_epoch = max(1, -(-blocks.blocks_per_epoch // micro_batch))
    index = start_batch
    while True:
        epoch, within = divmod(index, per_epoch)
        starts = blocks.epoch_blocks(epoch)[within * micro_batch : (within + 1) * micro_batch]
        if len(starts):
            yield index, blocks.batch(starts)
        index += 1


def real_token_share(batch: np.ndarray, pad_id: int) -> float:
    return float((batch != pad_id).sum()) / float(batch.size) if batch.size else 0.0
