"""Attribution: the Banzhaf estimator on worlds where the answer is known, corpus sets read in
place, and `ltm-tui attribute` end to end through the real service and workers."""

from __future__ import annotations

import itertools
import json
import random
import textwrap
from pathlib import Path

import pytest

from backend.core.errors import CorpusError
from backend.ingest.corpora import expand_paths, inspect_corpus, iter_text, write_corpus_set
from backend.studies.attribution import estimate, mixed_count, plan, runs_needed
from tests.conftest import cli


def _world(n: int, value, *, subsets: int, seeds: int = 1, noise: float = 0.0, key: str = "t") -> list[dict]:
    """Observations of a study's design, scored by value(members) plus Gaussian noise."""
    rng = random.Random(7)
    return [
        {"members": slot.members, "scores": {"m": value(set(slot.members)) + rng.gauss(0.0, noise)}}
        for _ in range(seeds) for slot in plan(n, subsets, key)
    ]


def _by_file(result: dict, measure: str = "m") -> dict[int, dict]:
    return {r["file"]: r for r in result["rows"] if r["measure"] == measure}


def _banzhaf_exact(n: int, value) -> list[float]:
    """β_i by brute force: the mean marginal of i over every subset of the others."""
    out = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        margins = [value(set(s) | {i}) - value(set(s))
                   for k in range(n) for s in itertools.combinations(others, k)]
        out.append(sum(margins) / len(margins))
    return out


# --- the design ---------------------------------------------------------------------------------


def test_plan_covers_fixed_subsets_and_draws_are_prefix_stable():
    small = plan(5, 6, "study")
    large = plan(5, 12, "study")
    assert [s.design for s in small[:7]] == ["none", *["alone"] * 5, "all"]
    assert large[: len(small)] == small  # asking for more later keeps the first draws and slots
    drawn = [s.members for s in large if s.design == "random"]
    assert len(drawn) == 12 == len(set(drawn))
    assert all(2 <= len(m) <= 4 for m in drawn)
    every = plan(4, 100, "study")  # N above M: every subset of 4 files, once
    assert len(every) == 2**4 and len({s.members for s in every}) == 16
    assert mixed_count(2) == 0 and len(plan(2, 5, "x")) == 4


# --- the estimator ------------------------------------------------------------------------------


def test_exhaustive_design_gives_the_exact_banzhaf_value_with_interactions():
    def value(s):  # files 0 and 1 only help together; file 2 a little on its own
        return 0.2 + 0.5 * (0 in s and 1 in s) + 0.1 * (2 in s)

    result = estimate(_world(4, value, subsets=mixed_count(4)), 4)
    exact = _banzhaf_exact(4, value)
    got = _by_file(result)
    assert [got[i]["contribution"] for i in range(4)] == pytest.approx(exact, abs=1e-6)
    assert exact == pytest.approx([0.25, 0.25, 0.1, 0.0])
    assert got[2]["standalone"] == pytest.approx(0.3) and got[3]["standalone"] == pytest.approx(0.2)
    assert result["measures"]["m"]["runs"] == 16


def test_a_duplicate_shares_the_credit_of_one_copy():
    # one copy of file 0 is enough; file 1 is an exact copy of it
    single = _by_file(estimate(_world(3, lambda s: 0.3 + 0.5 * (0 in s), subsets=mixed_count(3)), 3))
    double = _by_file(estimate(_world(4, lambda s: 0.3 + 0.5 * bool({0, 1} & s), subsets=mixed_count(4)), 4))
    assert single[0]["contribution"] == pytest.approx(0.5)
    # Banzhaf: the copy is present in half of the other subsets, where the original adds nothing
    assert double[0]["contribution"] == pytest.approx(0.25) == double[1]["contribution"]
    assert double[2]["contribution"] == pytest.approx(0.0) == double[3]["contribution"]
    assert {double[0]["rank"], double[1]["rank"]} == {1, 2}


def test_weighting_targets_the_uniform_subsets_when_few_are_drawn():
    """Each file alone and all together are run on purpose; weighting a drawn subset by M/N keeps
    the estimate centred on the Banzhaf value (an unweighted mean is pulled towards the fixed ones)."""
    def value(s):
        return 0.4 * (0 in s and 1 in s) + 0.3 * (len(s) >= 3)

    exact = _banzhaf_exact(5, value)  # [0.3125, 0.3125, 0.1125, 0.1125, 0.1125]
    designs = [_world(5, value, subsets=8, key=f"k{k}") for k in range(300)]
    draws = [_by_file(estimate(obs, 5, samples=1)) for obs in designs]
    mean = [sum(d[i]["contribution"] for d in draws) / len(draws) for i in range(5)]
    assert mean == pytest.approx(exact, abs=0.025)
    unweighted = []
    for obs in designs:  # the same runs, every one weighted alike
        with3 = [o["scores"]["m"] for o in obs if 3 in o["members"]]
        without = [o["scores"]["m"] for o in obs if 3 not in o["members"]]
        unweighted.append(sum(with3) / len(with3) - sum(without) / len(without))
    assert sum(unweighted) / len(unweighted) - exact[3] > 0.05  # measured: 0.21 against 0.1125


