"""Evaluation progress: the ETA from the two kinds of work, and a real evaluation of the
built-in batteries on a tiny micro model reporting its scenes done, up to all of them."""

from __future__ import annotations

import pytest
import torch

from backend.compute.evaluate import EvalProgress, eval_eta, evaluate_all
from backend.compute.models import ByteTokenizer, build_micro
from backend.core.workspace import default_scenes_dir
from backend.scoring.scenes import GenerateScene, load_batteries

CPU = torch.device("cpu")


def test_eta_prices_each_kind_of_work_at_its_own_pace():
    decode = (10.0, 100, 400)  # 10 s for 100 of 400 completion tokens
    # scoring not begun: its 50 scenes are priced at `prior` decoded tokens each
    assert eval_eta(decode, (0.0, 0, 50), prior=8.0) == pytest.approx(300 * 0.1 + 50 * 8.0 * 0.1)
    # once scoring has been timed, its own pace counts, whatever the decoding's
    assert eval_eta((40.0, 400, 400), (3.0, 10, 50), prior=8.0) == pytest.approx(40 * 0.3)
    assert eval_eta((0.0, 0, 400), (0.0, 0, 50)) is None  # nothing timed yet
    assert eval_eta((40.0, 400, 400), (6.0, 50, 50)) == 0.0


class Clock:
    """A clock that moves a quarter second at every reading: the evaluation's own reports set
    the pace, so the test asserts on counts, never on how fast this machine is."""

    def __init__(self) -> None:
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        return self.readings * 0.25


def test_a_real_evaluation_reports_scenes_done_up_to_all_of_them():
    batteries = load_batteries(default_scenes_dir())
    scenes = [s for b in batteries for s in b.scenes]
    clock, events = Clock(), []
    progress = EvalProgress(batteries, lambda kind, **p: events.append({"type": kind, **p}), clock=clock)
    evaluate_all(build_micro("tiny", 0, CPU), ByteTokenizer(), batteries, device=CPU, progress=progress)

    assert {e["type"] for e in events} == {"eval_progress"}
    assert {e["total"] for e in events} == {len(scenes)}
    done = [e["done"] for e in events]
    assert done == sorted(done) and done[-1] == len(scenes)
    generated = sum(isinstance(s, GenerateScene) for s in scenes)
    assert 0 < generated < len(scenes)
    assert any(0 < d <= generated for d in done) and any(generated < d < len(scenes) for d in done)
    # at most one event a second of the clock, and the last one
    assert len(events) <= clock.readings * 0.25 / progress.every + 1
    assert events[-1]["eta_s"] == 0.0
    assert all(e["eta_s"] is not None and e["eta_s"] > 0 for e in events if e["done"] < len(scenes))


def test_without_progress_nothing_is_sent_and_scores_are_the_same():
    batteries = load_batteries(default_scenes_dir() / "heldout.yaml")
    model, tok = build_micro("tiny", 0, CPU), ByteTokenizer()
    events = []
    with_progress = evaluate_all(model, tok, batteries, device=CPU, general=[],
                                 progress=EvalProgress(batteries, lambda kind, **p: events.append(p), every=0.0))
    plain = evaluate_all(model, tok, batteries, device=CPU, general=[])
    assert with_progress[0] == plain[0] and with_progress[1] == plain[1]
    assert [e["done"] for e in events][-1] == len(batteries[0].scenes)
