"""The GPU training path, checked on the CPU: mixed precision, attention choice, kernels,
regional compilation and gradient checkpointing.

The CPU runs the same code a card does when a base is asked for `--precision bf16`: bf16
weights for a frozen base, fp32 adapter weights, every activation in bf16 under autocast. What
differs on a card is only which kernels do the arithmetic.
"""

from __future__ import annotations

import sys

import pytest
import torch

from backend.compute.models import (
    BaseSpec,
    attach_lora,
    attention_for,
    autocast,
    compile_layers,
    load_base,
    use_kernels,
)
from backend.core.config import LoraSettings
from backend.core.errors import ModelError

CPU = torch.device("cpu")


def _hidden_dtypes(model, ids):
    """The dtype of every decoder layer's output and of the logits, in one forward pass."""
    seen = []
    layers = (model.get_base_model() if hasattr(model, "get_base_model") else model).model.layers
    hooks = [layer.register_forward_hook(lambda _m, _i, out: seen.append(
        (out[0] if isinstance(out, tuple) else out).dtype)) for layer in layers]
    try:
        out = model(input_ids=ids, labels=ids)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def _norm_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for n, p in model.named_parameters() if "norm" in n or "embed" in n}


@pytest.mark.parametrize("quant", [None, "4bit"])
def test_bf16_keeps_every_activation_in_bf16_and_the_adapter_in_fp32(tiny_hf_model, quant):
    spec = BaseSpec(base=str(tiny_hf_model), quant=quant, device="cpu", precision="bf16")
    base, tok, device = load_base(spec)
    # A 4-bit base keeps its norms and embeddings in bf16: PEFT's kbit preparation would have
    # made them fp32, and with them the residual stream.
    assert _norm_dtypes(base) == {torch.bfloat16}
    model = attach_lora(base, LoraSettings(r=4, alpha=8), seed=0)
    adapter = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert adapter == {torch.float32}  # the master weights AdamW updates
    ids = torch.tensor([tok.encode("the cat sat on the mat and the dog ran")])
    with autocast(device, spec.precision):
        seen, out = _hidden_dtypes(model, ids)
    assert seen and set(seen) == {torch.bfloat16}
    out.loss.backward()
    grads = {p.grad.dtype for p in model.parameters() if p.requires_grad}
    assert grads == {torch.float32}


def test_fp32_on_the_cpu_runs_without_autocast(tiny_hf_model):
    spec = BaseSpec(base=str(tiny_hf_model), device="cpu")
    base, tok, device = load_base(spec)
    ids = torch.tensor([tok.encode("the cat sat on the mat")])
    with autocast(device, spec.precision):
        seen, _ = _hidden_dtypes(base, ids)
    assert set(seen) == {torch.float32}


def test_bf16_training_learns_as_fp32_does(tiny_hf_model, tmp_path):
    """Ten LoRA steps in bf16 autocast lower the loss about as much as in fp32."""
    from backend.compute.train import train_model
    from backend.core.config import TrainConfig
    from backend.ingest.packing import tokenize_to_file

    text = "the cat sat on the mat and the dog ran to the park " * 40
    finals = {}
    for precision in ("fp32", "bf16"):
        spec = BaseSpec(base=str(tiny_hf_model), device="cpu", precision=precision)
        base, tok, device = load_base(spec)
        run = tmp_path / precision
        run.mkdir()
        tokenize_to_file([text], tok.encode, run / "tokens.bin", bos_id=tok.bos_id, eos_id=tok.eos_id)
        model = attach_lora(base, LoraSettings(r=4, alpha=8), seed=0)
        cfg = TrainConfig(block_size=32, micro_batch=4, max_steps=12, lr=5e-3, min_train_tokens=0,
                          checkpoint_every=0, log_every=1)
        curve = []
        out = train_model(model, run / "tokens.bin", run, cfg, device=device, precision=precision, log=lambda _: None,
                          emit=lambda kind, **f: curve.append(f["loss"]) if kind == "progress" else None)
        finals[precision] = (curve[0], out.final_loss)
    for first, last in finals.values():
        assert last < first * 0.8
    assert finals["bf16"][1] == pytest.approx(finals["fp32"][1], rel=0.1)


def test_attention_choice():
    assert attention_for(BaseSpec(), CPU) == "sdpa"  # flash-attn runs on CUDA only
    assert attention_for(BaseSpec(attn="eager"), CPU) == "eager"
    with pytest.raises(ModelError, match="flash-attn package"):
        attention_for(BaseSpec(attn="flash_attention_2"), CPU)
    with pytest.raises(ModelError, match="unknown --precision"):
        load_base(BaseSpec(precision="fp8"))