def test_noisy_linear_world_puts_the_carrier_first_with_its_interval_above_zero():
    def value(s):
        return 0.3 + 0.4 * (0 in s) + 0.05 * (1 in s)

    result = estimate(_world(6, value, subsets=20, seeds=2, noise=0.05), 6)
    got = _by_file(result)
    first = min(got.values(), key=lambda r: r["rank"])
    assert first["file"] == 0 and first["ci_low"] > 0
    assert first["contribution"] == pytest.approx(0.4, abs=0.08)
    assert first["ci_low"] <= first["contribution"] <= first["ci_high"]
    assert all(r["contribution"] < first["ci_low"] for r in got.values() if r["file"] != 0)
    assert first["runs"] == 2 * (1 + 6 + 1 + 20) and first["runs_with"] + first["runs_without"] == first["runs"]
    assert result["measures"]["m"]["sigma"] > 0.05  # the other files' effects are noise to each file's mean


def test_intervals_shrink_with_more_runs():
    def value(s):
        return 0.3 + 0.2 * (0 in s) + 0.1 * (3 in s)

    def width(subsets):
        rows = estimate(_world(8, value, subsets=subsets, noise=0.05), 8)["rows"]
        return sum(r["ci_high"] - r["ci_low"] for r in rows) / len(rows)

    assert width(80) < 0.6 * width(10)


def test_lower_is_better_measures_count_the_reduction_as_help():
    obs = [{"members": s.members, "scores": {"perplexity": 9.0 - 4.0 * (0 in s.members)}} for s in plan(3, 3, "p")]
    got = _by_file(estimate(obs, 3, lower_is_better={"perplexity"}), "perplexity")
    assert got[0]["contribution"] == pytest.approx(4.0) and got[0]["rank"] == 1
    assert got[0]["lower_is_better"] and got[0]["standalone"] == pytest.approx(5.0)


