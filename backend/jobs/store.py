"""The results database: the service's one DuckDB read-write connection.

DuckDB allows a single read-write process per file, so only the service opens it; workers write
files in their run directory and the service records them here. Thread safety: one connection is
held, every call works on its own ``cursor()`` (DuckDB's per-thread handle) and every write runs
under one lock, so writes never conflict and reads see a consistent snapshot.

Schema changes are ordered, named migrations recorded in the ``migrations`` table and applied on
every open. Every SQL identifier that is not a bound parameter comes from a whitelist in this
module; values, including measure names used for sorting, are always bound.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb

from backend.core.errors import JobError, StoreError
from backend.core.states import JobState, can_transition
from backend.scoring.measures import overall_interval

DEFAULT_CSV_NAME = "ltm_results_table.csv"

RUN_KINDS = ("adapter", "baseline")

# The schema's steps, applied in name order, each once: backend/jobs/migrations/NNN_name.sql.
# Never edit one that has shipped: add a new file instead. No foreign keys: DuckDB refuses updates
# of rows that other tables reference. settings/detail are VARCHAR holding JSON so the store needs
# no extension to be loaded.
MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def migrations() -> list[tuple[str, str]]:
    """(name, sql) of every migration, in the order they apply."""
    return [(f.stem, f.read_text(encoding="utf-8")) for f in sorted(MIGRATIONS_DIR.glob("[0-9]*.sql"))]


# --- whitelists: the only identifiers ever formatted into SQL ---------------------------------

_RUN_COLUMNS = (
    "run_id", "kind", "corpus_id", "corpus_path", "base", "settings", "seed", "status",
    "priority", "error", "created_at", "started_at", "finished_at", "updated_at", "tokens",
    "steps", "train_seconds", "eval_seconds", "final_loss", "overall", "run_dir", "ingested",
    "worker_pid", "worker_start", "session_path", "attempt",
)
_TIME_COLUMNS = frozenset({"created_at", "started_at", "finished_at", "updated_at", "added_at"})

# Columns update_run may set: results and bookkeeping, never status or identity.
UPDATABLE_RUN_COLUMNS = frozenset(
    {"tokens", "steps", "train_seconds", "eval_seconds", "final_loss", "overall", "run_dir",
     "settings", "error", "worker_pid", "worker_start", "session_path"}
)

# Result fields ingest_result copies from result.json onto the run row.
_RESULT_COLUMNS = ("tokens", "steps", "train_seconds", "eval_seconds", "final_loss", "overall")

# Sort name -> SQL expression over `runs r LEFT JOIN corpora c LEFT JOIN probes p`.
SORT_COLUMNS: dict[str, str] = {
    "run_id": "r.run_id",
    # the run's own file name: corpora are keyed by content, and a copy under another name
    # shares the row (its latest name) with every earlier run of the same bytes
    "corpus": "CASE WHEN r.corpus_path IS NULL OR c.path = r.corpus_path THEN c.name"
              " ELSE regexp_extract(r.corpus_path, '[^/]+$') END",
    "corpus_path": "r.corpus_path",
    "base": "r.base",
    "status": "r.status",
    "pages": "c.pages",
    "tokens": "r.tokens",
    "train_seconds": "r.train_seconds",
    "overall": "r.overall",
    "kind": "r.kind",
    "seed": "r.seed",
    "created_at": "r.created_at",
    "weight_change": "p.weight_change",
    "attn_entropy_change": "p.attn_entropy_change",
    "drift_layer": "p.drift_layer",
    # Δ base: the run's overall less its baseline's (same base, battery and seed); none for a baseline
    "delta": ("CASE WHEN r.kind = 'baseline' THEN NULL ELSE r.overall - (SELECT max(b.overall) FROM runs b"
              " WHERE b.kind = 'baseline' AND b.run_id <> r.run_id AND json_extract_string(b.settings, '$.baseline_key')"
              " = json_extract_string(r.settings, '$.baseline_key')) END"),
}

RESULT_KEYS = (
    "run_id", "corpus", "corpus_path", "base", "status", "pages", "tokens", "train_seconds",
    "scores", "overall", "kind", "seed", "error", "created_at",
    "weight_change", "attn_entropy_change", "drift_layer",  # probe summary (None: no probes)
    "preset",  # the micro model's size (None for a Hugging Face base)
    "trial",  # "study #n" for a search trial's run, else None
    "trial_state",  # that trial's Optuna state: RUNNING, COMPLETE, PRUNED or FAIL
    "attribution",  # the attribution study the run serves, else None
    "baseline_key",  # runs and the baseline they are measured against share it (base, battery, seed)
    "settings_key",  # runs that differ by their seed alone share it (base, battery, training)
    "scenes",  # the battery folder or file the run was scored on
    "intervals",  # {measure: [lo, hi]}; filled after the SQL row, keep it last
)

# Probe summary keys stored as columns of `probes` (the rest of a probe result is its detail).
PROBE_COLUMNS = (
    "weight_change", "weight_rel_change", "attn_entropy_change", "attn_js", "drift_layer",
    "min_cka", "mean_cka", "lens_layer_base", "lens_layer_adapter", "seconds",
)

CSV_FIXED_COLUMNS = (
    "run_id", "corpus", "corpus_path", "base", "kind", "status", "pages", "tokens",
    "train_seconds", "overall",
)
CSV_PROBE_COLUMNS = ("weight_change", "attn_entropy_change", "drift_layer")


def _now() -> datetime:
    # Stored as naive UTC: binding an aware datetime into TIMESTAMP would convert it to the
    # session's local zone, which differs between machines.
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=timezone.utc).isoformat()
    return value


def _state(value: JobState | str) -> JobState:
    try:
        return JobState(str(value))
    except ValueError:
        allowed = ", ".join(s.value for s in JobState)
        raise JobError(f"unknown job state {value!r}; expected one of: {allowed}") from None


def _open_error(path: Path, exc: Exception) -> StoreError:
    text = str(exc)
    if "not a valid DuckDB database" in text:
        return StoreError(
            f"{path} is not a DuckDB database; move it aside or choose another --workspace"
        )
    if "Could not set lock" in text or "Conflicting lock" in text:
        pid = re.search(r"\(PID (\d+)\)", text)
        holder = f"process {pid.group(1)}" if pid else "another process"
        return StoreError(
            f"{path} is in use by {holder}; stop it (ltm-tui stop) or choose another --workspace"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return StoreError(f"cannot open {path}: {first}")


class Store:
    """The service's results database (corpora, runs, scores, scene results, curves)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._write_lock = threading.RLock()
        self._cursor_lock = threading.Lock()
        self._closed = False
        self._batch = threading.local()  # the cursor of this thread's open batch(), if any
        if self.path == ":memory:":
            target = ":memory:"
        else:
            file = Path(path).expanduser()
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create folder {file.parent}: {exc.strerror}") from exc
            target = str(file)
        try:
            self._conn = duckdb.connect(target)
        except duckdb.Error as exc:
            raise _open_error(Path(target), exc) from exc
        try:
            self._migrate()
        except BaseException:
            self._conn.close()
            self._closed = True
            raise

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Store:
        return cls(path)

    def close(self) -> None:
        with self._write_lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- plumbing --------------------------------------------------------------------------

    @contextmanager
    def _cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._cursor_lock:
            if self._closed:
                raise StoreError(f"the store {self.path} is closed")
            cur = self._conn.cursor()
        try:
            yield cur
        finally:
            cur.close()

    @contextmanager
    def _write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor inside one transaction, under the write lock; rolled back on any error.
        Inside `batch()` (same thread) it is the batch's cursor and transaction."""
        outer = getattr(self._batch, "cur", None)
        if outer is not None:
            yield outer
            return
        with self._write_lock, self._cursor() as cur:
            cur.execute("BEGIN TRANSACTION")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Every write inside is one transaction: all of it is stored, or none (a submission
        that meets a full disk leaves no corpus without its runs)."""
        with self._write_lock, self._cursor() as cur:
            cur.execute("BEGIN TRANSACTION")
            self._batch.cur = cur
            try:
                yield
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                self._batch.cur = None

    @contextmanager
    def _read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor inside one read transaction, so several queries see one snapshot."""
        with self._cursor() as cur:
            cur.execute("BEGIN TRANSACTION")
            try:
                yield cur
            finally:
                cur.execute("ROLLBACK")

    def _migrate(self) -> None:
        with self._write_lock, self._cursor() as cur:
            cur.execute(
                "CREATE TABLE IF NOT EXISTS migrations"
                " (name VARCHAR PRIMARY KEY, applied_at TIMESTAMP NOT NULL)"
            )
            done = {row[0] for row in cur.execute("SELECT name FROM migrations").fetchall()}
            for name, sql in migrations():
                if name in done:
                    continue
                cur.execute("BEGIN TRANSACTION")
                try:
                    cur.execute(sql)
                    cur.execute("INSERT INTO migrations VALUES (?, ?)", [name, _now()])
                except duckdb.Error as exc:
                    cur.execute("ROLLBACK")
                    raise StoreError(f"migration {name} failed on {self.path}: {exc}") from exc
                cur.execute("COMMIT")

    def applied_migrations(self) -> list[str]:
        """Names of the migrations recorded in this database, in the order applied."""
        with self._cursor() as cur:
            rows = cur.execute("SELECT name FROM migrations ORDER BY applied_at, name").fetchall()
        return [r[0] for r in rows]

    # --- corpora ---------------------------------------------------------------------------

    def add_corpus(self, info: Mapping[str, Any]) -> str:
        """Record a corpus file (upsert by sha256, keeping the latest path); returns its id."""
        try:
            corpus_id = str(info["sha256"])
            path = str(info["path"])
        except KeyError as exc:
            raise ValueError(f"corpus info lacks {exc.args[0]!r}") from None
        name = info.get("name") or Path(path).name
        values = [
            corpus_id, path, name, info.get("format"), info.get("encoding"), info.get("bytes"),
            info.get("chars"), info.get("words"), info.get("pages"), _now(),
        ]
        with self._write() as cur:
            cur.execute(
                """
                INSERT INTO corpora (corpus_id, path, name, format, encoding, bytes, chars,
                                     words, pages, added_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (corpus_id) DO UPDATE SET
                    path = excluded.path, name = excluded.name, format = excluded.format,
                    encoding = excluded.encoding, bytes = excluded.bytes,
                    chars = excluded.chars, words = excluded.words, pages = excluded.pages
                """,
                values,
            )
        return corpus_id

    def get_corpus(self, corpus_id: str) -> dict[str, Any] | None:
        """One corpus row, or None."""
        with self._cursor() as cur:
            cur.execute("SELECT * FROM corpora WHERE corpus_id = ?", [corpus_id])
            row = cur.fetchone()
            names = [d[0] for d in cur.description]
        return None if row is None else {k: _iso(v) for k, v in zip(names, row)}

    # --- runs ------------------------------------------------------------------------------

    def create_run(
        self,
        run_id: str,
        *,
        kind: str,
        base: str,
        settings: Mapping[str, Any],
        corpus_id: str | None = None,
        corpus_path: str | None = None,
        seed: int = 0,
        priority: int = 0,
        run_dir: str | None = None,
    ) -> None:
        """Add a run in state `queued`."""
        if kind not in RUN_KINDS:
            raise ValueError(f"run kind must be one of {', '.join(RUN_KINDS)}, not {kind!r}")
        now = _now()
        with self._write() as cur:
            if cur.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone():
                raise JobError(f"run {run_id} already exists")
            cur.execute(
                """
                INSERT INTO runs (run_id, kind, corpus_id, corpus_path, base, settings, seed,
                                  status, priority, created_at, updated_at, run_dir)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """,
                [run_id, kind, corpus_id, corpus_path, base, json.dumps(dict(settings)), seed,
                 JobState.QUEUED.value, priority, now, now, run_dir],
            )

    def transition(self, run_id: str, new: JobState | str, *, error: str | None = None) -> JobState:
        """Move a run to `new` if the state machine allows it, stamping times; returns the old state."""
        target = _state(new)
        now = _now()
        with self._write() as cur:
            row = cur.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchone()
            if row is None:
                raise JobError(f"no run {run_id}")
            old = JobState(row[0])
            if not can_transition(old, target):
                raise JobError(f"run {run_id} cannot go from {old.value} to {target.value}")
            sets = ["status = ?", "updated_at = ?"]
            params: list[Any] = [target.value, now]
            if target is JobState.QUEUED:
                # A retry resumes the same run as a new attempt: its old failure and end no
                # longer apply, and its next result must be recorded, so it is no longer ingested.
                sets += ["error = NULL", "finished_at = NULL", "ingested = false", "attempt = attempt + 1"]
            elif error is not None:
                sets.append("error = ?")
                params.append(error)
            if target is JobState.STARTING:
                sets.append("started_at = ?")
                params.append(now)
            if target.is_terminal():
                sets.append("finished_at = ?")
                params.append(now)
            cur.execute(f"UPDATE runs SET {', '.join(sets)} WHERE run_id = ?", [*params, run_id])
            if target.is_terminal():
                cur.execute(
                    """
                    INSERT OR REPLACE INTO run_attempts
                    SELECT run_id, attempt, status, error, started_at, finished_at
                    FROM runs WHERE run_id = ?
                    """,
                    [run_id],
                )
        return old

    def attempts(self, run_id: str) -> list[dict[str, Any]]:
        """How each ended attempt of a run ended, oldest first."""
        cols = ("attempt", "status", "error", "started_at", "finished_at")
        with self._cursor() as cur:
            rows = cur.execute(
                f"SELECT {', '.join(cols)} FROM run_attempts WHERE run_id = ? ORDER BY attempt",
                [run_id],
            ).fetchall()
        return [_record(cols, row) for row in rows]

    def update_run(self, run_id: str, /, **fields: Any) -> None:
        """Set result columns of a run (tokens, steps, ..., settings, error)."""
        unknown = sorted(set(fields) - UPDATABLE_RUN_COLUMNS)
        if unknown:
            allowed = ", ".join(sorted(UPDATABLE_RUN_COLUMNS))
            raise ValueError(f"cannot update run column(s) {', '.join(unknown)}; allowed: {allowed}")
        if not fields:
            return
        names = sorted(fields)
        values = [
            json.dumps(dict(fields[n])) if n == "settings" else fields[n] for n in names
        ]
        sets = ", ".join(f"{n} = ?" for n in names)  # names checked against the whitelist above
        with self._write() as cur:
            count = cur.execute(
                f"UPDATE runs SET {sets}, updated_at = ? WHERE run_id = ?",
                [*values, _now(), run_id],
            ).fetchone()
            if not count or count[0] == 0:
                raise JobError(f"no run {run_id}")

    def ingest_result(self, run_id: str, result: Mapping[str, Any]) -> bool:
        """Record a worker's result.json once; False if this run was already ingested.

        Replaces the run's scores and scene results, upserts its curve, sets its result columns
        (a key absent from `result` keeps the stored value) and marks it ingested, all in one
        transaction. The status is left to the caller.
        """
        scores = _score_rows(result.get("scores") or {})
        scenes = _scene_rows(result.get("scene_results") or [])
        curve = _curve_columns(result.get("curve") or [])
        probes = result.get("probes")
        with self._write() as cur:
            row = cur.execute("SELECT ingested FROM runs WHERE run_id = ?", [run_id]).fetchone()
            if row is None:
                raise JobError(f"no run {run_id}")
            if row[0]:
                return False
            try:
                sets = ", ".join(f"{c} = COALESCE(?, {c})" for c in _RESULT_COLUMNS)
                cur.execute(
                    f"UPDATE runs SET {sets}, ingested = true, updated_at = ? WHERE run_id = ?",
                    [*(result.get(c) for c in _RESULT_COLUMNS), _now(), run_id],
                )
                cur.execute("DELETE FROM scores WHERE run_id = ?", [run_id])
                cur.execute("DELETE FROM scene_results WHERE run_id = ?", [run_id])
                _insert_scores(cur, run_id, scores)
                if scenes:
                    cols = [list(c) for c in zip(*scenes)]
                    cur.execute(
                        "INSERT INTO scene_results SELECT ?, UNNEST(?::VARCHAR[]),"
                        " UNNEST(?::VARCHAR[]), UNNEST(?::VARCHAR[]), UNNEST(?::VARCHAR[]),"
                        " UNNEST(?::DOUBLE[]), UNNEST(?::BOOLEAN[]), UNNEST(?::VARCHAR[])",
                        [run_id, *cols],
                    )
                _upsert_curve(cur, run_id, curve)
                if isinstance(probes, Mapping):
                    _replace_probes(cur, run_id, probes)
            except (duckdb.Error, TypeError, ValueError) as exc:
                raise StoreError(f"result of run {run_id} cannot be recorded: {exc}") from exc
        return True

    def probes(self, run_id: str) -> dict[str, Any]:
        """A run's stored probe result (shape in docs/probes.md; `{"run_id", "error"}` when the
        probes failed); a JobError that says why when the run has none."""
        with self._cursor() as cur:
            run = cur.execute("SELECT kind, status FROM runs WHERE run_id = ?", [run_id]).fetchone()
            row = cur.execute("SELECT error, detail FROM probes WHERE run_id = ?", [run_id]).fetchone()
        if run is None:
            raise JobError(f"no run {run_id}; `ltm-tui status` lists them")
        if row is None:
            kind, status = run
            if kind == "baseline":
                why = "it is a baseline; probes compare an adapted run with this base"
            elif status != "done":
                why = f"it is {status}; probes come with its result"
            else:
                why = "it ran with --no-probes; run the corpus again without it"
            raise JobError(f"run {run_id} has no probes: {why}")
        error, detail = row
        return {"run_id": run_id, "error": error} if detail is None else {"run_id": run_id, **json.loads(detail)}

    def add_curve_points(self, run_id: str, points: Iterable[Mapping[str, Any]]) -> None:
        """Upsert training-curve points by (run_id, step), for live progress."""
        curve = _curve_columns(points)
        if not curve[0]:
            return
        with self._write() as cur:
            if not cur.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone():
                raise JobError(f"no run {run_id}")
            _upsert_curve(cur, run_id, curve)

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """Every column of one run (settings as a dict, times as ISO strings), or None."""
        cols = ", ".join(_RUN_COLUMNS)
        with self._cursor() as cur:
            row = cur.execute(f"SELECT {cols} FROM runs WHERE run_id = ?", [run_id]).fetchone()
        return None if row is None else _run_dict(row)

    def list_runs(self, *, status: Iterable[JobState | str] | None = None) -> list[dict[str, Any]]:
        """Runs ordered by priority (highest first), then age, then id; optionally by status."""
        cols = ", ".join(_RUN_COLUMNS)
        sql = f"SELECT {cols} FROM runs"
        params: list[Any] = []
        if status is not None:
            if isinstance(status, (str, JobState)):
                status = [status]
            sql += " WHERE list_contains(?::VARCHAR[], status)"
            params.append([_state(s).value for s in status])
        sql += " ORDER BY priority DESC, created_at, run_id"
        with self._cursor() as cur:
            rows = cur.execute(sql, params).fetchall()
        return [_run_dict(r) for r in rows]

    # --- results ---------------------------------------------------------------------------

    def measures(self) -> list[str]:
        """Distinct measure names present in scores, sorted."""
        with self._cursor() as cur:
            rows = cur.execute("SELECT DISTINCT measure FROM scores ORDER BY measure").fetchall()
        return [r[0] for r in rows]

    def run_scores(self, run_id: str) -> dict[str, float | None]:
        """One run's scores, measure -> value."""
        with self._cursor() as cur:
            rows = cur.execute(
                "SELECT measure, value FROM scores WHERE run_id = ? ORDER BY measure", [run_id]
            ).fetchall()
        return dict(rows)

    def results(
        self,
        *,
        sort: str = "overall",
        descending: bool = True,
        kind: str | None = None,
        status: str | None = None,
        limit: int | None = None,
        baselines_first: bool = False,
    ) -> list[dict[str, Any]]:
        """The ranked table: one dict per run, keys as in RESULT_KEYS.

        `sort` is a column of SORT_COLUMNS or a measure name present in scores; NULLs sort
        last either way and ties go by run_id; `baselines_first` pins the baselines on top,
        as the tables show them.
        """
        with self._read() as cur:
            rows, score_map = self._results(cur, sort, descending, kind, status, limit, baselines_first)
            intervals = self._intervals(cur, [r[0] for r in rows])
        out = []
        for row in rows:
            record = dict(zip(RESULT_KEYS, row))
            record["scores"] = score_map.get(record["run_id"], {})
            record["intervals"] = intervals.get(record["run_id"], {})
            record["created_at"] = _iso(record["created_at"])
            out.append(record)
        return out

    def _results(
        self,
        cur: duckdb.DuckDBPyConnection,
        sort: str,
        descending: bool,
        kind: str | None,
        status: str | None,
        limit: int | None,
        baselines_first: bool = False,
    ) -> tuple[list[tuple[Any, ...]], dict[str, dict[str, float | None]]]:
        present = [r[0] for r in cur.execute("SELECT DISTINCT measure FROM scores").fetchall()]
        params: list[Any] = []
        if sort in SORT_COLUMNS:
            order_expr, join = SORT_COLUMNS[sort], ""
        elif sort in present:
            # The measure name is bound, never formatted into the SQL.
            order_expr = "sm.value"
            join = " LEFT JOIN scores sm ON sm.run_id = r.run_id AND sm.measure = ?"
            params.append(sort)
        else:
            allowed = ", ".join([*SORT_COLUMNS, *sorted(present)])
            raise ValueError(f"cannot sort by {sort!r}; choose one of: {allowed}")
        where = []
        if kind is not None:
            where.append("r.kind = ?")
            params.append(kind)
        if status is not None:
            where.append("r.status = ?")
            params.append(_state(status).value)
        direction = "DESC" if descending else "ASC"
        sql = (
            f"SELECT r.run_id, {SORT_COLUMNS['corpus']}, r.corpus_path, r.base, r.status, c.pages, r.tokens,"
            " r.train_seconds, NULL, r.overall, r.kind, r.seed, r.error, r.created_at,"
            " p.weight_change, p.attn_entropy_change, p.drift_layer,"
            " json_extract_string(r.settings, '$.base.preset'),"
            " (SELECT min(t.study || ' #' || t.number) FROM search_trials t WHERE t.run_id = r.run_id),"
            " (SELECT min(t.state) FROM search_trials t WHERE t.run_id = r.run_id),"
            " (SELECT min(a.study_id) FROM attribution_runs a WHERE a.run_id = r.run_id),"
            " json_extract_string(r.settings, '$.baseline_key'),"
            " left(md5(concat_ws('|', json_extract(r.settings, '$.base')::VARCHAR,"
            " json_extract(r.settings, '$.scenes')::VARCHAR, json_extract(r.settings, '$.train')::VARCHAR,"
            " json_extract(r.settings, '$.lora')::VARCHAR)), 16),"
            " json_extract_string(r.settings, '$.scenes')"
            " FROM runs r LEFT JOIN corpora c ON c.corpus_id = r.corpus_id"
            " LEFT JOIN probes p ON p.run_id = r.run_id" + join
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        pin = "r.kind <> 'baseline', " if baselines_first else ""
        sql += f" ORDER BY {pin}{order_expr} {direction} NULLS LAST, r.run_id"
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise ValueError(f"limit must be a non-negative integer, not {limit!r}")
            sql += " LIMIT ?"
            params.append(limit)
        rows = cur.execute(sql, params).fetchall()
        score_map: dict[str, dict[str, float | None]] = {}
        if rows:
            score_rows = cur.execute(
                "SELECT run_id, measure, value FROM scores"
                " WHERE list_contains(?::VARCHAR[], run_id) ORDER BY run_id, measure",
                [[r[0] for r in rows]],
            ).fetchall()
            for run_id, measure, value in score_rows:
                score_map.setdefault(run_id, {})[measure] = value
        return rows, score_map

    def _intervals(self, cur: duckdb.DuckDBPyConnection, run_ids: list[str]) -> dict[str, dict[str, list]]:
        """run_id → {measure: [lo, hi]}: the bootstrap 95% intervals (migration 003_measures)."""
        if not run_ids:
            return {}
        out: dict[str, dict[str, list]] = {}
        for run_id, measure, lo, hi in cur.execute(
            "SELECT run_id, measure, lo, hi FROM scores WHERE list_contains(?::VARCHAR[], run_id)"
            " AND lo IS NOT NULL AND hi IS NOT NULL ORDER BY run_id, measure",
            [run_ids],
        ).fetchall():
            out.setdefault(run_id, {})[measure] = [lo, hi]
        return out

    def rescore_run(
        self, run_id: str, scene_results: Iterable[Mapping[str, Any]], scores: Mapping[str, Any],
        overall: float | None,
    ) -> None:
        """Replace one finished run's scene results, scores and overall in one transaction (after
        a judge graded its generations: backend/compute/judge.py)."""
        score_rows = _score_rows(scores)
        scenes = _scene_rows(scene_results)
        with self._write() as cur:
            if not cur.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone():
                raise JobError(f"no run {run_id}")
            cur.execute("DELETE FROM scores WHERE run_id = ?", [run_id])
            _insert_scores(cur, run_id, score_rows)
            cur.execute("DELETE FROM scene_results WHERE run_id = ?", [run_id])
            if scenes:
                cur.execute(
                    "INSERT INTO scene_results SELECT ?, UNNEST(?::VARCHAR[]),"
                    " UNNEST(?::VARCHAR[]), UNNEST(?::VARCHAR[]), UNNEST(?::VARCHAR[]),"
                    " UNNEST(?::DOUBLE[]), UNNEST(?::BOOLEAN[]), UNNEST(?::VARCHAR[])",
                    [run_id, *[list(c) for c in zip(*scenes)]],
                )
            cur.execute("UPDATE runs SET overall = ?, updated_at = ? WHERE run_id = ?", [overall, _now(), run_id])

    # --- search studies (006_search; backend/studies/search.py writes, the dashboard reads) ---------

    def save_search(self, study: Mapping[str, Any], trials: Iterable[Mapping[str, Any]]) -> None:
        """Upsert a study's summary and replace its trials' rows, in one transaction."""
        now = _now()
        rows = [
            [study["study"], t["number"], t.get("run_id"), t["state"], json.dumps(t.get("params") or {}),
             t.get("value"), t.get("last_step"), t.get("last_value"), t.get("error")]
            for t in trials
        ]
        with self._write() as cur:
            cur.execute(
                "INSERT INTO search_studies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (study) DO UPDATE SET objective = excluded.objective,"
                " direction = excluded.direction, sampler = excluded.sampler,"
                " target_trials = excluded.target_trials, space = excluded.space, files = excluded.files,"
                " best_trial = excluded.best_trial, best_value = excluded.best_value,"
                " importances = excluded.importances, updated_at = excluded.updated_at",
                [study["study"], study["objective"], study["direction"], study["sampler"],
                 study.get("target_trials"), json.dumps(study.get("space") or {}),
                 json.dumps(study.get("files") or []), study.get("best_trial"), study.get("best_value"),
                 None if study.get("importances") is None else json.dumps(study["importances"]), now, now],
            )
            cur.execute("DELETE FROM search_trials WHERE study = ?", [study["study"]])
            if rows:
                cur.executemany("INSERT INTO search_trials VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def search(self, study: str | None = None) -> dict[str, Any]:
        """The studies (newest first) and one study's trials and best: the named one, else the
        newest. Shape in docs/search.md."""
        cols = ("study", "objective", "direction", "sampler", "target_trials", "space", "files",
                "best_trial", "best_value", "importances", "created_at", "updated_at")
        with self._read() as cur:
            found = cur.execute(
                f"SELECT {', '.join(cols)} FROM search_studies ORDER BY updated_at DESC, study"
            ).fetchall()
            studies = [_record(cols, row, ("space", "files", "importances")) for row in found]
            chosen = next((s for s in studies if s["study"] == study), None) if study else (studies[0] if studies else None)
            if study and chosen is None:
                raise JobError(f"no search study {study!r}; `ltm-tui search --space FILE` starts one")
            tcols = ("number", "run_id", "state", "params", "value", "last_step", "last_value", "error")
            trials = []
            if chosen is not None:
                trials = [_record(tcols, row, ("params",)) for row in cur.execute(
                    f"SELECT {', '.join(tcols)} FROM search_trials WHERE study = ? ORDER BY number",
                    [chosen["study"]],
                ).fetchall()]
        best = None
        if chosen is not None and chosen["best_trial"] is not None:
            best = next((t for t in trials if t["number"] == chosen["best_trial"]), None)
        counts: dict[str, int] = {}
        for t in trials:
            counts[t["state"]] = counts.get(t["state"], 0) + 1
        if chosen is not None:
            chosen["counts"] = counts
        return {"studies": studies, "study": chosen, "trials": trials, "best": best}

    def scene_results(self, run_id: str) -> list[dict[str, Any]]:
        """Per-scene results of one run, by battery then scene id (detail decoded)."""
        with self._cursor() as cur:
            rows = cur.execute(
                "SELECT battery, scene_id, kind, metric, score, correct, detail"
                " FROM scene_results WHERE run_id = ? ORDER BY battery, scene_id",
                [run_id],
            ).fetchall()
        keys = ("battery", "scene_id", "kind", "metric", "score", "correct", "detail")
        out = []
        for row in rows:
            record = dict(zip(keys, row))
            record["detail"] = None if record["detail"] is None else json.loads(record["detail"])
            out.append(record)
        return out

    def curve(self, run_id: str) -> list[dict[str, Any]]:
        """Training-curve points of one run, by step."""
        with self._cursor() as cur:
            rows = cur.execute(
                "SELECT step, loss, lr, tokens, tokens_per_s FROM curves WHERE run_id = ?"
                " ORDER BY step",
                [run_id],
            ).fetchall()
        return [dict(zip(("step", "loss", "lr", "tokens", "tokens_per_s"), r)) for r in rows]

    def export_csv(
        self, path: str | os.PathLike[str], *, sort: str = "overall", descending: bool = True,
        mode: int = 0o644, baselines_first: bool = False,
    ) -> Path:
        """Write the ranked table as CSV (atomically: temp file, then rename); returns the path.

        A folder as `path` gets ltm_results_table.csv inside it. `mode` is the file's: the
        asking client's usual mode for a new file (`backend.core.workspace.file_mode()`), since the service that
        writes it keeps its own files private.
        """
        target = Path(path).expanduser()
        if target.is_dir():
            target = target / DEFAULT_CSV_NAME
        real = self._export_target(target)
        try:
            real.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
        except OSError as exc:
            raise StoreError(f"cannot write {target}: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
                self.write_csv(fh, sort=sort, descending=descending, baselines_first=baselines_first)
            os.chmod(tmp, mode & 0o777)  # mkstemp made it 0600
            os.replace(tmp, real)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StoreError(f"cannot write {target}: {exc.strerror}") from exc
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def csv_text(self, *, sort: str = "overall", descending: bool = True, baselines_first: bool = False) -> str:
        """The exported table as text (`ltm-tui export --csv -` prints it)."""
        out = io.StringIO(newline="")
        self.write_csv(out, sort=sort, descending=descending, baselines_first=baselines_first)
        return out.getvalue()

    def _export_target(self, target: Path) -> Path:
        """The file an export replaces: a symlink's target (the link stays), never a device, a
        pipe or a socket (a rename would put a file in its place), and never one of the
        workspace's own files (`--csv ltm.duckdb` would replace every result with a table)."""
        try:
            real = target.resolve()
        except (RuntimeError, OSError) as exc:  # a loop of symbolic links
            raise StoreError(f"cannot write {target}: {exc}; give a file or folder path") from None
        if real.exists() and not real.is_file():
            raise StoreError(f"cannot write {target}: it is not a regular file; give a file or folder path")
        if self.path != ":memory:" and real.exists() and real.suffix.lower() != ".csv":
            workspace = Path(self.path).resolve().parent
            if workspace in real.parents:
                raise StoreError(f"cannot write {target}: it is one of the workspace's own files; "
                                 "export to a .csv file or another folder")
        return real

    def write_csv(self, fh, *, sort: str = "overall", descending: bool = True, baselines_first: bool = False) -> None:
        """The ranked table as CSV into an open text file: the fixed columns, each measure, the
        scenes passed, the probes' summary, then each score's 95% interval."""
        with self._read() as cur:
            rows, score_map = self._results(cur, sort, descending, None, None, None, baselines_first)
            intervals = self._intervals(cur, [r[0] for r in rows])
            measures = [r[0] for r in cur.execute(
                "SELECT DISTINCT measure FROM scores ORDER BY measure").fetchall()]
            counts = {
                r[0]: (r[1], r[2])
                for r in cur.execute(
                    "SELECT run_id, count(*) FILTER (WHERE correct), count(correct)"
                    " FROM scene_results GROUP BY run_id"
                ).fetchall()
            }
        # A measure named like a fixed column gets a suffix rather than a duplicate header.
        taken = set(CSV_FIXED_COLUMNS) | {"scenes_passed", "scenes_total"}
        headers = [f"{m} (score)" if m in taken else m for m in measures]
        writer = csv.writer(fh)
        bounds = [f"{m}_{end}" for m in ("overall", *measures) for end in ("lo", "hi")]
        writer.writerow([*CSV_FIXED_COLUMNS, *headers, "scenes_passed", "scenes_total", *CSV_PROBE_COLUMNS, *bounds])
        for row in rows:
            record = dict(zip(RESULT_KEYS, row))
            run_scores = score_map.get(record["run_id"], {})
            run_ci = intervals.get(record["run_id"], {})
            passed, total = counts.get(record["run_id"], (0, 0))
            overall_ci = overall_interval(run_scores, run_ci) if run_scores else None
            writer.writerow(
                [csv_cell(record[c]) for c in CSV_FIXED_COLUMNS]
                + [csv_cell(run_scores.get(m)) for m in measures]
                + [passed, total]
                + [csv_cell(record[c]) for c in CSV_PROBE_COLUMNS]
                + [csv_cell(ci[i]) for ci in [overall_ci or (None, None)]
                   + [run_ci.get(m) or (None, None) for m in measures] for i in (0, 1)]
            )

    # --- attribution studies (005_attribution; backend/studies/attribution_study.py) -----------------

    def save_attribution_study(
        self, study_id: str, *, files: list[dict], settings: Mapping[str, Any], subsets: int, seeds: list[int]
    ) -> dict[str, Any]:
        """Create a study, or widen it: the largest N and every seed asked for are kept."""
        now = _now()
        with self._write() as cur:
            row = cur.execute(
                "SELECT subsets, seeds FROM attribution_studies WHERE study_id = ?", [study_id]
            ).fetchone()
            if row is None:
                cur.execute(
                    "INSERT INTO attribution_studies VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [study_id, json.dumps(files), json.dumps(dict(settings)), subsets, json.dumps(sorted(seeds)), now, now],
                )
            else:
                subsets = max(subsets, row[0])
                seeds = sorted(set(seeds) | set(json.loads(row[1])))
                cur.execute(
                    "UPDATE attribution_studies SET files = ?, subsets = ?, seeds = ?, updated_at = ? WHERE study_id = ?",
                    [json.dumps(files), subsets, json.dumps(seeds), now, study_id],
                )
        return self.attribution_study(study_id)

    def attribution_study(self, study_id: str) -> dict[str, Any] | None:
        """One study (files, settings and seeds decoded), or None."""
        found = [s for s in self.attribution_studies() if s["study_id"] == study_id]
        return found[0] if found else None

    def attribution_studies(self) -> list[dict[str, Any]]:
        """Every study, newest first."""
        cols = ("study_id", "files", "settings", "subsets", "seeds", "created_at", "updated_at")
        with self._cursor() as cur:
            rows = cur.execute(
                f"SELECT {', '.join(cols)} FROM attribution_studies ORDER BY updated_at DESC, study_id"
            ).fetchall()
        return [_record(cols, row, ("files", "settings", "seeds")) for row in rows]

    def attribution_slots(self, study_id: str) -> list[dict[str, Any]]:
        """The study's slots: design, slot, seed, members (file indices) and the run that fills it."""
        cols = ("design", "slot", "seed", "members", "run_id")
        with self._cursor() as cur:
            rows = cur.execute(
                f"SELECT {', '.join(cols)} FROM attribution_runs WHERE study_id = ? ORDER BY seed, design, slot",
                [study_id],
            ).fetchall()
        return [_record(cols, row, ("members",)) for row in rows]

    def set_attribution_slot(
        self, study_id: str, *, design: str, slot: int, seed: int, members: list[int], run_id: str
    ) -> None:
        """Record (or replace) the run that fills one slot of a study."""
        with self._write() as cur:
            cur.execute(
                "INSERT INTO attribution_runs VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (study_id, design, slot, seed) DO UPDATE SET"
                " members = excluded.members, run_id = excluded.run_id",
                [study_id, design, slot, seed, json.dumps(list(members)), run_id],
            )


# --- row helpers ---------------------------------------------------------------------------


def _record(cols: Sequence[str], row: tuple[Any, ...], json_cols: Iterable[str] = ()) -> dict[str, Any]:
    """A row as a dict: timestamps as ISO text, the named JSON columns decoded (NULL stays None)."""
    record = {k: (_iso(v) if k in _TIME_COLUMNS else v) for k, v in zip(cols, row)}
    for k in json_cols:
        if record[k] is not None:
            record[k] = json.loads(record[k])
    return record


def _run_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    record = _record(_RUN_COLUMNS, row)
    record["settings"] = json.loads(record["settings"]) if record["settings"] else {}
    return record


# A text cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets
# (`=HYPERLINK(...)` in a corpus name would be live); a leading quote makes it text (OWASP's advice).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A value as a CSV cell: None empty, text that a spreadsheet would run as a formula quoted."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def _score_rows(scores: Mapping[str, Any]) -> list[tuple[str, Any, Any, Any, Any]]:
    rows = []
    for measure, entry in scores.items():
        if isinstance(entry, Mapping):
            rows.append((str(measure), entry.get("value"), entry.get("n"), entry.get("lo"), entry.get("hi")))
        else:
            rows.append((str(measure), entry, None, None, None))
    return rows


def _insert_scores(cur: duckdb.DuckDBPyConnection, run_id: str, scores: list[tuple[Any, ...]]) -> None:
    if not scores:
        return
    measures, values, ns, los, his = zip(*scores)
    cur.execute(
        "INSERT INTO scores (run_id, measure, value, n, lo, hi) SELECT ?, UNNEST(?::VARCHAR[]),"
        " UNNEST(?::DOUBLE[]), UNNEST(?::INTEGER[]), UNNEST(?::DOUBLE[]), UNNEST(?::DOUBLE[])",
        [run_id, list(measures), list(values), list(ns), list(los), list(his)],
    )


def _scene_rows(scenes: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    # Keyed by (battery, scene_id): a repeated scene keeps its last entry instead of
    # failing the whole result on the primary key.
    by_key: dict[tuple[str, str], tuple[Any, ...]] = {}
    for s in scenes:
        detail = s.get("detail")
        by_key[(str(s["battery"]), str(s["scene_id"]))] = (
            str(s["battery"]), str(s["scene_id"]), s.get("kind"), s.get("metric"),
            s.get("score"), s.get("correct"),
            None if detail is None else json.dumps(detail, ensure_ascii=False, default=str),
        )
    return list(by_key.values())


def _replace_probes(cur: duckdb.DuckDBPyConnection, run_id: str, probes: Mapping[str, Any]) -> None:
    """A run's probe result: the summary as columns, the whole result as JSON (or the error)."""
    summary = probes.get("summary") or {}
    error = probes.get("error")
    values = [summary.get(c) for c in PROBE_COLUMNS]
    detail = None if error else json.dumps(probes, ensure_ascii=False, default=str)
    cur.execute("DELETE FROM probes WHERE run_id = ?", [run_id])
    cols = ", ".join(PROBE_COLUMNS)  # a whitelist of this module
    cur.execute(
        f"INSERT INTO probes (run_id, {cols}, error, detail) VALUES (?, {', '.join('?' * len(PROBE_COLUMNS))}, ?, ?)",
        [run_id, *values, error, detail],
    )


_CURVE_FIELDS = ("step", "loss", "lr", "tokens", "tokens_per_s")


def _curve_columns(points: Iterable[Mapping[str, Any]]) -> tuple[list[Any], ...]:
    by_step: dict[int, tuple[Any, ...]] = {}  # a repeated step keeps its last point
    for p in points:
        step = int(p["step"])
        by_step[step] = (step, *(p.get(f) for f in _CURVE_FIELDS[1:]))
    ordered = [by_step[s] for s in sorted(by_step)]
    return tuple([list(c) for c in zip(*ordered)]) if ordered else ([],) * len(_CURVE_FIELDS)


def _upsert_curve(cur: duckdb.DuckDBPyConnection, run_id: str, columns: tuple[list[Any], ...]) -> None:
    if not columns[0]:
        return
    # One statement over bound lists: far faster than executemany for long curves.
    cur.execute(
        "INSERT OR REPLACE INTO curves SELECT ?, UNNEST(?::INTEGER[]), UNNEST(?::DOUBLE[]),"
        " UNNEST(?::DOUBLE[]), UNNEST(?::BIGINT[]), UNNEST(?::DOUBLE[])",
        [run_id, *columns],
    )
