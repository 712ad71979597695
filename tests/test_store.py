"""The results database, on real DuckDB files in a temp dir (and in memory)."""

from __future__ import annotations

import csv
import os
import stat
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import duckdb
import pytest

from backend.core.errors import JobError, StoreError
from backend.core.states import JobState
from backend.jobs.store import RESULT_KEYS, SORT_COLUMNS, Store, migrations
from tests.conftest import WAIT, cli

SHA_A = "a" * 64
SHA_B = "b" * 64


def corpus_info(sha: str, path: str, pages: float = 1.0) -> dict:
    return {
        "path": path, "name": Path(path).name, "format": "txt", "encoding": "utf-8",
        "bytes": 1000, "sha256": sha, "chars": 900, "words": 150, "pages": pages,
    }


def run_to_evaluating(store: Store, run_id: str) -> None:
    for state in ("starting", "training", "evaluating"):
        store.transition(run_id, state)


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "ws" / "ltm.duckdb") as s:
        yield s


@pytest.fixture
def ranked(store: Store) -> Store:
    """Three adapter runs and a baseline with known scores; some values missing (NULL)."""
    store.add_corpus(corpus_info(SHA_A, "/texts/alpha.txt", pages=10.0))
    store.add_corpus(corpus_info(SHA_B, "/texts/beta.pdf", pages=2.0))
    plan = {
        # run_id: (corpus_id, path, overall, depth, tokens)
        "r-a": (SHA_A, "/texts/alpha.txt", 0.70, 0.10, 500),
        "r-b": (SHA_B, "/texts/beta.pdf", 0.40, 0.90, None),
        "r-c": (SHA_A, "/texts/alpha.txt", None, None, 300),
    }
    for run_id, (cid, path, overall, depth, tokens) in plan.items():
        store.create_run(run_id, kind="adapter", base="micro", settings={"lr": 0.001},
                         corpus_id=cid, corpus_path=path)
        run_to_evaluating(store, run_id)
        result = {"overall": overall, "tokens": tokens, "train_seconds": 12.5,
                  "scores": {} if depth is None else {"depth": depth, "novelty": 0.5}}
        assert store.ingest_result(run_id, result) is True
        store.transition(run_id, "done")
    store.create_run("base", kind="baseline", base="micro", settings={})
    run_to_evaluating(store, "base")
    store.ingest_result("base", {"overall": 0.20, "scores": {"depth": {"value": 0.05, "n": 8}}})
    store.transition("base", "done")
    return store


@pytest.fixture
def two_batteries(store: Store) -> Store:
    """One base scored on two batteries: two baselines, and runs measured against each."""
    store.add_corpus(corpus_info(SHA_A, "/texts/alpha.txt"))
    plan = [
        # run_id, kind, battery, seed, lr, overall
        ("base-x", "baseline", "/b/x", 0, 0.001, 0.50),
        ("base-y", "baseline", "/b/y", 0, 0.001, 0.10),
        ("x-s0", "adapter", "/b/x", 0, 0.001, 0.60),  # Δ +0.10 against base-x
        ("y-s0", "adapter", "/b/y", 0, 0.001, 0.30),  # Δ +0.20 against base-y (−0.20 against base-x)
        ("y-s1", "adapter", "/b/y", 1, 0.001, 0.35),  # no baseline for seed 1
        ("y-lr", "adapter", "/b/y", 0, 0.01, 0.15),  # Δ +0.05
    ]
    for run_id, kind, battery, seed, lr, overall in plan:
        settings = {"base": {"base": "micro"}, "scenes": battery, "train": {"lr": lr}, "lora": {},
                    "baseline_key": f"{battery}|{seed}"}
        store.create_run(run_id, kind=kind, base="micro", settings=settings, seed=seed,
                         corpus_id=None if kind == "baseline" else SHA_A,
                         corpus_path=None if kind == "baseline" else "/texts/alpha.txt")
        run_to_evaluating(store, run_id)
        store.ingest_result(run_id, {"overall": overall, "scores": {"depth": overall}})
        store.transition(run_id, "done")
    return store


