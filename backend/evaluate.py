"""The testbench: run batteries of scenes on a model and score them.

- `choice` scenes: log-likelihood of each choice after the context, batched and sorted by
  length, with lm-evaluation-harness's conventions (continuation tokens = tokens of
  context+choice past the context's tokens; acc, and acc_norm = log-likelihood per character).
- `generate` scenes: greedy decoding, then the scene's checks; novelty completions are also
  scored by the base model, which gates them on fluency.
- `perplexity` scenes: mean per-token loss of the text.
- general text (`data/general/`): loss of the model and of its base, for `forgetting`.

Scores with their bootstrap intervals come from `backend.measures.score_run`.
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from backend import measures
from backend.models import Tokenizer, context_length
from backend.scenes import (
    Battery,
    ChoiceScene,
    GenerateScene,
    PerplexityScene,
    choice_request,
    run_check,
)

# A completion is fluent when the base model's perplexity on it (given its prompt) is at most
# this many times the base's perplexity on ordinary general text: word salad scores hundreds of
# times worse, an unusual but well-formed sentence a few times worse.
FLUENCY_RATIO = 4.0
GENERAL_DIR = Path(__file__).resolve().parent.parent / "data" / "general"


@dataclass(frozen=True)
class LoglikRequest:
    context: str
    continuation: str


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


@torch.no_grad()
def loglikelihoods(
    model,
    tok: Tokenizer,
    requests: Sequence[LoglikRequest],
    *,
    device: torch.device,
    batch_size: int = 32,
) -> list[tuple[float, bool]]:
    """(sum of log-probs of the continuation, whether it is the greedy continuation) per request.

    Requests are sorted longest first so each batch pads little and an out-of-memory error, if
    any, comes on the first batch; results come back in the caller's order.
    """
    max_len = context_length(model)
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    encoded = []
    for req in requests:
        ctx, cont = encode_pair(tok, req.context, req.continuation)
        if not ctx and prefix is not None:
            ctx = [prefix]  # lm-eval scores an empty context after the prefix token
        if not cont:
            raise ValueError(f"empty continuation for context {req.context[:40]!r}")
        ids = (ctx + cont)[-(max_len + 1) :][:-1]
        encoded.append((ids, cont))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i][0]) for i in idx)
        batch = torch.full((len(idx), width), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = encoded[i][0]
            batch[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits
        logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
        for row, i in enumerate(idx):
            ids, cont = encoded[i]
            n = len(ids)
            span = logprobs[row, n - len(cont) : n]
            target = torch.tensor(cont)
            ll = span.gather(1, target[:, None]).squeeze(1).sum().item()
            greedy = bool((span.argmax(dim=-1) == target).all())
            out[i] = (ll, greedy)
    return out


@torch.no_grad()
def generate_text(model, tok: Tokenizer, prompt: str, max_new_tokens: int, *, device) -> str:
    """Greedy continuation of `prompt`, cut at end-of-text or a blank line.

    A plain loop over the KV cache: for the short answers scenes ask for it is several times
    faster than `generate()`, whose per-token bookkeeping dominates on a small model.
    """
    ids = tok.encode(prompt)
    if tok.bos_id is not None and not ids:
        ids = [tok.bos_id]
    ids = ids[-max(1, context_length(model) - max_new_tokens) :]
    x = torch.tensor([ids], device=device)
    name = _cache_argument(model)
    past = None
    new: list[int] = []
    for _ in range(max_new_tokens):
        out = model(input_ids=x, use_cache=True, **({name: past} if past is not None else {}))
        past = out[name]
        nxt = int(out.logits[0, -1].argmax())
        if nxt == tok.eos_id:
            break
        new.append(nxt)
        if len(new) >= 2 and tok.decode(new[-4:]).endswith("\n\n"):
            break
        x = torch.tensor([[nxt]], device=device)
    return tok.decode(new).split("\n\n")[0].strip()


def _cache_argument(model) -> str:
    """`cache` in transformers 5.x, `past_key_values` before it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def text_loss(model, tok: Tokenizer, text: str, *, device) -> tuple[float, int]:
    """(mean per-token loss in nats, tokens scored) of `text`, in windows of the context length."""
    ids = tok.encode(text)
    if tok.bos_id is not None:
        ids = [tok.bos_id] + ids
    if len(ids) < 2:
        return float("nan"), 0
    window = context_length(model)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[max(0, start - 1) : start + window] if start else ids[:window]
        x = torch.tensor([chunk], device=device)
        logits = model(input_ids=x).logits.float()
        loss = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        total += loss.item()
        count += x.shape[1] - 1
    return total / count, count


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
    batch_size: int = 32,
) -> list[dict]:
    """Scene results for one battery: dicts with battery, scene_id, kind, metric, score,
    correct and detail (tags, log-likelihoods, generated text, checks)."""
    results: list[dict] = []

    def add(scene, kind: str, score: float, correct: bool | None, detail: dict) -> None:
        results.append(
            {
                "battery": battery.name,
                "scene_id": scene.id,
                "kind": kind,
                "metric": battery.metric,
                "score": None if score is None else float(score),
                "correct": correct,
                "detail": {**_tags(scene), **detail},
            }
        )

    choices = [s for s in battery.scenes if isinstance(s, ChoiceScene)]
    requests: list[LoglikRequest] = []
    for scene in choices:
        context, continuations = choice_request(scene)
        requests += [LoglikRequest(context, c) for c in continuations]
    scored = loglikelihoods(model, tok, requests, device=device, batch_size=batch_size)
    pos = 0
    for scene in choices:
        n = len(scene.choices)
        lls = [ll for ll, _ in scored[pos : pos + n]]
        pos += n
        answer = _answer_index(scene)
        pred = max(range(n), key=lambda i: lls[i])
        norm = [ll / max(1, len(c)) for ll, c in zip(lls, scene.choices)]
        pred_norm = max(range(n), key=lambda i: norm[i])
        ok = pred == answer
        add(
            scene,
            "choice",
            float(ok),
            ok,
            {
                "loglik": [round(v, 5) for v in lls],
                "pred": pred,
                "answer": answer,
                "n_choices": n,
                "acc_norm": float(pred_norm == answer),
            },
        )

    generated: list[tuple[GenerateScene, str, list[tuple[str, bool]]]] = []
    for scene in battery.scenes:
        if isinstance(scene, GenerateScene):
            text = generate_text(model, tok, scene.prompt, scene.max_new_tokens, device=device)
            checks = [(c.kind, run_check(c, text)) for c in scene.checks]
            generated.append((scene, text, checks))
    if generated:
        seen: set[tuple[str, ...]] = set()
        if battery.metric == "novelty" and corpus_chunks is not None:
            wanted = set().union(*(measures.word_ngrams(t) for _, t, _ in generated))
            seen = _ngrams_present(wanted, corpus_chunks())
        for scene, text, checks in generated:
            detail = {
                "prompt": scene.prompt,
                "text": text,
                "words": len(text.split()),
                "checks": [{"check": k, "passed": ok} for k, ok in checks],
            }
            if scene.judge:
                detail["rubric"] = scene.judge  # graded later by `ltm-tui judge`
            if battery.metric == "novelty":
                grams = measures.word_ngrams(text)
                detail["ngrams"] = len(grams)
                detail["novel_ngrams"] = len(grams - seen)  # no corpus (a baseline): all are new
            score, passed = measures.rescore_generate(battery.metric, detail)
            add(scene, "generate", score, passed, detail)

    for scene in battery.scenes:
        if isinstance(scene, PerplexityScene):
            loss, count = text_loss(model, tok, scene.text, device=device)
            add(scene, "perplexity", loss, None, {"tokens": count, "ppl": math.exp(loss)})
    order = {s.id: i for i, s in enumerate(battery.scenes)}
    results.sort(key=lambda r: order[r["scene_id"]])
    return results


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