@pytest.mark.parametrize("wheel", ["broken", "working"])
def test_a_flash_attn_that_does_not_load_leaves_sdpa_and_names_why(tmp_path, monkeypatch, wheel):
    """A flash-attn wheel built for another torch or CUDA is found but does not load ("undefined
    symbol"). `auto` then takes SDPA on a card, where it would otherwise pick flash-attn and fail
    every job at its first forward pass; asking for it names why it cannot run. A flash-attn
    that loads is taken. (A real package on the path stands in for the wheel.)"""
    from backend.compute import models

    package = tmp_path / "site" / "flash_attn"
    package.mkdir(parents=True)
    body = ("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')"
            if wheel == "broken" else "def flash_attn_varlen_func(*args, **kwargs):\n    raise NotImplementedError\n")
    (package / "__init__.py").write_text(body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    models._flash_attn_error.cache_clear()
    card = torch.device("cuda")  # a device name: nothing here runs on it
    try:
        hf = BaseSpec(base="some/model", precision="bf16")
        if wheel == "working":
            assert attention_for(hf, card) == "flash_attention_2"
            return
        assert attention_for(hf, card) == "sdpa"
        with pytest.raises(ModelError, match="does not load: flash_attn_2_cuda.so: undefined symbol"):
            attention_for(BaseSpec(base="some/model", attn="flash_attention_2"), card)
    finally:
        models._flash_attn_error.cache_clear()
        sys.modules.pop("flash_attn", None)


def test_liger_kernels_off_the_gpu_leave_the_model_as_it_was(tiny_hf_model):
    spec = BaseSpec(base=str(tiny_hf_model), device="cpu", kernels="liger")
    base, tok, device = load_base(spec)
    forward = base.forward
    line = use_kernels(base, spec, device)
    assert "CUDA only" in line
    assert base.forward == forward


def test_tf32_leaves_every_reader_of_the_flags_working():
    """What `use_tensor_cores` sets on a card: TF32 for CUDA matmuls and convolutions, while the
    old flags torch's compiler and other libraries read still answer (torch 2.9's per-backend
    setter makes them raise) and the CPU's matmuls stay fp32. The flags are global: put back."""
    from backend.compute.models import _tf32_on

    b = torch.backends
    before = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    try:
        _tf32_on()
        assert (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision) == ("tf32", "tf32")
        assert b.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"
        assert b.mkldnn.matmul.fp32_precision == "none"
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = before
    assert torch.get_float32_matmul_precision() == "highest"


def test_regional_compile_gives_the_same_losses(monkeypatch, tmp_path):
    """Each decoder layer compiled on its own (aot_eager here: the same graph capture as
    inductor, without a C++ toolchain) trains exactly as the plain network does."""
    from backend.compute.models import build_micro

    monkeypatch.setenv("LTM_COMPILE_BACKEND", "aot_eager")
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for compiled in (False, True):
        model = build_micro("tiny", seed=0, device=CPU)
        if compiled:
            assert compile_layers(model) == len(model.model.layers)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        run = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(float(loss))
        losses.append(run)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_compiled_layers_compile_a_shape_change_once_and_nothing_after_training(monkeypatch):
    """A compiled job whose batches change size (a last, shorter batch; on a card, flash-attn's
    document boundaries, every step) compiles one dynamic graph for them rather than one per
    shape until torch's recompile limit, after which it would run eager for good. Evaluation
    after training (each battery's lengths) compiles nothing, and a warm worker's next job
    compiles afresh, its own adapter included."""
    from torch._dynamo.utils import counters

    from backend.compute.models import build_micro
    from backend.compute.train import done_training

    monkeypatch.setenv("LTM_COMPILE_BACKEND", "aot_eager")
    spec = BaseSpec(device="cpu", compile=True, preset="tiny")
    model = build_micro("tiny", seed=0, device=CPU)

    def graphs() -> int:
        return counters["stats"]["unique_graphs"]

    def steps(lengths):
        for n in lengths:
            ids = torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(n))
            model(input_ids=ids, labels=ids).loss.backward()

    try:
        layers = compile_layers(model)
        before = graphs()
        steps([16, 24, 32, 40])
        assert graphs() - before == 2 * layers  # a static graph, then one dynamic one, per layer
        done_training(model, spec)
        before = graphs()
        with torch.no_grad():
            for n in range(5, 30, 2):
                model(input_ids=torch.randint(0, 256, (1, n)))
        assert graphs() == before
        compile_layers(model)  # the next job
        before = graphs()
        steps([16])
        assert graphs() - before == layers
    finally:
        torch.compiler.set_stance("default")
        torch.compiler.reset()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_hf_model):
    """Recomputing activations in the backward pass changes memory, not the gradients."""
    from backend.compute.train import set_grad_checkpointing

    spec = BaseSpec(base=str(tiny_hf_model), device="cpu")
    base, tok, _ = load_base(spec)
    model = attach_lora(base, LoraSettings(r=4, alpha=8), seed=0)
    ids = torch.tensor([tok.encode("the cat sat on the mat and the dog ran to the park")])
    # Checkpointing wraps a layer's forward inside its hooks, and the recomputation stops as soon
    # as it has what the backward pass needs: a pre-hook on a module inside counts both runs.
    inside = base.model.layers[0].mlp
    calls = []
    inside.register_forward_pre_hook(lambda *_: calls.append(1))
    grads, forwards = [], []
    for on in (False, True):
        set_grad_checkpointing(model, on)
        model.train()
        calls.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        forwards.append(len(calls))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad()
    set_grad_checkpointing(model, False)
    assert forwards == [1, 2]  # with checkpointing the layer runs again in the backward pass
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    # switched off, the frozen base is as it was before: its embeddings' output needs no
    # gradient (a warm worker's next job keeps nothing for layer 0) and no hook is left behind
    set_grad_checkpointing(model, True)
    set_grad_checkpointing(model, False)
    assert not base.get_input_embeddings()(ids).requires_grad
    assert not getattr(base, "_require_grads_hooks", None)


