"""Where a workspace keeps its files (see docs/ARCHITECTURE.md, "Workspace")."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKSPACE = "ltm-workspace"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_scenes_dir() -> Path:
    """The built-in batteries shipped beside the packages (`scenes/`)."""
    return PROJECT_ROOT / "scenes"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, path: str | os.PathLike | None = None) -> "Workspace":
        chosen = path or os.environ.get("LTM_WORKSPACE") or DEFAULT_WORKSPACE
        return cls(Path(chosen).expanduser().resolve())

    def ensure(self) -> "Workspace":
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def db_path(self) -> Path:
        return self.root / "ltm.duckdb"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def sessions_dir(self) -> Path:
        return self.root / "sessions"

    @property
    def socket_path(self) -> Path:
        return self.root / "service.sock"

    @property
    def pid_path(self) -> Path:
        return self.root / "service.pid"

    @property
    def log_path(self) -> Path:
        return self.root / "service.log"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id
