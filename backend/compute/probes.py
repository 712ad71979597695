"""Probes: what training on a corpus changed inside the network, measured against its base.

Behaviour scores say what a model does; these say where it changed. Four probes, run by the
worker after evaluation while the base and the adapted model are both at hand:

1. weight change: per adapted matrix, the norm of the update (LoRA: scaling · B·A; `micro`: the
   trained weight minus its initialisation, rebuilt from the seed), its singular values, stable
   rank and effective rank. No forward pass.
2. attention: on short prompts cut from the battery, per layer and head, the entropy of the
   attention rows, the share on the previous and on the first token, and the Jensen–Shannon
   distance between the adapted and the base model's rows (eager attention, this pass only).
3. drift: linear CKA between the base's and the adapted model's residual stream per layer.
4. logit lens: for `choice` scenes with `depth`, the first layer from which the final norm and
   the output head, applied to the residual stream, keep preferring the right answer.

`run_probes` returns one JSON-ready dict; its shape is documented in docs/probes.md. This module
imports torch: only the worker and the benchmarks import it.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from backend.compute.models import Tokenizer, context_length
from backend.scoring.scenes import Battery, ChoiceScene, GenerateScene, PerplexityScene, choice_request

PROBES_VERSION = 1
_LAYER_RE = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class ProbeSettings:
    """How much of the battery the forward probes read; sized so probes cost a few percent of
    the evaluation (benchmarks/probes_bench.py measures the ratio)."""

    # 16 prompts and 16 lens scenes: 24 of each moved the demo's summaries by under 2% (the same
    # drift layer) for half as much again in time; probes stay under a tenth of the evaluation.
    max_prompts: int = 16  # prompts for attention and CKA, spread evenly over the batteries
    max_tokens: int = 48  # tokens per prompt (BOS included): short rows keep eager attention cheap
    max_lens_scenes: int = 16  # depth scenes read through the logit lens
    top_singular: int = 8  # singular values kept per matrix in the stored result
    batch_size: int = 8  # sequences per forward pass


# --- 1. weight change ----------------------------------------------------------------------


def matrix_stats(singular: torch.Tensor, shape: Sequence[int]) -> dict:
    """Norm, stable rank and effective rank of a matrix from its singular values.

    Stable rank = ||Δ||_F² / σ_max². Effective rank (Roy & Vetterli 2007) = exp of the entropy of
    σ_i / Σσ: 1 for a rank-1 matrix, n for n equal singular values. Singular values below the
    usual numerical-rank tolerance (σ_max · eps · max(shape)) count as zero, so a rank-1 update
    has effective rank 1, not 1.0001. A zero matrix has norm 0 and both ranks 0.
    """
    s = singular.detach().double().flatten().clamp_min(0)
    top = float(s.max()) if s.numel() else 0.0
    if top == 0.0:
        return {"norm": 0.0, "stable_rank": 0.0, "effective_rank": 0.0, "singular_values": []}
    tol = top * torch.finfo(singular.dtype if singular.is_floating_point() else torch.float32).eps * max(shape)
    s = torch.where(s > tol, s, torch.zeros_like(s))
    norm = float(torch.sqrt((s * s).sum()))
    p = s / s.sum()
    entropy = float(-torch.special.xlogy(p, p).sum())
    return {
        "norm": norm,
        "stable_rank": norm * norm / (top * top),
        "effective_rank": math.exp(entropy),
        "singular_values": [float(v) for v in s[s > 0]],
    }


def lora_singular_values(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values of scaling · B·A (B: out×r, A: r×in) without forming the out×in matrix:
    with B = Q_b R_b and Aᵀ = Q_a R_a, B·A = Q_b (R_b R_aᵀ) Q_aᵀ, so σ(B·A) = σ(R_b R_aᵀ), r×r."""
    # in fp64: r×r costs nothing, and on a card TF32 would round the product to 10 bits, far
    # above the cut-off that separates a rank's singular values from zero
    _, r_b = torch.linalg.qr(b.detach().double())
    _, r_a = torch.linalg.qr(a.detach().double().T)
    return (torch.linalg.svdvals(r_b @ r_a.T) * abs(float(scaling))).float()


