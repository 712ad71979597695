"""End to end: the real `ltm-tui` entry point, real worker subprocesses, a real DuckDB file."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from tests.conftest import REPO, TINY_RUN, cli, stop_service

TINY = TINY_RUN
RESULT_KEYS = {"run_id", "corpus", "corpus_path", "base", "status", "pages", "tokens",
               "train_seconds", "scores", "overall"}


def test_run_micro_ranks_two_corpora_and_exports_csv(tmp_path, finished):
    """`ltm-tui run logic.txt story.txt` (the session's shared run, TINY_RUN) and what it stored."""
    ws, corpora = finished.ws, {"logic": finished.corpora / "logic.txt"}
    assert "logic.txt" in finished.run_output and "(baseline)" in finished.run_output

    res = cli("results", "--format", "json", "--workspace", str(ws))
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert len(rows) == 3
    assert all(RESULT_KEYS <= set(r) for r in rows)
    by_corpus = {r["corpus"]: r for r in rows}
    baseline = by_corpus[None]
    assert baseline["tokens"] == 0 and baseline["train_seconds"] == 0
    logic = by_corpus["logic.txt"]
    assert logic["status"] == "done" and logic["base"] == "micro:tiny"
    assert logic["tokens"] == len(corpora["logic"].read_bytes()) + 2  # bytes + BOS + EOS
    assert logic["train_seconds"] > 0 and logic["pages"] > 0
    assert set(logic["scores"]) == {"reasoning_depth", "depth_max", "depth@1", "depth@2", "perplexity", "forgetting"}
    assert set(logic["intervals"]) == set(logic["scores"])  # every score has its 95% interval
    assert all(lo <= logic["scores"][m] + 1e-9 <= hi + 2e-9 for m, (lo, hi) in logic["intervals"].items())
    # what the logic corpus teaches, its model knows better than the untrained base
    assert logic["scores"]["perplexity"] < baseline["scores"]["perplexity"] / 2
    assert logic["scores"]["perplexity"] < by_corpus["story.txt"]["scores"]["perplexity"]

    asc = json.loads(cli("results", "--format", "json", "--sort", "perplexity", "--asc", "--workspace", str(ws)).stdout)
    assert [r["scores"]["perplexity"] for r in asc] == sorted(r["scores"]["perplexity"] for r in rows)
    for label in ("ppl", "ppl↓", "PPL"):  # the table's own header sorts as the measure's name does
        by_label = cli("results", "--format", "json", "--sort", label, "--asc", "--workspace", str(ws))
        assert by_label.returncode == 0, by_label.stderr
        assert [r["run_id"] for r in json.loads(by_label.stdout)] == [r["run_id"] for r in asc]

    out = tmp_path / "ltm_results_table.csv"
    exp = cli("export", "--csv", str(out), "--workspace", str(ws))
    assert exp.returncode == 0, exp.stderr
    table = list(csv.DictReader(out.open(encoding="utf-8")))
    assert {r["corpus"] for r in table} == {"", "logic.txt", "story.txt"}
    assert "reasoning_depth" in table[0] and "overall" in table[0]
    printed = cli("export", "--csv", "-", "--workspace", str(ws), cwd=tmp_path)  # to standard output
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == out.read_text(encoding="utf-8") and not (tmp_path / "-").exists()

    run_dir = ws / "runs" / logic["run_id"]
    assert (run_dir / "model" / "model.safetensors").is_file()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert {"phase", "progress", "result"} <= {e["type"] for e in events}
    assert all({"ts", "run_id", "type"} <= set(e) for e in events)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["settings"]["train"]["max_steps"] == 40 and result["steps"] == 40



@pytest.mark.slow
def test_a_second_batch_on_the_same_base_reuses_the_finished_baseline(tmp_path, finished):
    stop_service(finished.ws)  # a copy of a database is taken while nothing writes it
    ws = tmp_path / "ws"
    shutil.copytree(finished.ws, ws, ignore=shutil.ignore_patterns("service.*"))
    again = cli("run", str(finished.corpora / "logic.txt"), "--scenes", str(finished.battery),
                "--workspace", str(ws), *TINY_RUN)
    assert again.returncode == 0, again.stderr
    rows = json.loads(cli("results", "--format", "json", "--workspace", str(ws)).stdout)
    assert sum(r["corpus"] is None for r in rows) == 1 and len(rows) == 4


@pytest.mark.slow
def test_bad_inputs_end_in_one_line_and_good_files_finish(tmp_path, corpora, tiny_battery):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_bytes(b"")
    (bad / "binary.txt").write_bytes(bytes(range(256)) * 40)
    (bad / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog")
    missing = tmp_path / "nowhere.txt"
    ws = tmp_path / "ws"
    done = cli("run", str(corpora["logic"]), str(bad / "empty.txt"), str(bad / "binary.txt"),
               str(bad / "broken.pdf"), str(missing), "--scenes", str(tiny_battery),
               "--workspace", str(ws), *TINY)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    err_lines = [ln for ln in done.stderr.splitlines() if ln.startswith("ltm-tui: corpus")]
    assert len(err_lines) == 4, done.stderr
    for name in ("empty.txt", "binary.txt", "broken.pdf", "nowhere.txt"):
        assert sum(name in ln for ln in err_lines) == 1
    rows = json.loads(cli("results", "--format", "json", "--workspace", str(ws)).stdout)
    assert {r["corpus"]: r["status"] for r in rows} == {"logic.txt": "done", None: "done"}


def test_malformed_battery_names_file_line_and_field(tmp_path, corpora):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    (scenes / "oops.yaml").write_text(
        "battery: oops\ndescription: x\nmetric: pressure\nscenes:\n"
        "  - id: a\n    kind: choice\n    prompt: p\n    choices: [x, y]\n    answer: z\n"
    )
    done = cli("run", str(corpora["logic"]), "--scenes", str(scenes), "--workspace", str(tmp_path / "ws"), *TINY)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "oops.yaml:9" in line and "answer" in line


@pytest.mark.slow
@pytest.mark.parametrize("quant", [None, "4bit"], ids=["lora", "qlora"])
def test_run_hf_model_with_lora_and_qlora(tmp_path, corpora, tiny_battery, tiny_hf_model, quant):
    ws = tmp_path / "ws"
    args = ["run", str(corpora["logic"]), "--base", str(tiny_hf_model), "--scenes", str(tiny_battery),
            "--workspace", str(ws), "--steps", "6", "--block-size", "32", "--micro-batch", "4",
            "--grad-accum", "1", "--lr", "1e-2", "--lora-r", "4", "--quiet", "--format", "json"]
    if quant:
        args += ["--quant", quant]
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    run = next(r for r in rows if r["corpus"] == "logic.txt")
    assert run["status"] == "done" and run["tokens"] > 0
    assert run["base"] == str(tiny_hf_model) + (" (4bit)" if quant else "")
    assert "reasoning_depth" in run["scores"]
    # as `results --format json`: each score's interval and overall's
    assert run["intervals"] and len(run["overall_interval"]) == 2
    adapter = ws / "runs" / run["run_id"] / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert (adapter / "adapter_model.safetensors").is_file()

    # the saved adapter loads back with PEFT as it is
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_hf_model), adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # PEFT starts B at zero: these were trained


def test_unknown_model_is_one_line(tmp_path, corpora, tiny_battery):
    done = cli("run", str(corpora["logic"]), "--base", "no-such-org/no-such-model", "--scenes",
               str(tiny_battery), "--workspace", str(tmp_path / "ws"), "--steps", "2", "--quiet")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "no-such-org/no-such-model is not available offline" in done.stderr


def test_a_base_with_pickled_weights_is_refused_in_one_line(tmp_path, corpora, tiny_battery, tiny_hf_model):
    """Weights load from safetensors only: a folder holding only pytorch_model.bin (a pickle,
    which can run code as it loads) is refused with the fix, never unpickled."""
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_hf_model, folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    done = cli("run", str(corpora["logic"]), "--base", str(folder), "--scenes", str(tiny_battery),
               "--workspace", str(tmp_path / "ws"), "--steps", "2", "--quiet")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{folder} holds its weights as pickles (.bin)" in done.stderr and "safetensors" in done.stderr


def test_results_rejects_unknown_sort_column(tmp_path):
    done = cli("results", "--sort", "overall; DROP TABLE runs", "--workspace", str(tmp_path / "ws"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "sort" in done.stderr.lower()


def test_status_shows_step_eta_and_pid_and_never_cuts_a_run_id():
    """At 80 columns with a long corpus name and error, every run id is whole (cancel and retry
    take it) and a training job shows its step, ETA and worker pid."""
    import io

    from rich.console import Console

    from ltm_tui.report import print_status

    jobs = [
        {"run_id": "war-and-peace-volume-one-s0-3fa9c1", "corpus": "War and Peace, volume one (1869).epub",
         "kind": "adapter", "status": "training", "step": 120, "total": 400, "eta_s": 95, "pid": 4242,
         "error": None},
        {"run_id": "base-micro-small-s0-77aa01", "corpus": None, "kind": "baseline", "status": "failed",
         "step": None, "total": None, "eta_s": None, "pid": None,
         "error": "out of memory: use --quant 4bit, a smaller micro preset, or a smaller micro_batch"},
    ]
    out = io.StringIO()
    print_status(jobs, Console(file=out, width=80, color_system=None))
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for job in jobs:
        assert job["run_id"] in text
    training = next(line for line in text.splitlines() if jobs[0]["run_id"] in line)
    assert "120/400" in training and "1m35s" in training and "4242" in training
    assert " ".join(text.split()).count(jobs[1]["error"]) == 1  # the error whole, below the table
    wide = io.StringIO()
    print_status(jobs, Console(file=wide, width=140, color_system=None))
    assert "War and Peace, volume one" in wide.getvalue() and "(baseline)" in wide.getvalue()  # the corpus column


def test_follow_shows_training_and_evaluation_progress_in_80_columns():
    """`ltm-tui follow`'s bars: a training run's step, loss and ETA, and an evaluating run's
    scenes done of all with its ETA, each on one line at 80 columns; tokens/s when wide."""
    import io

    from rich.console import Console

    from ltm_tui.report import RunProgress

    jobs = [{"run_id": "wp", "kind": "adapter", "base": "micro:tiny", "status": "training",
             "corpus": "War and Peace, volume one (1869).epub"},
            {"run_id": "b", "kind": "baseline", "base": "micro:tiny", "corpus": None, "status": "evaluating"}]
    events = [{"type": "progress", "run_id": "wp", "step": 120, "total": 400, "loss": 1.23456,
               "tokens_per_s": 12345.6, "eta_s": 80},
              {"type": "eval_progress", "run_id": "b", "done": 12, "total": 40, "eta_s": 20}]
    for width in (80, 140):
        console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
        bars = RunProgress(jobs, console=console)
        for event in events:
            bars.on_event(event)
        console.print(bars.progress)
        lines = console.file.getvalue().splitlines()
        assert len(lines) == 2 and max(len(line) for line in lines) <= width
        training, evaluating = lines
        assert training.startswith("War and Pea") and ".epub" in training  # cut in the middle
        assert "120/400" in training and "loss 1.2346" in training and "ETA 1m20s" in training
        assert "evaluating" in evaluating and "12/40 scenes" in evaluating and "ETA 20s" in evaluating
        assert ("12,346 tok/s" in training) == (width == 140)


@pytest.mark.parametrize("flags, says", [
    (["--steps", "-5"], "--steps -5: give a whole number of at least 1"),
    (["--block-size", "0"], "--block-size 0: give a whole number of at least 8"),
    (["--micro-batch", "0"], "--micro-batch 0: give a whole number of at least 1"),
    (["--grad-accum", "-1"], "--grad-accum -1: give a whole number of at least 1"),
    (["--lr", "inf"], "--lr inf: give a positive number"),
    (["--lr", "-1"], "--lr -1.0: give a positive number"),
    (["--epochs", "nan"], "--epochs nan: give a positive number"),
    (["--device", "bogus"], "--device 'bogus': give cpu, cuda or cuda:N"),
    (["--seed", "-1"], "--seed -1: give a whole number from 0 to 4294967295"),
    (["--seeds", "0"], "--seeds 0: give a whole number of at least 1"),
    (["--priority", "99999999999999999999"], "--priority 99999999999999999999: give a whole number from -1000000"),
])
def test_a_number_out_of_its_range_is_one_line_before_anything_is_queued(tmp_path, flags, says):
    book = tmp_path / "book.md"
    book.write_text("Every rule has a reason. " * 40, encoding="utf-8")
    ws = tmp_path / "ws"
    out = cli("run", str(book), *flags, "--workspace", str(ws))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and says in out.stderr  # one line
    assert not (ws / "ltm.duckdb").exists()  # no service asked, nothing stored


def test_an_empty_path_is_not_the_current_folder(tmp_path):
    out = cli("run", "", "--workspace", str(tmp_path / "ws"), cwd=tmp_path)
    assert out.returncode == 1 and not (tmp_path / "ws" / "ltm.duckdb").exists()
    assert out.stderr.splitlines() == [
        "ltm-tui: corpus: an empty path names no file (an unset shell variable?); give a file or folder",
        "ltm-tui: no corpus could be read; nothing was queued"]


def test_more_bad_input_is_one_line(tmp_path):
    book = tmp_path / "book.md"
    book.write_text("Every rule has a reason. " * 40, encoding="utf-8")
    for command in ("cancel", "retry"):  # a mistyped workspace is not made into a new one
        out = cli(command, "nope", "--workspace", str(tmp_path / "typo"))
        assert out.returncode == 2 and "no run 'nope'" in out.stderr and not (tmp_path / "typo").exists()
    follow = cli("follow", "nope", "--workspace", str(tmp_path / "ws"))
    assert follow.returncode == 2 and follow.stderr == "ltm-tui: no run nope; `ltm-tui status` lists them\n"
    deep = tmp_path / ("d" * (120 - len(str(tmp_path))))  # WORKSPACE/service.sock over the kernel's 107 bytes
    run = cli("run", str(book), "--workspace", str(deep))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("ltm-tui: workspace: the workspace's path is too long")
    afile = tmp_path / "not-a-folder"
    afile.write_text("x")
    for command in (("results",), ("run", str(book))):
        out = cli(*command, "--workspace", str(afile))
        assert out.returncode == 2 and out.stderr == (
            f"ltm-tui: workspace: {afile} is a file, not a workspace folder; give a folder to --workspace "
            "(or LTM_WORKSPACE)\n")
    checked = cli("scenes", "check", str(REPO / "scenes"), "--workspace", str(tmp_path / "ws"))
    assert checked.returncode == 0, checked.stderr
    port = cli("web", "--port", "99999", "--workspace", str(tmp_path / "ws"))
    assert port.returncode == 2 and port.stderr == "ltm-tui: usage: --port 99999: give a TCP port from 1 to 65535\n"
