"""Packed blocks keep documents apart: a corpus set's files are documents, each ends with EOS,
and a block of several documents gives each the logits it has alone, with no target across a
boundary. Tiny random Llamas built from a config on the CPU, in fp32, through the real
tokenize → PackedBlocks → model_inputs → train path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.compute.models import ByteTokenizer
from backend.compute.train import packed_inputs, train_model
from backend.core.config import TrainConfig
from backend.ingest.corpora import iter_documents, write_corpus_set
from backend.ingest.packing import (
    PackedBlocks,
    document_marks,
    load_tokens,
    model_inputs,
    tokenize_documents,
    tokenize_to_file,
)

CPU = torch.device("cpu")
TOK = ByteTokenizer()
# three files of different lengths; with BOS and EOS they are 24, 54 and 13 tokens
TEXTS = ["All glims are blorps.\n", "The lamp is red. Red things glow, so the lamp glows.\n", "Zents hum.\n"]


def _doc_ids(text: str) -> list[int]:
    return [TOK.bos_id, *text.encode("utf-8"), TOK.eos_id]


SPANS = []  # (start, end) of each document in the packed file
for _text in TEXTS:
    _start = SPANS[-1][1] if SPANS else 0
    SPANS.append((_start, _start + len(_doc_ids(_text))))


def _corpus_set(tmp_path, texts=TEXTS):
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    return write_corpus_set(tmp_path / "docs.corpora", files)


def _packed_set(tmp_path):
    """The set tokenized as the worker does it; (token file, its one block of every document)."""
    path = tmp_path / "tokens.bin"
    tokenize_documents(iter_documents(_corpus_set(tmp_path)), TOK.encode, path, bos_id=TOK.bos_id, eos_id=TOK.eos_id)
    blocks = PackedBlocks(load_tokens(path), block_size=256)  # shorter than a block: one block of all
    assert blocks.blocks_per_epoch == 1
    return path, blocks.batch(blocks.epoch_blocks(0))


def _tiny_llama(attn: str = "sdpa", init: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=TOK.bos_id, eos_token_id=TOK.eos_id, pad_token_id=TOK.pad_id,
        initializer_range=init, attn_implementation=attn,
    )
    model = LlamaForCausalLM(config).eval()
    # the default a micro network has too: packed_inputs must turn the cache off, or transformers
    # skips the packed-sequence mask
    assert model.config.use_cache
    return model


def test_a_corpus_sets_files_become_documents_each_ending_with_eos(tmp_path):
    path, block = _packed_set(tmp_path)
    assert load_tokens(path).tolist() == [t for text in TEXTS for t in _doc_ids(text)]
    assert document_marks(path) == {"eos_id": TOK.eos_id, "bos_id": TOK.bos_id}
    inputs = model_inputs(block, **document_marks(path))
    assert np.array_equal(inputs["input_ids"], block)
    positions = np.concatenate([np.arange(end - start) for start, end in SPANS])
    assert inputs["position_ids"].tolist() == [positions.tolist()]
    # the label of each document's first token (its BOS, which would be predicted from the last
    # document's EOS) is -100; every other token is a target
    masked = np.flatnonzero(inputs["labels"][0] == -100).tolist()
    assert masked == [start for start, _ in SPANS]
    keep = inputs["labels"][0] != -100
    assert np.array_equal(inputs["labels"][0][keep], block[0][keep])
    # a block that starts inside a document counts from 0 there too, and masks the next start
    mid = model_inputs(block[:, 10:40], **document_marks(path))
    assert mid["position_ids"][0].tolist() == list(range(14)) + list(range(16))
    assert np.flatnonzero(mid["labels"][0] == -100).tolist() == [0, SPANS[1][0] - 10]


def test_a_single_file_is_one_document_and_trains_as_before(tmp_path):
    file = tmp_path / "one.txt"
    file.write_text(TEXTS[1], encoding="utf-8")
    path = tmp_path / "tokens.bin"
    n = tokenize_documents(iter_documents(file), TOK.encode, path, bos_id=TOK.bos_id, eos_id=TOK.eos_id)
    assert load_tokens(path).tolist() == _doc_ids(TEXTS[1]) and n == len(_doc_ids(TEXTS[1]))
    chunks = tmp_path / "chunks.bin"  # the one-document entry point writes the same file
    tokenize_to_file([TEXTS[1][:9], TEXTS[1][9:]], TOK.encode, chunks, bos_id=TOK.bos_id, eos_id=TOK.eos_id)
    assert chunks.read_bytes() == path.read_bytes()
    block = np.asarray(load_tokens(path), dtype=np.int64)[None]
    inputs = model_inputs(block, **document_marks(path))
    assert inputs["position_ids"][0].tolist() == list(range(n))
    assert np.flatnonzero(inputs["labels"][0] == -100).tolist() == [0]  # dropped by the shift anyway
    # a token file from before documents were marked has no record beside it: one run of tokens
    legacy = tmp_path / "old.bin"
    legacy.write_bytes(path.read_bytes())
    assert document_marks(legacy) == {"eos_id": None, "bos_id": None}


def test_bos_equal_to_eos_is_written_once_between_documents(tmp_path):
    """GPT-2's <|endoftext|> is both: a BOS of that id would read as an empty document's end."""
    path = tmp_path / "tokens.bin"
    tokenize_documents([["ab"], ["cd"]], TOK.encode, path, bos_id=TOK.eos_id, eos_id=TOK.eos_id)
    e = TOK.eos_id
    assert load_tokens(path).tolist() == [97, 98, e, 99, 100, e]
    inputs = model_inputs(np.asarray(load_tokens(path), dtype=np.int64)[None], **document_marks(path))
    assert inputs["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_block_gives_each_document_its_logits_alone(tmp_path, attn):
    path, block = _packed_set(tmp_path)
    model = _tiny_llama(attn)
    with torch.no_grad():
        packed = model(**packed_inputs(model, block, document_marks(path), CPU)).logits[0]
        alone = [model(input_ids=torch.from_numpy(block[:, s:e])).logits[0] for s, e in SPANS]
        # what training fed before: no positions, so each document saw the ones before it
        unmarked = model(input_ids=torch.from_numpy(block), use_cache=False).logits[0]
    for (start, end), solo in zip(SPANS, alone):
        assert torch.allclose(packed[start:end], solo, rtol=1e-5, atol=1e-5)
    start, end = SPANS[0]
    assert torch.allclose(unmarked[start:end], alone[0], rtol=1e-5, atol=1e-5)  # the first has nothing before it
    for (start, end), solo in zip(SPANS[1:], alone[1:]):
        assert (unmarked[start:end] - solo).abs().max() > 1e-3


def test_blocks_laid_end_to_end_give_the_same_logits_and_loss(tmp_path):
    """`flat` (flash_attention_2's form, one row): the row edges become document starts, so
    each block's logits and the batch's loss are those of the batch as it was."""
    path, block = _packed_set(tmp_path)
    rows = np.stack([block[0, 5:45], block[0, 45:85]])  # two blocks, each starting mid-document
    model = _tiny_llama()
    marks = document_marks(path)
    with torch.no_grad():
        batched = model(**{k: torch.from_numpy(v) for k, v in model_inputs(rows, **marks).items()}, use_cache=False)
        flat = model(**{k: torch.from_numpy(v) for k, v in model_inputs(rows, **marks, flat=True).items()},
                     use_cache=False)
    assert torch.allclose(flat.logits.reshape(batched.logits.shape), batched.logits, rtol=1e-5, atol=1e-5)
    assert float(flat.loss) == pytest.approx(float(batched.loss), rel=1e-5)


def test_a_corpus_sets_training_loss_has_no_cross_document_targets(tmp_path):
    """train_model's evaluation loss on the set's one block equals the mean cross-entropy of
    each document's own next tokens, scored on each document alone. Wide initial weights spread
    the per-token losses, so the two targets across boundaries would move that mean visibly."""
    path, block = _packed_set(tmp_path)
    model = _tiny_llama(init=0.5)
    with torch.no_grad():
        per_doc = []
        for start, end in SPANS:
            ids = torch.from_numpy(block[0, start:end])
            logits = model(input_ids=ids[None]).logits[0]
            per_doc.append(torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none"))
        expected = float(torch.cat(per_doc).mean())
        x = torch.from_numpy(block)
        unmasked = float(model(input_ids=x, labels=x, position_ids=packed_inputs(model, block, document_marks(path), CPU)
                               ["position_ids"], use_cache=False).loss)
    assert abs(unmasked - expected) > 1e-2  # the boundary targets would show

    events = []
    cfg = TrainConfig(block_size=256, micro_batch=1, lr=0.0, weight_decay=0.0, epochs=1, min_train_tokens=0,
                      max_steps=1, checkpoint_every=0, log_every=1, eval_every=1, eval_blocks=1, seed=0)
    train_model(model, path, tmp_path, cfg, device=CPU, emit=lambda t, **p: events.append({"type": t, **p}),
                log=lambda s: None)
    (metric,) = [e for e in events if e["type"] == "metric"]
    assert metric["value"] == pytest.approx(expected, abs=2e-5)  # lr 0: the same weights


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_every_layer_reads_one_mask_in_the_attention_dtype(tmp_path, precision):
    """The block-diagonal mask is made once a batch, in the dtype the queries have (bf16 under
    autocast), and every layer gets that same tensor: nothing for SDPA or autocast to convert,
    and so no per-layer copy for a card's backward pass to keep."""
    from backend.compute.models import autocast

    path, block = _packed_set(tmp_path)
    model = _tiny_llama("sdpa").train()
    seen = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    with autocast(CPU, precision):
        model(**packed_inputs(model, block, document_marks(path), CPU)).loss.backward()
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert len(seen) == len(model.model.layers)
    assert {m.dtype for m in seen} == {want} and len({m.data_ptr() for m in seen}) == 1
    one_document = block[:, SPANS[1][0] : SPANS[1][1]]  # a block inside one document: no mask at all
    assert "attention_mask" not in packed_inputs(model, one_document, document_marks(path), CPU)


def test_flash_attention_gets_the_document_bounds_transformers_would_find(tmp_path):
    """For flash_attention_2 the blocks go in as one row with the documents' bounds worked out on
    the host: the same bounds transformers derives from the positions on the device, given as
    the varlen arguments it then uses as they are, and the longest as a plain int."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    from backend.compute.train import document_lengths

    path, block = _packed_set(tmp_path)
    rows = np.concatenate([block[:, :40], block[:, 10:50]])  # two blocks, the second from mid-document
    inputs = model_inputs(rows, **document_marks(path), flat=True)
    got = document_lengths(inputs["position_ids"], CPU)
    (cu_q, cu_k), (longest_q, _) = prepare_fa_kwargs_from_position_ids(torch.from_numpy(inputs["position_ids"]))
    assert got["cu_seq_lens_q"].tolist() == cu_q.tolist() and got["cu_seq_lens_k"] is got["cu_seq_lens_q"]
    assert got["cu_seq_lens_q"].dtype == torch.int32 and got["cu_seq_lens_q"][-1] == rows.size
    assert got["max_length_q"] == got["max_length_k"] == int(longest_q) and isinstance(got["max_length_q"], int)


def test_a_sliding_window_model_keeps_its_window_in_a_packed_block(tmp_path):
    """Mistral-style layers that attend through a window shorter than the block get their masks
    from transformers (windowed and kept to each document), not the one full mask made for
    other models: each document's logits are still those it has alone."""
    from transformers import MistralConfig, MistralForCausalLM

    path, block = _packed_set(tmp_path)
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=8,
        bos_token_id=TOK.bos_id, eos_token_id=TOK.eos_id, pad_token_id=TOK.pad_id,
        attn_implementation="sdpa")).eval()
    inputs = packed_inputs(model, block, document_marks(path), CPU)
    assert "attention_mask" not in inputs
    with torch.no_grad():
        packed = model(**inputs).logits[0]
        alone = [model(input_ids=torch.from_numpy(block[:, s:e])).logits[0] for s, e in SPANS]
    for (start, end), solo in zip(SPANS, alone):
        assert torch.allclose(packed[start:end], solo, rtol=1e-5, atol=1e-5)
    assert "attention_mask" in packed_inputs(_tiny_llama("sdpa"), block, document_marks(path), CPU)
