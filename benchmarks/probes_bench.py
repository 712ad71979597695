"""Probe cost against evaluation cost, on the same model and the built-in batteries.

    python benchmarks/probes_bench.py [--quick]

`probe_cost_ratio` = probe seconds ÷ evaluation seconds, the worse of two cases measured in this
run on the built-in batteries (scenes/), goal ≤ 0.10:

- `micro`: a real worker run (`python -m backend.compute.worker`) of the default `small` preset on
  data/demo/logic.md; both times come from its result.json (`eval_seconds`, `probes.seconds`),
  so evaluation is what a trained model really costs (its generations stop where it has learned
  to stop). `--quick` caps training at 80 steps; without it the default settings apply.
- `tiny_hf_lora`: a 4-layer Llama (hidden 128) with random weights and a LoRA adapter (r 16),
  built in a temp folder (nothing downloaded), timed in-process. Evaluation is timed without the
  base-model comparisons the worker adds for an adapter, so this ratio errs high.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _tiny_hf(folder: Path) -> Path:
    """A 4-layer Llama (hidden 128) and a word-level tokenizer over the batteries' own words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [p.read_text(encoding="utf-8") for p in sorted((REPO / "scenes").glob("*.yaml"))]
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _micro_run(quick: bool) -> dict:
    """Train, evaluate and probe micro:small on the demo logic corpus through the real worker."""
    import json
    import subprocess

    train = {"max_steps": 80, "checkpoint_every": 0, "log_every": 20} if quick else {}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "runs" / "probe-bench"
        session = Path(tmp) / "session.json"
        session.write_text(json.dumps({
            "base": {"base": "micro", "preset": "small", "quant": None, "trust_remote_code": False, "device": "cpu"},
            "scenes": str(REPO / "scenes"),
            "jobs": [{"run_id": "probe-bench", "kind": "adapter", "corpus_path": str(REPO / "data" / "demo" / "logic.md"),
                      "run_dir": str(run_dir), "seed": 0, "train": train, "lora": {}, "probes": True}],
        }))
        done = subprocess.run([sys.executable, "-m", "backend.compute.worker", str(session)], cwd=REPO,
                              capture_output=True, text=True)
        result_path = run_dir / "result.json"
        if done.returncode != 0 or not result_path.exists():
            raise SystemExit(f"probe benchmark worker failed ({done.returncode}): {done.stderr[-500:]}")
        result = json.loads(result_path.read_text())
    e, p = result["eval_seconds"], result["probes"]["seconds"]
    return {"eval_seconds": e, "probe_seconds": p, "ratio": round(p / e, 4), "steps": result["steps"],
            "final_loss": result["final_loss"], "probe_summary": result["probes"]["summary"]}


def _measure(model, tok, batteries, device, base, repeats: int) -> dict:
    from backend.compute.evaluate import evaluate_all
    from backend.compute.probes import run_probes

    evals, probes = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        evaluate_all(model, tok, batteries, device=device)
        evals.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_probes(model, tok, batteries, device=device, base=base)
        probes.append(time.perf_counter() - t0)
    e, p = statistics.median(evals), statistics.median(probes)
    return {"eval_seconds": round(e, 3), "probe_seconds": round(p, 3), "ratio": round(p / e, 4)}


def run(quick: bool) -> dict:
    from peft import LoraConfig, get_peft_model

    from backend.compute.models import BaseSpec, load_base
    from backend.scoring.scenes import load_batteries

    batteries = load_batteries(REPO / "scenes")
    repeats = 1 if quick else 3
    micro = _micro_run(quick)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _tiny_hf(Path(tmp) / "tiny-llama")
        model, tok, dev = load_base(BaseSpec(base=str(folder), device="cpu"))
        adapted = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear"))
        hf = _measure(adapted, tok, batteries, dev, None, repeats)
    return {
        "probe_cost_ratio": max(micro["ratio"], hf["ratio"]),
        "probes": {"micro_small": micro, "tiny_hf_lora": hf, "battery": "scenes/", "device": "cpu"},
    }


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(run(parser.parse_args().quick)))
