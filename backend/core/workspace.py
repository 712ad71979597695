"""Where a workspace keeps its files (see docs/ARCHITECTURE.md, "Workspace")."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from backend.core.errors import LtmError

DEFAULT_WORKSPACE = "ltm-workspace"
SOCKET_PATH_MAX = 107  # a Unix socket's address: sun_path is 108 bytes on Linux, one of them the NUL
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def shared_workspace() -> bool:
    """LTM_WORKSPACE_SHARED=1: the workspace is readable by the user's group."""
    return os.environ.get("LTM_WORKSPACE_SHARED", "") not in ("", "0")


def folder_mode() -> int:
    return 0o750 if shared_workspace() else 0o700


def keep_private() -> None:
    """Files this process creates are the user's alone (0600; 0640 in a shared workspace).
    Called first thing by the service and by workers, the processes that write a workspace."""
    os.umask(0o027 if shared_workspace() else 0o077)


def file_mode() -> int:
    """This process's usual mode for a new file (0o666 less its umask), for a file the service
    writes on a client's behalf (an exported table). Reading the umask means setting it: call
    this before any other thread of the process creates files."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def default_scenes_dir() -> Path:
    """The built-in batteries shipped beside the packages (`scenes/`)."""
    return PROJECT_ROOT / "scenes"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, path: str | os.PathLike | None = None) -> "Workspace":
        chosen = path or os.environ.get("LTM_WORKSPACE") or DEFAULT_WORKSPACE
        root = Path(chosen).expanduser().resolve()
        if root.exists() and not root.is_dir():  # else every command would find "no runs yet"
            raise LtmError(f"{root} is a file, not a workspace folder; give a folder to --workspace "
                           "(or LTM_WORKSPACE)", title="workspace")
        return cls(root)

    def ensure(self) -> "Workspace":
        """Create the folders; the root is the user's alone (0700), or their group's too (0750)
        with LTM_WORKSPACE_SHARED=1: the database, the logs and tokens.bin (from which a corpus
        can be rebuilt) are not for other users of a shared GPU box."""
        mode = folder_mode()
        self.root.mkdir(mode=mode, parents=True, exist_ok=True)
        try:
            if self.root.stat().st_uid == os.getuid() and self.root.stat().st_mode & 0o777 != mode:
                self.root.chmod(mode)
        except OSError:
            pass  # not ours to change (a mount, another owner): the files inside are still 0600
        self.runs_dir.mkdir(mode=mode, parents=True, exist_ok=True)
        self.sessions_dir.mkdir(mode=mode, parents=True, exist_ok=True)
        return self

    def open_log(self):
        """service.log for appending, created private whoever creates it (a client starts the
        service with its own umask)."""
        mode = 0o640 if shared_workspace() else 0o600
        return open(self.log_path, "ab", opener=lambda path, flags: os.open(path, flags, mode))

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

    def checked_socket_path(self) -> Path:
        """The socket's path, or one line saying the workspace's path is too long for one."""
        size = len(os.fsencode(self.socket_path))
        if size > SOCKET_PATH_MAX:
            raise LtmError(f"the workspace's path is too long for its socket ({size} bytes for "
                           f"{self.socket_path.name}, at most {SOCKET_PATH_MAX}); give a shorter --workspace, "
                           "e.g. a symbolic link to this folder", title="workspace")
        return self.socket_path

    @property
    def pid_path(self) -> Path:
        return self.root / "service.pid"

    @property
    def log_path(self) -> Path:
        return self.root / "service.log"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def search_dir(self, study: str) -> Path:
        """A search study's folder: its journal, its request, its lines, its corpus sets."""
        return self.root / "search" / study

    def search_request(self, study: str) -> Path:
        """What started a study; while `active`, a service that starts goes on with it."""
        return self.search_dir(study) / "request.json"


def cancel_marker(run_dir: Path, attempt: int) -> Path:
    """The file that tells a worker to stop one attempt of one run (`ltm-tui cancel`), and only
    that one: its other jobs, and a later attempt of the same run, go on."""
    return Path(run_dir) / f"cancel.{int(attempt)}"


def model_folder(name: str) -> Path | None:
    """The folder a base's files are in on this host: `name` itself, or for a hub id the snapshot
    in the Hugging Face cache that a load of it reads (the revision `refs/main` names, else the
    newest); None where neither is here."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    repo = Path(os.environ.get("HF_HUB_CACHE") or home / "hub") / f"models--{name.replace('/', '--')}"
    try:
        revision = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        revision = ""
    if revision and (repo / "snapshots" / revision).is_dir():
        return repo / "snapshots" / revision
    snapshots = [p for p in (repo / "snapshots").glob("*") if p.is_dir()]
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None
