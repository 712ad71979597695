"""Peer parity: our `choice` scores equal lm-evaluation-harness's multiple_choice acc and acc_norm.

The same tiny Llama (tests/conftest.py) and the same items, written once as a harness task with a
local JSON-lines file: lm-eval's own HF backend scores the task, `ltm-tui scenes import-lmeval`
turns the task into a battery, and our testbench scores that battery. Per-item log-likelihoods
must agree within 1e-4 nats, and so must acc and acc_norm.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

ITEMS = [
    ("All glims are blorps. All blorps are zents.", "So all glims are", ["zents.", "blorps.", "lamps."], 0),
    ("The lamp is red. Red things glow.", "So the lamp", ["rowed.", "glows.", "hums."], 1),
    ("", "His daughter mended", ["nets", "boats coming home", "the gulls"], 0),
    ("The old fisherman rowed past the harbour wall at dawn,", "humming to the", ["gulls.", "lamps.", "zents."], 0),
    ("All blorps are zents.", "So all", ["glims are zents.", "lamps glow", "red"], 0),
    ("The lamp is red.", "Red things", ["glow.", "hums.", "rowed past the harbour wall"], 2),
]


@pytest.fixture
def task(tmp_path: Path) -> Path:
    data = tmp_path / "items.jsonl"
    with data.open("w", encoding="utf-8") as fh:
        for context, question, choices, label in ITEMS:
            fh.write(json.dumps({"context": context, "question": question, "choices": choices, "label": label}) + "\n")
    task = tmp_path / "ltm_parity.yaml"
    task.write_text(
        textwrap.dedent(
            f"""\
            task: ltm_parity
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {data}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{% if context %}}{{{{context}}}}\\n{{% endif %}}{{{{question}}}}"
            doc_to_choice: choices
            doc_to_target: label
            metric_list:
              - metric: acc
              - metric: acc_norm
            """
        ),
        encoding="utf-8",
    )
    return task


@pytest.mark.slow
def test_choice_scores_equal_lm_eval(task: Path, tiny_hf_model: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    import torch

    # the test extra installs lm-eval: a missing harness fails here, it is never skipped
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backend.compute.evaluate import evaluate_battery
    from backend.compute.models import HFTokenizer
    from backend.scoring.scenes import import_lmeval, load_battery

    out = simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_hf_model},dtype=float32",
        tasks=["ltm_parity"],
        task_manager=TaskManager(include_path=str(task.parent)),
        device="cpu",
        batch_size=4,
        log_samples=True,
    )
    theirs = sorted(out["samples"]["ltm_parity"], key=lambda s: s["doc_id"])
    assert len(theirs) == len(ITEMS)

    text, n = import_lmeval(task)
    assert n == len(ITEMS)
    battery_file = tmp_path / "imported.yaml"
    battery_file.write_text(text, encoding="utf-8")
    battery = load_battery(battery_file)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_model, local_files_only=True, torch_dtype=torch.float32)
    tok = HFTokenizer(AutoTokenizer.from_pretrained(tiny_hf_model, local_files_only=True))
    ours = evaluate_battery(model, tok, battery, device=torch.device("cpu"), batch_size=3)
    assert len(ours) == len(ITEMS)

    for sample, row in zip(theirs, ours):
        their_lls = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert row["detail"]["loglik"] == pytest.approx(their_lls, abs=1e-4)
        assert row["score"] == sample["acc"]
        assert row["detail"]["acc_norm"] == sample["acc_norm"]
    acc = sum(r["score"] for r in ours) / len(ours)
    acc_norm = sum(r["detail"]["acc_norm"] for r in ours) / len(ours)
    assert acc == pytest.approx(out["results"]["ltm_parity"]["acc,none"])
    assert acc_norm == pytest.approx(out["results"]["ltm_parity"]["acc_norm,none"])