def _module_entry(name: str, singular: torch.Tensor, shape: Sequence[int], base_norm: float | None, top: int) -> dict:
    stats = matrix_stats(singular, shape)
    layer = _LAYER_RE.search("." + name + ".")
    return {
        "module": name,
        "layer": int(layer.group(1)) if layer else None,
        "kind": name.rsplit(".", 1)[-1],
        "shape": [int(d) for d in shape],
        "norm": stats["norm"],
        "base_norm": base_norm,
        "rel_norm": stats["norm"] / base_norm if base_norm else None,
        "stable_rank": stats["stable_rank"],
        "effective_rank": stats["effective_rank"],
        "singular_values": stats["singular_values"][:top],
    }


def lora_weight_change(model, top: int = 8) -> list[dict]:
    """One entry per LoRA-adapted module of a PEFT model (its active adapter)."""
    from peft.tuners.lora import LoraLayer

    entries = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            sv = lora_singular_values(a, b, module.scaling[adapter])
            weight = getattr(module.get_base_layer(), "weight", None)
            base_norm = None
            if weight is not None and weight.is_floating_point() and weight.dim() == 2:
                base_norm = float(weight.detach().float().norm())  # a 4-bit weight has none to give
            short = re.sub(r"^(base_model\.model\.)", "", name)
            entries.append(_module_entry(short, sv, (b.shape[0], a.shape[1]), base_norm, top))
    return entries


def full_weight_change(model, initial, top: int = 8) -> list[dict]:
    """One entry per weight matrix: the trained model minus its initialisation (micro)."""
    start = dict(initial.named_parameters())
    entries = []
    for name, p in model.named_parameters():
        if p.dim() != 2 or name not in start:
            continue
        w0 = start[name].detach().float()
        delta = p.detach().float() - w0.to(p.device)
        sv = torch.linalg.svdvals(delta)
        entries.append(_module_entry(name.removesuffix(".weight"), sv, tuple(p.shape), float(w0.norm()), top))
    return entries


# --- 2. attention --------------------------------------------------------------------------


