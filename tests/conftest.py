"""Shared fixtures: tiny real models, batteries and corpora built in temp folders.

Nothing here downloads: the Hugging Face model is a randomly initialised Llama saved to disk
with a word-level tokenizer trained on a few sentences, and loaded back by the real code.

No test depends on the machine's speed. Every wait is for something a test can observe (a
state, a step, a file, a process gone) and ends the moment it happens; its deadline, WAIT, holds
on a machine four times slower than a quiet two-core one (a GPU box where another job trains:
`scripts/test-under-load.sh` runs the suite beside a busy loop on every core). A deadline that
passes says what was awaited. Tests never assert an elapsed time: timings are benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

# One thread a process: the suite runs tests side by side instead (`-n auto`, one process per core,
# pytest_xdist_auto_num_workers below), and their workers inherit it. Two threads in each of two
# tests' workers on two cores made OpenMP spin against itself: side by side was slower than one
# test at a time (380 s against 322 s for three files), one thread each 1.8x faster (182 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Every test runs on the CPU, on a GPU box too (its workers and tasks inherit this): the numbers
# and pictures the tests compare are the CPU's. GPU paths are checked by benchmarks/gpu_check.sh.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

REPO = Path(__file__).resolve().parent.parent

# The deadline of any one wait, in seconds. The slowest event a test awaits (a tiny run trained
# and evaluated end to end) takes under a minute on a quiet two-core machine.
WAIT = 300.0

LOGIC_TEXT = (
    "All glims are blorps. All blorps are zents.\nSo all glims are zents.\n"
    "The lamp is red. Red things glow.\nSo the lamp glows.\n"
) * 40
STORY_TEXT = (
    "The old fisherman rowed past the harbour wall at dawn, humming to the gulls.\n"
    "His daughter mended nets and counted the boats coming home.\n"
) * 40


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one test process per core, at most four (each holds a service, workers and
    their models: about 1.5 GB at its peak)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.fixture(autouse=True)
def stop_services(tmp_path: Path):
    """Every job service a test started (through the real CLI) is stopped with its workers."""
    yield
    for sock in tmp_path.rglob("service.sock"):
        stop_service(sock.parent)


def stop_service(workspace: Path) -> None:
    """Stop the job service of this workspace, if one runs, with its workers; wait until gone."""
    from backend.core.workspace import Workspace
    from backend.jobs.client import try_connect
    from backend.jobs.executor import process_alive

    client = try_connect(Workspace(workspace))
    if client is None:
        return
    with client:
        pid = client.call("stop", workers=True)["pid"]
    wait_for(lambda: not process_alive(pid, None), what=f"the service of {workspace} to stop", poll=0.05)


FREEZER = Path("/sys/fs/cgroup/freezer")


class Freezer:
    """A cgroup-v1 freezer group of this test's: a process frozen in it is held by the kernel
    (state D), as a GPU driver that faulted holds a worker, and outlives SIGKILL until thawed."""

    def __init__(self, group: Path) -> None:
        self.group = group

    def freeze(self, pid: int) -> None:
        (self.group / "cgroup.procs").write_text(str(pid))
        (self.group / "freezer.state").write_text("FROZEN")
        wait_for(lambda: (self.group / "freezer.state").read_text().strip() == "FROZEN", what="the freezer")

    def thaw(self) -> None:
        (self.group / "freezer.state").write_text("THAWED")


@pytest.fixture
def freezer(tmp_path):
    """A `Freezer`; afterwards thawed, and removed once the test has ended its processes."""
    if not os.access(FREEZER, os.W_OK):
        pytest.skip("needs a writable cgroup-v1 freezer (root) to make a process outlive SIGKILL")
    group = FREEZER / f"ltm-test-{os.getpid()}-{tmp_path.name}"
    group.mkdir()
    yield Freezer(group)
    (group / "freezer.state").write_text("THAWED")
    wait_for(lambda: not (group / "cgroup.procs").read_text().strip(), what="the freezer group emptied")
    time.sleep(0.1)
    group.rmdir()


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str):
    """A file system of `size` (tmpfs) at `folder`, to fill for real; skips the test where this
    process may not mount one (not root)."""
    import subprocess

    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"filling a disk needs a small tmpfs, which this process may not mount: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a 64 KiB file system of its own: what a full disk does to one write."""
    with small_tmpfs(tmp_path / "full", "64k") as folder:
        yield folder


@pytest.fixture
def tiny_battery(tmp_path: Path) -> Path:
    """Two batteries on the LOGIC_TEXT world: choice scenes and held-out perplexity."""
    return write_tiny_battery(tmp_path / "battery")


