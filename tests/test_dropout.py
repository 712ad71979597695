"""The adapter's CPU dropout (`backend.compute.dropout`) and the worker's allocator setting."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from backend.compute.dropout import FastDropout, keep_mask, use_fast_dropout
from backend.core.config import LoraSettings
from backend.core.workspace import PROJECT_ROOT


def test_every_lane_drops_at_the_rate():
    torch.manual_seed(0)
    keep, scale = keep_mask(torch.Size([200_000, 4]), 0.05)
    dropped = (~keep).float().mean(dim=0)
    # Each column is one 16-bit lane of the 64-bit draws: all four must drop about 5%.
    assert all(0.045 < float(d) < 0.055 for d in dropped), dropped
    assert scale == pytest.approx(1 / (1 - 3277 / 65536))


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5])
def test_output_keeps_the_expectation_and_the_gradient_is_the_mask(p):
    torch.manual_seed(1)
    x = torch.rand(1000, 300) + 0.5
    x.requires_grad_(True)
    drop = FastDropout(p).train()
    y = drop(x)
    kept = y != 0
    assert float(1 - kept.float().mean()) == pytest.approx(p, abs=0.01)
    assert float(y.sum() / x.sum()) == pytest.approx(1.0, abs=0.02)
    scale = float(y[kept][0] / x[kept][0])
    assert torch.allclose(y[kept], x[kept] * scale)
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() * scale)


def test_same_seed_same_masks_and_eval_is_identity():
    x = torch.randn(64, 128)
    drop = FastDropout(0.2).train()
    torch.manual_seed(7)
    a = drop(x)
    b = drop(x)
    torch.manual_seed(7)
    assert torch.equal(drop(x), a)  # a resumed run restores the RNG state and draws the same
    assert not torch.equal(a, b)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    with pytest.raises(ValueError):
        FastDropout(1.0)
    # Rates that 16 bits cannot hold go to F.dropout: nearly all dropped, or nearly none.
    big = torch.ones(100_000)
    assert int((FastDropout(0.999999).train()(big) != 0).sum()) < 10
    assert int((FastDropout(1e-7).train()(big) == 0).sum()) < 3


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def test_attach_lora_leaves_the_jobs_log_free_of_transformers_deprecation_noise():
    """PEFT reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning a job
    would print on every adapter, naming nothing the user can change. Other warnings still pass."""
    import warnings

    from backend.compute.models import attach_lora

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attach_lora(_tiny_llama(), LoraSettings(r=4, alpha=8), seed=0)
        warnings.warn("a warning of our own", UserWarning)
    said = [str(w.message) for w in caught]
    assert not [m for m in said if "is_gradient_checkpointing" in m] and "a warning of our own" in said


def test_attach_lora_swaps_every_adapter_dropout_and_nothing_else():
    from backend.compute.models import attach_lora

    lora = LoraSettings(r=4, alpha=8, dropout=0.1)
    ours = attach_lora(_tiny_llama(), lora, seed=3)
    plain = attach_lora(_tiny_llama(), lora, seed=3, fast_dropout=False)
    fast = [m for m in ours.modules() if isinstance(m, FastDropout)]
    assert len(fast) == 2 * 7 and all(m.p == 0.1 for m in fast)  # 7 linear layers a block
    assert not any(isinstance(m, FastDropout) for m in plain.modules())
    assert use_fast_dropout(ours) == 0  # nothing left to swap
    # Same weights, same adapter; in eval mode (no dropout) the same logits.
    assert ours.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), plain.state_dict().values()))
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(ours.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)
    # Training steps with either dropout lower the loss about equally.
    losses = []
    for model in (ours, plain):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(5)
        for _ in range(15):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(float(model.eval()(input_ids=ids, labels=ids).loss))
    assert losses[0] == pytest.approx(losses[1], rel=0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="keep_freed_memory is glibc's mallopt (a no-op elsewhere) and the check reads /proc")
def test_worker_keeps_freed_memory_in_the_process():
    # A freed 24 MiB activation: with glibc's defaults it goes back to the system (and the next
    # step faults its pages in again); with the worker's setting it stays for the next step.
    script = textwrap.dedent(
        """
        import os, sys, torch
        from backend.compute.train import keep_freed_memory
        if sys.argv[1] == "keep":
            assert keep_freed_memory()
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        t = torch.ones(24 << 18)  # 24 MiB, every page touched
        held = rss()
        del t
        print((held - rss()) / 2**20)
        """
    )

    def returned_mib(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", script, mode], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    assert returned_mib("default") > 20
    assert returned_mib("keep") < 1
