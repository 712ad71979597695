"""The batched evaluator gives the numbers of the plain one-at-a-time computation: shared-prefix
rows for a scene's choices, batches cut by tokens, batched greedy decoding that drops finished
rows, batched text losses; and continuations longer than the window are clipped, not misread."""

from __future__ import annotations

import math

import pytest
import torch

from backend.compute.evaluate import (
    Generation,
    LoglikRequest,
    _completion_ppl,
    clip_pair,
    encode_pair,
    generate_batch,
    loglikelihoods,
    score_pairs,
    text_loss,
    text_losses,
)
from backend.compute.models import ByteTokenizer, build_micro

CPU = torch.device("cpu")


def _plain(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One pair alone: context + continuation in one row, the continuation's log-probs summed."""
    ids = torch.tensor([(ctx + cont)[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    span = logp[len(ctx) - 1 :]
    target = torch.tensor(cont)
    return span.gather(1, target[:, None]).sum().item(), bool((span.argmax(-1) == target).all())


def _plain_greedy(model, tok, prompt: str, max_new: int) -> list[int]:
    ids = tok.encode(prompt) or [tok.bos_id]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            new.append(nxt)
            if len(new) >= 2 and tok.decode(new[-4:]).endswith("\n\n"):
                break
    return new


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # a bool 4D mask, an additive one
def test_shared_prefix_rows_equal_each_pair_scored_alone(attention):
    model = build_micro("tiny", 0, CPU).eval()
    model.set_attn_implementation(attention)
    tok = ByteTokenizer()
    requests = [
        LoglikRequest("All glims are blorps. All blorps are zents. So all glims are", c)
        for c in (" zents.", " blue", " x", " not zents at all.")
    ] + [LoglikRequest("The lamp is", c) for c in (" red.", " green.")] + [LoglikRequest("", "Hello")]
    # a token budget of 64 forces several batches and rows of different widths
    for kwargs in ({}, {"max_tokens": 64}, {"batch_size": 1}):
        got = loglikelihoods(model, tok, requests, device=CPU, **kwargs)
        for req, (ll, greedy) in zip(requests, got):
            ctx, cont = encode_pair(tok, req.context, req.continuation)
            want = _plain(model, ctx or [tok.bos_id], cont)
            assert ll == pytest.approx(want[0], abs=1e-4), (req, kwargs)
            assert greedy == want[1]


def test_a_continuation_longer_than_the_window_is_clipped_to_it():
    model = build_micro("tiny", 0, CPU).eval()  # a 256-token window
    window = model.config.max_position_embeddings
    ctx, cont = list(b"Once upon a time"), list(b"abcdefghij" * 40)  # 400 continuation tokens
    assert clip_pair(ctx, cont, window) == ([ctx[-1]], cont[:window])
    assert clip_pair(ctx, cont, window, max_cont=8) == (ctx, cont[:8])
    (ll, _), = score_pairs(model, [(ctx, cont)], device=CPU, pad_id=ByteTokenizer.pad_id)
    assert ll == pytest.approx(_plain(model, [ctx[-1]], cont[:window])[0], abs=1e-3)
    (ll8, _), = score_pairs(model, [(ctx, cont)], device=CPU, pad_id=ByteTokenizer.pad_id, max_cont=8)
    assert ll8 == pytest.approx(_plain(model, ctx, cont[:8])[0], abs=1e-4)
    with pytest.raises(ValueError, match="context token"):
        clip_pair([], cont, window)


class _StopAt(ByteTokenizer):
    """The byte tokenizer with another token as end-of-text, so a random model stops on it."""

    def __init__(self, eos: int) -> None:
        self.eos_id = eos


def test_batched_greedy_decoding_equals_decoding_each_prompt_alone():
    model = build_micro("tiny", 1, CPU).eval()
    with torch.no_grad():  # larger weights: greedy decoding wanders instead of repeating one byte
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(8)
    prompts = [("All glims are", 12), ("The lamp is red. Red things", 20), ("x", 5),
               ("Far to the north of Ardo, a young glim", 16), ("", 7)]
    # end-of-text is the token the third prompt's decoding picks at step 3: rows stop at
    # different steps and leave the batch while the others go on
    tok = _StopAt(_plain_greedy(model, ByteTokenizer(), "x", 5)[2])
    want = [_plain_greedy(model, tok, p, n) for p, n in prompts]
    assert len(want[2]) == 2 and len({len(w) for w in want}) >= 3
    for budget in (64, 10_000):  # one prompt a batch, and all in one batch
        got = generate_batch(model, tok, prompts, device=CPU, max_tokens=budget)
        for w, g in zip(want, got):
            assert list(g.ids) == w
            assert g.text == tok.decode(w).split("\n\n")[0].strip()


def test_text_losses_in_one_batch_equal_each_text_alone():
    model = build_micro("tiny", 2, CPU).eval()
    tok = ByteTokenizer()
    texts = ["hello world", "a" * 600, "All glims are blorps. " * 5, ""]  # 600 bytes: three windows
    got = text_losses(model, tok, texts, device=CPU, max_tokens=300)
    assert got[3][1] == 0 and math.isnan(got[3][0])
    for text, (loss, n) in zip(texts[:3], got):
        ids = [tok.bos_id] + tok.encode(text)
        assert n == len(ids) - 1
        assert loss == pytest.approx(text_loss(model, tok, text, device=CPU)[0], abs=1e-5)
    short = torch.tensor([[tok.bos_id] + tok.encode("hello world")])
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(input_ids=short).logits[0, :-1], short[0, 1:]).item()
    assert got[0][0] == pytest.approx(ref, abs=1e-5)


def test_fluency_is_read_on_the_generated_tokens_not_the_text_encoded_again():
    model = build_micro("tiny", 0, CPU).eval()
    tok = ByteTokenizer()
    # two stray bytes (not UTF-8) decode to two replacement characters, six bytes when encoded again
    gen = Generation(text=tok.decode([0xC3, 0xC3]), ids=(0xC3, 0xC3))
    assert len(tok.encode(gen.text)) == 6
    (ppl,) = _completion_ppl(model, tok, ["A glim"], [gen], device=CPU)
    ll, _ = _plain(model, tok.encode("A glim"), [0xC3, 0xC3])
    assert ppl == pytest.approx(math.exp(-ll / 2), rel=1e-4)


def test_a_small_model_is_evaluated_on_one_cpu_thread_and_the_setting_comes_back():
    model = build_micro("tiny", 0, CPU).eval()
    seen: list[int] = []
    handle = model.register_forward_hook(lambda *args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generate_batch(model, ByteTokenizer(), [("All glims are", 4)], device=CPU)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        handle.remove()
        torch.set_num_threads(before)


def test_a_batch_out_of_memory_is_split_and_gives_the_same_numbers(monkeypatch):
    """On a card a scoring or decoding batch that runs out of memory is split in two and run
    again, down to one row: the numbers are those of the whole batch, and a single row that does
    not fit still fails. LTM_FAULT_EVAL_OOM_ABOVE stands in for the card's limit. Each call's
    batches here are one of 222 (texts), 198 (choices) and 99 (decoding) padded tokens, over the
    limits set, with rows under them: the calls return only because the batches were split."""
    from backend.compute.evaluate import FAULT_OOM_ENV

    model = build_micro("tiny", 2, CPU).eval()
    tok = ByteTokenizer()
    texts = ["hello world", "All glims are blorps. " * 5, "The lamp is red.", "x y z"]
    prompts = [("All glims are", 6), ("The lamp is red. Red things", 6), ("x", 4)]
    requests = [LoglikRequest(c, " zents.") for c in (
        "All glims are blorps. All blorps are zents. So all glims are",
        "The lamp is red. Red things glow at night. So the lamp",
        "Far to the north of Ardo, a young glim rowed a boat to")]

    def run(limits: tuple[str, str, str] | None):
        out = []
        for limit, call in zip(limits or ("", "", ""), (
                lambda: text_losses(model, tok, texts, device=CPU, max_tokens=10_000),
                lambda: loglikelihoods(model, tok, requests, device=CPU, max_tokens=10_000),
                lambda: [g.ids for g in generate_batch(model, tok, prompts, device=CPU, max_tokens=10_000)])):
            monkeypatch.setenv(FAULT_OOM_ENV, limit)
            out.append(call())
        return out

    whole = run(None)
    halved = run(("150", "150", "60"))
    assert halved[2] == whole[2]
    for a, b in zip(halved[0] + halved[1], whole[0] + whole[1]):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6)
    monkeypatch.setenv(FAULT_OOM_ENV, "5")  # not even one row fits
    with pytest.raises(torch.OutOfMemoryError):
        text_losses(model, tok, texts, device=CPU, max_tokens=10_000)


def test_a_batch_size_that_ran_out_of_memory_is_not_tried_again(monkeypatch):
    """Where the batch size was too optimistic for the card, the first batch runs out of memory
    and is split; the later batches of as many tokens are split before they run, so the whole
    evaluation pays for one failed pass, not one a batch, and gives the same numbers."""
    from backend.compute import evaluate

    model = build_micro("tiny", 2, CPU).eval()
    tok = ByteTokenizer()
    texts = [f"Text number {i} is here. " * 2 for i in range(12)]  # 12 rows of 49 tokens
    want = text_losses(model, tok, texts, device=CPU, max_tokens=210)  # 3 batches of 4 rows
    raised = []
    real = evaluate._fault_oom

    def counted(tokens: int) -> None:
        try:
            real(tokens)
        except torch.OutOfMemoryError:
            raised.append(tokens)
            raise

    monkeypatch.setattr(evaluate, "_fault_oom", counted)
    monkeypatch.setenv(evaluate.FAULT_OOM_ENV, "150")  # 4 rows do not fit, 2 do
    got = text_losses(model, tok, texts, device=CPU, max_tokens=210)
    assert raised == [4 * 49]  # the first batch only; before, each of the three failed once
    for a, b in zip(got, want):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6)


def test_a_decoding_batch_that_runs_out_halfway_is_counted_once():
    """A decoding batch that runs out of memory after some steps takes back the tokens it had
    reported, so its halves' report is the only one: the progress ends at every completion's
    budget and every scene once, and the completions are those of a run that never failed."""
    from backend.compute.evaluate import EvalProgress

    model = build_micro("tiny", 2, CPU).eval()
    tok = ByteTokenizer()
    prompts = [("All glims are", 6), ("The lamp is red.", 6), ("x", 6)]
    want = [g.ids for g in generate_batch(model, tok, prompts, device=CPU)]
    forwards = []

    def out_of_memory_at_the_third_step(module, args, kwargs):
        forwards.append(kwargs["input_ids"].shape[0])
        if len(forwards) == 3:
            raise torch.OutOfMemoryError("the card's limit, halfway through decoding")

    handle = model.register_forward_pre_hook(out_of_memory_at_the_third_step, with_kwargs=True)
    progress = EvalProgress([], None)
    try:
        got = [g.ids for g in generate_batch(model, tok, prompts, device=CPU, progress=progress)]
    finally:
        handle.remove()
    assert forwards[:3] == [3, 3, 3] and len(forwards) > 3  # the batch failed, then its halves ran
    assert got == want
    assert progress.done == len(prompts) and progress._decode[1] == sum(n for _, n in prompts)


def test_a_bf16_output_layer_scores_in_fp32(tiny_hf_model):
    """On a bf16 base (a card's), a continuation's log-probability is that of the output layer
    computed in fp32 on the bf16 hidden states, not of logits rounded to bf16, which step by
    1/8 between 16 and 32."""
    from backend.compute.models import BaseSpec, load_base

    model, tok, _ = load_base(BaseSpec(base=str(tiny_hf_model), device="cpu", precision="bf16"))
    assert model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        model.lm_head.weight.mul_(400)  # logits of tens, as a trained model's
    pairs = [(tok.encode("All glims are"), tok.encode(" zents blorps")), (tok.encode("The lamp"), tok.encode(" glows"))]
    got = score_pairs(model, pairs, device=CPU, pad_id=tok.pad_id)
    for (ctx, cont), (ll, _) in zip(pairs, got):
        with torch.no_grad():
            h = model.model(input_ids=torch.tensor([ctx + cont[:-1]])).last_hidden_state[0, len(ctx) - 1 :]
            exact = torch.log_softmax(h.double() @ model.lm_head.weight.double().T, -1)
            rounded = torch.log_softmax(model.lm_head(h).double(), -1)  # bf16 logits, then upcast
        target = torch.tensor(cont)[:, None]
        want = exact.gather(1, target).sum().item()
        assert ll == pytest.approx(want, abs=1e-4)
        assert abs(rounded.gather(1, target).sum().item() - want) > 1e-2  # what the rounding costs here


def test_an_adapter_on_the_output_layer_is_scored_with_it(tiny_hf_model):
    """With LoRA on the output layer too (target_modules may name lm_head), the scores are the
    adapted model's: the fp32 recomputation is for a plain output layer only."""
    from backend.compute.models import BaseSpec, attach_lora, load_base
    from backend.core.config import LoraSettings

    base, tok, _ = load_base(BaseSpec(base=str(tiny_hf_model), device="cpu", precision="bf16"))
    model = attach_lora(base, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "lm_head"]), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lm_head" in name and "lora_B" in name:
                p.normal_(0, 1.0)  # an adapter that moved the head
    ctx, cont = tok.encode("All glims are"), tok.encode(" zents blorps")
    (got, _), = score_pairs(model, [(ctx, cont)], device=CPU, pad_id=tok.pad_id)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0].double(), -1)
        with model.disable_adapter():
            base_logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0].double(), -1)
    target = torch.tensor(cont)[:, None]
    want = logp[len(ctx) - 1 :].gather(1, target).sum().item()
    without = base_logp[len(ctx) - 1 :].gather(1, target).sum().item()
    assert abs(want - without) > 0.1  # the adapter changed the score
    assert got == pytest.approx(want, abs=0.05)  # the model's own bf16 logits: within their rounding
