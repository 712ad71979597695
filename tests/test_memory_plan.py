"""The memory plan against the allocator's own bytes in real training steps, on the CPU, and what
`choose` makes of it on a card. The measured side runs `backend.compute.train.train_model` on
tiny Llamas built from configs (benchmarks/memory_plan_check.py; its 1B case is in
docs/benchmarks.md)."""

from __future__ import annotations

import json

import pytest

from backend.core.errors import LtmError
from backend.studies import memory_plan

# Its module-scoped fixture is built once: the file's tests run in one process (`-n auto`
# with `--dist loadgroup`, pyproject.toml).
pytestmark = pytest.mark.xdist_group("memory_plan")

# Llama-3-8B's config.json, the fields the plan reads
LLAMA3_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def measured():
    from benchmarks.memory_plan_check import QUICK_CASES, measure

    return {case["name"]: measure(case) for case in QUICK_CASES}


def test_the_plan_is_within_15_percent_of_measured_peaks(measured):
    # three shapes (MHA; GQA with a 32k vocabulary and documents; a wide SwiGLU, checkpointed),
    # LoRA in fp32 and in bf16 mixed precision, and a 4-bit QLoRA base, each its own kind of peak
    assert len(measured) >= 4
    for name, row in measured.items():
        assert 0.85 <= row["plan_over_measured"] <= 1.15, (name, row)
    assert {r["plan_stage"] for r in measured.values()} == {"loss", "layer"}
    assert any(r["quant"] == "4bit" for r in measured.values())
    assert any(r["grad_checkpointing"] for r in measured.values())
    assert {r["precision"] for r in measured.values()} == {"fp32", "bf16"}