def test_a_run_is_measured_against_the_baseline_of_its_own_battery(two_batteries: Store):
    rows = {r["run_id"]: r for r in two_batteries.results()}
    assert rows["y-s0"]["baseline_key"] == rows["base-y"]["baseline_key"] != rows["base-x"]["baseline_key"]
    assert rows["y-s0"]["settings_key"] == rows["y-s1"]["settings_key"]  # the seed alone differs
    assert rows["y-lr"]["settings_key"] != rows["y-s0"]["settings_key"]
    assert rows["y-s0"]["scenes"] == "/b/y"
    # Δ base: the run's overall less its own baseline's; a baseline and a run without one last
    order = [r["run_id"] for r in two_batteries.results(sort="delta")]
    assert order == ["y-s0", "x-s0", "y-lr", "base-x", "base-y", "y-s1"]
    order = [r["run_id"] for r in two_batteries.results(sort="delta", descending=False, baselines_first=True)]
    assert order == ["base-x", "base-y", "y-lr", "x-s0", "y-s0", "y-s1"]
    exported = list(csv.DictReader(two_batteries.csv_text(sort="delta", descending=False, baselines_first=True)
                                   .splitlines()))
    assert [r["run_id"] for r in exported] == order


# --- migrations and opening ----------------------------------------------------------------


def test_blank_memory_db_gets_every_migration():
    with Store(":memory:") as s:
        assert s.applied_migrations() == [name for name, _ in migrations()]
        tables = {r[0] for r in s._conn.execute("SELECT table_name FROM information_schema.tables")
                  .fetchall()}
    assert {"migrations", "corpora", "runs", "scores", "scene_results", "curves"} <= tables


def test_migration_names_are_unique_and_ordered():
    names = [name for name, _ in migrations()]
    assert names == sorted(names) and len(set(names)) == len(names)


def test_reopen_applies_no_migration_twice(tmp_path: Path):
    path = tmp_path / "ltm.duckdb"
    Store(path).close()
    Store(path).close()
    with Store(path) as s:
        assert s.applied_migrations() == [name for name, _ in migrations()]
    con = duckdb.connect(str(path))
    try:
        counts = con.execute("SELECT name, count(*) FROM migrations GROUP BY name ORDER BY name").fetchall()
    finally:
        con.close()
    assert counts == [(name, 1) for name, _ in migrations()]


def test_an_old_database_gets_the_new_migrations(tmp_path: Path):
    """A workspace made before 002_workers opens with its rows kept and the new columns added."""
    path = tmp_path / "ltm.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMP NOT NULL)")
    con.execute(migrations()[0][1])
    con.execute("INSERT INTO migrations VALUES ('001_initial', now())")
    con.execute("INSERT INTO runs (run_id, kind, base, status, created_at, updated_at) VALUES ('r1', 'adapter', 'micro', 'done', now(), now())")
    con.close()
    with Store(path) as s:
        assert s.applied_migrations()[-1] == migrations()[-1][0]
        s.update_run("r1", worker_pid=42, worker_start=7)
        run = s.get_run("r1")
        assert (run["status"], run["worker_pid"], run["worker_start"]) == ("done", 42, 7)


def test_creates_parent_folder(tmp_path: Path):
    path = tmp_path / "deep" / "er" / "ltm.duckdb"
    Store(path).close()
    assert path.is_file()


def test_garbage_file_is_one_line_store_error(tmp_path: Path):
    path = tmp_path / "ltm.duckdb"
    path.write_bytes(b"\x00not a database\xff" * 64)
    with pytest.raises(StoreError) as info:
        Store(path)
    message = str(info.value)
    assert str(path) in message
    assert "not a DuckDB database" in message
    assert "\n" not in message
    assert path.read_bytes().startswith(b"\x00not a database")  # nothing overwritten


