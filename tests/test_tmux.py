"""The real `ltm-tui` binary in a real terminal (tmux): launch, queue a corpus through the file
picker, wait for it to finish, sort by a score, quit — what a user does over SSH."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import LOGIC_TEXT, REPO, WAIT, wait_for, write_tiny_battery

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (a system package, which pip cannot install)")


class Tmux:
    """One tmux server of our own (its own socket), one window of a fixed size."""

    def __init__(self, name: str) -> None:
        self.socket = name
        self.session = name

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=check)

    def start(self, command: str, env: dict[str, str]) -> None:
        exports = " ".join(f"{k}={_quote(v)}" for k, v in env.items())
        self._run("new-session", "-d", "-s", self.session, "-x", "80", "-y", "24", f"env {exports} {command}")

    def keys(self, *keys: str) -> None:
        self._run("send-keys", "-t", self.session, *keys)

    def screen(self) -> str:
        out = self._run("capture-pane", "-p", "-t", self.session, check=False)
        return out.stdout

    def alive(self) -> bool:
        return self._run("has-session", "-t", self.session, check=False).returncode == 0

    def wait(self, pattern: str, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if re.search(pattern, screen):
                return screen
            time.sleep(0.2)  # polling a real terminal: there is no event to wait on
        raise AssertionError(f"{pattern!r} did not appear; the screen was:\n{screen}")

    def kill(self) -> None:
        self._run("kill-server", check=False)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def _binary() -> str:
    found = shutil.which("ltm-tui", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return found or f"{sys.executable} -m ltm_tui.cli"


@pytest.mark.slow
def test_queue_from_the_picker_wait_sort_and_quit(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "logic.txt").write_text(LOGIC_TEXT, encoding="utf-8")
    battery = write_tiny_battery(tmp_path / "battery")
    ws = tmp_path / "ws"
    done = tmp_path / "exit-code"
    command = (
        f"sh -c '{_binary()} --workspace {ws} --root {texts} --preset tiny --steps 40 "
        f"--min-train-tokens 0 --scenes {battery}; echo $? > {done}'"
    )
    env = {"PYTHONPATH": str(REPO), "TERM": "xterm-256color", "HF_HUB_OFFLINE": "1", "LANG": "C.UTF-8",
           "PATH": os.environ.get("PATH", "")}
    tmux = Tmux(f"ltm-test-{os.getpid()}")
    try:
        tmux.start(command, env)
        tmux.wait(r"No runs yet")
        tmux.keys("a")
        tmux.wait(r"marked: none")
        tmux.wait(r"logic\.txt")
        tmux.keys("Down", "Space")
        tmux.wait(r"marked: 1")
        tmux.wait(r"logic\.txt\s+\d+\.\d+\s+[\d,]+")  # the preview: pages and tokens
        tmux.keys("Enter")  # Enter on a file asks to queue the marked files, with the batch's total
        tmux.wait(r"Queue 1 run\?")
        tmux.keys("y")
        tmux.wait(r"queued 1 run")
        screen = tmux.wait(r"logic\.txt\s+\d\.\d{3}\s+[+-]\d\.\d{3}")  # overall and Δ base
        assert "baseline · tiny" in screen
        current = re.search(r"sorted by (\S+)", screen).group(1)
        for _ in range(12):  # `s` walks the columns, one per press; stop at the depth score
            tmux.keys("s")
            current = re.search(r"sorted by (\S+)", tmux.wait(rf"sorted by (?!{re.escape(current)} )\S+ ")).group(1)
            if current == "depth":
                break
        tmux.wait(r"sorted by depth high→low")
        tmux.keys("d")
        tmux.wait(r"sorted by depth low→high")
        tmux.keys("q")
        wait_for(done.exists, what="the dashboard to quit")
        assert done.read_text().strip() == "0"
    finally:
        tmux.kill()
    # the jobs live in the service, not in the dashboard: it is still there after `q`
    assert (ws / "service.sock").exists()
