"""The layout's rules, checked on the source: only `backend/compute` imports torch; nothing in
`backend` imports textual; each folder of `backend` imports only the folders below it; no module
imports another module's private name; no import circle anywhere. Then, in a fresh interpreter,
what an import really pulls in: the UI and the service side never load torch."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "safetensors")
# What each folder of backend may import (besides itself), lowest first: the service on top hosts
# the jobs and the studies; compute (the worker side) reads the forecast's calibration file.
ALLOWED = {
    "core": set(),
    "ingest": {"core"},
    "scoring": {"core"},
    "jobs": {"core", "ingest", "scoring"},
    "studies": {"core", "ingest", "scoring", "jobs"},
    "compute": {"core", "ingest", "scoring", "studies"},
    "service": {"core", "jobs", "studies"},
}


def _source_modules() -> dict[str, Path]:
    found = {}
    for package in ("backend", "ltm_tui"):
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _source_modules()


# The files are parsed in a fresh interpreter. CPython 3.11 keeps the AST builder's recursion
# count in state the whole interpreter shares, so a parse on another thread of this process (one
# an earlier test left running) while ours builds its tree failed it once with "AST constructor
# recursion depth mismatch".
_PARSE = """
import ast, json, sys
out = {}
for path in sys.argv[1:]:
    found = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((a.name, [], node.lineno) for a in node.names)
    out[path] = found
print(json.dumps(out))
"""


@functools.cache
def _parsed(paths: tuple[str, ...]) -> dict[str, list]:
    out = subprocess.run([sys.executable, "-c", _PARSE, *paths], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every import in a file, at any depth (lazy ones too)."""
    project = tuple(str(p) for p in MODULES.values())
    found = _parsed(project) if str(path) in project else _parsed((str(path),))
    return [(module, names, line) for module, names, line in found[str(path)]]


def _targets(module: str, names: list[str]) -> set[str]:
    """The project modules an import statement loads."""
    found = {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
    if module in MODULES:
        found.add(module)
    return found


def _folder(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "backend" and len(parts) > 1 else None


def test_only_compute_imports_torch_and_backend_never_the_ui():
    wrong = []
    for name, path in MODULES.items():
        for module, _, line in _imports(path):
            root = module.split(".")[0]
            if root in HEAVY and _folder(name) != "compute":
                wrong.append(f"{name}:{line} imports {module}")
            if root in ("textual", "ltm_tui") and name.startswith("backend"):  # the UI sits on top
                wrong.append(f"{name}:{line} imports {module}")
    assert not wrong, wrong


def test_each_backend_folder_imports_only_the_folders_below_it():
    assert {_folder(n) for n in MODULES if _folder(n)} == set(ALLOWED)  # a new folder needs its rule
    wrong = []
    for name, path in MODULES.items():
        here = _folder(name)
        if here is None:
            continue
        for module, names, line in _imports(path):
            for target in _targets(module, names):
                there = _folder(target)
                if there and there != here and there not in ALLOWED[here]:
                    wrong.append(f"{name}:{line} imports {target} ({here} may use {sorted(ALLOWED[here])})")
    assert not wrong, wrong


def test_no_module_imports_another_modules_private_name():
    wrong = [
        f"{name}:{line} imports {module}.{n}"
        for name, path in MODULES.items()
        for module, names, line in _imports(path)
        for n in names
        if n.startswith("_") and module.split(".")[0] in ("backend", "ltm_tui")
    ]
    assert not wrong, wrong


def test_there_is_no_import_circle():
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, names, _ in _imports(path):
            graph[name] |= _targets(module, names) - {name}
    # a package's __init__ may gather its own modules; a circle through it is the package itself
    for name in graph:
        graph[name] = {t for t in graph[name] if not (t.startswith(name + "."))}
    circles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, [" -> ".join(c) for c in circles]


def test_the_circle_check_finds_a_circle(tmp_path, monkeypatch):
    """The check above on two modules that import each other, lazily."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from backend.b import g\n")
    b.write_text("from backend.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {"backend.a": a, "backend.b": b})
    with pytest.raises(AssertionError, match=r"backend\.a -> backend\.b -> backend\.a"):
        test_there_is_no_import_circle()


def _loaded_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return {m.split(".")[0] for m in out.stdout.split()}


@pytest.mark.parametrize("module", sorted(n for n in MODULES if _folder(n) != "compute" and not n.endswith("__main__")))
def test_importing_anything_but_compute_loads_no_torch(module):
    loaded = _loaded_after(module)
    assert not loaded & set(HEAVY), f"{module} pulled in {sorted(loaded & set(HEAVY))}"


def test_a_service_that_never_searches_does_not_load_optuna(tmp_path):
    """Optuna comes with the first search study, not with every on-demand start of the service."""
    code = (f"import sys; from backend.service import Service; from backend.core.workspace import Workspace; "
            f"s = Service(Workspace.resolve({str(tmp_path / 'ws')!r})); s.searches.resume_all(); "
            f"print('optuna' in sys.modules); s.store.close()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"