def test_db_locked_by_another_process_is_store_error(tmp_path: Path):
    path = tmp_path / "ltm.duckdb"
    Store(path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('ok', flush=True);"
         " sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(StoreError) as info:
            Store(path)
        message = str(info.value)
        assert str(path) in message and "in use" in message and str(holder.pid) in message
        assert "\n" not in message
    finally:
        holder.stdin.close()
        holder.wait(timeout=WAIT)
        holder.stdout.close()


def test_data_persists_across_close_and_reopen(tmp_path: Path):
    path = tmp_path / "ltm.duckdb"
    with Store(path) as s:
        s.add_corpus(corpus_info(SHA_A, "/texts/alpha.txt", pages=3.0))
        s.create_run("r1", kind="adapter", base="micro", settings={"rank": 8},
                     corpus_id=SHA_A, corpus_path="/texts/alpha.txt", seed=7)
        run_to_evaluating(s, "r1")
        s.ingest_result("r1", {"overall": 0.6, "scores": {"depth": 0.4},
                               "curve": [{"step": 1, "loss": 3.0}]})
    with Store(path) as s:
        run = s.get_run("r1")
        assert run["status"] == "evaluating"
        assert run["settings"] == {"rank": 8} and run["seed"] == 7
        assert run["overall"] == 0.6 and run["ingested"] is True
        assert s.results()[0]["scores"] == {"depth": 0.4}
        assert s.results()[0]["pages"] == 3.0
        assert s.curve("r1")[0]["loss"] == 3.0


def test_closed_store_refuses_calls(tmp_path: Path):
    s = Store(tmp_path / "ltm.duckdb")
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.list_runs()


# --- corpora and runs ----------------------------------------------------------------------


def test_same_content_from_two_paths_is_one_corpus_with_latest_path(store: Store):
    assert store.add_corpus(corpus_info(SHA_A, "/old/alpha.txt")) == SHA_A
    assert store.add_corpus(corpus_info(SHA_A, "/new/alpha-copy.txt")) == SHA_A
    with store._cursor() as cur:
        rows = cur.execute("SELECT corpus_id, path, name FROM corpora").fetchall()
    assert rows == [(SHA_A, "/new/alpha-copy.txt", "alpha-copy.txt")]


def test_create_run_defaults_and_duplicate(store: Store):
    store.create_run("r1", kind="adapter", base="micro", settings={"lr": 0.01},
                     corpus_id=SHA_A, corpus_path="/t/a.txt", priority=3, run_dir="/ws/runs/r1")
    run = store.get_run("r1")
    assert run["status"] == "queued" and run["priority"] == 3 and run["run_dir"] == "/ws/runs/r1"
    assert run["settings"] == {"lr": 0.01} and run["ingested"] is False
    assert datetime.fromisoformat(run["created_at"]).utcoffset().total_seconds() == 0
    assert run["started_at"] is None and run["finished_at"] is None
    with pytest.raises(JobError, match="r1 already exists"):
        store.create_run("r1", kind="adapter", base="micro", settings={})
    with pytest.raises(ValueError, match="kind"):
        store.create_run("r2", kind="lora", base="micro", settings={})
    assert store.get_run("missing") is None


def test_list_runs_order_and_status_filter(store: Store):
    store.create_run("low", kind="adapter", base="micro", settings={})
    store.create_run("high", kind="adapter", base="micro", settings={}, priority=5)
    store.create_run("low2", kind="adapter", base="micro", settings={})
    store.transition("low2", JobState.STARTING)
    assert [r["run_id"] for r in store.list_runs()] == ["high", "low", "low2"]
    assert [r["run_id"] for r in store.list_runs(status=["starting"])] == ["low2"]
    assert [r["run_id"] for r in store.list_runs(status=[JobState.QUEUED])] == ["high", "low"]


# --- the transition guard ------------------------------------------------------------------


def test_allowed_chain_stamps_times(store: Store):
    store.create_run("r1", kind="adapter", base="micro", settings={})
    created = store.get_run("r1")
    assert store.transition("r1", "starting") is JobState.QUEUED
    started = store.get_run("r1")
    assert started["status"] == "starting"
    assert started["started_at"] is not None and started["finished_at"] is None
    assert started["updated_at"] >= created["updated_at"]
    assert store.transition("r1", JobState.TRAINING) is JobState.STARTING
    assert store.transition("r1", "evaluating") is JobState.TRAINING
    assert store.get_run("r1")["finished_at"] is None
    assert store.transition("r1", "done") is JobState.EVALUATING
    done = store.get_run("r1")
    assert done["status"] == "done"
    assert done["started_at"] == started["started_at"]
    assert done["finished_at"] is not None
    assert done["created_at"] <= done["started_at"] <= done["finished_at"] == done["updated_at"]


def test_done_is_final(store: Store):
    store.create_run("r1", kind="adapter", base="micro", settings={})
    run_to_evaluating(store, "r1")
    store.transition("r1", "done")
    with pytest.raises(JobError) as info:
        store.transition("r1", "queued")
    assert "r1" in str(info.value) and "done" in str(info.value) and "queued" in str(info.value)
    assert store.get_run("r1")["status"] == "done"


def test_skipping_states_is_refused(store: Store):
    store.create_run("r1", kind="adapter", base="micro", settings={})
    with pytest.raises(JobError, match="queued to done"):
        store.transition("r1", "done")
    with pytest.raises(JobError, match="unknown job state"):
        store.transition("r1", "running")
    with pytest.raises(JobError, match="no run ghost"):
        store.transition("ghost", "starting")
    assert store.get_run("r1")["status"] == "queued"


def test_failure_then_retry_clears_error_and_end(store: Store):
    store.create_run("r1", kind="adapter", base="micro", settings={})
    store.transition("r1", "starting")
    store.transition("r1", "failed", error="CUDA out of memory")
    failed = store.get_run("r1")
    assert failed["error"] == "CUDA out of memory" and failed["finished_at"] is not None
    assert store.transition("r1", "queued") is JobState.FAILED
    retried = store.get_run("r1")
    assert retried["status"] == "queued"
    assert retried["error"] is None and retried["finished_at"] is None


def test_retry_after_ingest_lets_the_new_result_in(store: Store):
    store.create_run("r1", kind="adapter", base="micro", settings={})
    run_to_evaluating(store, "r1")
    assert store.ingest_result("r1", {"overall": 0.1, "scores": {"depth": 0.1, "old": 1.0}})
    store.transition("r1", "interrupted")
    store.transition("r1", "queued")
    run_to_evaluating(store, "r1")
    assert store.ingest_result("r1", {"overall": 0.9, "scores": {"depth": 0.8}}) is True
    assert store.results()[0]["scores"] == {"depth": 0.8}
    assert store.get_run("r1")["overall"] == 0.9


# --- update_run ----------------------------------------------------------------------------


def test_update_run_whitelist(store: Store):
    store.create_run("r1", kind="adapter", base="micro", settings={})
    store.update_run("r1", tokens=1234, final_loss=2.5, settings={"rank": 16})
    run = store.get_run("r1")
    assert run["tokens"] == 1234 and run["final_loss"] == 2.5 and run["settings"] == {"rank": 16}
    for bad in ({"status": "done"}, {"run_id": "x"}, {"tokens = 1; DROP TABLE runs; --": 1}):
        with pytest.raises(ValueError, match="cannot update"):
            store.update_run("r1", **bad)
    assert store.get_run("r1")["status"] == "queued"
    with pytest.raises(JobError, match="no run ghost"):
        store.update_run("ghost", tokens=1)


# --- ingest and curves ---------------------------------------------------------------------

FULL_RESULT = {
    "tokens": 4096, "steps": 40, "train_seconds": 30.0, "eval_seconds": 4.5,
    "final_loss": 1.75, "overall": 0.62,
    "scores": {"depth": 0.5, "consistency": {"value": 0.75, "n": 12}},
    "scene_results": [
        {"battery": "logic", "scene_id": "s1", "kind": "choice", "metric": "depth",
         "score": 1.0, "correct": True, "detail": {"chosen": 2, "loglik": [-1.5, -0.25]}},
        {"battery": "logic", "scene_id": "s2", "kind": "choice", "metric": "depth",
         "score": 0.0, "correct": False, "detail": None},
        {"battery": "held", "scene_id": "p1", "kind": "perplexity", "metric": "ppl",
         "score": 12.5, "correct": None, "detail": {"tokens": 80}},
    ],
    "curve": [{"step": s, "loss": 4.0 - s / 20, "lr": 1e-3, "tokens": s * 100,
               "tokens_per_s": 500.0} for s in range(1, 41)],
}


def table_counts(store: Store, run_id: str) -> tuple[int, int, int]:
    with store._cursor() as cur:
        return tuple(
            cur.execute(f"SELECT count(*) FROM {t} WHERE run_id = ?", [run_id]).fetchone()[0]
            for t in ("scores", "scene_results", "curves")
        )


def test_ingest_exactly_once(store: Store):
    store.create_run("r1", kind="adapter", base="micro", settings={})
    run_to_evaluating(store, "r1")
    assert store.ingest_result("r1", FULL_RESULT) is True
    assert store.ingest_result("r1", FULL_RESULT) is False
    assert store.ingest_result("r1", {"overall": 0.0, "scores": {"depth": 0.0}}) is False
    assert table_counts(store, "r1") == (2, 3, 40)
    run = store.get_run("r1")
    assert run["status"] == "evaluating"  # the caller moves it to done
    assert (run["tokens"], run["steps"], run["train_seconds"], run["eval_seconds"],
            run["final_loss"], run["overall"], run["ingested"]) == (
        4096, 40, 30.0, 4.5, 1.75, 0.62, True)
    with store._cursor() as cur:
        scores = cur.execute("SELECT measure, value, n FROM scores ORDER BY measure").fetchall()
    assert scores == [("consistency", 0.75, 12), ("depth", 0.5, None)]
    scenes = store.scene_results("r1")
    assert [(s["battery"], s["scene_id"], s["correct"]) for s in scenes] == [
        ("held", "p1", None), ("logic", "s1", True), ("logic", "s2", False)]
    assert scenes[1]["detail"] == {"chosen": 2, "loglik": [-1.5, -0.25]}
    assert scenes[2]["detail"] is None
    curve = store.curve("r1")
    assert [p["step"] for p in curve] == list(range(1, 41))
    assert curve[-1] == {"step": 40, "loss": 2.0, "lr": 1e-3, "tokens": 4000, "tokens_per_s": 500.0}


def test_bad_result_is_rolled_back(store: Store):
    store.create_run("r1", kind="adapter", base="micro", settings={})
    bad = {"overall": 0.5, "scores": {"depth": 0.5}, "curve": [{"step": 1, "loss": "not a number"}]}
    with pytest.raises(StoreError, match="r1"):
        store.ingest_result("r1", bad)
    assert table_counts(store, "r1") == (0, 0, 0)
    run = store.get_run("r1")
    assert run["ingested"] is False and run["overall"] is None
    assert store.ingest_result("r1", FULL_RESULT) is True
    with pytest.raises(JobError, match="no run ghost"):
        store.ingest_result("ghost", FULL_RESULT)


def test_live_curve_points_upsert_by_step(store: Store):
    store.create_run("r1", kind="adapter", base="micro", settings={})
    store.add_curve_points("r1", [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}])
    store.add_curve_points("r1", [{"step": 2, "loss": 3.5, "tokens": 200}, {"step": 3, "loss": 3.0}])
    store.add_curve_points("r1", [])
    assert [(p["step"], p["loss"], p["tokens"]) for p in store.curve("r1")] == [
        (1, 5.0, None), (2, 3.5, 200), (3, 3.0, None)]
    with pytest.raises(JobError):
        store.add_curve_points("ghost", [{"step": 1, "loss": 1.0}])