def _completion_ppl(base, tok, rows: list[dict], *, device) -> list[float]:
    requests = []
    for r in rows:
        prompt, text = r["detail"]["prompt"], r["detail"]["text"]
        requests.append(LoglikRequest(prompt, text if prompt[-1:].isspace() else " " + text))
    scored = loglikelihoods(base, tok, requests, device=device)
    out = []
    for req, (ll, _) in zip(requests, scored):
        n = max(1, len(encode_pair(tok, req.context, req.continuation)[1]))
        out.append(math.exp(-ll / n))
    return out


def evaluate_all(
    model,
    tok: Tokenizer,
    batteries: Sequence[Battery],
    *,
    device: torch.device,
    corpus_chunks: Callable[[], Iterable[str]] | None = None,
    reference: Callable[[], AbstractContextManager] | None = None,
    general: Sequence[tuple[str, str]] | None = None,
) -> tuple[dict[str, dict], list[dict], float]:
    """(scores {measure: {value, n, lo, hi}}, scene results, seconds) over every battery.

    `reference` opens the base model (None: `model` is the base itself, as for a baseline run);
    it gates novelty on fluency and gives the base's loss on `general` text for `forgetting`
    (default: the paragraphs of data/general/).
    """
    t0 = time.perf_counter()
    scene_results: list[dict] = []
    for battery in batteries:
        scene_results += evaluate_battery(model, tok, battery, device=device, corpus_chunks=corpus_chunks)
    general = general_texts() if general is None else list(general)
    novel = [r for r in scene_results if r["metric"] == "novelty" and r["kind"] == "generate" and r["detail"]["text"]]
    own = [text_loss(model, tok, text, device=device) for _, text in general]
    with (reference or (lambda: nullcontext(model)))() as base:
        base_general = [text_loss(base, tok, text, device=device) for _, text in general]
        completion_ppl = _completion_ppl(base, tok, novel, device=device) if novel else []
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
    return scores, scene_results, time.perf_counter() - t0
