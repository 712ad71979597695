"""Generated input, hostile or plain: the scene loader, corpus ingestion, the service's protocol
and the statistics each give a result or one `LtmError` line, never a traceback or a hang.

Hypothesis draws the inputs; each example has a deadline, so a parser that goes quadratic on
some input fails here rather than stalling a user's service."""

from __future__ import annotations

import json
import math
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.core.errors import BatteryError, CorpusError, LtmError
from backend.core.workspace import Workspace
from backend.ingest.corpora import FORMAT_BY_SUFFIX, inspect_corpus
from backend.jobs.client import connect
from backend.scoring import stats
from backend.scoring.scenes import load_battery

# Its module-scoped fixture is built once: the file's tests run in one process (`-n auto`
# with `--dist loadgroup`, pyproject.toml).
pytestmark = pytest.mark.xdist_group("properties")

PATIENT = settings(deadline=timedelta(seconds=20), max_examples=60,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# --- the scene loader -----------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                      st.dictionaries(st.text(max_size=10), inner, max_size=5)),
                      max_leaves=30)
scene = st.fixed_dictionaries(
    {"id": st.one_of(st.text(min_size=1, max_size=8), st.integers()),
     "kind": st.sampled_from(["choice", "generate", "perplexity", "nonsense", 3])},
    optional={"prompt": values, "context": values, "choices": st.lists(scalars, max_size=4),
              "answer": scalars, "text": values, "checks": values, "depth": scalars, "group": scalars,
              "max_new_tokens": scalars, "variants": values})
battery_doc = st.fixed_dictionaries(
    {"battery": st.one_of(st.text(min_size=1, max_size=12), scalars)},
    optional={"metric": scalars, "description": scalars, "scenes": st.one_of(st.lists(scene, max_size=6), values)})
broken_text = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    st.integers(1, 400).map(lambda n: "a: " + "[" * n + "]" * n),  # nesting
    st.integers(1, 400).map(lambda n: "- " * n + "x"),
    st.sampled_from(["!!python/object/apply:os.system ['echo owned']", "a: !!binary AAAA",
                     "&a [*a, *a, *a]", "battery: x\nscenes: !!set {a, b}", "a: *undefined",
                     "x: &a [" + ", ".join(["*a"] * 8) + "]"]),
)


def _load(text: str):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "generated.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            return load_battery(path)
        except BatteryError as exc:
            line = exc.one_line()
            assert str(path) in line and "\n" not in line, line
            return None


@PATIENT
@given(battery_doc)
def test_a_generated_battery_loads_or_names_its_fault(doc):
    battery = _load(yaml.safe_dump(doc, allow_unicode=True))
    if battery is not None:
        assert battery.scenes and all(s.id for s in battery.scenes)


@PATIENT
@given(broken_text)
def test_malformed_yaml_gives_one_line_with_file_and_line(text):
    _load(text)


# --- corpus ingestion -----------------------------------------------------------------------------

encodings = st.sampled_from(["utf-8", "utf-16", "cp1251", "koi8-r", "latin-1", "utf-8-sig"])


@PATIENT
@given(st.one_of(st.binary(max_size=2000),
                 st.tuples(st.text(max_size=500), encodings).map(lambda te: te[0].encode(te[1], errors="replace"))),
       st.sampled_from(sorted(FORMAT_BY_SUFFIX)))
def test_any_bytes_under_any_suffix_are_a_corpus_or_one_line(data, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"generated{suffix}"
        path.write_bytes(data)
        try:
            info = inspect_corpus(path)
        except CorpusError as exc:
            assert str(path) in exc.one_line() and "\n" not in exc.one_line()
            return
        assert info.bytes == len(data) and info.chars >= 0 and info.pages >= 0


# --- the protocol -----------------------------------------------------------------------------------

# Every read-only or run-scoped op (no run exists), the task and search ops (no task or study
# exists, and generated arguments never name a kind or a valid study), and names that are none;
# `submit`, `export`, `attribute` and `stop` act on the machine and are tested by name elsewhere.
OPS = ["ping", "jobs", "results", "run", "log", "probes", "cancel", "retry", "scene_results",
       "search", "attribution", "rescore", "task", "tasks", "task_cancel", "search_start", "search_stop",
       "no-such-op", ""]
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), st.text(max_size=30)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)
arg_names = st.sampled_from(["run_id", "runs", "sort", "descending", "lines", "study", "scene_results",
                             "scores", "overall", "effect", "task_id", "kind", "files", "x"])
requests = st.one_of(
    st.fixed_dictionaries({"id": json_values, "op": st.sampled_from(OPS),
                           "args": st.one_of(st.dictionaries(arg_names, json_values, max_size=4), json_values)}),
    json_values,
)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from tests.conftest import stop_service

    ws = Workspace(tmp_path_factory.mktemp("protocol") / "ws")
    connect(ws).close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(120)
    sock.connect(str(ws.socket_path))
    yield ws, sock, sock.makefile("rb")
    sock.close()
    stop_service(ws.root)


@PATIENT
@given(st.lists(requests, min_size=1, max_size=5))
def test_every_generated_request_gets_exactly_one_reply(service, batch):
    ws, sock, reader = service
    for request in batch:
        sock.sendall(json.dumps(request).encode() + b"\n")
        reply = json.loads(reader.readline())
        assert isinstance(reply.get("ok"), bool)
        if not reply["ok"]:
            message = reply["error"]["message"]
            assert message and "Traceback" not in message and "\n" not in message
    sock.sendall(b'{"id": "end", "op": "ping"}\n')
    assert json.loads(reader.readline())["result"]["workspace"] == str(ws.root)


# --- the statistics ------------------------------------------------------------------------------------


@given(st.integers(0, 5000), st.integers(0, 5000), st.floats(0, 1))
def test_the_binomial_tail_is_a_probability_that_falls_with_k(k, n, p):
    tail = stats.binomial_tail(k, n, p)
    assert 0.0 <= tail <= 1.0 and math.isfinite(tail)
    assert stats.binomial_tail(k + 1, n, p) <= tail + 1e-9


@given(st.integers(0, 3000), st.integers(0, 3000))
def test_the_sign_test_is_a_symmetric_probability(wins, losses):
    p = stats.sign_test(wins, losses)
    assert 0.0 <= p <= 1.0 and p == stats.sign_test(losses, wins)


@settings(deadline=timedelta(seconds=20), max_examples=40)
@given(st.lists(st.floats(-1e6, 1e6), min_size=0, max_size=60))
def test_a_bootstrap_interval_lies_within_the_data_or_is_none(xs):
    rows = [{"score": x} for x in xs]
    interval = stats.bootstrap_interval(rows, lambda rs: sum(r["score"] for r in rs) / len(rs) if rs else None,
                                        samples=200)
    if not xs:
        assert interval is None
        return
    lo, hi = interval  # every resample's mean lies between the smallest and the largest value
    assert min(xs) - 1e-6 <= lo <= hi <= max(xs) + 1e-6


def test_ltm_errors_are_one_line_whatever_their_text():
    assert "\n" not in LtmError("a\nb\r\nc").one_line()