# --- results -------------------------------------------------------------------------------


def test_results_keys_and_values(ranked: Store):
    rows = ranked.results()
    assert [r["run_id"] for r in rows] == ["r-a", "r-b", "base", "r-c"]
    for row in rows:
        assert tuple(row)[:10] == RESULT_KEYS[:10]
        assert set(row) == set(RESULT_KEYS)
    first = rows[0]
    assert first["corpus"] == "alpha.txt" and first["corpus_path"] == "/texts/alpha.txt"
    assert first["base"] == "micro" and first["status"] == "done" and first["kind"] == "adapter"
    assert first["pages"] == 10.0 and first["tokens"] == 500 and first["train_seconds"] == 12.5
    assert first["scores"] == {"depth": 0.10, "novelty": 0.5} and first["overall"] == 0.70
    assert first["seed"] == 0 and first["error"] is None
    assert isinstance(first["created_at"], str)
    datetime.fromisoformat(first["created_at"])
    base = rows[2]
    assert base["kind"] == "baseline" and base["corpus"] is None and base["corpus_path"] is None
    assert base["pages"] is None and base["scores"] == {"depth": 0.05}
    assert rows[3]["scores"] == {} and rows[3]["overall"] is None
    assert ranked.measures() == ["depth", "novelty"]


@pytest.mark.parametrize(
    ("sort", "descending", "expected"),
    [
        ("overall", True, ["r-a", "r-b", "base", "r-c"]),
        ("overall", False, ["base", "r-b", "r-a", "r-c"]),
        ("tokens", True, ["r-a", "r-c", "base", "r-b"]),   # base and r-b tokens NULL: last
        ("tokens", False, ["r-c", "r-a", "base", "r-b"]),
        ("pages", False, ["r-b", "r-a", "r-c", "base"]),   # r-a/r-c tie on pages: by run_id
        ("corpus", True, ["r-b", "r-a", "r-c", "base"]),
        ("run_id", False, ["base", "r-a", "r-b", "r-c"]),
        ("depth", True, ["r-b", "r-a", "base", "r-c"]),    # a measure; r-c has none: last
        ("depth", False, ["base", "r-a", "r-b", "r-c"]),
        ("novelty", True, ["r-a", "r-b", "base", "r-c"]),  # tie on value: by run_id
    ],
)
def test_results_sorting(ranked: Store, sort: str, descending: bool, expected: list[str]):
    assert [r["run_id"] for r in ranked.results(sort=sort, descending=descending)] == expected


