"""Corpus → token file → fixed-length training blocks, with no padding.

A corpus is a run of documents (a corpus set's member files; a single file is one document).
Each is tokenized as it streams (chunk by chunk, split at whitespace so no token is cut) into a
flat uint32 file on disk, as BOS (when the tokenizer has one) + its tokens + EOS, so the file
says where every document ends; `<name>.documents.json` beside it records those ids. Training
reads blocks from a memory map of the file. Blocks are contiguous runs of real tokens: every
epoch starts at a different offset (so sentences cut at a block edge in one epoch are whole in
another) and drops only the last partial block, so the share of real tokens in a batch is 1.0,
never less. `model_inputs` keeps the documents of a block apart: positions restart at each
document's start (transformers then attends within each document only) and the label of a
document's first token is -100 (nothing is learnt from predicting it out of the previous one).
"""

from __future__ import annotations

import json
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


def tokenize_documents(
    documents: Iterable[Iterable[str]],
    encode: Callable[[str], list[int]],
    out_path: Path,
    *,
    bos_id: int | None,
    eos_id: int | None,
) -> int:
    """Stream documents (each an iterable of text chunks) through `encode` into `out_path`
    (uint32), each as BOS + tokens + EOS; returns the token count.

    With BOS == EOS (GPT-2's <|endoftext|>) only the EOS is written: a BOS of the same id would
    read as the end of an empty document. The ids go to `documents_path(out_path)`, written
    before the token file appears, so a token file that exists always has them beside it."""
    if bos_id is not None and bos_id == eos_id:
        bos_id = None
    # With neither id nothing in the tokens can mark a document's end: a blank line between
    # documents at least keeps the last word of one from joining the first of the next.
    between = encode("\n\n") if bos_id is None and eos_id is None else []
    n = count = 0
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    with open(tmp, "wb") as fh:

        def write(ids: list[int]) -> None:
            nonlocal n
            if ids:
                fh.write(np.asarray(ids, dtype=TOKEN_DTYPE).tobytes())
                n += len(ids)

        for chunks in documents:
            write(between if count else [])
            write([] if bos_id is None else [bos_id])
            for piece in _whitespace_cut(chunks):
                write(encode(piece))
            write([] if eos_id is None else [eos_id])
            count += 1
    marks = documents_path(out_path)
    marks_tmp = marks.with_suffix(".tmp")
    marks_tmp.write_text(json.dumps({"bos_id": bos_id, "eos_id": eos_id, "documents": count, "tokens": n}))
    marks_tmp.replace(marks)
    tmp.replace(out_path)
    return n


def tokenize_to_file(
    chunks: Iterable[str],
    encode: Callable[[str], list[int]],
    out_path: Path,
    *,
    bos_id: int | None,
    eos_id: int | None,
) -> int:
    """One document's text chunks into `out_path`; see `tokenize_documents`."""
    return tokenize_documents([chunks], encode, out_path, bos_id=bos_id, eos_id=eos_id)


def documents_path(tokens_path: Path) -> Path:
    """Where the ids that start and end a token file's documents are kept (tokens.documents.json)."""
    return tokens_path.with_name(tokens_path.stem + ".documents.json")


def document_marks(tokens_path: Path) -> dict[str, int | None]:
    """{"eos_id", "bos_id"} a token file's documents were written with, for `model_inputs`.

    A token file without them (written before documents were marked, or by a benchmark or the
    calibration straight from an array) is one run of tokens: both None, so a resumed run trains
    on it exactly as it started."""
    try:
        recorded = json.loads(documents_path(tokens_path).read_text())
    except FileNotFoundError:
        return {"eos_id": None, "bos_id": None}
    return {"eos_id": recorded["eos_id"], "bos_id": recorded["bos_id"]}


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


def step_blocks(blocks: PackedBlocks, per_step: int, start_step: int = 0) -> Iterator[np.ndarray]:
    """Endless start indices of the `per_step` blocks each optimizer step trains on, from step
    `start_step`: the epochs' shuffled orders laid end to end and cut every `per_step` blocks.

    What a step holds depends on the effective batch alone, never on the micro-batches it is
    split into (a card's memory plan, or out of memory, may split it differently, and a resumed
    run may split it otherwise than before). A step may run from the end of one epoch into the
    next; a corpus of fewer blocks than a step sees each of them more than once in it.
    """
    # every epoch holds blocks_per_epoch blocks: its offset is less than a block
    epoch, at = divmod(start_step * per_step, blocks.blocks_per_epoch)
    order = blocks.epoch_blocks(epoch)[at:]
    while True:
        while len(order) < per_step:
            epoch += 1
            order = np.concatenate([order, blocks.epoch_blocks(epoch)])
        yield order[:per_step]
        order = order[per_step:]


def model_inputs(
    batch: np.ndarray, eos_id: int | None = None, bos_id: int | None = None, *, flat: bool = False
) -> dict[str, np.ndarray]:
    """A batch of packed blocks as a causal LM's inputs: {input_ids, position_ids, labels}.

    A document starts after an EOS (or at a BOS, for a tokenizer without EOS). Positions count
    from 0 at each start, and at each block's first token, which may be mid-document, as plain
    contiguous packing always did. Given such positions, no attention mask and no cache,
    transformers (5.x, `masking_utils.find_packed_sequence_indices`) makes the causal mask
    block-diagonal for sdpa and eager, so no token attends to another document. HF causal LMs
    shift labels inside (label i is predicted from token i - 1), so a document's first token
    gets -100: the step from one document into the next is never a target. A block's first label
    is -100 too, which the shift drops anyway; so `flat` can lay the blocks end to end as one row,
    the form flash_attention_2 needs to take its lengths from the positions (at batch 1 only).
    All ids None: one document, positions 0..L-1, every target kept: the unmarked training."""
    x = np.asarray(batch, dtype=np.int64)
    starts = np.zeros(x.shape, dtype=bool)
    starts[:, 0] = True
    if eos_id is not None:
        starts[:, 1:] |= x[:, :-1] == eos_id
    if bos_id is not None and bos_id != eos_id:
        starts[:, 1:] |= x[:, 1:] == bos_id
    index = np.broadcast_to(np.arange(x.shape[1], dtype=np.int64), x.shape)
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)  # latest start at or before i
    inputs = {"input_ids": x, "position_ids": index - first, "labels": np.where(starts, -100, x)}
    return {k: v.reshape(1, -1) for k, v in inputs.items()} if flat else inputs


def real_token_share(batch: np.ndarray, pad_id: int) -> float:
    return float((batch != pad_id).sum()) / float(batch.size) if batch.size else 0.0
