"""The testbench: run batteries of scenes on a model and score them.

- `choice` scenes: log-likelihood of each choice after the context, with lm-evaluation-harness's
  conventions (continuation tokens = tokens of context+choice past the context's tokens; acc,
  and acc_norm = log-likelihood per character). A scene's context is computed once, its
  choices in the same row; rows are packed end to end and batched by tokens.
- `generate` scenes: greedy decoding of every battery's prompts in one batch over a KV cache,
  then the scene's checks; novelty completions are also scored by the base model on the
  generated tokens, which gates them on fluency.
- `perplexity` scenes: mean per-token loss of the text, all texts batched.
- general text (`data/general/`): loss of the model and of its base, for `forgetting`.

On a card the batches are sized from the memory this process may still fill
(`memory_fit.eval_batch_tokens`); a batch that runs out of memory anyway is split in two and run
again (`_split_on_oom`), down to one row, so a job that has trained for an hour does not fail in
its scoring; later batches as large as one that ran out are split before they run. Logits of a
half-precision output layer are computed in fp32 for the positions scored (`_fp32_logits`).
`LTM_FAULT_EVAL_OOM_ABOVE=N` makes any batch of more than N padded tokens raise out-of-memory,
to test that path on a CPU.

Scores with their bootstrap intervals come from `backend.scoring.measures.score_run`. While it
runs, an `EvalProgress` counts the scenes done (a completion when it is decoded, any other scene
when it is scored) and sends `eval_progress` events {done, total, eta_s} at most once a second.
"""

from __future__ import annotations

import bisect
import gc
import inspect
import math
import os
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from backend.compute.models import Tokenizer, context_length
from backend.scoring import measures
from backend.scoring.scenes import Battery, ChoiceScene, GenerateScene, PerplexityScene, choice_request, run_check

# A completion is fluent when the base model's perplexity on it (given its prompt) is at most
# this many times the base's perplexity on ordinary general text: word salad scores hundreds of
# times worse, an unusual but well-formed sentence a few times worse.
FLUENCY_RATIO = 4.0
GENERAL_DIR = Path(__file__).resolve().parents[2] / "data" / "general"


@dataclass(frozen=True)
class LoglikRequest:
    context: str
    continuation: str


# A choice or perplexity scene costs about as much as decoding this many tokens of one
# completion (micro tiny and small on the CPU: 8 to 9); the ETA uses it only until it has timed
# some scoring of its own.
SCORE_TOKENS_PRIOR = 8.0
PROGRESS_SECONDS = 1.0  # the least time between two eval_progress events (the last one aside)


def eval_eta(decode: tuple[float, float, float], score: tuple[float, float, float],
             prior: float = SCORE_TOKENS_PRIOR) -> float | None:
    """Seconds left of an evaluation from its two kinds of work, each as (seconds spent, units
    done, units in all): decoding in completion tokens (a row's unused budget counts once it
    stops), scoring in scenes. Each kind's pace is its own so far; scoring that has not begun
    is priced at `prior` decoded tokens a scene. None while no pace is known."""
    (d_seconds, d_done, d_total), (s_seconds, s_done, s_total) = decode, score
    decode_pace = d_seconds / d_done if d_done else None
    score_pace = s_seconds / s_done if s_done else (decode_pace * prior if decode_pace is not None else None)
    left = 0.0
    for pace, remaining in ((decode_pace, d_total - d_done), (score_pace, s_total - s_done)):
        if remaining > 0:
            if pace is None:
                return None
            left += pace * remaining
    return left