def test_results_filters_and_limit(ranked: Store):
    assert [r["run_id"] for r in ranked.results(kind="baseline")] == ["base"]
    assert [r["run_id"] for r in ranked.results(sort="depth", limit=2)] == ["r-b", "r-a"]
    assert ranked.results(status="queued") == []
    ranked.create_run("q", kind="adapter", base="micro", settings={})
    assert [r["run_id"] for r in ranked.results(status="queued")] == ["q"]
    with pytest.raises(ValueError):
        ranked.results(limit=-1)


@pytest.mark.parametrize(
    "sort", ["nonsense", "overall; DROP TABLE runs", "r.overall", "overall DESC, 1", "Overall"]
)
def test_unknown_sort_is_rejected(ranked: Store, sort: str):
    with pytest.raises(ValueError) as info:
        ranked.results(sort=sort)
    message = str(info.value)
    assert all(name in message for name in SORT_COLUMNS)
    assert "depth" in message and "novelty" in message
    assert len(ranked.results()) == 4  # runs table intact


def test_measure_name_is_bound_not_formatted(store: Store):
    evil = "x' OR 1=1; DROP TABLE runs; --"
    store.create_run("r1", kind="adapter", base="micro", settings={})
    store.create_run("r2", kind="adapter", base="micro", settings={})
    store.ingest_result("r1", {"scores": {evil: 0.2}})
    store.ingest_result("r2", {"scores": {evil: 0.9}})
    assert [r["run_id"] for r in store.results(sort=evil)] == ["r2", "r1"]
    assert store.measures() == [evil]


