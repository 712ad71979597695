"""`ltm-tui search`: the space file's checks, the eval-loss events that feed the pruner, and the
loop end to end through the real service and workers (micro `tiny`, a few steps, tiny battery):
a 2×2 grid in 4 trials, a study that goes on without its client and after its service is killed,
--stop, pruning that cancels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backend.core.errors import SpaceError
from backend.studies.search import check_base, check_objective, grid_space, load_space
from tests.conftest import REPO, WAIT, cli, wait_for, write_tiny_battery

TINY = ["--preset", "tiny", "--block-size", "64", "--micro-batch", "8", "--min-train-tokens", "0",
        "--epochs", "50"]


def _space(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "text, where, says",
    [
        ("params: {lr: {low: 1.0e-3}}\n", "params.lr", "high is missing"),
        ("params: {lr: {low: 1.0e-2, high: 1.0e-3}}\n", "params.lr", "must be below"),
        ("params: {rank: {choices: [4, 8]}}\n", "params.rank", "unknown parameter"),
        ("params: {steps: {choices: [10, 10.5]}}\n", "params.steps.choices", "not a whole number"),
        ("params: {warmup_frac: {low: 0, high: 0.1, log: true}}\n", "params.warmup_frac.low", "log range must start above 0"),
        ("params: {lr: {low: 0, high: 1}}\n", "params.lr.low", "must be above 0"),
        ("params: {preset: {low: 1, high: 2}}\n", "params.preset", "takes choices"),
        ("direction: up\nparams: {lr: {low: 1.0e-3, high: 1.0e-2}}\n", "direction", "maximize or minimize"),
        ("pruner: {kind: hyperband}\nparams: {lr: {low: 1.0e-3, high: 1.0e-2}}\n", "pruner.kind", "median or none"),
        ("corpora: some\nparams: {lr: {low: 1.0e-3, high: 1.0e-2}}\n", "corpora", "subsets"),
        ("params: {lr: 1.0e-3}\n", "params", "nothing to search"),
        ("params: [lr]\n", "params", "at least one parameter"),
        ("objective: overall\nparams: {lr: {low: 1, high: 2}\n", "3", "not valid YAML"),
    ],
)
def test_a_bad_space_is_one_line_naming_file_and_field(tmp_path, text, where, says):
    path = _space(tmp_path, text)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    line = info.value.one_line()
    assert f"{path}:{where}" in line and says in line and "\n" not in line


@pytest.mark.parametrize("data, says", [
    (bytes(range(256)) * 4, "not a text file"),
    (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
])
def test_a_space_that_is_no_yaml_text_at_all_is_one_line(tmp_path, data, says):
    path = tmp_path / "space.yaml"
    path.write_bytes(data)
    with pytest.raises(SpaceError, match=says):
        load_space(path)


def test_base_and_grid_checks_name_the_parameter(tmp_path):
    space = load_space(_space(tmp_path, "params: {lora_r: {choices: [4, 8]}, lr: {low: 1.0e-4, high: 1.0e-3, log: true}}\n"))
    with pytest.raises(SpaceError, match=r"params\.lora_r: LoRA settings apply to Hugging Face bases"):
        check_base(space, micro=True)
    check_base(space, micro=False)
    with pytest.raises(SpaceError, match=r"params\.lr: a grid needs finite values: add step:"):
        grid_space(space, ["a.txt"])
    ok = load_space(_space(tmp_path, "params: {steps: {low: 10, high: 30, step: 10}, lr: {choices: [0.01, 0.02]}}\n", "ok.yaml"))
    assert grid_space(ok, ["a.txt"]) == {"steps": [10, 20, 30], "lr": [0.01, 0.02]}
    battery = write_tiny_battery(tmp_path / "battery")
    check_objective(ok, str(battery))  # overall
    typo = load_space(_space(tmp_path, "objective: reasoning_dept\nparams: {lr: {choices: [0.01, 0.02]}}\n", "typo.yaml"))
    with pytest.raises(SpaceError, match=r"typo\.yaml:objective: 'reasoning_dept' is not a score of the battery in .*;"
                                         r" use overall or one of forgetting, perplexity, reasoning_depth$"):
        check_objective(typo, str(battery))
    assert load_space(_space(tmp_path, "objective: perplexity\nparams: {lr: {choices: [0.01]}}\n", "ppl.yaml")).direction == "minimize"


def test_a_trial_sets_training_lora_and_base_settings(tmp_path):
    from backend.studies.search import trial_settings

    space = load_space(_space(tmp_path, "eval_every: 7\nparams: {lr: {low: 0.0001, high: 0.001, log: true},"
                                        " lora_r: {choices: [4, 8]}, lora_alpha: 16, steps: {low: 10, high: 20, step: 10}}\n"))
    base = {"base": {"base": "/m/llama", "preset": None}, "scenes": "/s", "train": {"lr": 2e-4, "max_steps": 0},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05}, "probes": False}
    out = trial_settings(base, space, {"lr": 5e-4, "lora_r": 8, "steps": 20})
    assert out["train"] == {"lr": 5e-4, "max_steps": 20, "eval_every": 7}
    assert out["lora"] == {"r": 8, "alpha": 16, "dropout": 0.05}  # alpha pinned by the space
    assert base["lora"]["r"] == 16 and "eval_every" not in base["train"]  # the command's settings untouched
    micro = load_space(_space(tmp_path, "params: {preset: {choices: [tiny, small]}}\n", "m.yaml"))
    assert trial_settings({**base, "lora": {}}, micro, {"preset": "small"})["base"]["preset"] == "small"


def test_the_cli_says_a_bad_space_in_one_line(tmp_path, corpora):
    path = _space(tmp_path, "params: {lora_r: {choices: [4, 8]}}\n")
    out = cli("search", "--space", str(path), "--trials", "2", str(corpora["logic"]),
              "--workspace", str(tmp_path / "ws"), *TINY)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"ltm-tui: search space: {path}:params.lora_r: LoRA settings apply to Hugging Face bases;"
        " micro trains all its weights; remove it or change --base"
    )
    assert not (tmp_path / "ws" / "search").exists()


def test_eval_loss_events_come_every_k_steps_from_fixed_blocks(tmp_path):
    import torch

    from backend.compute.models import ByteTokenizer, build_micro
    from backend.compute.train import _eval_starts, train_model
    from backend.core.config import TrainConfig
    from backend.ingest.packing import PackedBlocks, load_tokens, tokenize_to_file
    from tests.conftest import LOGIC_TEXT

    tok = ByteTokenizer()
    tokens = tmp_path / "tokens.bin"
    tokenize_to_file([LOGIC_TEXT], tok.encode, tokens, bos_id=tok.bos_id, eos_id=tok.eos_id)
    cfg = TrainConfig(block_size=64, micro_batch=8, lr=1e-2, epochs=50, min_train_tokens=0, max_steps=25,
                      checkpoint_every=0, log_every=5, eval_every=10)
    trained = {}

    def train(folder: str, config: TrainConfig) -> list[dict]:
        events: list[dict] = []
        trained[folder] = build_micro("tiny", 0, torch.device("cpu"))
        train_model(trained[folder], tokens, tmp_path / folder, config,
                    device=torch.device("cpu"), emit=lambda t, **p: events.append({"type": t, **p}), log=lambda s: None)
        return events

    with_eval = train("a", cfg)
    metrics = [e for e in with_eval if e["type"] == "metric"]
    assert [(e["name"], e["step"]) for e in metrics] == [("eval_loss", 10), ("eval_loss", 20), ("eval_loss", 25)]
    assert metrics[0]["value"] > metrics[-1]["value"]  # it learns, and the measure sees it
    plain = train("b", TrainConfig(**{**cfg.to_dict(), "eval_every": 0}))
    assert not [e for e in plain if e["type"] == "metric"]
    # evaluating changes nothing in the training: the same weights at the end, bit for bit (the
    # progress events may differ: a slow step adds one, and evaluating makes steps slower)
    for (name, a), b in zip(trained["a"].state_dict().items(), trained["b"].state_dict().values()):
        assert torch.equal(a, b), name
    # the sample: blocks spread evenly from the first to the last, the same every time
    blocks = PackedBlocks(load_tokens(tokens), 64, seed=0)
    starts = _eval_starts(blocks, 8)
    assert len(starts) == 8 and starts[0] == 0 and starts[-1] == 64 * (blocks.blocks_per_epoch - 1)
    assert list(starts) == list(_eval_starts(PackedBlocks(load_tokens(tokens), 64, seed=5), 8))


def _search(tmp_path, space: Path, *extra: str, timeout: float = 300):
    return cli("search", "--space", str(space), *extra, "--workspace", str(tmp_path / "ws"),
               "--scenes", str(tmp_path / "battery"), "--format", "json", *TINY, timeout=timeout)


def _setup(tmp_path, corpora) -> None:
    if not (tmp_path / "battery").exists():
        write_tiny_battery(tmp_path / "battery")


@pytest.mark.slow
def test_grid_enumerates_a_2x2_grid_in_four_trials(tmp_path, corpora):
    _setup(tmp_path, corpora)
    space = _space(tmp_path, """\
        objective: overall
        pruner: none
        params:
          lr: {choices: [0.003, 0.01]}
          steps: {low: 10, high: 20, step: 10}
        """)
    out = _search(tmp_path, space, "--trials", "9", "--sampler", "grid", str(corpora["logic"]))
    assert out.returncode == 0, out.stderr
    assert "the grid holds 4 points: 4 trials, not 9" in out.stderr
    report = json.loads(out.stdout)
    trials = report["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"] * 4
    assert sorted((t["params"]["lr"], t["params"]["steps"]) for t in trials) == [
        (0.003, 10), (0.003, 20), (0.01, 10), (0.01, 20)]
    assert len({t["run_id"] for t in trials}) == 4
    best = max(trials, key=lambda t: t["value"])
    assert report["best"]["value"] == best["value"] and report["study"]["best_trial"] == report["best"]["number"]
    assert (tmp_path / "ws" / "search" / "space" / "journal.log").is_file()
    # each trial is an ordinary run with the trial's settings, and the dashboard's op has them
    from backend.core.workspace import Workspace
    from backend.jobs.client import connect

    with connect(Workspace(tmp_path / "ws")) as client:
        shown = client.call("search", study="space")
        for t in trials:
            run = client.call("run", run_id=t["run_id"])["run"]
            assert run["status"] == "done" and run["kind"] == "adapter"
            assert run["settings"]["train"]["lr"] == t["params"]["lr"]
            assert run["steps"] == t["params"]["steps"] and run["settings"]["train"]["eval_every"] == 10
    assert shown["study"]["best_trial"] == report["best"]["number"]
    assert [(t["number"], t["run_id"], t["state"]) for t in shown["trials"]] == [
        (t["number"], t["run_id"], t["state"]) for t in trials]


def _journal_trials(tmp_path) -> list[dict]:
    from backend.core.workspace import Workspace
    from backend.jobs.client import try_connect

    client = try_connect(Workspace(tmp_path / "ws"))
    if client is None:
        return []
    with client:
        try:
            return client.call("search", study="space")["trials"]
        except Exception:  # noqa: BLE001 - not saved yet
            return []


def _service_pid(tmp_path) -> int:
    return int((tmp_path / "ws" / "service.pid").read_text().strip())


@pytest.mark.slow
def test_a_search_goes_on_without_its_client_and_after_the_service_is_killed(tmp_path, corpora):
    """SIGHUP to the client's group after its first trial (a dropped SSH connection): the study
    runs all its trials in the service. Then the service is SIGKILLed mid-trial: the next
    command's service adopts the trial's worker, waits for its job and finishes the study."""
    _setup(tmp_path, corpora)
    space = _space(tmp_path, """\
        pruner: {kind: median, startup_trials: 5}
        eval_every: 5
        params:
          lr: {low: 0.002, high: 0.02, log: true}
          steps: {low: 10, high: 30, step: 5}
        """)
    args = ["--space", str(space), "--trials", "2", "--workspace", str(tmp_path / "ws"),
            "--scenes", str(tmp_path / "battery"), "--format", "json", *TINY, str(corpora["logic"])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start(argv):
        return subprocess.Popen([sys.executable, "-m", "ltm_tui.cli", "search", *argv], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    first = start(args)
    try:
        wait_for(lambda: [t for t in _journal_trials(tmp_path) if t["state"] == "COMPLETE"], what="trial 0 to finish")
    finally:
        os.killpg(first.pid, signal.SIGHUP)  # the terminal goes away
        first.communicate()
    assert first.returncode != 0  # it did not wait for the end: the study is not its own
    trials = wait_for(lambda: [t for t in _journal_trials(tmp_path) if t["state"] == "COMPLETE"][1:] and
                      _journal_trials(tmp_path), what="the service to run trial 1 without a client")
    assert [(t["number"], t["state"]) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    again = cli("search", *args)  # nothing left: the report at once
    assert again.returncode == 0, again.stderr
    assert [t["run_id"] for t in json.loads(again.stdout)["trials"]] == [t["run_id"] for t in trials]

    args[args.index("--trials") + 1] = "3"
    third = start(args)
    try:
        [trial] = wait_for(lambda: [t for t in _journal_trials(tmp_path) if t["number"] == 2 and t["run_id"]],
                           what="trial 2's job")
        wait_for(lambda: [e for e in _events(tmp_path, trial["run_id"]) if e["type"] == "progress"],
                 what="trial 2's training")
        os.kill(_service_pid(tmp_path), signal.SIGKILL)  # its worker goes on, alone
    finally:
        os.killpg(third.pid, signal.SIGKILL)
        third.communicate()
    fourth = cli("search", *args)
    assert fourth.returncode == 0, fourth.stderr
    assert f"trial 2: waiting for its job {trial['run_id']} (asked before the last stop)" in fourth.stderr
    report = json.loads(fourth.stdout)
    trials = report["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2] and trials[2]["run_id"] == trial["run_id"]
    assert all(t["state"] == "COMPLETE" for t in trials)
    log = (tmp_path / "ws" / "runs" / trial["run_id"] / "train.log").read_text()
    assert "resumed from" not in log  # the same worker finished it: adopted, not restarted
    # each invocation's sampler goes on where the study stands: no trial repeats another's settings
    assert len({json.dumps(t["params"], sort_keys=True) for t in trials}) == 3
    assert report["best"]["value"] == max(t["value"] for t in trials)
    assert report["importances"] is None or set(report["importances"]) == {"lr", "steps"}
    assert report["importances"] is not None or report["importances_note"]
    table = cli("search", *[a for a in args if a not in ("--format", "json")])
    assert table.returncode == 0, table.stderr
    assert "best: trial" in table.stdout and "importance:" in table.stdout and "3 trials" in table.stdout


@pytest.mark.slow
def test_stop_ends_a_running_study_and_cancels_its_trial(tmp_path, corpora):
    _setup(tmp_path, corpora)
    space = _space(tmp_path, "pruner: none\nparams: {lr: {choices: [0.01, 0.003]}, steps: 4000}\n")
    args = ["--space", str(space), "--trials", "2", "--sampler", "grid", "--workspace", str(tmp_path / "ws"),
            "--scenes", str(tmp_path / "battery"), "--format", "json", *TINY, str(corpora["logic"])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    follower = subprocess.Popen([sys.executable, "-m", "ltm_tui.cli", "search", *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        [trial] = wait_for(lambda: [t for t in _journal_trials(tmp_path) if t["run_id"]], what="trial 0's job")
        stop = cli("search", "--stop", "--study", "space", "--workspace", str(tmp_path / "ws"))
        assert stop.returncode == 0, stop.stderr
        out, err = follower.communicate(timeout=WAIT)
    finally:
        if follower.poll() is None:
            os.killpg(follower.pid, signal.SIGKILL)
    assert follower.returncode == 1, err  # no trial finished with a score
    assert "search stopped by the user" in err.decode()
    [stopped] = json.loads(out)["trials"]
    assert stopped["state"] == "FAIL" and stopped["error"] == "search stopped by the user"
    from backend.core.workspace import Workspace
    from backend.jobs.client import connect

    with connect(Workspace(tmp_path / "ws")) as client:
        wait_for(lambda: client.call("run", run_id=trial["run_id"])["run"]["status"] == "cancelled", what="the cancel")
        assert client.call("search", study="space")["study"]["running"] is False
    request = json.loads((tmp_path / "ws" / "search" / "space" / "request.json").read_text())
    assert request["active"] is False  # a new service does not start it again


@pytest.mark.slow
def test_pruning_cancels_a_diverging_trial(tmp_path, corpora):
    _setup(tmp_path, corpora)
    space = _space(tmp_path, """\
        eval_every: 5
        pruner: {kind: none, max_eval_loss: 6.0}
        params:
          lr: {choices: [3.0, 5.0]}
          steps: 400
        """)
    out = _search(tmp_path, space, "--trials", "1", str(corpora["logic"]))
    assert out.returncode == 1, out.stderr  # no trial finished with a score
    report = json.loads(out.stdout)
    assert [t["state"] for t in report["trials"]] == ["PRUNED"] and report["best"] is None
    assert "trial 0: PRUNED pruned at step 5" in out.stderr
    from backend.core.workspace import Workspace
    from backend.jobs.client import connect

    with connect(Workspace(tmp_path / "ws")) as client:
        for t in report["trials"]:
            assert t["error"].startswith("pruned at step") and t["last_value"] > 6.0
            wait_for(lambda: client.call("run", run_id=t["run_id"])["run"]["status"] == "cancelled", 60, "the cancel")
            steps = [e["step"] for e in _events(tmp_path, t["run_id"]) if e["type"] in ("metric", "progress")]
            assert steps and max(steps) < 100  # stopped long before its 400 steps


def _events(tmp_path, run_id: str) -> list[dict]:
    from backend.core.events import read_events

    return read_events(tmp_path / "ws" / "runs" / run_id / "events.jsonl")[0]


def test_a_subset_trains_on_a_corpus_set_of_its_files(tmp_path, corpora):
    from backend.ingest.corpora import inspect_corpus, iter_text
    from backend.studies.search import chosen_files, combined_corpus, subset_keys

    files = [str(corpora["logic"]), str(corpora["story"])]
    assert subset_keys(files) == ["use:logic.txt", "use:story.txt"]
    params = {"use:logic.txt": False, "use:story.txt": True}
    assert chosen_files(params, files, subsets=True) == [files[1]]
    assert chosen_files(params, files, subsets=False) == files
    both = combined_corpus(files, tmp_path / "sets")
    assert both.suffix == ".corpora" and combined_corpus(files, tmp_path / "sets") == both
    text = "".join(iter_text(both))
    assert text == corpora["logic"].read_text() + "\n\n" + corpora["story"].read_text()
    assert inspect_corpus(both).words == sum(inspect_corpus(f).words for f in files)
    assert combined_corpus(files[:1], tmp_path / "sets") == corpora["logic"]


@pytest.mark.slow
def test_a_failed_job_ends_its_trial_fail_with_the_reason(tmp_path):
    write_tiny_battery(tmp_path / "battery")
    short = tmp_path / "short.txt"
    short.write_text("tiny text", encoding="utf-8")  # too few tokens to train on: the job fails
    space = _space(tmp_path, "pruner: none\nparams: {lr: {low: 0.001, high: 0.01, log: true}, steps: 10}\n")
    out = _search(tmp_path, space, "--trials", "1", str(short))
    assert out.returncode == 1, out.stderr
    [trial] = json.loads(out.stdout)["trials"]
    assert trial["state"] == "FAIL" and trial["run_id"]
    assert trial["error"].startswith("job failed: corpus: only 11 tokens after tokenizing"), trial["error"]


def test_a_study_resumes_only_as_it_was_started(tmp_path):
    from backend.studies.search import open_study

    first = load_space(_space(tmp_path, "study: s\nparams: {lr: {low: 0.001, high: 0.01, log: true}}\n", "a.yaml"))
    other = load_space(_space(tmp_path, "study: s\nparams: {lr: {low: 0.001, high: 0.02, log: true}}\n", "b.yaml"))
    settings = {"base": {"base": "micro", "preset": "tiny"}, "train": {"lr": 0.003}}
    study = open_study(tmp_path / "s", first, "tpe", ["/x/a.txt"], settings, 0)
    trial = study.ask()
    trial.suggest_float("lr", 0.001, 0.01, log=True)
    study.tell(trial, 0.5)
    again = open_study(tmp_path / "s", first, "tpe", ["/x/a.txt"], settings, 0)  # the journal, read back
    assert [t.value for t in again.trials] == [0.5]
    with pytest.raises(SpaceError, match=r"started with other space; .*--study NAME, or study: in .*b\.yaml"):
        open_study(tmp_path / "s", other, "tpe", ["/x/a.txt"], settings, 0)
    with pytest.raises(SpaceError, match=r"started with other files and settings;"):
        open_study(tmp_path / "s", first, "tpe", ["/x/b.txt"], {**settings, "train": {"lr": 0.01}}, 0)


@pytest.mark.slow
def test_a_trial_survives_a_reboot_mid_training(tmp_path, corpora):
    """The CLI killed and the service stopped with its workers (what a reboot leaves): the job
    ends interrupted; the next search queues it again and it resumes from its checkpoint."""
    from tests.conftest import stop_service

    write_tiny_battery(tmp_path / "battery")
    space = _space(tmp_path, "pruner: none\neval_every: 10\nparams: {lr: {choices: [0.01]}, steps: 60}\n")
    args = ["search", "--space", str(space), "--trials", "1", "--sampler", "grid", "--workspace", str(tmp_path / "ws"),
            "--scenes", str(tmp_path / "battery"), "--format", "json", *TINY, str(corpora["logic"])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-m", "ltm_tui.cli", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        [trial] = wait_for(lambda: [t for t in _journal_trials(tmp_path) if t["run_id"]], 120, "trial 0's job")
        wait_for(lambda: [e for e in _events(tmp_path, trial["run_id"]) if e["type"] == "metric"], 120, "training")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    stop_service(tmp_path / "ws")  # the workers checkpoint and stop: the run ends interrupted
    out = cli(*args)
    assert out.returncode == 0, out.stderr
    assert f"trial 0: job {trial['run_id']} was interrupted; queued again (it resumes)" in out.stderr
    [done] = json.loads(out.stdout)["trials"]
    assert done["state"] == "COMPLETE" and done["run_id"] == trial["run_id"] and done["last_step"] == 60
    log = (tmp_path / "ws" / "runs" / trial["run_id"] / "train.log").read_text()
    assert "resumed from step-" in log
