"""How much memory one training step of a Hugging Face causal LM takes, from its config alone.

No torch here (only json and math): the dashboard and `ltm-tui estimate --gpu` call it in a
process that never loads a model, and the training worker calls it before it builds the first
batch. The functions other code relies on, with stable signatures:

    read_config(folder) -> dict
        config.json of a local model folder (the text model's part of a multimodal one);
        one clear line (LtmError) when it is missing, unreadable or not a decoder we can plan.

    plan(config, *, quant=None, lora_r=16, target_modules="all-linear", micro_batch=4,
         block_size=512, dtype_bytes=2, grad_checkpointing=False, attention="sdpa",
         device="cuda", lora_dropout=0.0, packed_documents=False, kernels=None) -> MemoryPlan
        the bytes of one optimizer step, by part, and its peak. quant: None or "4bit" (nf4,
        double quantization, as backend.compute.models loads it); lora_r: the adapter's rank, or
        None to train every weight (the micro network); target_modules: "all-linear" (q, k, v, o,
        gate, up, down) or a list of those names; dtype_bytes: 2 for bf16 on a card, 4 for fp32
        on the CPU; attention: "flash" (flash-attn 2), "sdpa" (PyTorch's memory-efficient or
        flash kernel) or "eager"/"math" (scores materialised); device: "cuda" adds the CUDA
        context and the caching allocator's slack, "cpu" adds nothing; packed_documents: blocks
        hold several documents, so SDPA gets a block-diagonal mask (and GQA keys repeated);
        kernels: None for PyTorch's, "liger" for liger-kernel's RMSNorm, SwiGLU, RoPE and fused
        linear cross-entropy (`--kernels liger`, CUDA only): they keep less (see `_layer_saved`
        and the loss stage in `plan`).

    choose(config, card_bytes, target_share=0.9, *, micro_batch=4, cap=64, **settings)
        -> (grad_checkpointing, micro_batch)
        the largest power-of-two micro-batch up to `cap` whose peak fits target_share of the
        card: without checkpointing when that reaches the requested micro-batch, else with it.
        `settings` are plan()'s keywords.

Where the numbers come from: the tensors PyTorch's autograd keeps for the backward pass of
transformers' Llama (the layout Mistral and Qwen share), counted op by op in the comments of
`_layer_saved`, and checked against the allocator's own bytes in real training steps of
`backend.compute.train.train_model` on the CPU, in fp32 and in bf16 mixed precision through the
CPU's autocast (tests/test_memory_plan.py, and up to a 1.5B shape in
benchmarks/memory_plan_check.py; docs/benchmarks.md has the numbers). The CUDA context and the
caching allocator's slack are assumptions until benchmarks/gpu_check.sh measures a card, and
so are liger's terms and those of a 4-bit base under CUDA's autocast: both are read from the
libraries' code (liger-kernel 0.8, peft 0.21), and neither runs on the CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from backend.core.errors import LtmError

GB = 1e9
GiB = 1 << 30
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("flash", "sdpa", "eager", "math")  # "math" is "eager": both materialise the scores
KERNELS = (None, "liger")
# A bare CUDA context with PyTorch's kernels loaded is about 0.5 GB on Ampere and Hopper
# (nvidia-smi beside torch.cuda.init()); cuBLAS and cuDNN workspaces and the lazily loaded
# kernels of a training step add a few hundred MB. None of it is in the caching allocator's count.
CUDA_CONTEXT_BYTES = int(0.8 * GB)
# What the caching allocator reserves beyond what tensors hold (blocks split and cached between
# steps of varying size): an assumption of 5% of the allocated peak, until benchmarks/gpu_check.sh
# measures reserved against allocated on a card.
ALLOCATOR_SLACK = 0.05
MICRO_BATCH_CAP = 64
# Tokens a forward pass needs to keep a card's matmuls at full speed: with 4096 rows the GEMMs of
# a 4k-wide model are far past the size where an H100's tensor cores saturate. Below it, `choose`
# prefers a larger micro-batch with checkpointing to a short pass without.
FULL_PASS_TOKENS = 4096


def read_config(folder) -> dict:
    """config.json of a model folder, as a dict: the text model's part where the file nests one
    (`text_config`), checked for the fields the plan needs."""
    path = Path(folder).expanduser()
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists():
        raise LtmError(f"{folder}: no such folder; point --base at a model folder holding config.json",
                       title="model")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LtmError(f"{path.parent}: no config.json in this folder; point --base at a model folder holding one",
                       title="model") from None
    except (OSError, ValueError) as exc:
        raise LtmError(f"{path}: not readable as JSON ({str(exc).splitlines()[0][:120]})", title="model") from None
    if not isinstance(config, dict):
        raise LtmError(f"{path}: not a model config (a JSON object is expected)", title="model")
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], "tie_word_embeddings": config.get(
            "tie_word_embeddings", config["text_config"].get("tie_word_embeddings", False))}
    shape(config, where=str(path))  # the one-line error for a config we cannot plan, now
    return config


@dataclass(frozen=True)
class Shape:
    """The numbers of a config the plan reads."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        d, q, kv, f = self.hidden, self.q_dim, self.kv_dim, self.ffn
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}

    def layer_linear_params(self) -> int:
        return sum(i * o for i, o in self.linears().values())

    def params(self) -> int:
        """Every weight: embeddings, layers (linears and two norms), final norm, output layer."""
        d = self.hidden
        out = 0 if self.tied else self.vocab * d
        return self.vocab * d + self.layers * (self.layer_linear_params() + 2 * d) + d + out