# --- CSV export ----------------------------------------------------------------------------


def test_export_csv_reads_back(ranked: Store, tmp_path: Path):
    ranked.create_run("r-s", kind="adapter", base="micro", settings={})
    ranked.ingest_result("r-s", {"overall": 0.1, "scene_results": FULL_RESULT["scene_results"]})
    out = ranked.export_csv(tmp_path / "out" / "ltm_results_table.csv")
    assert out == tmp_path / "out" / "ltm_results_table.csv"
    assert [p.name for p in out.parent.iterdir()] == ["ltm_results_table.csv"]  # no temp left
    with out.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["run_id", "corpus", "corpus_path", "base", "kind", "status", "pages",
                       "tokens", "train_seconds", "overall", "depth", "novelty",
                       "scenes_passed", "scenes_total", "weight_change", "attn_entropy_change",
                       "drift_layer", "overall_lo", "overall_hi", "depth_lo", "depth_hi",
                       "novelty_lo", "novelty_hi"]
    by_id = {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    assert [r[0] for r in rows[1:]] == ["r-a", "r-b", "base", "r-s", "r-c"]
    assert by_id["r-a"]["corpus"] == "alpha.txt" and float(by_id["r-a"]["overall"]) == 0.70
    assert float(by_id["r-a"]["pages"]) == 10.0 and by_id["r-a"]["tokens"] == "500"
    assert float(by_id["r-b"]["depth"]) == 0.90 and by_id["r-b"]["tokens"] == ""
    assert by_id["base"]["corpus"] == "" and by_id["base"]["novelty"] == ""
    assert (by_id["r-s"]["scenes_passed"], by_id["r-s"]["scenes_total"]) == ("1", "2")
    assert (by_id["r-a"]["scenes_passed"], by_id["r-a"]["scenes_total"]) == ("0", "0")


def test_export_csv_sort_and_folder_target(ranked: Store, tmp_path: Path):
    out = ranked.export_csv(tmp_path, sort="depth", descending=False)
    assert out == tmp_path / "ltm_results_table.csv"
    with out.open(newline="") as fh:
        assert [r["run_id"] for r in csv.DictReader(fh)] == ["base", "r-a", "r-b", "r-c"]
    with pytest.raises(ValueError):
        ranked.export_csv(tmp_path / "x.csv", sort="bogus")
    assert not (tmp_path / "x.csv").exists()


def test_a_copy_under_another_name_keeps_each_runs_own_name(store: Store):
    # corpora are keyed by content: the second name must not rename the first run
    for run_id, path in (("run-a", "/texts/copyA.txt"), ("run-b", "/texts/copyB.txt")):
        store.add_corpus(corpus_info(SHA_A, path))
        store.create_run(run_id, kind="adapter", base="micro", settings={}, corpus_id=SHA_A, corpus_path=path)
    rows = {r["run_id"]: r for r in store.results(sort="corpus", descending=False)}
    assert (rows["run-a"]["corpus"], rows["run-b"]["corpus"]) == ("copyA.txt", "copyB.txt")
    assert [r["run_id"] for r in store.results(sort="corpus", descending=True)] == ["run-b", "run-a"]


def test_an_export_never_replaces_the_store_a_device_or_a_link(ranked: Store, tmp_path: Path):
    db = Path(ranked.path)
    for target in (db, db.with_name("service.pid")):  # the workspace's own files
        if not target.exists():
            target.write_text("123")
        before = target.read_bytes()
        with pytest.raises(StoreError, match="one of the workspace's own files"):
            ranked.export_csv(target)
        assert target.read_bytes() == before
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop)
    with pytest.raises(StoreError, match="cannot write .*loop.csv"):
        ranked.export_csv(loop)
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with pytest.raises(StoreError, match="not a regular file"):
        ranked.export_csv(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    # a link is written through: the link stays a link, its target gets the table
    real, link = tmp_path / "real.csv", tmp_path / "link.csv"
    real.write_text("old")
    link.symlink_to(real)
    ranked.export_csv(link)
    assert link.is_symlink() and real.read_text().startswith("run_id,")
    assert ranked.results() and len(ranked.results()) == 4  # nothing stored was lost


# --- threads -------------------------------------------------------------------------------


def test_concurrent_writes_from_four_threads_lose_nothing(store: Store):
    per_thread = 15
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(per_thread):
                run_id = f"t{t}-{i:02d}"
                store.create_run(run_id, kind="adapter", base="micro", settings={"t": t})
                store.transition(run_id, "starting")
                store.add_curve_points(run_id, [{"step": 1, "loss": 2.0}])
                store.transition(run_id, "training")
                store.add_curve_points(run_id, [{"step": 2, "loss": 1.0}])
                store.transition(run_id, "evaluating")
                store.update_run(run_id, steps=i)
                assert store.ingest_result(run_id, {"overall": t + i / 100,
                                                    "scores": {"depth": float(i)}})
                store.transition(run_id, "done")
                store.results(sort="depth", limit=3)  # reads interleaved with writes
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    _run_in_four_threads(work)
    assert errors == []
    runs = store.list_runs()
    assert len(runs) == 4 * per_thread
    assert {r["status"] for r in runs} == {"done"}
    assert all(r["ingested"] and r["steps"] == int(r["run_id"][-2:]) for r in runs)
    with store._cursor() as cur:
        assert cur.execute("SELECT count(*) FROM curves").fetchone()[0] == 2 * 4 * per_thread
        assert cur.execute("SELECT count(*) FROM scores").fetchone()[0] == 4 * per_thread
    assert len(store.results()) == 4 * per_thread


def test_concurrent_writes_to_one_run_do_not_conflict(store: Store):
    # Without the write lock DuckDB would abort one of two transactions updating the same row.
    store.create_run("shared", kind="adapter", base="micro", settings={})
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(25):
                store.update_run("shared", steps=t * 100 + i)
                store.add_curve_points("shared", [{"step": t * 100 + i, "loss": float(t)}])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    _run_in_four_threads(work)
    assert errors == []
    steps = [p["step"] for p in store.curve("shared")]
    assert steps == sorted(t * 100 + i for t in range(4) for i in range(25))
    assert store.get_run("shared")["steps"] in {t * 100 + 24 for t in range(4)}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_csv_has_the_users_usual_file_mode(tmp_path: Path, umask: int):
    """The service keeps the workspace private (umask 077), but the table it writes for a user
    gets the mode of that user's own new files."""
    with Store(tmp_path / "ws" / "ltm.duckdb"):
        pass
    old = os.umask(umask)
    try:
        out = cli("export", "--csv", str(tmp_path / "t.csv"), "--workspace", str(tmp_path / "ws"))
    finally:
        os.umask(old)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE((tmp_path / "t.csv").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "ws" / "service.log").stat().st_mode) == 0o600