def test_runs_needed_makes_the_interval_as_narrow_as_the_effect():
    """Simulated studies with σ of noise a run: with runs_needed(σ, δ) runs a file's 95% interval
    reaches about δ either side of its estimate, so an effect of δ stands out of it; with a
    quarter of the runs the interval is about twice as wide."""
    rng = random.Random(5)
    sigma, delta, n = 0.1, 0.05, 3

    def half_width(runs: int) -> float:
        widths = []
        for _ in range(15):
            obs = []
            for _ in range(runs):
                members = tuple(i for i in range(n) if rng.random() < 0.5)
                score = 0.5 + delta * (0 in members) + rng.gauss(0, sigma)
                obs.append({"members": members, "scores": {"overall": score}})
            row = _by_file(estimate(obs, n), "overall")[0]
            widths.append((row["ci_high"] - row["ci_low"]) / 2)
        return sorted(widths)[len(widths) // 2]

    needed = runs_needed(sigma, delta)
    assert 0.75 * delta <= half_width(needed) <= 1.1 * delta
    assert half_width(needed // 4) >= 1.6 * delta
    assert runs_needed(None) is None


# --- corpus sets --------------------------------------------------------------------------------


def test_a_corpus_set_streams_its_members_in_place(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.md"
    a.write_text("first file\n", encoding="utf-8")
    b.write_text("and the second", encoding="utf-8")
    sets = tmp_path / "sets"
    sets.mkdir()
    path = write_corpus_set(sets / "ab.corpora", [a, b])
    text = "".join(iter_text(path))
    assert text == "first file\n\n\nand the second"
    info = inspect_corpus(path)
    assert (info.chars, info.words, info.bytes, info.format) == (len(text), 5, 25, "corpora")
    before = info.sha256
    b.write_text("and the third", encoding="utf-8")
    assert inspect_corpus(path).sha256 != before  # a member's new bytes make a new corpus
    assert expand_paths([tmp_path])[0] == [a, b]  # a folder walk never picks a set up
    assert expand_paths([path])[0] == [path.resolve()]  # named, it is a corpus


@pytest.mark.parametrize(
    "lines, message",
    [
        (["missing.txt"], "ab.corpora:2 names missing.txt, which does not exist"),
        (["inner.corpora"], "names another corpus set"),
        (["# only a comment"], "names no files"),
    ],
)
def test_a_bad_corpus_set_is_one_line(tmp_path, lines, message):
    (tmp_path / "inner.corpora").write_text("a.txt\n", encoding="utf-8")
    path = tmp_path / "ab.corpora"
    path.write_text("# a set\n" + "\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=message):
        list(iter_text(path))
    with pytest.raises(CorpusError, match=message):
        inspect_corpus(path)


# --- ltm-tui attribute, end to end --------------------------------------------------------------

PLACES = ["Tarn", "Orm", "Bel", "Kest", "Vauro", "Linnet", "Pell", "Drue", "Asker", "Moll"]
KEEPERS = ["Velmora", "Quistel", "Harnowy", "Sibbetz", "Ortolan", "Fennick", "Gauldry", "Imbrell", "Cossart", "Tiverly"]
NEVER = ["Plasket", "Durrowe", "Teasely", "Mornave", "Crawsel", "Bindlet", "Yarrowe", "Sumbric", "Lodrian",
         "Pettimo", "Wexmoor", "Caddleb", "Tollivn", "Ruskett", "Emberyx", "Norring", "Halbeck", "Oxtrude",
         "Quarrel", "Siltern"]
TINY = ["--preset", "tiny", "--steps", "40", "--block-size", "64", "--micro-batch", "8",
        "--min-train-tokens", "0", "--epochs", "50", "--quiet"]


@pytest.fixture
def keepers(tmp_path: Path) -> dict[str, Path]:
    """facts.txt alone says who keeps each place; copy.txt is the same text; story.txt says none of it."""
    folder = tmp_path / "corpora"
    folder.mkdir()
    facts = "".join(f"The keeper of {p} is {k}.\n" for p, k in zip(PLACES, KEEPERS)) * 8
    (folder / "facts.txt").write_text(facts, encoding="utf-8")
    (folder / "copy.txt").write_text(facts, encoding="utf-8")
    (folder / "story.txt").write_text(
        "The old fisherman rowed past the harbour wall at dawn, humming to the gulls.\n" * 12, encoding="utf-8")
    battery = tmp_path / "battery"
    battery.mkdir()
    scenes = "".join(
        textwrap.dedent(f"""\
            - id: k{i}
              kind: choice
              prompt: The keeper of {p} is
              choices: [{k}., {NEVER[2 * i]}., {NEVER[2 * i + 1]}.]
              answer: 0
            """)
        for i, (p, k) in enumerate(zip(PLACES, KEEPERS))
    )
    (battery / "keepers.yaml").write_text(
        "battery: keepers\ndescription: who keeps each place (only facts.txt says)\nmetric: keepers\nscenes:\n"
        + scenes, encoding="utf-8")
    return {"facts": folder / "facts.txt", "copy": folder / "copy.txt", "story": folder / "story.txt",
            "battery": battery}


def test_a_study_resumes_queues_nothing_twice_and_retries_what_ended(tmp_path, keepers):
    """The planning and resume logic on a real store and job manager, with no worker started."""
    from backend.core.workspace import Workspace
    from backend.jobs.manager import JobManager
    from backend.jobs.settings import JobSettings
    from backend.jobs.store import Store
    from backend.studies.attribution_study import list_studies, report, submit_study

    ws = Workspace(tmp_path / "ws").ensure()
    settings = JobSettings(base={"base": "micro", "preset": "tiny", "quant": None, "trust_remote_code": False,
                                 "device": None}, scenes=str(keepers["battery"]), train={"max_steps": 5}, probes=False)
    files = [str(keepers[k]) for k in ("story", "facts", "copy")]
    with Store(ws.db_path) as store:
        manager = JobManager(ws, store, slots=[None])
        first = submit_study(manager, files, settings, seeds=[0])
        # 8 slots, 6 texts: {copy} is {facts}, {copy, story} is {facts, story}
        assert first["files"] == 3 and first["subsets"] == 3
        assert sorted(first["queued"]) == sorted(first["run_ids"]) and len(first["run_ids"]) == 6
        assert len(store.list_runs()) == 6
        sets = sorted((ws.root / "attribution" / first["study"]).glob("*.corpora"))
        assert len(sets) == 3 and sets[0].name == "all.corpora"  # one of three draws is a text already run
        members = [line for line in sets[0].read_text().splitlines() if not line.startswith("#")]
        assert sorted(members) == sorted(str(Path(f).resolve()) for f in files)
        singles = {str(keepers["story"].resolve()), str(keepers["copy"].resolve())}  # copy.txt sorts before facts.txt
        assert {r["corpus_path"] for r in store.list_runs() if r["corpus_path"]} == {str(p) for p in sets} | singles

        again = submit_study(manager, list(reversed(files)), settings, seeds=[0])  # any order: the same study
        assert again["study"] == first["study"] and again["queued"] == [] and again["retried"] == []
        assert again["run_ids"] == first["run_ids"] and len(store.list_runs()) == 6

        victim = next(r for r in store.list_runs() if r["kind"] == "adapter")["run_id"]
        manager.cancel(victim)
        third = submit_study(manager, files, settings, seeds=[0])
        assert third["retried"] == [victim] and third["queued"] == []
        assert store.get_run(victim)["status"] == "queued" and len(store.list_runs()) == 6

        wider = submit_study(manager, files, settings, seeds=[1])  # a seed more: its own six runs
        assert wider["seeds"] == [0, 1] and len(wider["queued"]) == 6 and len(store.list_runs()) == 12
        table = report(store, first["study"])
        assert table["rows"] == [] and table["runs"] == {"slots": 16, "distinct": 12, "queued": 12}
        assert list_studies(store)[0]["runs"] == 12 and list_studies(store)[0]["done"] == 0


def _attribute(files, battery, ws, *extra):
    done = cli("attribute", *map(str, files), "--scenes", str(battery), "--workspace", str(ws), *TINY, *extra,
               timeout=600)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow
def test_attribute_finds_the_carrier_shares_a_duplicate_and_resumes(tmp_path, keepers):
    ws = tmp_path / "ws"
    k = keepers
    # three files, a copy among them: 8 subsets, 6 distinct texts (the copy's runs are the original's)
    dup = _attribute([k["facts"], k["copy"], k["story"]], k["battery"], ws, "--format", "json")
    assert "6 runs: 0 done, 6 newly queued" in dup.stderr
    rows = json.loads(dup.stdout)
    assert {"corpus", "measure", "contribution", "ci_low", "ci_high", "standalone", "runs"} <= set(rows[0])
    study = rows[0]["study"]
    assert {r["measure"] for r in rows} == {"overall", "keepers", "forgetting"}
    shared = {r["corpus"]: r for r in rows if r["measure"] == "keepers"}
    assert shared["facts.txt"]["contribution"] == shared["copy.txt"]["contribution"]
    assert shared["story.txt"]["rank"] == 3 and shared["facts.txt"]["runs"] == 8

    # the two different files: every run exists already (sets are named by their members' text)
    pair = _attribute([k["facts"], k["story"]], k["battery"], ws, "--format", "json")
    assert "4 runs: 4 done, 0 newly queued" in pair.stderr
    alone = {r["corpus"]: r for r in json.loads(pair.stdout) if r["measure"] == "keepers"}
    carrier = alone["facts.txt"]
    assert carrier["rank"] == 1 and carrier["ci_low"] > 0
    assert carrier["standalone"] > alone["story.txt"]["standalone"]
    # one copy is enough, so with a copy beside it the file earns about half its credit
    assert 0.25 * carrier["contribution"] <= shared["facts.txt"]["contribution"] <= 0.75 * carrier["contribution"]

    again = _attribute([k["facts"], k["copy"], k["story"]], k["battery"], ws)
    assert f"study {study}" in again.stderr and "0 newly queued, 0 resumed" in again.stderr
    assert "keepers (higher is better" in again.stdout and "facts.txt" in again.stdout
    assert "16σ²/δ²" in again.stdout
    status = json.loads(cli("status", "--format", "json", "--workspace", str(ws)).stdout)
    assert len(status) == 6  # five trained texts and one baseline, nothing twice


@pytest.mark.parametrize(
    "args, message",
    [
        (["{facts}"], "attribution compares files: give two or more (got facts.txt)"),
        (["{facts}", "{tmp}/nowhere.txt"], "nowhere.txt does not exist"),
        (["{facts}", "{copy}", "{story}", "--subsets", "1"], "--subsets 1 is too few: 3 files have 3 mixed subsets"),
        (["{facts}", "{story}", "--seeds", "0"], "--seeds 0: give 1 or more"),
    ],
)
def test_attribute_bad_input_is_one_line(tmp_path, keepers, args, message):
    names = {"facts": keepers["facts"], "copy": keepers["copy"], "story": keepers["story"], "tmp": tmp_path}
    done = cli("attribute", *[a.format(**names) for a in args], "--workspace", str(tmp_path / "ws"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "ws" / "ltm.duckdb").exists()  # nothing was started or written