def test_checkpointing_and_a_4bit_base_cut_what_the_plan_and_the_step_hold():
    # the same 8B step four ways: 4-bit weights are about a quarter of bf16 ones (their
    # constants and the unquantised embeddings on top), checkpointing keeps one tensor a layer
    lora = memory_plan.plan(LLAMA3_8B, micro_batch=4, block_size=2048)
    qlora = memory_plan.plan(LLAMA3_8B, quant="4bit", micro_batch=4, block_size=2048)
    ckpt = memory_plan.plan(LLAMA3_8B, micro_batch=4, block_size=2048, grad_checkpointing=True)
    assert 15e9 < lora.weights < 17e9 and qlora.quantized_weights < lora.weights / 3.5
    assert ckpt.activations < lora.activations / 4 and ckpt.peak < lora.peak
    # the plan's parts add up to its peak
    for p in (lora, qlora, ckpt):
        static = p.weights + p.quantized_weights + p.adapters + p.optimizer
        working = p.activations + p.logits + (p.grads // 32 if p.peak_stage == "layer" else 0)
        assert p.peak == static + working + p.cuda_context + p.allocator_slack
        assert json.loads(json.dumps(p.to_dict()))["peak"] == p.peak


def test_eager_attention_keeps_the_scores_that_flash_does_not():
    flash = memory_plan.plan(LLAMA3_8B, micro_batch=1, block_size=4096, attention="flash")
    eager = memory_plan.plan(LLAMA3_8B, micro_batch=1, block_size=4096, attention="eager")
    scores = 32 * 4096 * 4096 * (4 + 2)  # heads × seq² in fp32 and in bf16, a layer
    assert eager.activations_per_layer - flash.activations_per_layer >= scores


def test_liger_never_holds_the_logits_and_keeps_less_a_layer():
    """With liger's fused cross-entropy the step no longer grows with tokens × vocabulary: four
    times the vocabulary adds the larger embeddings and output layer, and of the working set at
    most one chunk of logits, where PyTorch's loss adds its fp32 working set (log_softmax's
    output and two gradients of the logits' size).
    Its RMSNorm and SwiGLU keep less a layer. The parts still add up to the peak."""
    wide = {**LLAMA3_8B, "vocab_size": 4 * LLAMA3_8B["vocab_size"]}
    T, extra_vocab = 4 * 2048, 3 * LLAMA3_8B["vocab_size"]
    # PyTorch's loss holds at the least one fp32 copy of the logits (the plan's own count of
    # its tensors is measured by benchmarks/memory_plan_check.py, not restated here); liger's
    # at most a chunk of them
    for kernels, most, least in ((None, None, T * extra_vocab * 4), ("liger", 0.01 * T * extra_vocab * 2, 0)):
        a, b = (memory_plan.plan(c, micro_batch=4, block_size=2048, kernels=kernels) for c in (LLAMA3_8B, wide))
        working = (b.activations + b.logits) - (a.activations + a.logits)
        assert working >= least and (most is None or working <= most), (kernels, working)
    torch_plan = memory_plan.plan(LLAMA3_8B, micro_batch=4, block_size=2048)
    liger = memory_plan.plan(LLAMA3_8B, micro_batch=4, block_size=2048, kernels="liger")
    assert liger.activations_per_layer < torch_plan.activations_per_layer and liger.peak < torch_plan.peak
    assert liger.kernels == "liger" and liger.logits < torch_plan.logits / 100
    static = liger.weights + liger.quantized_weights + liger.adapters + liger.optimizer
    working = liger.activations + liger.logits + (liger.grads // 32 if liger.peak_stage == "layer" else 0)
    assert liger.peak == static + working + liger.cuda_context + liger.allocator_slack
    with pytest.raises(LtmError, match="unknown kernels 'triton'"):
        memory_plan.plan(LLAMA3_8B, kernels="triton")


def test_a_4bit_layer_under_cudas_autocast_shares_its_input_among_adapters():
    """PEFT casts each adapter's input to fp32 (a copy each) except in a 4-bit layer under
    CUDA's autocast: a QLoRA layer keeps less on a card than the CPU's calibration measured,
    while a bf16 LoRA layer keeps the same on both."""
    per_layer = {(quant, device): memory_plan.plan(LLAMA3_8B, quant=quant, micro_batch=4, block_size=2048,
                                                   device=device).activations_per_layer
                 for quant in (None, "4bit") for device in ("cpu", "cuda")}
    assert per_layer[None, "cuda"] == per_layer[None, "cpu"]
    assert per_layer["4bit", "cuda"] < per_layer["4bit", "cpu"]


def test_choose_prefers_no_checkpointing_then_checkpoints_then_gives_the_smallest_step():
    def peak(mb, ckpt, **kw):
        return memory_plan.plan(LLAMA3_8B, micro_batch=mb, grad_checkpointing=ckpt, block_size=2048, **kw).peak

    # a card on which micro-batch 4 just fits unchecked: no checkpointing, and no more than 4
    card = int(peak(4, False) / 0.9) + 1
    assert peak(8, False) > 0.9 * card
    assert memory_plan.choose(LLAMA3_8B, card, micro_batch=4, cap=16, block_size=2048) == (False, 4)
    # asked for 2 on that card: it grows to the 4 that fits
    assert memory_plan.choose(LLAMA3_8B, card, micro_batch=2, cap=16, block_size=2048) == (False, 4)
    # on 96 GiB, 8B at block 2048 unchecked fits only below a requested 8, but its 4 × 2048
    # tokens a pass already fill the card's matmuls: no recomputation of the forward pass
    big = 96 * memory_plan.GiB
    assert peak(8, False) > 0.9 * big >= peak(4, False)
    assert memory_plan.choose(LLAMA3_8B, big, micro_batch=8, cap=16, block_size=2048) == (False, 4)
    # where unchecked passes would be short (1 × 2048 tokens), checkpointed: the micro-batch
    # grows to the largest that fits that way, up to the cap
    tight = int(peak(1, False) / 0.9) + 1
    assert peak(2, False) > 0.9 * tight
    ckpt, mb = memory_plan.choose(LLAMA3_8B, tight, micro_batch=4, cap=16, block_size=2048)
    assert ckpt is True and mb > 1 and peak(mb, True) <= 0.9 * tight
    assert mb == 16 or peak(2 * mb, True) > 0.9 * tight
    # 8B bf16 LoRA on a 24 GB card (the weights alone are 16 GB): checkpointed; 4-bit fits
    small = 24 * memory_plan.GiB
    assert memory_plan.choose(LLAMA3_8B, small, micro_batch=4, cap=16, block_size=2048)[0] is True
    q_ckpt, q_mb = memory_plan.choose(LLAMA3_8B, small, micro_batch=4, cap=16, block_size=2048, quant="4bit")
    assert peak(q_mb, q_ckpt, quant="4bit") <= 0.9 * small
    # nothing fits a 4 GB card: the smallest step, with checkpointing, for the caller to try
    assert memory_plan.choose(LLAMA3_8B, 4 * memory_plan.GiB, block_size=2048) == (True, 1)


def test_read_config_takes_a_folder_and_names_what_is_wrong(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert memory_plan.read_config(tmp_path)["hidden_size"] == 4096
    nested = tmp_path / "vlm"
    nested.mkdir()
    (nested / "config.json").write_text(json.dumps({"text_config": LLAMA3_8B, "vision_config": {}}))
    assert memory_plan.read_config(nested)["num_key_value_heads"] == 8
    with pytest.raises(LtmError, match=r"empty: no such folder; point --base at a model folder holding config.json"):
        memory_plan.read_config(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LtmError, match=r"empty: no config.json in this folder"):
        memory_plan.read_config(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"hidden_size": 4096}))
    with pytest.raises(LtmError, match=r"no num_hidden_layers, num_attention_heads, intermediate_size, vocab_size"):
        memory_plan.read_config(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(LtmError, match=r"not readable as JSON"):
        memory_plan.read_config(bad)