def _run_in_four_threads(work) -> None:
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=WAIT)


def test_a_batch_is_stored_whole_or_not_at_all(tmp_path: Path):
    """A submission that fails half-way (a full disk, a clash) leaves no corpus without its runs."""
    with Store(tmp_path / "ltm.duckdb") as s:
        s.create_run("taken", kind="adapter", base="micro", settings={})
        with pytest.raises(JobError, match="already exists"):
            with s.batch():
                s.add_corpus(corpus_info(SHA_A, "/texts/alpha.txt"))
                s.create_run("fresh", kind="adapter", base="micro", settings={}, corpus_id=SHA_A)
                s.create_run("taken", kind="adapter", base="micro", settings={}, corpus_id=SHA_A)
        assert s.get_corpus(SHA_A) is None and s.get_run("fresh") is None
        with s.batch():
            s.add_corpus(corpus_info(SHA_A, "/texts/alpha.txt"))
            s.create_run("fresh", kind="adapter", base="micro", settings={}, corpus_id=SHA_A)
            s.transition("fresh", JobState.STARTING)
        assert s.get_corpus(SHA_A)["name"] == "alpha.txt" and s.get_run("fresh")["status"] == "starting"


def test_each_attempt_of_a_run_keeps_its_outcome(tmp_path: Path):
    with Store(tmp_path / "ltm.duckdb") as s:
        s.create_run("r", kind="adapter", base="micro", settings={})
        s.transition("r", JobState.STARTING)
        s.transition("r", JobState.FAILED, error="out of memory")
        assert s.get_run("r")["attempt"] == 0
        s.transition("r", JobState.QUEUED)  # retry
        assert s.get_run("r")["attempt"] == 1 and s.get_run("r")["error"] is None
        s.transition("r", JobState.CANCELLED, error="cancelled by the user")
        s.transition("r", JobState.QUEUED)
        for state in (JobState.STARTING, JobState.TRAINING, JobState.EVALUATING, JobState.DONE):
            s.transition("r", state)
        assert [(a["attempt"], a["status"], a["error"]) for a in s.attempts("r")] == [
            (0, "failed", "out of memory"), (1, "cancelled", "cancelled by the user"), (2, "done", None)]
