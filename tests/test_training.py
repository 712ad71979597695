"""Packing, the schedule, the training recipe (checkpoint, resume) and scoring on tiny real models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from backend.compute.evaluate import LoglikRequest, encode_pair, loglikelihoods, text_loss
from backend.compute.models import ByteTokenizer, build_micro
from backend.compute.train import lr_factor, newest_checkpoint, train_model
from backend.core.config import TrainConfig
from backend.ingest.packing import PackedBlocks, load_tokens, real_token_share, step_blocks, tokenize_to_file
from tests.conftest import WAIT

CPU = torch.device("cpu")


def _tokens(tmp_path, text: str):
    tok = ByteTokenizer()
    path = tmp_path / "tokens.bin"
    n = tokenize_to_file([text[i : i + 7] for i in range(0, len(text), 7)], tok.encode, path, bos_id=tok.bos_id, eos_id=tok.eos_id)
    return path, n


def test_tokenize_streams_exact_bytes_across_chunks(tmp_path):
    text = "Все глимы — блорпы. All glims are blorps.\n" * 50
    path, n = _tokens(tmp_path, text)
    ids = load_tokens(path)
    assert n == len(text.encode("utf-8")) + 2
    assert ids[0] == ByteTokenizer.bos_id and ids[-1] == ByteTokenizer.eos_id
    assert ByteTokenizer().decode(ids[1:-1].tolist()) == text


def test_packing_has_no_padding_and_covers_every_block(tmp_path):
    rng = np.random.default_rng(0)
    path, n = _tokens(tmp_path, " ".join(f"w{int(i)}" for i in rng.integers(0, 10_000, 700)))
    blocks = PackedBlocks(load_tokens(path), block_size=64, seed=1)
    assert blocks.blocks_per_epoch == n // 64
    stream = step_blocks(blocks, per_step=8)
    starts = np.concatenate([next(stream) for _ in range(-(-blocks.blocks_per_epoch // 8))])
    rows = blocks.batch(starts[: blocks.blocks_per_epoch])
    assert rows.shape[1] == 64
    assert len(set(starts[: blocks.blocks_per_epoch].tolist())) == blocks.blocks_per_epoch  # every block once an epoch
    tokens = load_tokens(path)
    off = blocks.offset(0)  # an epoch's blocks start at a seeded offset into the file
    slices = {tokens[off + i * 64:off + (i + 1) * 64].astype(rows.dtype).tobytes() for i in range(len(rows))}
    assert {r.tobytes() for r in rows} == slices  # each row is the file's own tokens: nothing padded
    padded = np.array([[5, ByteTokenizer.pad_id, ByteTokenizer.pad_id, 7]])
    assert real_token_share(padded, ByteTokenizer.pad_id) == 0.5


def test_steps_run_through_the_epochs_and_resume_at_the_same_blocks(tmp_path):
    """A step's blocks are the next effective batch of the epochs' orders laid end to end: a
    step may cross into the next epoch, and a stream started at step k gives what the stream
    from 0 gave at k, however the epochs fall."""
    path, _ = _tokens(tmp_path, "the quick brown fox " * 200)
    blocks = PackedBlocks(load_tokens(path), block_size=32, seed=3)
    assert blocks.blocks_per_epoch % 6  # epochs end inside a step
    stream = step_blocks(blocks, 6)
    first = [next(stream) for _ in range(12)]
    laid = np.concatenate([blocks.epoch_blocks(e) for e in range(4)])
    assert np.array_equal(np.concatenate(first), laid[: 12 * 6])
    resumed = step_blocks(blocks, 6, start_step=7)
    for step in first[7:]:
        assert np.array_equal(next(resumed), step)
    tiny = PackedBlocks(load_tokens(path), block_size=len(load_tokens(path)) // 3, seed=3)
    assert len(next(step_blocks(tiny, 8))) == 8  # fewer blocks than a step: each more than once


def test_short_corpus_trains_as_one_block(tmp_path):
    path, n = _tokens(tmp_path, "short text, twenty-ish")
    blocks = PackedBlocks(load_tokens(path), block_size=256)
    assert blocks.block_size == n and blocks.blocks_per_epoch == 1


def test_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(warmup_frac=0.1, min_lr_ratio=0.1, schedule="cosine")
    factors = [lr_factor(s, 100, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=0.01)
    linear = TrainConfig(warmup_frac=0.0, min_lr_ratio=0.0, schedule="linear")
    assert lr_factor(50, 100, linear) == pytest.approx(0.5)


def test_plan_steps_respects_epochs_floor_and_cap():
    cfg = TrainConfig(micro_batch=4, grad_accum=2, epochs=2, min_train_tokens=0)
    assert cfg.plan_steps(n_tokens=8 * 64 * 10, block_size=64) == 20
    cfg.min_train_tokens = 8 * 64 * 50
    assert cfg.plan_steps(n_tokens=8 * 64 * 10, block_size=64) == 50
    cfg.max_steps = 7
    assert cfg.plan_steps(n_tokens=8 * 64 * 10, block_size=64) == 7


def _tiny_cfg(**over):
    base = dict(block_size=32, micro_batch=4, lr=3e-3, epochs=1, min_train_tokens=0, max_steps=12,
                checkpoint_every=4, log_every=2, seed=0)
    return TrainConfig(**{**base, **over})


def test_training_lowers_the_loss_and_writes_events(tmp_path, monkeypatch):
    from backend.compute import train

    monkeypatch.setattr(train, "PROGRESS_SECONDS", 1e9)  # only every log_every steps, however slow
    path, _ = _tokens(tmp_path, "All glims are blorps. " * 120)
    model = build_micro("tiny", 0, CPU)
    events = []
    out = train_model(model, path, tmp_path, _tiny_cfg(max_steps=30, epochs=10), device=CPU,
                      emit=lambda t, **p: events.append({"type": t, **p}), log=lambda s: None)
    progress = [e for e in events if e["type"] == "progress"]
    assert out.steps == 30 and len(progress) == 15
    assert progress[-1]["loss"] < progress[0]["loss"] - 1.0
    assert {"step", "total", "tokens", "loss", "tokens_per_s", "eta_s", "gpu_mem_bytes"} <= set(progress[0])
    ckpt = newest_checkpoint(tmp_path / "checkpoints")
    assert ckpt.name == "step-000028"  # every 4 steps, the last two kept
    assert len(list((tmp_path / "checkpoints").glob("step-*"))) == 2
    assert json.loads((ckpt / "config.json").read_text())["max_steps"] == 30


def test_a_slow_step_sends_progress_without_waiting_for_log_every(tmp_path, monkeypatch):
    """With the time threshold at zero every step is "slow": each sends its event, whose loss is
    that step's alone (marked `timed` between the log_every points); the curve the worker builds
    from them, and the outcome's final loss, are the same as when the events fell every
    log_every steps only."""
    from backend.compute import train
    from backend.compute.worker import _curve_from_events
    from backend.core.events import EventLog

    path, _ = _tokens(tmp_path, "All glims are blorps. " * 120)
    monkeypatch.setattr(train, "PROGRESS_SECONDS", 0.0)
    log = EventLog(tmp_path / "events.jsonl", "r", 0)
    events = []

    def emit(kind, **payload):
        events.append({"type": kind, **payload})
        log.emit(kind, **payload)

    cfg = _tiny_cfg(max_steps=6, log_every=4, checkpoint_every=0)
    out = train_model(build_micro("tiny", 0, CPU), path, tmp_path, cfg, device=CPU, emit=emit, log=lambda s: None)
    log.close()
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4, 5, 6]
    assert [e["eta_s"] is None for e in progress] == [True, True, False, False, False, False]
    assert progress[-1]["eta_s"] == 0
    assert [bool(e.get("timed")) for e in progress] == [True, True, True, False, True, False]
    curve = _curve_from_events(tmp_path / "events.jsonl")
    assert [p["step"] for p in curve] == [4, 6]
    monkeypatch.setattr(train, "PROGRESS_SECONDS", 1e9)
    (tmp_path / "again").mkdir()
    again = []
    same = train_model(build_micro("tiny", 0, CPU), path, tmp_path / "again", cfg, device=CPU,
                       emit=lambda kind, **p: again.append(p) if kind == "progress" else None, log=lambda s: None)
    assert [e["step"] for e in again] == [4, 6]
    assert [e["loss"] for e in again] == [p["loss"] for p in curve]  # a point: the mean since the last
    assert same.final_loss == pytest.approx(out.final_loss, rel=1e-6)
    assert same.final_loss == pytest.approx(curve[-1]["loss"], rel=1e-4)  # steps 5 and 6
    assert curve[-1]["loss"] != pytest.approx(progress[-2]["loss"], rel=1e-4)  # not step 5's alone
    # the benchmark reads the Trainer's logging windows back out of either kind of curve
    from benchmarks.peers import log_windows

    assert log_windows(progress)[0] == pytest.approx([e["loss"] for e in again], rel=1e-4)


def test_smoothed_eta_damps_one_slow_window_and_follows_a_lasting_change():
    """Windows of 10 steps whose times jump as in issue 18 (the last window's rate alone gave
    1m…→58s→20s→26s): past the first windows the smoothed pace, and so the ETA, moves far less
    than the window's own; it stays within the windows' range, near their mean, and still
    follows when the steps really become slower."""
    from backend.compute.train import eta_seconds, smooth_pace

    steps, total = 10, 2000
    noisy = [2.0, 6.0, 5.8, 2.0, 2.6, 1.8, 6.2, 2.2, 2.0, 2.4] * 4  # seconds a window of 10 steps
    window_paces = [s / steps for s in noisy]
    pace, done, paces = None, 0, []
    for seconds in noisy:
        done += steps
        pace = smooth_pace(pace, seconds, steps, done, time_constant=30.0)
        paces.append(pace)
        assert eta_seconds(pace, total - done, done) == pytest.approx((total - done) * pace)

    def worst_change(values, skip=0):  # the largest relative change from one value to the next
        return max(abs(b - a) / a for a, b in list(zip(values, values[1:]))[skip:])

    assert worst_change(paces) < worst_change(window_paces)
    assert worst_change(paces, skip=3) < worst_change(window_paces, skip=3) / 5
    assert min(window_paces) <= min(paces) and max(paces) <= max(window_paces)
    mean = sum(window_paces) / len(window_paces)
    assert abs(pace - mean) < (max(window_paces) - min(window_paces)) / 4
    # the steps become three times slower for good: within three time constants the ETA says so
    slow, waited = 3 * mean * steps, 0.0
    while waited < 3 * 30.0:
        done += steps
        waited += slow
        pace = smooth_pace(pace, slow, steps, done, time_constant=30.0)
    assert pace == pytest.approx(slow / steps, rel=0.1)
    assert eta_seconds(pace, 100, 2) is None and eta_seconds(None, 100, 50) is None  # no ETA yet


def test_stop_then_resume_equals_uninterrupted(tmp_path):
    text = "Red things glow. The lamp is red. " * 80
    straight_dir, resumed_dir = tmp_path / "a", tmp_path / "b"
    straight_dir.mkdir(); resumed_dir.mkdir()
    path, _ = _tokens(tmp_path, text)
    cfg = _tiny_cfg(checkpoint_every=0)

    straight = build_micro("tiny", 0, CPU)
    train_model(straight, path, straight_dir, cfg, device=CPU, emit=lambda *a, **k: None, log=lambda s: None)

    from backend.compute.train import StopRequested

    first = build_micro("tiny", 0, CPU)
    calls = {"n": 0}

    def stop_after_five():
        calls["n"] += 1
        return calls["n"] == 5

    with pytest.raises(StopRequested):
        train_model(first, path, resumed_dir, cfg, device=CPU, emit=lambda *a, **k: None,
                    log=lambda s: None, should_stop=stop_after_five)
    assert newest_checkpoint(resumed_dir / "checkpoints").name == "step-000005"
    second = build_micro("tiny", 0, CPU)  # a fresh process would rebuild from the seed
    out = train_model(second, path, resumed_dir, cfg, device=CPU, emit=lambda *a, **k: None, log=lambda s: None)
    assert out.resumed_from == 5 and out.steps == 12
    for (name, a), (_, b) in zip(straight.named_parameters(), second.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    path, _ = _tokens(tmp_path, "Red things glow. The lamp is red. " * 80)
    cfg = _tiny_cfg(checkpoint_every=4, keep_checkpoints=2)
    straight_dir, torn_dir = tmp_path / "a", tmp_path / "b"
    straight_dir.mkdir(); torn_dir.mkdir()
    straight = build_micro("tiny", 0, CPU)
    train_model(straight, path, straight_dir, cfg, device=CPU, emit=lambda *a, **k: None, log=lambda s: None)

    from backend.compute.train import StopRequested

    calls = {"n": 0}

    def stop_at_nine():
        calls["n"] += 1
        return calls["n"] == 9

    with pytest.raises(StopRequested):
        train_model(build_micro("tiny", 0, CPU), path, torn_dir, cfg, device=CPU, emit=lambda *a, **k: None,
                    log=lambda s: None, should_stop=stop_at_nine)
    ckpts = torn_dir / "checkpoints"
    assert [p.name for p in sorted(ckpts.glob("step-*"))] == ["step-000008", "step-000009"]
    (ckpts / "step-000009" / "trainable.safetensors").write_bytes(b"torn")  # a write the disk lost
    lines = []
    resumed = build_micro("tiny", 0, CPU)
    out = train_model(resumed, path, torn_dir, cfg, device=CPU, emit=lambda *a, **k: None, log=lines.append)
    assert out.resumed_from == 8 and out.steps == 12
    assert (ckpts / "broken-step-000009").is_dir()  # set aside, not deleted
    assert any("step-000009 does not load" in line for line in lines)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_loglikelihood_matches_a_hand_computation():
    torch.manual_seed(0)
    model = build_micro("tiny", 0, CPU).eval()
    tok = ByteTokenizer()
    context, continuation = "All glims are", " zents."
    ctx, cont = encode_pair(tok, context, continuation)
    assert ctx == list(b"All glims are") and cont == list(b" zents.")
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    expected = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    reqs = [LoglikRequest(context, continuation), LoglikRequest("x", " y"), LoglikRequest("All glims are ", "zents.")]
    got = loglikelihoods(model, tok, reqs, device=CPU, batch_size=2)
    assert got[0][0] == pytest.approx(expected, abs=1e-4)
    # lm-eval moves a context's trailing space into the continuation: same numbers
    assert got[2][0] == pytest.approx(expected, abs=1e-4)


def test_text_loss_is_mean_next_token_loss():
    model = build_micro("tiny", 1, CPU).eval()
    tok = ByteTokenizer()
    loss, count = text_loss(model, tok, "hello world", device=CPU)
    ids = torch.tensor([[tok.bos_id] + tok.encode("hello world")])
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:]).item()
    assert count == 11 and loss == pytest.approx(ref, abs=1e-5)
    assert math.isfinite(loss)


# --- out of memory at run time: halve the micro-batch, keep the effective batch -------------


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(tmp_path, monkeypatch):
    """The real loop with the documented fault knob: a forward pass of more than 2 sequences
    raises torch.OutOfMemoryError, with checkpointing too, so checkpointing goes on first, then
    8 × 1 becomes 4 × 2, then 2 × 4, and training goes on on exactly the blocks (and to exactly
    the weights) of a run asked for 2 × 4 from the start."""
    from backend.compute.train import FAULT_OOM_ENV

    path, _ = _tokens(tmp_path, "All glims are blorps. All blorps are zents. " * 60)
    (tmp_path / "a").mkdir(); (tmp_path / "b").mkdir()
    asked = _tiny_cfg(micro_batch=8, grad_accum=1, max_steps=6, checkpoint_every=0)
    planned = _tiny_cfg(micro_batch=2, grad_accum=4, max_steps=6, checkpoint_every=0)

    straight = build_micro("tiny", 0, CPU)
    want = train_model(straight, path, tmp_path / "a", planned, device=CPU,
                       emit=lambda *a, **k: None, log=lambda s: None)

    monkeypatch.setenv(FAULT_OOM_ENV, "2")
    model, events, lines = build_micro("tiny", 0, CPU), [], []
    got = train_model(model, path, tmp_path / "b", asked, device=CPU,
                      emit=lambda t, **p: events.append({"type": t, **p}), log=lines.append)
    assert (got.micro_batch, got.grad_accum, got.oom_halvings, got.oom_checkpointing) == (2, 4, 2, True)
    said = [e for e in events if e["type"] == "log" and "out of memory" in e["message"]]
    assert said[0]["grad_checkpointing"] is True and "checkpointing now on" in said[0]["message"]
    assert [(e["micro_batch"], e["grad_accum"]) for e in said[1:]] == [(4, 2), (2, 4)]
    assert "effective batch kept" in said[1]["message"] and any("out of memory" in s for s in lines)
    assert got.steps == 6 and got.tokens_seen == want.tokens_seen
    assert got.final_loss == pytest.approx(want.final_loss, rel=1e-5)
    for (name, a), (_, b) in zip(straight.named_parameters(), model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_out_of_memory_switches_checkpointing_on_before_it_halves_the_micro_batch(tmp_path, monkeypatch):
    """The plan left checkpointing off and a step does not fit (more than 2 sequences a pass, as
    the fault knob says), but it fits with checkpointing (up to 8): checkpointing goes on, the
    step is redone at the asked 8 × 1, and the run ends with the weights of one that never ran
    out of memory. `--grad-checkpointing off` is the user's word: there, the micro-batch halves."""
    from backend.compute.train import FAULT_OOM_ENV

    path, _ = _tokens(tmp_path, "All glims are blorps. All blorps are zents. " * 60)
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    asked = _tiny_cfg(micro_batch=8, grad_accum=1, max_steps=4, checkpoint_every=0)
    straight = build_micro("tiny", 0, CPU)
    want = train_model(straight, path, tmp_path / "a", asked, device=CPU, emit=lambda *a, **k: None,
                       log=lambda s: None)

    monkeypatch.setenv(FAULT_OOM_ENV, "2/8")
    model, events = build_micro("tiny", 0, CPU), []
    got = train_model(model, path, tmp_path / "b", asked, device=CPU,
                      emit=lambda t, **p: events.append({"type": t, **p}), log=lambda s: None)
    assert (got.micro_batch, got.grad_accum, got.oom_halvings, got.oom_checkpointing) == (8, 1, 0, True)
    assert [e["message"] for e in events if e["type"] == "log" and "out of memory" in e["message"]] == [
        "out of memory at step 1: gradient checkpointing now on"]
    assert got.final_loss == pytest.approx(want.final_loss, rel=1e-5)
    for (name, a), (_, b) in zip(straight.named_parameters(), model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name

    off = _tiny_cfg(micro_batch=8, grad_accum=1, max_steps=4, checkpoint_every=0, grad_checkpointing="off")
    kept = train_model(build_micro("tiny", 0, CPU), path, tmp_path / "c", off, device=CPU,
                       emit=lambda *a, **k: None, log=lambda s: None)
    assert (kept.micro_batch, kept.oom_halvings, kept.oom_checkpointing) == (2, 2, False)


def test_a_run_halved_by_out_of_memory_resumes_at_any_micro_batch(tmp_path, monkeypatch):
    """A run asked for 8 × 1, halved to 2 × 4 by out of memory and stopped after a step that
    crossed into its second epoch, is resumed where 8 × 1 fits again (as a retry's memory plan
    may find): the steps hold the same blocks however they are split, so it ends with the
    weights of a run planned at 2 × 4 from the start; no block is trained twice, none skipped."""
    from backend.compute.train import FAULT_OOM_ENV, StopRequested

    path, _ = _tokens(tmp_path, "All glims are blorps. All blorps are zents. " * 8)
    assert PackedBlocks(load_tokens(path), 32, 0).blocks_per_epoch == 11  # epochs end mid-step
    (tmp_path / "a").mkdir(); (tmp_path / "b").mkdir()
    asked = _tiny_cfg(micro_batch=8, grad_accum=1, max_steps=5, epochs=4, checkpoint_every=0)
    planned = _tiny_cfg(micro_batch=2, grad_accum=4, max_steps=5, epochs=4, checkpoint_every=0)
    straight = build_micro("tiny", 0, CPU)
    want = train_model(straight, path, tmp_path / "a", planned, device=CPU,
                       emit=lambda *a, **k: None, log=lambda s: None)

    monkeypatch.setenv(FAULT_OOM_ENV, "2")
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] == 2

    with pytest.raises(StopRequested):
        train_model(build_micro("tiny", 0, CPU), path, tmp_path / "b", asked, device=CPU,
                    emit=lambda *a, **k: None, log=lambda s: None, should_stop=stop_after_two)
    monkeypatch.delenv(FAULT_OOM_ENV)
    resumed = build_micro("tiny", 0, CPU)
    got = train_model(resumed, path, tmp_path / "b", asked, device=CPU, emit=lambda *a, **k: None,
                      log=lambda s: None)
    assert (got.resumed_from, got.steps, got.micro_batch, got.grad_accum) == (2, 5, 8, 1)
    assert got.tokens_seen == want.tokens_seen
    assert got.final_loss == pytest.approx(want.final_loss, rel=1e-5)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_an_odd_micro_batch_halved_reports_the_passes_a_step_takes(tmp_path, monkeypatch):
    """3 × 2 halved to micro-batch 1 takes six passes a step, and says so (not 1 × 4)."""
    from backend.compute.train import FAULT_OOM_ENV

    path, _ = _tokens(tmp_path, "All glims are blorps. All blorps are zents. " * 20)
    monkeypatch.setenv(FAULT_OOM_ENV, "1")
    events = []
    got = train_model(build_micro("tiny", 0, CPU), path, tmp_path, _tiny_cfg(micro_batch=3, grad_accum=2, max_steps=2),
                      device=CPU, emit=lambda t, **p: events.append({"type": t, **p}), log=lambda s: None)
    assert (got.micro_batch, got.grad_accum, got.oom_halvings) == (1, 6, 1)
    assert [(e["micro_batch"], e["grad_accum"]) for e in events if "micro_batch" in e] == [(1, 6)]