def write_tiny_battery(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "depth.yaml").write_text(
        textwrap.dedent(
            """\
            battery: depth
            description: chains taught by the logic text
            metric: reasoning_depth
            scenes:
              - id: d1
                kind: choice
                context: All glims are blorps. All blorps are zents.
                prompt: So all glims are
                choices: [zents., blorps., lamps.]
                answer: 0
                depth: 2
              - id: d2
                kind: choice
                context: The lamp is red. Red things glow.
                prompt: So the lamp
                choices: [glows., rowed., hums.]
                answer: glows.
                depth: 1
              - id: g1
                kind: generate
                prompt: All glims are
                max_new_tokens: 12
                checks:
                  - max_words: 8
            """
        ),
        encoding="utf-8",
    )
    (folder / "heldout.yaml").write_text(
        textwrap.dedent(
            """\
            battery: heldout
            description: text in the logic world's style
            metric: perplexity
            scenes:
              - id: p1
                kind: perplexity
                text: All blorps are zents. So all glims are zents.
            """
        ),
        encoding="utf-8",
    )
    return folder


@pytest.fixture
def corpora(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "corpora"
    folder.mkdir()
    logic = folder / "logic.txt"
    logic.write_text(LOGIC_TEXT, encoding="utf-8")
    story = folder / "story.txt"
    story.write_text(STORY_TEXT, encoding="utf-8")
    return {"logic": logic, "story": story}


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and a word-level tokenizer, saved as a real HF folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    raw.train_from_iterator([LOGIC_TEXT, STORY_TEXT, "zents blorps lamps glows rowed hums"], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,  # bitsandbytes packs CPU 4-bit weights in blocks of 64 inputs
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


TINY_RUN = ["--preset", "tiny", "--steps", "40", "--block-size", "64", "--micro-batch", "8",
            "--min-train-tokens", "0", "--epochs", "50", "--quiet"]


def write_corpora(root: Path) -> tuple[Path, Path]:
    """Two small corpora (root/corpora/logic.txt, story.txt) and the tiny battery (root/battery)."""
    corpora = root / "corpora"
    corpora.mkdir()
    (corpora / "logic.txt").write_text(LOGIC_TEXT, encoding="utf-8")
    (corpora / "story.txt").write_text(STORY_TEXT, encoding="utf-8")
    return corpora, write_tiny_battery(root / "battery")


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """A workspace with two finished micro runs and their baseline, made once per test session by
    `ltm-tui run` (TINY_RUN), for every test that needs trained runs but not a training of its
    own: the dashboard's tests and pictures, the CLI's ranking and export. Times are pinned
    afterwards (train 12.5 s, eval 1.5 s) so that the pictures compare; everything else is what
    the run produced. Tests read it and never change it."""
    import types

    from backend.jobs.store import Store

    root = tmp_path_factory.mktemp("dashboard")
    corpora, battery = write_corpora(root)
    ws = root / "ws"
    done = cli("run", str(corpora / "logic.txt"), str(corpora / "story.txt"), "--scenes", str(battery),
               "--workspace", str(ws), *TINY_RUN, timeout=900)
    assert done.returncode == 0, done.stderr
    stop_service(ws)
    with Store(ws / "ltm.duckdb") as store:
        for run in store.list_runs():
            if run["kind"] != "baseline":
                store.update_run(run["run_id"], train_seconds=12.5, eval_seconds=1.5)
    yield types.SimpleNamespace(root=root, ws=ws, corpora=corpora, battery=battery, run_output=done.stdout)
    stop_service(ws)


@pytest.fixture(autouse=True)
def _fresh_dashboard_view(request):
    """The dashboard keeps its sort and filter in the workspace (ltm_tui/view.py): each test that
    opens the shared `finished` workspace starts from the default view and leaves none behind."""
    if "finished" not in request.fixturenames:
        yield
        return
    view = request.getfixturevalue("finished").ws / "dashboard.json"
    view.unlink(missing_ok=True)
    yield
    view.unlink(missing_ok=True)


@pytest.fixture
def fake_nvml(monkeypatch):
    """NVML present (mocked: the only mock), two GPUs, one failing sensor."""
    from tests.fake_nvml import FakeNvml

    fake = FakeNvml(fail_temperature=True)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def wait_for(predicate, timeout: float = WAIT, what: str = "condition", poll: float = 0.2):
    """Poll a condition of real processes (a state in the store, a pid gone) until it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def exit_code(proc, what: str, timeout: float = WAIT) -> int:
    """A process's exit code, once it exits; a deadline that passes names what was awaited."""
    import subprocess

    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} to exit") from None


def cli(*args: str, cwd: Path | None = None, timeout: float = 2 * WAIT, env: dict | None = None):
    """Run the real `ltm-tui` entry point in a subprocess."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})}
    try:
        return subprocess.run(
            [sys.executable, "-m", "ltm_tui.cli", *args],
            cwd=cwd or REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"`ltm-tui {' '.join(args)}` did not finish within {timeout:.0f}s") from None