class EvalProgress:
    """How far an evaluation is: scenes done of all the batteries' scenes, sent through `emit`
    (the worker's events) as `eval_progress` {done, total, eta_s} at most once every `every`
    seconds, and once more by `finish()`. The time between two reports is charged to the work
    the second one reports, which gives each kind of work its own pace for the ETA."""

    def __init__(self, batteries: Sequence[Battery], emit: Callable[..., Any] | None, *,
                 every: float = PROGRESS_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        scenes = [s for b in batteries for s in b.scenes]
        generate = [s for s in scenes if isinstance(s, GenerateScene)]
        self.total, self.done = len(scenes), 0
        self.emit, self.every, self.clock = emit, every, clock
        # [seconds, done, in all] of each kind of work
        self._decode = [0.0, 0, sum(s.max_new_tokens for s in generate)]
        self._score = [0.0, 0, len(scenes) - len(generate)]
        self._mark = self._sent = clock()

    def expect(self, extra_units: int) -> None:
        """Scoring work to come that is no scene (the general text of `forgetting`), reported
        by `scored(0, extra_units)`."""
        self._score[2] += extra_units

    def decoded(self, tokens: int, finished: int = 0) -> None:
        """`tokens` more completion tokens decoded (with the unused budget of rows that stopped),
        of which `finished` completions are now whole."""
        self._charge(self._decode, tokens)
        self.done += finished
        self._maybe_send()

    def withdraw(self, tokens: int, finished: int) -> None:
        """Take back what `decoded` was told of a batch that ran out of memory and is decoded
        again in halves; the time it took stays charged, as time the decoding spent."""
        self._decode[1] -= tokens
        self.done -= finished

    def scored(self, scenes: int, extra_units: int = 0) -> None:
        """`scenes` more scenes scored (and `extra_units` of scoring that is no scene)."""
        self._charge(self._score, scenes + extra_units)
        self.done += scenes
        self._maybe_send()

    def finish(self) -> None:
        self.done = self.total
        self._send(0.0)

    def eta(self) -> float | None:
        return eval_eta(tuple(self._decode), tuple(self._score))

    def _charge(self, work: list, units: int) -> None:
        now = self.clock()
        work[0] += now - self._mark
        work[1] += units
        self._mark = now

    def _maybe_send(self) -> None:
        if self.clock() - self._sent >= self.every:
            self._send(self.eta())

    def _send(self, eta: float | None) -> None:
        self._sent = self.clock()
        if self.emit is not None:
            self.emit("eval_progress", done=min(self.done, self.total), total=self.total,
                      eta_s=None if eta is None else round(eta, 1))


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation, then
    the continuation is whatever tokens of context+continuation lie past the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return whole[: len(ctx)], whole[len(ctx) :]


# Padded tokens (rows × width) in one forward pass when scoring or generating; a batch of
# rows this size fits in well under a gigabyte of activations on the micro presets and on a 1B
# model, and keeps two CPU cores busy without paging.
BATCH_TOKENS = 16384
# On a GPU, `evaluate_all` sets the batch from the memory plan for the whole evaluation
# (backend.compute.memory_fit.eval_batch_tokens); a function called without max_tokens uses it.
_BATCH_TOKENS: ContextVar[int] = ContextVar("batch_tokens", default=BATCH_TOKENS)
FAULT_OOM_ENV = "LTM_FAULT_EVAL_OOM_ABOVE"  # see the module docstring


def _split_on_oom(batches: Sequence[list[int]], run: Callable[[list[int]], None], device,
                  tokens: Callable[[list[int]], int]) -> None:
    """`run` each batch of indices in order; one that runs out of memory is split in two and
    its halves run in its place (one row that does not fit is the error it was). Each batch's
    results are its own, so a batch run again in halves gives the same numbers. What did not
    fit is remembered: a later batch of as many padded tokens (`tokens`) as one that ran out is
    split before it runs, so an optimistic batch size costs one failed pass, not one a batch."""
    stack = [list(idx) for idx in reversed(batches)]
    too_many: int | None = None  # the fewest padded tokens a batch ran out of memory with
    while stack:
        idx = stack.pop()
        if too_many is None or len(idx) == 1 or tokens(idx) < too_many:
            try:
                run(idx)
                continue
            except torch.OutOfMemoryError:
                if len(idx) == 1:
                    raise
            too_many = tokens(idx) if too_many is None else min(too_many, tokens(idx))
            # out here, where no traceback holds the failed pass's tensors
            gc.collect()
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
        half = len(idx) // 2
        stack += [idx[half:], idx[:half]]


def _fault_oom(tokens: int) -> None:
    raw = os.environ.get(FAULT_OOM_ENV, "").strip()
    if raw and tokens > int(raw):
        raise torch.OutOfMemoryError(f"{FAULT_OOM_ENV}={raw}: a batch of {tokens} padded tokens")


def clip_pair(ctx: Sequence[int], cont: Sequence[int], max_len: int, max_cont: int | None = None) -> tuple[list[int], list[int]]:
    """Fit a (context, continuation) pair in the model's window of `max_len` tokens.

    The continuation keeps its first `max_cont` tokens (default: the window), and the context
    its last tokens that still fit: lm-eval's left truncation, which for a continuation no
    longer than the window is exactly what `(ctx + cont)[-(max_len + 1):][:-1]` feeds. Without
    the clip, a continuation longer than the window would be scored against the wrong positions.
    """
    cont = list(cont[: min(max_len, max_cont or max_len)])
    keep = max_len + 1 - len(cont)
    ctx = list(ctx[-keep:]) if ctx else []
    if not ctx:
        raise ValueError("a continuation needs at least one context token (the tokenizer has no BOS or EOS)")
    return ctx, cont


@dataclass
class _Row:
    """One sequence of a forward pass: a context, then several continuations that each see the
    context and themselves only (segments 1, 2, ...; the context is segment 0)."""

    ids: list[int]
    seg: list[int]
    pos: list[int]
    targets: list[tuple[int, int, int]]  # (index in the row, target token, request)
    doc: list[int] = field(default_factory=list)  # packed rows: which one each token is of


def _pack(rows: Sequence[_Row]) -> list[_Row]:
    """Rows laid end to end in lines as wide as the widest row (best fit, longest first): a
    batch then holds rows, not padding. A token sees only tokens of its own row (`doc`)."""
    width = max((len(r.ids) for r in rows), default=0)
    lines: list[_Row] = []
    free: list[tuple[int, int]] = []  # (room left, line), ascending
    for r in sorted(rows, key=lambda r: -len(r.ids)):
        n = len(r.ids)
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            lines.append(_Row([], [], [], [], []))
            room, k = width, len(lines) - 1
        else:
            room, k = free.pop(at)
        line = lines[k]
        offset, doc = len(line.ids), (line.doc[-1] + 1 if line.doc else 0)
        line.ids += r.ids
        line.seg += r.seg
        line.pos += r.pos
        line.doc += [doc] * n
        line.targets += [(p + offset, t, q) for p, t, q in r.targets]
        if room - n > 0:
            bisect.insort(free, (room - n, k))
    return lines


def _attention(model) -> str:
    """The model's attention kernel: "sdpa" and "eager" take a custom 4D mask (a bool one and
    an additive one), so a scene's choices can share their context's row; any other kernel
    (flash attention) takes padding masks only, and each request gets a row of its own."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = getattr(inner.config, "_attn_implementation", None) or "eager"
    return impl if impl in ("eager", "sdpa") else "other"


def _compute_dtype(model) -> torch.dtype:
    """The dtype activations have: the embeddings' (a 4-bit base keeps them in bf16/fp16/fp32)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return weight.dtype if weight is not None and weight.dtype.is_floating_point else torch.float32


def _pair_rows(pairs: Sequence[tuple[list[int], list[int]]], max_len: int, share: bool) -> list[_Row]:
    """Requests with the same context tokens packed into one row: the context once, then each
    continuation but its last token, with positions restarting after the context."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        groups.setdefault(tuple(ctx) if share else (i,), []).append(i)
    rows: list[_Row] = []
    for members in groups.values():
        ctx = pairs[members[0]][0]
        row: _Row | None = None
        segments = 0
        for i in members:
            cont = pairs[i][1]
            if row is None or len(row.ids) + len(cont) - 1 > max_len:
                row = _Row(list(ctx), [0] * len(ctx), list(range(len(ctx))), [])
                rows.append(row)
                segments = 0
            segments += 1
            before = len(row.ids)
            row.targets.append((len(ctx) - 1, cont[0], i))
            for j, t in enumerate(cont[1:]):  # token j + 1 is predicted where token j sits
                row.targets.append((before + j, t, i))
            row.ids += cont[:-1]
            row.seg += [segments] * (len(cont) - 1)
            row.pos += range(len(ctx), len(ctx) + len(cont) - 1)
    return rows


def _batches(lengths: Sequence[int], max_tokens: int, max_rows: int | None) -> list[list[int]]:
    """Row indices longest first, cut into batches of at most `max_tokens` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= max_tokens and (max_rows is None or len(out[-1]) < max_rows):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _head_gather(model, flat: torch.Tensor) -> list | None:
    """Have the output layer project only the hidden states at `flat` (indices into the batch
    flattened to rows × width): logits for the scored positions, not for every token. Where the
    layer's weights are in half precision (a bf16 base on a card), those logits are computed
    again in fp32 (`_fp32_logits`). Returns the hooks' handles (None: the model has no output
    layer to hook)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None

    def pre_hook(module, args):
        h = args[0]
        return (h.reshape(-1, h.shape[-1]).index_select(0, flat).unsqueeze(0), *args[1:])

    def in_fp32(module, args, output):
        return _fp32_logits(args[0], module) if output.dtype != torch.float32 else None

    hooks = [head.register_forward_pre_hook(pre_hook)]
    if type(head) is torch.nn.Linear:  # a plain layer: an adapter's (LoRA on the head) has more than its weight
        hooks.append(head.register_forward_hook(in_fp32))
    return hooks


# Rows of the output layer's weight cast to fp32 at a time (a 128k × 4096 head would be 2 GB in
# fp32 at once; 16k rows are 268 MB).
HEAD_CHUNK = 16384


def _fp32_logits(h: torch.Tensor, head) -> torch.Tensor:
    """The output layer on `h` in fp32: the scores' log-probabilities from logits rounded to
    bf16 would be off by up to 0.06 nats a token (bf16 keeps 8 bits: logits between 16 and 32
    step by 0.125), noise that piles up over a continuation's tokens and can flip a close
    choice. The bf16 inputs and weights are exact in fp32; only the products and sums gain."""
    weight, bias = head.weight, getattr(head, "bias", None)
    h = h.float()
    out = torch.empty(*h.shape[:-1], weight.shape[0], dtype=torch.float32, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        for i in range(0, weight.shape[0], HEAD_CHUNK):
            out[..., i : i + HEAD_CHUNK] = F.linear(h, weight[i : i + HEAD_CHUNK].float())
    return out if bias is None else out.add_(bias.float())


def _row_batch(rows: Sequence[_Row], idx: Sequence[int], *, device, pad_id: int, kernel: str, dtype):
    """The tensors of one batch of rows: ids, attention mask (4D: a token sees its own row only,
    and a continuation its context and itself; 2D padding for other kernels), positions, and
    for the targets their flat index (row × width + position), token and request."""
    width = len(rows[idx[0]].ids)
    b = len(idx)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    seg = torch.full((b, width), -1, dtype=torch.long)
    doc = torch.zeros((b, width), dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    flat, tgt, req = [], [], []
    for k, i in enumerate(idx):
        r = rows[i]
        n = len(r.ids)
        ids[k, :n] = torch.tensor(r.ids)
        seg[k, :n] = torch.tensor(r.seg)
        pos[k, :n] = torch.tensor(r.pos)
        if r.doc:
            doc[k, :n] = torch.tensor(r.doc)
        for p, t, q in r.targets:
            flat.append(k * width + p)
            tgt.append(t)
            req.append(q)
    ids, seg, doc, pos = ids.to(device), seg.to(device), doc.to(device), pos.to(device)
    if kernel == "other":  # one request a row: a padding mask is all it needs
        mask = (seg >= 0).long()
    else:
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        sq, sk = seg[:, :, None], seg[:, None, :]
        same_row = doc[:, :, None] == doc[:, None, :]
        allowed = causal & same_row & ((sk == 0) | (sk == sq)) & (sk >= 0)
        allowed |= torch.eye(width, dtype=torch.bool, device=device)  # padding sees itself: no empty rows
        if kernel == "sdpa":
            mask = allowed[:, None]
        else:
            mask = torch.zeros((b, 1, width, width), dtype=dtype, device=device)
            mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return ids, mask, pos, as_tensor(flat), as_tensor(tgt), as_tensor(req)


def pair_batches(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, device, pad_id: int,
                 max_cont: int | None = None, max_tokens: int | None = None, max_rows: int | None = None):
    """Token pairs (context, continuation) as forward-pass batches: each pair clipped to the
    window (`clip_pair`), pairs with the same context in one row (`_pair_rows`), rows packed
    (`_pack`) and cut by tokens. Yields (input_ids, attention_mask, position_ids, flat, target,
    request) per batch (see `_row_batch`)."""
    max_len = context_length(model)
    kernel = _attention(model)
    rows = _pair_rows([clip_pair(c, x, max_len, max_cont) for c, x in pairs], max_len, kernel != "other")
    batches, build = _row_plan(model, rows, device=device, pad_id=pad_id, max_tokens=max_tokens, max_rows=max_rows)
    for idx in batches:
        yield build(idx)


def _row_plan(model, rows: Sequence[_Row], *, device, pad_id: int, max_tokens: int | None,
              max_rows: int | None) -> tuple[list[list[int]], Callable[[list[int]], tuple]]:
    """(batches of row indices cut by tokens, the function that makes one batch's tensors):
    rows packed end to end first where the attention kernel takes a mask (`_pack`)."""
    kernel, dtype = _attention(model), _compute_dtype(model)
    if kernel != "other":
        rows = _pack(rows)
    batches = _batches([len(r.ids) for r in rows], max_tokens or _BATCH_TOKENS.get(), max_rows)
    return batches, lambda idx: _row_batch(rows, idx, device=device, pad_id=pad_id, kernel=kernel, dtype=dtype)


def _score_rows(model, rows: Sequence[_Row], n_out: int, *, device, pad_id: int, max_tokens: int | None,
                max_requests: int | None = None) -> tuple[list[float], list[bool], list[int]]:
    """(sum of target log-probs, all targets greedy, target count) per request over `rows`.

    Rows are packed end to end into lines as wide as the widest (`_pack`), which go in batches
    of at most `max_tokens` tokens (`_row_batch`); the output layer projects only the scored
    positions, and the results stay on the device until one copy to the host at the end.
    """
    ll = torch.zeros(n_out, dtype=torch.float64, device=device)
    misses = torch.zeros(n_out, dtype=torch.float64, device=device)
    count = torch.zeros(n_out, dtype=torch.float64, device=device)
    max_rows = None if max_requests is None else max(1, max_requests)  # the old batch size, as rows
    batches, build = _row_plan(model, rows, device=device, pad_id=pad_id, max_tokens=max_tokens, max_rows=max_rows)

    def run(idx: list[int]) -> None:
        ids, mask, pos, flat, tgt, req = build(idx)
        _fault_oom(ids.numel())
        hooks = _head_gather(model, flat)
        try:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        finally:
            for hook in hooks or ():
                hook.remove()
        logits = logits[0] if hooks is not None else logits.reshape(-1, logits.shape[-1]).index_select(0, flat)
        logp = F.log_softmax(logits.float(), dim=-1).gather(1, tgt[:, None]).squeeze(1)
        ll.index_add_(0, req, logp.double())
        misses.index_add_(0, req, (logits.argmax(dim=-1) != tgt).double())
        count.index_add_(0, req, torch.ones_like(logp, dtype=torch.float64))

    _split_on_oom(batches, run, device, tokens=lambda idx: len(idx) * max(len(rows[i].ids) for i in idx))
    return ll.tolist(), [m == 0 for m in misses.tolist()], [int(c) for c in count.tolist()]


@torch.inference_mode()
def score_pairs(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    device: torch.device,
    pad_id: int,
    max_cont: int | None = None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log-probs of the continuation, whether it is the greedy continuation) for token
    pairs (context, continuation), each clipped to the window (`clip_pair`; `max_cont` caps
    the continuation). Pairs that share their context tokens are scored in one row: the
    context is computed once, not once per choice."""
    max_len = context_length(model)
    clipped = [clip_pair(ctx, cont, max_len, max_cont) for ctx, cont in pairs]
    rows = _pair_rows(clipped, max_len, _attention(model) != "other")
    model.eval()
    ll, greedy, _ = _score_rows(model, rows, len(clipped), device=device, pad_id=pad_id, max_tokens=max_tokens,
                                max_requests=batch_size)
    return list(zip(ll, greedy))


def loglikelihoods(
    model,
    tok: Tokenizer,
    requests: Sequence[LoglikRequest],
    *,
    device: torch.device,
    batch_size: int | None = None,
    max_tokens: int | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log-probs of the continuation, whether it is the greedy continuation) per request,
    in the caller's order, with lm-evaluation-harness's tokenization (`encode_pair`).

    The choices of a scene share their context: it is scored once, in one row with every
    choice (`score_pairs`). Rows go longest first in batches of `max_tokens` padded tokens
    (`batch_size`, when given, caps the rows of a batch), so an out-of-memory error, if any,
    comes on the first batch.
    """
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    pairs = []
    for req in requests:
        ctx, cont = encode_pair(tok, req.context, req.continuation)
        if not ctx and prefix is not None:
            ctx = [prefix]  # lm-eval scores an empty context after the prefix token
        if not cont:
            raise ValueError(f"empty continuation for context {req.context[:40]!r}")
        pairs.append((ctx, cont))
    return score_pairs(model, pairs, device=device, pad_id=tok.pad_id, batch_size=batch_size, max_tokens=max_tokens)


@dataclass(frozen=True)
class Generation:
    text: str  # the completion as the scene's checks read it: cut at a blank line, stripped
    ids: tuple[int, ...]  # the tokens the model chose for it (at most max_new_tokens)


def _stop_text(tok: Tokenizer, new: list[int]) -> bool:
    return len(new) >= 2 and tok.decode(new[-4:]).endswith("\n\n")


def _kept_ids(tok: Tokenizer, new: list[int]) -> tuple[int, ...]:
    """The generated tokens without the blank line (and trailing spaces) that ended them."""
    end = len(new)
    while end and not tok.decode(new[end - 1 : end]).strip():
        end -= 1
    return tuple(new[:end])


# Evaluating a model this narrow or narrower on the CPU uses one intra-op thread (one_thread).
ONE_THREAD_HIDDEN = 1024


@contextmanager
def one_thread(model, device):
    """One intra-op thread while evaluating a small model on the CPU. A decoding step is some
    hundred tiny operations: a second thread gains little on each, and when another process (a
    training worker) holds the other core, every operation waits for that core to come free, so
    two threads can be many times slower than one (docs/benchmarks.md has the measurement)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = int(getattr(inner.config, "hidden_size", 0) or 0)
    before = torch.get_num_threads()
    if torch.device(device).type != "cpu" or hidden > ONE_THREAD_HIDDEN or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def generate_batch(
    model,
    tok: Tokenizer,
    prompts: Sequence[tuple[str, int]],
    *,
    device,
    max_tokens: int | None = None,
    progress: EvalProgress | None = None,
) -> list[Generation]:
    """Greedy continuations of (prompt, max_new_tokens) pairs, each cut at end-of-text or a
    blank line: the same tokens as decoding each prompt alone.

    Prompts are batched longest first (at most `max_tokens` prompt + new tokens a batch), left
    padded, with explicit positions so padding shifts nothing, and decoded over one KV cache;
    rows that have stopped leave the batch. `progress` hears of every decoding step.
    """
    window = context_length(model)
    encoded = []
    for prompt, max_new in prompts:
        ids = tok.encode(prompt)
        if tok.bos_id is not None and not ids:
            ids = [tok.bos_id]
        encoded.append(ids[-max(1, window - max_new) :])
    out: list[Generation] = [Generation("", ())] * len(prompts)
    name = _cache_argument(model)
    keep_one = "logits_to_keep" in forward_params(model)
    model.eval()
    sizes = [len(e) + prompts[i][1] for i, e in enumerate(encoded)]

    def tokens(idx: list[int]) -> int:
        return len(idx) * max(sizes[i] for i in idx)

    def run(idx: list[int]) -> None:  # each prompt's tokens are its own: a batch run again gives the same
        _fault_oom(tokens(idx))
        tally = _Tally(progress)
        try:
            _decode(model, tok, idx, encoded, prompts, out, device=device, name=name, keep_one=keep_one,
                    progress=tally)
        except torch.OutOfMemoryError:
            tally.take_back()  # its halves decode those tokens again, and report them
            raise

    with one_thread(model, device):
        _split_on_oom(_batches(sizes, max_tokens or _BATCH_TOKENS.get(), None), run, device, tokens)
    return out


class _Tally:
    """What one decoding batch has told `progress` (None: nobody listens), so that a batch that
    runs out of memory halfway can take it back before its halves decode the same tokens again."""

    def __init__(self, progress: EvalProgress | None) -> None:
        self.progress, self.tokens, self.finished = progress, 0, 0

    def decoded(self, tokens: int, finished: int = 0) -> None:
        self.tokens += tokens
        self.finished += finished
        if self.progress is not None:
            self.progress.decoded(tokens, finished)

    def take_back(self) -> None:
        if self.progress is not None:
            self.progress.withdraw(self.tokens, self.finished)


def _decode(model, tok: Tokenizer, idx: list[int], encoded, prompts, out: list, *, device, name: str, keep_one: bool,
            progress: "EvalProgress | _Tally | None" = None) -> None:
    """Greedy decoding of one batch of prompts (`generate_batch`), results into `out`."""
    b = len(idx)
    width = max(len(encoded[i]) for i in idx)
    x = torch.full((b, width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for k, i in enumerate(idx):
        x[k, width - len(encoded[i]) :] = torch.tensor(encoded[i])
        mask[k, width - len(encoded[i]) :] = 1
    x, mask = x.to(device), mask.to(device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    limits = [prompts[i][1] for i in idx]
    new: list[list[int]] = [[] for _ in idx]
    live = list(range(b))  # rows of the batch still decoding, in cache order
    past = None
    extra = {"logits_to_keep": 1} if keep_one else {}
    steps = 0
    while live:
        steps += 1
        kwargs = {name: past} if past is not None else {}
        res = model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True, **kwargs, **extra)
        past = res[name]
        nxt = res.logits[:, -1].argmax(dim=-1)
        still = []
        for k, t in zip(live, nxt.tolist()):
            if t == tok.eos_id:
                continue
            new[k].append(t)
            if len(new[k]) < limits[k] and not _stop_text(tok, new[k]):
                still.append(k)
        if progress is not None:  # a row that stopped early counts its unused budget as decoded
            going = set(still)
            unused = sum(limits[k] - steps for k in live if k not in going)
            progress.decoded(len(live) + unused, finished=len(live) - len(going))
        if not still:
            break
        if len(still) < len(live):  # drop finished rows from the cache, mask and positions
            keep = torch.tensor([live.index(k) for k in still], device=device)
            if hasattr(past, "batch_select_indices"):
                past.batch_select_indices(keep)
            else:
                past = _select_legacy(past, keep)
            mask, pos, nxt = mask.index_select(0, keep), pos.index_select(0, keep), nxt.index_select(0, keep)
            live = still
        x = nxt[:, None]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        pos = pos[:, -1:] + 1
    for k, i in enumerate(idx):
        out[i] = Generation(tok.decode(new[k]).split("\n\n")[0].strip(), _kept_ids(tok, new[k]))


def _select_legacy(past, keep: torch.Tensor):
    """Rows of a tuple-of-tuples KV cache (transformers before DynamicCache)."""
    return tuple(tuple(t.index_select(0, keep) for t in layer) for layer in past)


def generate_text(model, tok: Tokenizer, prompt: str, max_new_tokens: int, *, device) -> str:
    """Greedy continuation of `prompt`, cut at end-of-text or a blank line."""
    return generate_batch(model, tok, [(prompt, max_new_tokens)], device=device)[0].text


def forward_params(model) -> dict:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return dict(inspect.signature(inner.forward).parameters)


def _cache_argument(model) -> str:
    """`cache` in transformers 5.x, `past_key_values` before it."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def _text_rows(tok: Tokenizer, texts: Sequence[str], window: int) -> list[_Row]:
    """Each text (after BOS) cut into windows of the context length, one row each; every token
    but the first is a target of its text."""
    rows = []
    for q, text in enumerate(texts):
        ids = tok.encode(text)
        if tok.bos_id is not None:
            ids = [tok.bos_id] + ids
        for start in range(0, len(ids) - 1, window):
            chunk = ids[max(0, start - 1) : start + window] if start else ids[:window]
            rows.append(_Row(chunk, [0] * len(chunk), list(range(len(chunk))),
                             [(p, t, q) for p, t in enumerate(chunk[1:])]))
    return rows


@torch.inference_mode()
def text_losses(model, tok: Tokenizer, texts: Sequence[str], *, device, max_tokens: int | None = None) -> list[tuple[float, int]]:
    """(mean per-token loss in nats, tokens scored) per text, in windows of the context length,
    all texts' windows batched together; (nan, 0) for a text with fewer than two tokens."""
    model.eval()
    rows = _text_rows(tok, texts, context_length(model))
    ll, _, count = _score_rows(model, rows, len(texts), device=device, pad_id=tok.pad_id, max_tokens=max_tokens)
    return [(-s / n, n) if n else (float("nan"), 0) for s, n in zip(ll, count)]


def text_loss(model, tok: Tokenizer, text: str, *, device) -> tuple[float, int]:
    """(mean per-token loss in nats, tokens scored) of `text`, in windows of the context length."""
    return text_losses(model, tok, [text], device=device)[0]


def _tags(scene) -> dict:
    keys = ("depth", "group", "perturb", "of", "lang")
    return {k: getattr(scene, k) for k in keys if getattr(scene, k, None) is not None}


def evaluate_battery(
    model,
    tok: Tokenizer,
    battery: Battery,
    *,
    device: torch.device,
    corpus_chunks: Callable[[], Iterable[str]] | None = None,
    batch_size: int | None = None,
    generations: dict[str, Generation] | None = None,
    progress: EvalProgress | None = None,
) -> list[dict]:
    """Scene results for one battery: dicts with battery, scene_id, kind, metric, score,
    correct and detail (tags, log-likelihoods, generated text, checks). `generations` (scene
    id → Generation) are completions already made, as `evaluate_all` makes them for every
    battery in one batch (and counted by `progress` as they were decoded); the rest are
    generated here. Each kind of scene is scored in one batch: choices by log-likelihood,
    completions by their checks, texts by their loss."""
    progress = progress or EvalProgress([], None)
    choices = _choice_scores(model, tok, battery, device, batch_size)
    progress.scored(len(choices))
    generated = _generate_scores(model, tok, battery, device, corpus_chunks, generations, progress)
    texts = _perplexity_scores(model, tok, battery, device)
    progress.scored(len(texts))
    scored = [*choices, *generated, *texts]  # (scene, kind, score, correct, detail) of each scene
    order = {s.id: i for i, s in enumerate(battery.scenes)}
    scored.sort(key=lambda item: order[item[0].id])
    return [
        {
            "battery": battery.name,
            "scene_id": scene.id,
            "kind": kind,
            "metric": battery.metric,
            "score": None if score is None else float(score),
            "correct": correct,
            "detail": {**_tags(scene), **detail},
        }
        for scene, kind, score, correct, detail in scored
    ]


def _choice_scores(model, tok: Tokenizer, battery: Battery, device, batch_size: int | None) -> list[tuple]:
    """Each choice scene: right when its answer has the highest log-likelihood (acc_norm: per
    character of the choice, as lm-evaluation-harness reports it too)."""
    choices = [s for s in battery.scenes if isinstance(s, ChoiceScene)]
    requests: list[LoglikRequest] = []
    for scene in choices:
        context, continuations = choice_request(scene)
        requests += [LoglikRequest(context, c) for c in continuations]
    scored = loglikelihoods(model, tok, requests, device=device, batch_size=batch_size)
    out, pos = [], 0
    for scene in choices:
        n = len(scene.choices)
        lls = [ll for ll, _ in scored[pos : pos + n]]
        pos += n
        answer = _answer_index(scene)
        pred = max(range(n), key=lambda i: lls[i])
        norm = [ll / max(1, len(c)) for ll, c in zip(lls, scene.choices)]
        pred_norm = max(range(n), key=lambda i: norm[i])
        ok = pred == answer
        detail = {"loglik": [round(v, 5) for v in lls], "pred": pred, "answer": answer, "n_choices": n,
                  "acc_norm": float(pred_norm == answer),
                  # as asked, for the run's Scenes tab
                  "question": " ".join(filter(None, (scene.context, scene.prompt))), "choices": list(scene.choices)}
        out.append((scene, "choice", float(ok), ok, detail))
    return out


def _generate_scores(model, tok: Tokenizer, battery: Battery, device, corpus_chunks,
                     generations: dict[str, Generation] | None, progress: EvalProgress | None = None) -> list[tuple]:
    """Each generate scene: its completion (made here unless given), its checks, and for
    novelty the word n-grams the training corpus does not hold."""
    made = dict(generations or {})
    todo = [s for s in battery.scenes if isinstance(s, GenerateScene) and s.id not in made]
    if todo:
        made.update(zip((s.id for s in todo), generate_batch(
            model, tok, [(s.prompt, s.max_new_tokens) for s in todo], device=device, progress=progress)))
    generated = []
    for scene in battery.scenes:
        if isinstance(scene, GenerateScene):
            text = made[scene.id].text
            generated.append((scene, text, [(c, run_check(c, text)) for c in scene.checks]))
    if not generated:
        return []
    seen: set[tuple[str, ...]] = set()
    if battery.metric == "novelty" and corpus_chunks is not None:
        wanted = set().union(*(measures.word_ngrams(t) for _, t, _ in generated))
        seen = _ngrams_present(wanted, corpus_chunks())
    out = []
    for scene, text, checks in generated:
        detail = {
            "prompt": scene.prompt,
            "text": text,
            "words": len(text.split()),
            "checks": [{"check": c.kind, "value": c.value, "passed": ok} for c, ok in checks],
        }
        if scene.judge:
            detail["rubric"] = scene.judge  # graded later by `ltm-tui judge`
        if battery.metric == "novelty":
            grams = measures.word_ngrams(text)
            detail["ngrams"] = len(grams)
            detail["novel_ngrams"] = len(grams - seen)  # no corpus (a baseline): all are new
        score, passed = measures.rescore_generate(battery.metric, detail)
        out.append((scene, "generate", score, passed, detail))
    return out


def _perplexity_scores(model, tok: Tokenizer, battery: Battery, device) -> list[tuple]:
    """Each perplexity scene: the model's mean loss on its text."""
    texts = [s for s in battery.scenes if isinstance(s, PerplexityScene)]
    losses = text_losses(model, tok, [s.text for s in texts], device=device)
    return [(scene, "perplexity", loss, None, {"tokens": count, "ppl": math.exp(loss)})
            for scene, (loss, count) in zip(texts, losses)]


def _answer_index(scene: ChoiceScene) -> int:
    answer = scene.answer
    return answer if isinstance(answer, int) else list(scene.choices).index(answer)


def _ngrams_present(wanted: set, chunks: Iterable[str], n: int = 3) -> set:
    """Which of `wanted` occur in the streamed corpus (memory bounded by `wanted`, not the corpus)."""
    present: set = set()
    carry = ""
    for chunk in chunks:
        text = carry + chunk
        present |= measures.word_ngrams(text, n) & wanted
        if present == wanted:
            break
        # keep the last n-1 words so an n-gram split between chunks is still seen whole
        tail = " ".join(text.rsplit(None, n - 1)[1:])
        carry = tail + " " if text[-1:].isspace() else tail
    return present


def general_texts(folder: Path = GENERAL_DIR) -> list[tuple[str, str]]:
    """(id, text) for each paragraph of the general-text files (`data/general/*.md`), which the
    `forgetting` measure reads: ordinary prose in English and Russian that no corpus teaches."""
    texts = []
    for path in sorted(Path(folder).glob("*.md")) if Path(folder).is_dir() else []:
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
        for i, para in enumerate(p for p in paragraphs if p and not p.startswith("#")):
            texts.append((f"{path.stem}-{i + 1}", para))
    return texts


def peft_base(model) -> Callable[[], AbstractContextManager]:
    """The base of a PEFT model: the same network with its adapter switched off (PEFT's
    `disable_adapter()` yields nothing, so the scope yields the model itself)."""

    @contextmanager
    def scope():
        with model.disable_adapter():
            yield model

    return scope


def fixed_base(base_model) -> Callable[[], AbstractContextManager]:
    """A separate base network (the untrained micro model of the same seed)."""
    return lambda: nullcontext(base_model)


def _completion_ppl(base, tok, prompts: list[str], made: list[Generation], *, device) -> list[float]:
    """The base's perplexity on each completion given its prompt, on the tokens the model
    generated (at most the scene's max_new_tokens), not on the text encoded again: an untrained
    byte model's stray bytes decode to replacement characters three times as long."""
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    pairs = []
    for prompt, gen in zip(prompts, made):
        ctx = tok.encode(prompt)
        pairs.append((ctx or ([prefix] if prefix is not None else []), list(gen.ids)))
    scored = score_pairs(base, pairs, device=device, pad_id=tok.pad_id)
    window = context_length(base)
    return [math.exp(-ll / max(1, min(len(gen.ids), window))) for (ll, _), gen in zip(scored, made)]


def evaluate_all(
    model,
    tok: Tokenizer,
    batteries: Sequence[Battery],
    *,
    device: torch.device,
    corpus_chunks: Callable[[], Iterable[str]] | None = None,
    reference: Callable[[], AbstractContextManager] | None = None,
    general: Sequence[tuple[str, str]] | None = None,
    progress: EvalProgress | None = None,
    base_memo: dict | None = None,
) -> tuple[dict[str, dict], list[dict], float]:
    """(scores {measure: {value, n, lo, hi}}, scene results, seconds) over every battery.

    `reference` opens the base model (None: `model` is the base itself, as for a baseline run);
    it gates novelty on fluency and gives the base's loss on `general` text for `forgetting`
    (default: the paragraphs of data/general/). `progress` (made for these batteries) hears of
    every scene done and sends its last event when the scores are in. `base_memo`, a dict the
    caller keeps for one base, remembers the base's losses on the general text: a warm worker's
    base is the same for every job, so they are computed once, not once a job.
    """
    from backend.compute.memory_fit import eval_batch_tokens

    batch = _BATCH_TOKENS.set(eval_batch_tokens(model, torch.device(device), BATCH_TOKENS))
    try:
        with one_thread(model, device):
            return _evaluate_all(model, tok, batteries, device=device, corpus_chunks=corpus_chunks,
                                 reference=reference, general=general, progress=progress or EvalProgress([], None),
                                 base_memo={} if base_memo is None else base_memo)
    finally:
        _BATCH_TOKENS.reset(batch)


def _evaluate_all(model, tok, batteries, *, device, corpus_chunks, reference, general, progress: EvalProgress,
                  base_memo: dict):
    t0 = time.perf_counter()
    general = general_texts() if general is None else list(general)
    passes = 1 if reference is None else 2  # the model's loss on the general text, and its base's
    progress.expect(passes * len(general))
    # every battery's completions in one batched decode
    wanted = [(b.name, s) for b in batteries for s in b.scenes if isinstance(s, GenerateScene)]
    made = generate_batch(model, tok, [(s.prompt, s.max_new_tokens) for _, s in wanted], device=device,
                          progress=progress)
    by_battery: dict[str, dict[str, Generation]] = {}
    for (name, scene), gen in zip(wanted, made):
        by_battery.setdefault(name, {})[scene.id] = gen
    scene_results: list[dict] = []
    for battery in batteries:
        scene_results += evaluate_battery(model, tok, battery, device=device, corpus_chunks=corpus_chunks,
                                          generations=by_battery.get(battery.name, {}), progress=progress)
    novel = [r for r in scene_results if r["metric"] == "novelty" and r["kind"] == "generate" and r["detail"]["text"]]
    novel_made = [by_battery[r["battery"]][r["scene_id"]] for r in novel]
    own = text_losses(model, tok, [text for _, text in general], device=device)
    progress.scored(0, len(general))
    with (reference or (lambda: nullcontext(model)))() as base:
        # a baseline is its own base: its general-text losses are the ones just computed
        texts = tuple(text for _, text in general)
        if reference is None:
            base_general = own
        elif base_memo.get("general", (None,))[0] == texts:
            base_general = base_memo["general"][1]
        else:
            base_general = text_losses(base, tok, list(texts), device=device)
            base_memo["general"] = (texts, base_general)
        progress.scored(0, (passes - 1) * len(general))
        prompts = [r["detail"]["prompt"] for r in novel]
        completion_ppl = _completion_ppl(base, tok, prompts, novel_made, device=device) if novel else []
    if novel:
        count = sum(n for _, n in base_general)
        bound = FLUENCY_RATIO * math.exp(sum(l * n for l, n in base_general) / count) if count else math.inf
        for r, ppl in zip(novel, completion_ppl):
            r["detail"].update(base_ppl=round(ppl, 3), fluency_bound=round(bound, 3), fluent=ppl <= bound)
            r["score"], r["correct"] = measures.rescore_generate("novelty", r["detail"])
    for (gid, _), (loss, n), (base_loss, _) in zip(general, own, base_general):
        scene_results.append({
            "battery": measures.GENERAL_BATTERY, "scene_id": gid, "kind": "perplexity",
            "metric": "forgetting", "score": loss, "correct": None,
            "detail": {"tokens": n, "base_loss": base_loss, "lang": gid.split("-")[0]},
        })
    scores = measures.score_run(scene_results)
    progress.finish()
    return scores, scene_results, time.perf_counter() - t0