def test_out_of_memory_at_micro_batch_one_fails_with_one_line(tmp_path, monkeypatch):
    from backend.compute.train import FAULT_OOM_ENV, OutOfMemory

    path, _ = _tokens(tmp_path, "Red things glow. " * 80)
    monkeypatch.setenv(FAULT_OOM_ENV, "0")
    with pytest.raises(OutOfMemory) as err:
        train_model(build_micro("tiny", 0, CPU), path, tmp_path, _tiny_cfg(micro_batch=4),
                    device=CPU, emit=lambda *a, **k: None, log=lambda s: None)
    line = err.value.one_line()
    assert "\n" not in line and "micro-batch 1" in line and "--quant 4bit" in line


@pytest.mark.slow
def test_worker_goes_on_after_out_of_memory_and_says_so(tmp_path, monkeypatch, corpora, tiny_battery):
    """Through a real worker process: the job finishes, its events and result say what happened;
    with the floor reached the job fails with the reason as its one error line."""
    from backend.compute.train import FAULT_OOM_ENV
    from backend.core.events import read_events
    from backend.core.workspace import Workspace
    from backend.jobs.manager import JobManager
    from backend.jobs.settings import JobSettings
    from backend.jobs.store import Store

    ws = Workspace(tmp_path / "ws").ensure()
    store = Store(ws.db_path)
    train = {"block_size": 32, "micro_batch": 4, "min_train_tokens": 0, "epochs": 1,
             "max_steps": 4, "checkpoint_every": 0, "log_every": 2}
    settings = JobSettings(base={"base": "micro", "preset": "tiny", "quant": None,
                                 "trust_remote_code": False, "device": "cpu"},
                           scenes=str(tiny_battery / "heldout.yaml"), train=train)
    manager = JobManager(ws, store)
    runs = [store.get_run(r) for r in manager.submit([corpora["logic"], corpora["story"]], settings).run_ids]

    monkeypatch.setenv(FAULT_OOM_ENV, "1")
    assert manager.start_worker(manager._write_session([runs[0]])).wait(timeout=WAIT) == 0
    run_dir = ws.run_dir(runs[0]["run_id"])
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["micro_batch_used"], result["grad_accum_used"], result["oom_halvings"]) == (1, 4, 2)
    events, _ = read_events(run_dir / "events.jsonl")
    assert any(e["type"] == "log" and "micro-batch now 1" in e.get("message", "") for e in events)

    monkeypatch.setenv(FAULT_OOM_ENV, "0")
    assert manager.start_worker(manager._write_session([runs[1]])).wait(timeout=WAIT) == 1
    events, _ = read_events(ws.run_dir(runs[1]["run_id"]) / "events.jsonl")
    errors = [e["message"] for e in events if e["type"] == "error"]
    assert len(errors) == 1 and errors[0].startswith("out of memory: a step does not fit even at micro-batch 1")
    store.close()


def test_a_checkpoint_on_a_full_disk_says_so_and_leaves_no_half_checkpoint(full_disk):
    from backend.compute.train import save_checkpoint
    from backend.core.errors import describe

    model = torch.nn.Linear(256, 256)  # 256 KiB of weights on a 64 KiB disk
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(Exception) as info:
        save_checkpoint(model, optimizer, scheduler, 200, TrainConfig(), full_disk / "checkpoints")
    said = describe(info.value)  # safetensors' own error, around ENOSPC
    assert said.startswith("disk full while writing") and said.endswith("free space and retry"), said
    assert list((full_disk / "checkpoints").iterdir()) == []  # the space back for the next try