def test_the_memory_plan_fits_the_micro_batch_to_the_card(tiny_hf_model):
    """auto grows the micro-batch up to the effective batch where the card holds it, turns
    checkpointing on where the asked micro-batch would not fit without it, and keeps the
    effective batch; on and off keep the run's own settings."""
    from backend.compute.memory_fit import fit_to_card, plan_settings
    from backend.core.config import TrainConfig
    from backend.studies.memory_plan import plan

    base, _, device = load_base(BaseSpec(base=str(tiny_hf_model), device="cpu"))
    lora = LoraSettings(r=4, alpha=8)
    model = attach_lora(base, lora, seed=0)
    cfg = TrainConfig(block_size=128, micro_batch=2, grad_accum=8)
    fit = lambda card, **over: fit_to_card(model, TrainConfig(**{**cfg.to_dict(), **over}), quant=None,  # noqa: E731
                                           lora=lora, device=device, dtype_bytes=4, log=lambda _: None,
                                           card_bytes=card)
    settings = plan_settings(model, cfg, quant=None, lora=lora, device=device, dtype_bytes=4)
    peak = lambda mb, ckpt: plan(base.config.to_dict(), micro_batch=mb, grad_checkpointing=ckpt, **settings).peak  # noqa: E731

    roomy, ckpt = fit(10 * peak(16, False))
    assert (roomy.micro_batch, roomy.grad_accum, ckpt) == (16, 1, False)
    # room for 4 sequences, not 8: the largest micro-batch that divides the effective batch
    snug, ckpt = fit(int(peak(4, False) / 0.9) + 1)
    assert (snug.micro_batch, snug.grad_accum, ckpt) == (4, 4, False)
    # the asked micro-batch fits only with checkpointing
    assert peak(2, True) < peak(2, False)  # the shapes make this case exist
    tight, ckpt = fit(int(peak(2, True) / 0.9) + 1)
    assert ckpt and tight.micro_batch * tight.grad_accum == 16 and tight.micro_batch >= 2
    for mode, want in (("on", True), ("off", False)):
        same, ckpt = fit(10, grad_checkpointing=mode)
        assert (same.micro_batch, same.grad_accum, ckpt) == (2, 8, want)
    # where liger's kernels run (use_kernels marks the base), the plan counts what they keep:
    # the same room holds a larger micro-batch
    room = int(plan(base.config.to_dict(), micro_batch=8, **{**settings, "kernels": "liger"}).peak / 0.9) + 1
    assert fit(room)[0].micro_batch < 8
    base.ltm_kernels = "liger"
    try:
        assert fit(room)[0].micro_batch == 8
    finally:
        del base.ltm_kernels
    # on the CPU, auto keeps the run's settings without a plan
    kept, ckpt = fit_to_card(model, cfg, quant=None, lora=lora, device=device, dtype_bytes=4, log=lambda _: None)
    assert (kept.micro_batch, kept.grad_accum, ckpt) == (2, 8, False)


def test_a_4bit_base_counts_the_weights_of_its_dense_twin(tiny_hf_model):
    """result.json's `params` for a QLoRA run: bitsandbytes holds two 4-bit values in a byte, so
    the packed tensor's numel is half the weight's; the count is the model's, not the bytes'."""
    from backend.compute.models import count_params

    dense, _, _ = load_base(BaseSpec(base=str(tiny_hf_model), device="cpu"))
    packed, _, _ = load_base(BaseSpec(base=str(tiny_hf_model), quant="4bit", device="cpu"))
    assert sum(p.numel() for p in packed.parameters()) < count_params(dense)  # what numel alone says
    assert count_params(packed) == count_params(dense)