def shape(config: Mapping[str, Any], where: str = "config") -> Shape:
    """The plan's numbers from a config dict; one line naming the field when one is missing."""
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in need if not isinstance(config.get(k), int) or config.get(k) <= 0]
    if missing:
        raise LtmError(f"{where}: no {', '.join(missing)}; the memory plan needs a decoder config "
                       "(Llama, Mistral, Qwen) with these fields", title="model")
    if (config.get("num_local_experts") or config.get("num_experts") or 0) > 1:
        raise LtmError(f"{where}: a mixture-of-experts config; the memory plan covers dense decoders only",
                       title="model")
    heads = int(config["num_attention_heads"])
    return Shape(
        hidden=int(config["hidden_size"]),
        layers=int(config["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        ffn=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]),
        tied=bool(config.get("tie_word_embeddings", False)),
    )


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of one training step by part; `peak` is what the device must hold at its fullest."""

    weights: int  # base weights in the training dtype (for QLoRA: embeddings, norms, output layer)
    quantized_weights: int  # QLoRA: nf4 linear weights, 4 bits each, with their quantization constants
    adapters: int  # trainable weights: LoRA A and B in fp32, or every weight when training in full
    grads: int  # one gradient per trainable weight, in its dtype
    optimizer: int  # AdamW's two moments per trainable weight, in its dtype
    activations_per_layer: int  # kept for the backward pass by one decoder layer, no checkpointing
    checkpointed_per_layer: int  # kept by one decoder layer with checkpointing: its input
    activations: int  # at the peak: every layer's saved tensors and the backward's working set
    logits: int  # at the peak: the logits and the loss's working set (liger's: one chunk of logits)
    cuda_context: int  # the CUDA context and workspaces: outside the allocator, 0 on the CPU
    allocator_slack: int  # the caching allocator's reserve beyond live tensors, 0 on the CPU
    peak: int  # the sum of the static parts and the largest stage of the step
    peak_stage: str  # where the step is fullest: "loss" (logits) or "layer" (last layer's backward)
    micro_batch: int
    block_size: int
    grad_checkpointing: bool
    quant: str | None
    lora_r: int | None
    dtype_bytes: int
    attention: str
    device: str
    params: int  # weights of the base, for the reader
    kernels: str | None = None

    @property
    def total(self) -> int:
        return self.peak

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["peak_gb"] = round(self.peak / GB, 2)
        return out


def lora_targets(target_modules: str | Sequence[str]) -> tuple[str, ...]:
    """The linear layers an adapter wraps: "all-linear" (PEFT's name for every linear layer of
    the decoder but the output layer) or a list of names, short ("q") or full ("q_proj")."""
    if target_modules in ("all-linear", "all_linear", None):
        return ALL_LINEAR
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    full = {n.split("_")[0]: n for n in ALL_LINEAR}
    out = tuple(full.get(n, n) for n in names)
    unknown = [n for n in out if n not in ALL_LINEAR]
    if unknown:
        raise LtmError(f"unknown LoRA target module(s) {', '.join(unknown)}; use all-linear or some of "
                       f"{', '.join(ALL_LINEAR)}", title="usage")
    return out


def _nf4_bytes(n: int) -> int:
    """A 4-bit nf4 weight of n elements with double quantization (bitsandbytes): 4 bits each,
    one uint8 absmax per 64-element block, one fp32 absmax (and offset) per 256 of those."""
    blocks = math.ceil(n / 64)
    return n // 2 + blocks + math.ceil(blocks / 256) * 4 * 2


def _layer_saved(s: Shape, T: int, B: int, *, b: int, seq: int, targets: tuple[str, ...], rank: int,
                 dropout: bool, copies: bool, attention: str, packed: bool, first: bool, liger: bool) -> int:
    """Bytes one Llama decoder layer keeps for the backward pass: T tokens, B bytes an element.

    RMSNorm (x.float() * rsqrt(mean(x²) + eps), times its weight) keeps its input in fp32 and the
    rsqrt, twice a layer; not in the first layer of an adapter run, where nothing before it needs
    a gradient. Each trained linear keeps its input for its weight's gradient: LoRA's A does, the
    frozen base weight does not; inputs shared by q, k, v (and by gate, up) are one tensor, unless
    each adapter makes its own copy (`copies`): LoRA dropout does (a copy and a boolean mask), and
    so does mixed precision, where PEFT casts the input to the adapter's fp32 and autocast casts
    it back to bf16 for the matmul, a new tensor for each adapter. PEFT's 4-bit layer skips that
    cast while CUDA's autocast is on (`torch.is_autocast_enabled()`, which the CPU's autocast
    does not answer), so on a card a QLoRA group's adapters read one tensor. LoRA's B keeps A's output
    (rank r). Attention keeps q and k after RoPE, v, its output (which is o_proj's input) and a
    log-sum-exp a head and token; "eager" also keeps the softmax scores in fp32 (and their copy
    in the training dtype when that is narrower). SwiGLU keeps gate, silu(gate), up and their
    product (down_proj's input) unless nothing needs it.

    With liger's kernels (`liger`): its RMSNorm keeps its input as it came (the training dtype,
    not fp32) and the rsqrt in fp32; its SwiGLU keeps gate and up and recomputes silu(gate) in
    the backward pass; its RoPE keeps only cos and sin, as PyTorch's does.
    """
    d, f, q, kv = s.hidden, s.ffn, s.q_dim, s.kv_dim
    lora = rank > 0
    norm = T * d * (B if liger else 4) + T * 4
    norms = 0 if (first and lora) else norm
    norms += norm  # the second norm's input is the residual after attention
    if not lora:  # a trained norm weight also keeps the normalised input, in the training dtype
        norms += 2 * T * d * B
    linear_in = s.linears()
    if lora:
        inputs = 0
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            hit = [n for n in group if n in targets]
            if hit and copies:  # a copy each, and dropout's mask (none in the first layer's
                # attention, where nothing before needs a gradient, so no mask is kept)
                mask = 0 if not dropout or (first and group[0] == "q_proj") else 1
                inputs += sum(T * linear_in[n][0] * (B + mask) for n in hit)
            elif hit:  # the adapters of a group read one tensor, kept once
                inputs += T * linear_in[hit[0]][0] * B
        if "o_proj" in targets and copies:  # o_proj's input is attention's output, kept anyway
            inputs += T * s.q_dim * (B + (1 if dropout else 0))
        if "down_proj" in targets:  # down_proj's input, SwiGLU's product, or its copy
            inputs += T * f * (B + (1 if dropout else 0))
    else:  # every linear keeps its input: the two normalised ones and SwiGLU's product
        inputs = 2 * T * d * B + T * f * B
    lora_out = len(targets) * T * rank * B
    # GQA: with a mask (eager always; SDPA when packed documents need one) transformers repeats
    # keys and values to every head before attention, and the repeated copies are what is kept.
    repeat = attention in ("eager", "math") or (attention == "sdpa" and packed)
    kv_kept = q if repeat else kv
    attn = T * q * B + 2 * T * kv_kept * B + T * q * B + b * s.heads * seq * 4
    if attention in ("eager", "math"):
        scores = b * s.heads * seq * seq
        attn += scores * 4 + (scores * B if B < 4 else 0)
    mlp = (2 if liger else 3) * T * f * B  # gate (for silu's gradient), silu(gate) and up (for the product's)
    return norms + inputs + lora_out + attn + mlp


def plan(
    config: Mapping[str, Any],
    *,
    quant: str | None = None,
    lora_r: int | None = 16,
    target_modules: str | Sequence[str] = "all-linear",
    micro_batch: int = 4,
    block_size: int = 512,
    dtype_bytes: int = 2,
    grad_checkpointing: bool = False,
    attention: str = "sdpa",
    device: str = "cuda",
    lora_dropout: float = 0.0,
    packed_documents: bool = False,
    kernels: str | None = None,
) -> MemoryPlan:
    """The bytes of one optimizer step (see the module docstring for the arguments)."""
    s = shape(config)
    attention = "eager" if attention == "math" else attention
    if attention not in ATTENTION:
        raise LtmError(f"unknown attention {attention!r}; use one of {', '.join(ATTENTION)}", title="usage")
    if quant not in (None, "4bit"):
        raise LtmError(f"unknown quant {quant!r}; use 4bit or none", title="usage")
    if kernels not in KERNELS:
        raise LtmError(f"unknown kernels {kernels!r}; use liger or none", title="usage")
    if micro_batch < 1 or block_size < 1:
        raise LtmError(f"micro_batch {micro_batch} and block_size {block_size} must be at least 1", title="usage")
    lora = lora_r is not None and lora_r > 0
    if quant and not lora:
        raise LtmError("a 4-bit base trains through an adapter: give lora_r", title="usage")
    B, b, seq = int(dtype_bytes), int(micro_batch), int(block_size)
    T = b * seq
    d, V, L = s.hidden, s.vocab, s.layers
    targets = lora_targets(target_modules) if lora else ()
    linears = s.linears()
    cuda = device.startswith("cuda")
    liger = kernels == "liger"
    # PEFT casts an adapter's input to its fp32 weights (a copy for each adapter, and a gradient
    # that comes back in fp32) unless it is a 4-bit layer under CUDA's autocast (_layer_saved)
    cast = lora and B < 4 and not (quant and cuda)

    # --- what stays for the whole run -------------------------------------------------------
    out_layer = 0 if s.tied else V * d
    if quant:
        # bitsandbytes quantises the decoder's linear layers; embeddings, norms and the output
        # layer stay in the load dtype (models.py no longer upcasts them to fp32)
        quantized = L * sum(_nf4_bytes(i * o) for i, o in linears.values())
        weights = (V * d + L * 2 * d + d + out_layer) * B
    else:
        quantized = 0
        weights = s.params() * B if lora else 0
    if lora:
        # PEFT keeps adapter weights in fp32 even on a bf16 base (autocast_adapter_dtype), so
        # their gradients and AdamW's moments are fp32 too: no separate master copy is needed
        trainable = L * sum(lora_r * (linears[n][0] + linears[n][1]) for n in targets)
        adapters, grads, optimizer = trainable * 4, trainable * 4, trainable * 8
    else:
        # training in full (micro): weights fp32 as master weights on every device (the forward
        # runs under bf16 autocast on a card); fp32 gradients; AdamW's moments like the weights
        adapters, grads, optimizer = s.params() * 4, s.params() * 4, s.params() * 8

    # --- activations ------------------------------------------------------------------------
    def saved(first: bool) -> int:
        return _layer_saved(s, T, B, b=b, seq=seq, targets=targets, rank=lora_r if lora else 0,
                            dropout=lora and lora_dropout > 0, copies=(lora and lora_dropout > 0) or cast,
                            attention=attention, packed=packed_documents, first=first, liger=liger)

    per_layer = saved(first=False)
    # checkpointing keeps each layer's input (the residual stream) and recomputes the rest of
    # the layer in the backward pass, one layer at a time
    per_layer_ckpt = T * d * B
    if grad_checkpointing:
        layers_kept = L * per_layer_ckpt
        recomputed = per_layer
    else:
        layers_kept = saved(first=True) + (L - 1) * per_layer
        recomputed = 0
    rope = 2 * b * seq * s.head_dim * B  # cos and sin, shared by the layers
    # one additive block-diagonal mask in the training dtype, made once a batch and read by every
    # layer (train.packed_inputs); eager attention always has one
    mask = b * seq * seq * B if attention == "eager" or (attention == "sdpa" and packed_documents) else 0
    final_norm = T * d * 4 + T * 4 + (0 if lora else T * d * B)
    if liger:  # its input as it came and the rsqrt; the backward recomputes the rest
        final_norm = T * d * B + T * 4
    # under autocast the fp32 trainable weights are cast to the training dtype once a step, and
    # the backward pass keeps those copies
    weight_casts = adapters // 4 * B if B < 4 else 0
    kept = layers_kept + rope + mask + final_norm + weight_casts

    # The loss stage: the cross-entropy's fp32 working set in its backward pass: log_softmax's
    # output (kept for its backward), the gradient nll_loss hands back and log_softmax's gradient
    # of the logits, 4 bytes each. The logits themselves are gone by then (the training loop
    # drops the model's output before the backward pass), and the forward pass's own peak (the
    # logits, their fp32 copy and log_softmax's output) is smaller.
    loss_work = 3 * T * V * 4
    if liger:
        # liger's fused linear cross-entropy never holds the logits: in the forward pass it takes
        # the tokens in chunks of about T / ceil(V / d) (a power of two), one chunk's logits in
        # the training dtype at a time, turns them into their gradient in place and adds it into
        # the gradient of its input (T×d, kept for the backward), beside its input (the final
        # norm's output) and an fp32 loss a token
        chunk = min(T, 1 << max(0, math.ceil(math.log2(max(1, math.ceil(T / math.ceil(V / d)))))))
        loss_work = chunk * V * B + 2 * T * d * B + T * 4
    loss_stage = kept + loss_work
    # The last layer's backward: its saved tensors (recomputed first with checkpointing), the
    # gradient of the residual stream (fp32 where the norms run) and SwiGLU's gradients: two
    # T×ffn at a time (down_proj's input gradient from the base and from the adapter, or the
    # gradients of silu(gate) and of up once the product is freed); a 4-bit weight is dequantised
    # to the training dtype for the gradient of its input, one matrix at a time. Gradients by
    # then: the adapter's of that layer, or in full training every weight's (the output layer's
    # and the embeddings' come first).
    # In mixed precision the adapter's input gradient passes PEFT's cast to fp32 on its way
    # back: down_proj's comes back as a T×ffn in fp32 before it is cast to the training dtype.
    dequant = max(i * o for i, o in linears.values()) * B if quant else 0
    mixed = T * s.ffn * (4 - B) if cast else 0
    # the residual stream's gradient: fp32 inside PyTorch's RMSNorm, the training dtype in liger's
    layer_work = 2 * T * d * (B if liger else 4) + 2 * T * s.ffn * B + mixed + dequant
    layer_stage = kept + recomputed + layer_work + (grads // L if lora else grads)
    activations_peak = max(loss_stage, layer_stage)
    stage = "loss" if loss_stage >= layer_stage else "layer"
    logits = loss_work if stage == "loss" else 0
    activations = activations_peak - logits - ((grads // L if lora else grads) if stage == "layer" else 0)

    # Gradients are set to None after each step (zero_grad(set_to_none=True)), so at the loss
    # stage they do not exist yet; the optimizer's moments live from the first step on.
    static = weights + quantized + adapters + optimizer
    allocated = static + max(activations_peak, grads)
    context = CUDA_CONTEXT_BYTES if cuda else 0
    slack = int(ALLOCATOR_SLACK * allocated) if cuda else 0
    return MemoryPlan(
        weights=weights, quantized_weights=quantized, adapters=adapters, grads=grads, optimizer=optimizer,
        activations_per_layer=per_layer, checkpointed_per_layer=per_layer_ckpt, activations=activations,
        logits=logits, cuda_context=context, allocator_slack=slack, peak=allocated + context + slack,
        peak_stage=stage, micro_batch=b, block_size=seq, grad_checkpointing=bool(grad_checkpointing),
        quant=quant, lora_r=lora_r if lora else None, dtype_bytes=B, attention=attention, device=device,
        params=s.params(), kernels=kernels,
    )


def choose(
    config: Mapping[str, Any],
    card_bytes: int,
    target_share: float = 0.9,
    *,
    micro_batch: int = 4,
    cap: int = MICRO_BATCH_CAP,
    **settings: Any,
) -> tuple[bool, int]:
    """(grad_checkpointing, micro_batch) for a card of `card_bytes`: the largest power-of-two
    micro-batch up to `cap` whose plan fits `target_share` of the card. Without checkpointing
    when that micro-batch is at least the requested one, or already runs FULL_PASS_TOKENS a
    forward pass: recomputing the forward costs a LoRA step on a frozen base half as much matmul
    work again (6 instead of 4 FLOPs a frozen weight and token), while a smaller micro-batch of
    passes that long costs only more, equally efficient passes. Else with checkpointing, the
    largest that fits that way. When not even
    micro-batch 1 with checkpointing fits, (True, 1): the smallest step there is, for the caller
    to try (and `plan` of it says by how much it is over). Pass cap = micro_batch × grad_accum
    to keep the effective batch."""
    budget = card_bytes * target_share
    sizes = [1 << i for i in range(int(math.log2(max(1, cap))) + 1)]

    def largest(ckpt: bool) -> int:
        best = 0
        for mb in sizes:  # the peak grows with the micro-batch: stop at the first that does not fit
            if plan(config, micro_batch=mb, grad_checkpointing=ckpt, **settings).peak > budget:
                break
            best = mb
        return best

    plain = largest(False)
    block = int(settings.get("block_size", 512))
    if plain and (plain >= min(micro_batch, sizes[-1]) or plain * block >= FULL_PASS_TOKENS):
        return False, plain
    return True, max(1, largest(True))
