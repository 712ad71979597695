"""The UI never loads torch at start-up, and the back end never loads textual (checked in a fresh
interpreter, where sys.modules shows what an import really pulled in)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "transformers", "peft", "bitsandbytes")


def _loaded_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return {m.split(".")[0] for m in out.stdout.split()}


def _modules(package: str) -> list[str]:
    return [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(REPO / package)])]


@pytest.mark.parametrize("module", ["ltm_tui", *_modules("ltm_tui")])
def test_ui_modules_do_not_import_torch(module):
    loaded = _loaded_after(module)
    assert not loaded & set(HEAVY), f"{module} pulled in {sorted(loaded & set(HEAVY))}"


@pytest.mark.parametrize("module", ["backend", *_modules("backend")])
def test_backend_modules_do_not_import_textual(module):
    assert "textual" not in _loaded_after(module)


@pytest.mark.parametrize("module", ["backend.jobs", "backend.store", "backend.scenes", "backend.corpora", "backend.measures",
                                    "backend.config", "backend.service", "backend.search_study", "backend.tasks"])
def test_backend_core_stays_light(module):
    """What the CLI and the service import must not load torch either."""
    loaded = _loaded_after(module)
    assert not loaded & set(HEAVY), f"{module} pulled in {sorted(loaded & set(HEAVY))}"