def attention_sums(base: torch.Tensor, adapted: torch.Tensor, lengths: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per-head sums over the query rows of a batch, for one layer.

    `base`, `adapted`: attention weights (batch, heads, T, T), right-padded to T; `lengths`: the
    real length of each sequence. Rows 1..len-1 are counted (row 0 can only look at itself).
    Returns sums (heads,) of entropy (nats) for each model, of the share on the previous and on
    the first token for each model, of the Jensen–Shannon distance (base 2, in [0, 1]) between
    the two models' rows, and the number of rows.
    """
    bsz, heads, t, _ = base.shape
    pos = torch.arange(t, device=base.device)
    lens = torch.as_tensor(list(lengths), device=base.device)
    rows = ((pos[None, :] >= 1) & (pos[None, :] < lens[:, None])).to(torch.float64)  # (B, T)
    w = rows[:, None, :]  # broadcast over heads
    p, q = base.double(), adapted.double()

    def entropy(a):
        return -torch.special.xlogy(a, a).sum(-1)

    def prev(a):
        d = torch.diagonal(a, offset=-1, dim1=-2, dim2=-1)  # a[..., t, t-1] for t = 1..T-1
        return F.pad(d, (1, 0))

    m = 0.5 * (p + q)
    jsd = 0.5 * (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum(-1)
    jsd += 0.5 * (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum(-1)
    js = torch.sqrt((jsd / math.log(2)).clamp(0, 1))
    out = {
        "entropy_base": entropy(p),
        "entropy_adapter": entropy(q),
        "prev_base": prev(p),
        "prev_adapter": prev(q),
        "first_base": p[..., 0],
        "first_adapter": q[..., 0],
        "js": js,
    }
    sums = {k: (torch.nan_to_num(v) * w).sum(dim=(0, 2)).cpu() for k, v in out.items()}
    sums["rows"] = rows.sum().cpu().expand(heads).clone()
    return sums


# --- 3. drift ------------------------------------------------------------------------------


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Linear CKA (Kornblith et al. 2019) between two (samples × features) matrices; 1 for the
    same representation up to rotation and scale, None when either has no variance."""
    x = x.double()
    y = y.double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    if x.shape[0] <= max(x.shape[1], y.shape[1]):  # the n×n Gram form is cheaper
        k, l_ = x @ x.T, y @ y.T
        hsic, kk, ll = (k * l_).sum(), (k * k).sum(), (l_ * l_).sum()
    else:
        hsic = ((y.T @ x) ** 2).sum()
        kk, ll = ((x.T @ x) ** 2).sum(), ((y.T @ y) ** 2).sum()
    denom = math.sqrt(float(kk) * float(ll))
    if denom == 0.0 or not math.isfinite(denom):
        return None
    return min(1.0, float(hsic) / denom)


# --- the model's parts ---------------------------------------------------------------------


def _inner(model):
    """The transformers model under a PEFT wrapper (the same object when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _parts(model):
    """(embedding module, decoder layers, final norm, output head) of a causal LM."""
    inner = _inner(model)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else inner.model
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None) or getattr(decoder, "ln_f", None)
    if layers is None or norm is None:
        raise ValueError(f"{type(inner).__name__}: no decoder layers or final norm found to probe")
    return inner.get_input_embeddings(), list(layers), norm, inner.get_output_embeddings()


@contextmanager
def eager_attention(model):
    """Eager attention (which can return its weights) for the probe pass only, then back."""
    inner = _inner(model)
    before = getattr(inner.config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(inner, "set_attn_implementation")
    if switch:
        inner.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            inner.set_attn_implementation(before)


@contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()  # no dropout in LoRA's input while probing
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def _forward(model, batch: list[list[int]], pad_id: int, device, attentions: bool):
    """Residual stream after the embedding and after each block: a list of (B, T, d) tensors,
    plus the attention weights per block when asked."""
    embed, layers, _, _ = _parts(model)
    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    hidden: list[torch.Tensor | None] = [None] * (len(layers) + 1)

    def keep(index):
        def hook(module, args, output):  # noqa: ARG001 - hook signature
            hidden[index] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    handles = [embed.register_forward_hook(keep(0))]
    handles += [layer.register_forward_hook(keep(i + 1)) for i, layer in enumerate(layers)]
    try:
        out = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), output_attentions=attentions, use_cache=False
        )
    finally:
        for h in handles:
            h.remove()
    return hidden, (list(out.attentions) if attentions else None)


def _as_base(adapted, base):
    """The base as a model to run: a separate network (micro) or the adapter switched off."""
    if base is not None:
        return nullcontext(base)
    return _disabled(adapted)


@contextmanager
def _disabled(adapted):
    with adapted.disable_adapter():
        yield adapted


# --- prompts -------------------------------------------------------------------------------


def probe_texts(batteries: Sequence[Battery], limit: int) -> list[str]:
    """Texts of the battery's scenes (a choice scene's context, a prompt, a held-out text),
    without repeats, `limit` of them spread evenly over the batteries in order."""
    seen: dict[str, None] = {}
    for battery in batteries:
        for scene in battery.scenes:
            if isinstance(scene, ChoiceScene):
                text = choice_request(scene)[0]
            elif isinstance(scene, GenerateScene):
                text = scene.prompt
            elif isinstance(scene, PerplexityScene):
                text = scene.text
            else:
                continue
            if text.strip():
                seen.setdefault(text, None)
    texts = list(seen)
    if len(texts) <= limit:
        return texts
    step = len(texts) / limit
    return [texts[int(i * step)] for i in range(limit)]


def _encode(tok: Tokenizer, text: str, max_tokens: int) -> list[int]:
    ids = tok.encode(text)
    if tok.bos_id is not None:
        ids = [tok.bos_id] + ids
    return ids[:max_tokens]


# --- the probe pass ------------------------------------------------------------------------


def attention_and_drift(adapted, base, tok: Tokenizer, batteries, *, device, settings: ProbeSettings) -> dict:
    """Attention statistics per layer and head and CKA per layer, base against adapted."""
    max_tokens = min(settings.max_tokens, context_length(_inner(adapted)))
    seqs = [s for s in (_encode(tok, t, max_tokens) for t in probe_texts(batteries, settings.max_prompts)) if len(s) >= 3]
    if not seqs:
        return {"prompts": 0, "tokens": 0, "attention": None, "cka": []}
    sums: list[dict[str, torch.Tensor]] | None = None
    states_base: list[list[torch.Tensor]] = []
    states_adapted: list[list[torch.Tensor]] = []
    for start in range(0, len(seqs), settings.batch_size):
        batch = seqs[start : start + settings.batch_size]
        lengths = [len(s) for s in batch]
        with _as_base(adapted, base) as model:
            h_base, a_base = _forward(model, batch, tok.pad_id, device, attentions=True)
        h_adapted, a_adapted = _forward(adapted, batch, tok.pad_id, device, attentions=True)
        layer_sums = [attention_sums(pb, qa, lengths) for pb, qa in zip(a_base, a_adapted)]
        if sums is None:
            sums = layer_sums
        else:
            for acc, add in zip(sums, layer_sums):
                for k in acc:
                    acc[k] += add[k]
        # the residual stream at the real positions past the first (the first token is the same
        # BOS everywhere, and its huge activations would dominate CKA)
        keep = [(row, pos) for row, n in enumerate(lengths) for pos in range(1, n)]
        rows = torch.tensor([r for r, _ in keep])
        cols = torch.tensor([c for _, c in keep])
        states_base.append([h[rows, cols].float().cpu() for h in h_base])
        states_adapted.append([h[rows, cols].float().cpu() for h in h_adapted])
    n_layers = len(sums)
    attention = {}
    for key in ("entropy_base", "entropy_adapter", "prev_base", "prev_adapter", "first_base", "first_adapter", "js"):
        attention[key] = [_rounded((s[key] / s["rows"].clamp_min(1)).tolist()) for s in sums]
    attention["entropy_delta"] = [
        _rounded([a - b for a, b in zip(ad, ba)])
        for ad, ba in zip(attention["entropy_adapter"], attention["entropy_base"])
    ]
    cka = []
    for layer in range(n_layers + 1):
        x = torch.cat([chunk[layer] for chunk in states_base])
        y = torch.cat([chunk[layer] for chunk in states_adapted])
        value = linear_cka(x, y)
        cka.append(None if value is None else round(value, 6))
    return {
        "prompts": len(seqs),
        "tokens": int(sum(s["rows"][0] for s in sums[:1])),
        "attention": attention,
        "cka": cka,
    }


@torch.no_grad()
def _lens_logliks(model, tok: Tokenizer, requests: list[tuple[list[int], list[int]]], device) -> list[list[float]]:
    """For each (context, continuation) pair, the continuation's log-likelihood read through the
    logit lens at every depth 0..L (0: the embeddings; L: the model's own output). Batched as
    evaluation batches choices (`backend.compute.evaluate.pair_batches`): a scene's context once with
    all its choices in one row, rows packed end to end and cut by tokens."""
    from backend.compute.evaluate import forward_params, pair_batches

    embed, layers, norm, head = _parts(model)
    hidden: list[torch.Tensor | None] = [None] * (len(layers) + 1)

    def keep(index):
        def hook(module, args, output):  # noqa: ARG001 - hook signature
            hidden[index] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    ll = torch.zeros((len(requests), len(hidden)), dtype=torch.float64, device=device)
    handles = [embed.register_forward_hook(keep(0))]
    handles += [layer.register_forward_hook(keep(i + 1)) for i, layer in enumerate(layers)]
    try:
        # the hooks read the hidden states: the model's own logits need only its last position
        extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_params(model) else {}
        for ids, mask, pos, flat, target, req in pair_batches(model, requests, device=device, pad_id=tok.pad_id):
            model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **extra)
            for depth, h in enumerate(hidden):
                picked = h.reshape(-1, h.shape[-1]).index_select(0, flat)
                logprobs = F.log_softmax(head(norm(picked).to(head.weight.dtype)).float(), dim=-1)
                ll[:, depth].index_add_(0, req, logprobs.gather(1, target[:, None]).squeeze(1).double())
    finally:
        for h in handles:
            h.remove()
    return ll.tolist()


def logit_lens(adapted, base, tok: Tokenizer, batteries, *, device, settings: ProbeSettings) -> dict:
    """Per depth scene: at which depth base and adapter first prefer the right answer for good."""
    from backend.compute.evaluate import encode_pair

    scenes = [
        (battery.name, s)
        for battery in batteries
        for s in battery.scenes
        if isinstance(s, ChoiceScene) and s.depth is not None
    ][: settings.max_lens_scenes]
    if not scenes:
        return {"scenes": [], "first_layer": {"base": None, "adapter": None}, "answered": {"base": 0, "adapter": 0}}
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    requests = []
    for _, scene in scenes:
        context, continuations = choice_request(scene)
        for c in continuations:
            ctx, cont = encode_pair(tok, context, c)
            requests.append((ctx or ([prefix] if prefix is not None else []), cont))
    with _as_base(adapted, base) as model:
        lls_base = _lens_logliks(model, tok, requests, device)
    lls_adapted = _lens_logliks(adapted, tok, requests, device)
    rows = []
    pos = 0
    for battery_name, scene in scenes:
        n = len(scene.choices)
        row = {"battery": battery_name, "scene_id": scene.id, "depth": scene.depth, "answer": scene.answer}
        for label, lls in (("base", lls_base), ("adapter", lls_adapted)):
            per_choice = lls[pos : pos + n]
            prefers = [
                max(range(n), key=lambda i, d=depth: per_choice[i][d]) == scene.answer
                for depth in range(len(per_choice[0]))
            ]
            row[label] = {"prefers": prefers, "first_layer": _first_for_good(prefers)}
        rows.append(row)
        pos += n
    summary = {}
    answered = {}
    for label in ("base", "adapter"):
        firsts = [r[label]["first_layer"] for r in rows if r[label]["first_layer"] is not None]
        summary[label] = round(sum(firsts) / len(firsts), 3) if firsts else None
        answered[label] = len(firsts)
    return {"scenes": rows, "first_layer": summary, "answered": answered}


def _first_for_good(prefers: list[bool]) -> int | None:
    """The first depth from which every later depth prefers the answer; None if the output
    (the last depth) does not."""
    first = None
    for depth in range(len(prefers) - 1, -1, -1):
        if not prefers[depth]:
            break
        first = depth
    return first


def run_probes(
    adapted,
    tok: Tokenizer,
    batteries: Sequence[Battery],
    *,
    device,
    base=None,
    settings: ProbeSettings | None = None,
) -> dict:
    """Every probe of an adapted model against its base.

    `adapted` is a PEFT model (its base: the same model with the adapter switched off) or, with
    `base` given, a trained network compared with `base`, its initialisation (micro).
    """
    from backend.compute.evaluate import (
        one_thread,  # small models on the CPU: one thread, as evaluation
    )

    settings = settings or ProbeSettings()
    t0 = time.perf_counter()
    with one_thread(adapted, device), _eval_mode(adapted), (_eval_mode(base) if base is not None else nullcontext()):
        if base is not None:
            weight = full_weight_change(adapted, base, settings.top_singular)
        else:
            weight = lora_weight_change(adapted, settings.top_singular)
        weight_seconds = time.perf_counter() - t0
        with eager_attention(adapted), (eager_attention(base) if base is not None else nullcontext()):
            drift = attention_and_drift(adapted, base, tok, batteries, device=device, settings=settings)
        lens = logit_lens(adapted, base, tok, batteries, device=device, settings=settings)
    seconds = time.perf_counter() - t0
    result = {
        "version": PROBES_VERSION,
        "method": "full" if base is not None else "lora",
        "layers": len(_parts(adapted)[1]),
        "heads": len(drift["attention"]["js"][0]) if drift["attention"] else 0,
        "prompts": drift["prompts"],
        "tokens": drift["tokens"],
        "weight": weight,
        "attention": drift["attention"],
        "cka": drift["cka"],
        "logit_lens": lens,
        "seconds": round(seconds, 3),
        "weight_seconds": round(weight_seconds, 3),
    }
    result["summary"] = summarize(result)
    return result


def summarize(probes: dict) -> dict:
    """The headline numbers (the results table's columns) from a probe result."""
    weight = probes.get("weight") or []
    total = math.sqrt(sum(e["norm"] ** 2 for e in weight))
    rel = [e for e in weight if e.get("base_norm")]
    base_sq = sum(e["base_norm"] ** 2 for e in rel)
    attn = probes.get("attention") or {}
    delta = [v for row in attn.get("entropy_delta") or [] for v in row]
    js = [v for row in attn.get("js") or [] for v in row]
    cka = probes.get("cka") or []
    scored = [(v, i) for i, v in enumerate(cka) if v is not None]
    lowest = min(scored) if scored else None
    lens = probes.get("logit_lens") or {}
    first = lens.get("first_layer") or {}
    return {
        "weight_change": round(total, 6),
        "weight_rel_change": round(math.sqrt(sum(e["norm"] ** 2 for e in rel) / base_sq), 6) if base_sq else None,
        "attn_entropy_change": round(sum(delta) / len(delta), 6) if delta else None,
        "attn_js": round(sum(js) / len(js), 6) if js else None,
        # no layer "drifts most" when every layer is unchanged
        "drift_layer": lowest[1] if lowest and lowest[0] < 1.0 - 1e-9 else None,
        "min_cka": lowest[0] if lowest else None,
        "mean_cka": round(sum(v for v, _ in scored) / len(scored), 6) if scored else None,
        "lens_layer_base": first.get("base"),
        "lens_layer_adapter": first.get("adapter"),
        "seconds": probes.get("seconds"),
    }


def _rounded(values: list[float]) -> list[float]:
    return [round(float(v), 6) for v in values]

