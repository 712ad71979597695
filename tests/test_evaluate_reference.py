"""The base as reference, on a real tiny model: forgetting on general text and the fluency gate
of novelty. A fresh LoRA adapter (B = 0) changes nothing, so it forgets exactly nothing; once
its weights move, the same text reads differently and forgetting is no longer 0."""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import STORY_TEXT


@pytest.fixture
def novelty_battery(tmp_path):
    from backend.scoring.scenes import load_battery

    path = tmp_path / "novelty.yaml"
    path.write_text(textwrap.dedent("""\
        battery: novelty
        description: free completions
        metric: novelty
        scenes:
          - id: n1
            kind: generate
            prompt: The old fisherman rowed past the
            max_new_tokens: 8
            checks:
              - max_words: 40
        """), encoding="utf-8")
    return load_battery(path)


def _model(tiny_hf_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backend.compute.models import HFTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_hf_model, local_files_only=True, torch_dtype=torch.float32)
    tok = HFTokenizer(AutoTokenizer.from_pretrained(tiny_hf_model, local_files_only=True))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")), tok


GENERAL = [("en-1", STORY_TEXT[:300]), ("en-2", "All glims are blorps. The lamp is red. " * 4)]


def test_forgetting_is_zero_for_an_untouched_adapter_and_moves_when_it_trains(tiny_hf_model, novelty_battery):
    import torch

    from backend.compute.evaluate import evaluate_all, peft_base

    model, tok = _model(tiny_hf_model)
    cpu = torch.device("cpu")
    scores, rows, _ = evaluate_all(model, tok, [novelty_battery], device=cpu, reference=peft_base(model), general=GENERAL)
    assert scores["forgetting"]["value"] == pytest.approx(0.0, abs=1e-6)
    general = [r for r in rows if r["battery"] == "_general"]
    assert [r["scene_id"] for r in general] == ["en-1", "en-2"]
    assert all(r["detail"]["base_loss"] == pytest.approx(r["score"], abs=1e-6) for r in general)

    with torch.no_grad():  # move the adapter: the model now differs from its base
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.5)
    scores2, rows2, _ = evaluate_all(model, tok, [novelty_battery], device=cpu, reference=peft_base(model), general=GENERAL)
    general2 = [r for r in rows2 if r["battery"] == "_general"]
    assert general2[0]["detail"]["base_loss"] == pytest.approx(general[0]["score"], abs=1e-5)  # the base is intact
    assert abs(scores2["forgetting"]["value"]) > 1e-3


def test_novelty_is_gated_on_the_base_models_fluency(tiny_hf_model, novelty_battery, monkeypatch):
    import torch

    from backend.compute import evaluate
    from backend.compute.evaluate import evaluate_all, peft_base

    model, tok = _model(tiny_hf_model)
    cpu = torch.device("cpu")
    _, rows, _ = evaluate_all(model, tok, [novelty_battery], device=cpu, reference=peft_base(model), general=GENERAL)
    n1 = next(r for r in rows if r["scene_id"] == "n1")
    detail = n1["detail"]
    assert detail["text"] and detail["ngrams"] > 0 and detail["base_ppl"] > 0
    assert detail["fluent"] == (detail["base_ppl"] <= detail["fluency_bound"])
    if detail["fluent"]:
        assert n1["score"] == detail["novel_ngrams"] / detail["ngrams"]  # no corpus: every 3-gram is new
    # a bound no text can meet: the same completion now earns nothing
    monkeypatch.setattr(evaluate, "FLUENCY_RATIO", 1e-9)
    _, rows, _ = evaluate_all(model, tok, [novelty_battery], device=cpu, reference=peft_base(model), general=GENERAL)
    gated = next(r for r in rows if r["scene_id"] == "n1")
    assert gated["detail"]["fluent"] is False and gated["score"] == 0.0 and gated["correct"] is True


def test_a_warm_base_reads_the_general_text_once(tiny_hf_model, novelty_battery, monkeypatch):
    """A warm worker's base is the same for every job: with a memo its general-text losses are
    computed by the first evaluation and taken from the memo by the next, with the same rows."""
    import torch

    from backend.compute import evaluate
    from backend.compute.evaluate import evaluate_all, peft_base

    model, tok = _model(tiny_hf_model)
    cpu = torch.device("cpu")
    passes = []
    real = evaluate.text_losses
    general_texts = [text for _, text in GENERAL]

    def counted(m, tok, texts, **kw):  # the passes over general text (scoring reads other texts too)
        if texts and list(texts) == general_texts[: len(texts)]:
            passes.append(m)
        return real(m, tok, texts, **kw)

    monkeypatch.setattr(evaluate, "text_losses", counted)
    memo: dict = {}
    first = evaluate_all(model, tok, [novelty_battery], device=cpu, reference=peft_base(model), general=GENERAL,
                         base_memo=memo)[1]
    assert len(passes) == 2  # the adapted model's, then its base's
    second = evaluate_all(model, tok, [novelty_battery], device=cpu, reference=peft_base(model), general=GENERAL,
                          base_memo=memo)[1]
    assert len(passes) == 3  # the adapted model's only
    rows = lambda rs: [(r["scene_id"], r["detail"]["base_loss"]) for r in rs if r["battery"] == "_general"]  # noqa: E731
    assert rows(second) == rows(first)
    # other general texts are not taken from the memo
    evaluate_all(model, tok, [novelty_battery], device=cpu, reference=peft_base(model), general=GENERAL[:1],
                 base_memo=memo)
    assert len(passes) == 5
