"""The job service's search studies: which run, starting and stopping them, and going on with
the active ones when the service starts. Each study's loop is a `StudyRunner` thread
(backend/studies/search_study.py), imported with optuna only once a study runs, so a service
that never searches does not pay for it at every start.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from backend.core.errors import JobError, LtmError, SpaceError
from backend.core.events import write_json_atomic


class Searches:
    """The service's running studies, by name."""

    def __init__(self, service) -> None:
        self.service = service
        self.runners: dict = {}  # name -> its StudyRunner
        self._lock = threading.Lock()

    def busy(self) -> bool:
        return any(r.alive() for r in self.runners.values())

    def running(self) -> list[str]:
        return [name for name, r in self.runners.items() if r.alive()]

    def start(self, args: dict[str, Any]) -> dict[str, Any]:
        """Start a study, resume it, or find it running (then a larger --trials raises its target)."""
        from backend.studies.search_study import StudyRunner, checked  # optuna: only once a study runs

        request = checked(args)
        name = request["study"]
        with self._lock:
            runner = self.runners.get(name)
            if runner is not None and runner.alive():
                if not runner.same_as(request):
                    raise SpaceError(
                        f"study {name!r} is running with other space, files or settings; follow it with the "
                        "command that started it, stop it (ltm-tui search --stop --study NAME), or name a new study"
                    )
                if request["target"] != runner.target:
                    runner.target = request["target"]
                    runner.say(f"study {name}: target now {runner.target} trials")
                return {"study": name, "status": "running", "lines": runner.backlog()}
            runner = StudyRunner(self.service, request)
            self.runners[name] = runner
            runner.start()
            return {"study": name, "status": "started", "lines": runner.backlog()}

    def stop(self, name: str) -> dict[str, Any]:
        from backend.studies.search import STUDY_NAME

        if not STUDY_NAME.fullmatch(name):  # a name, never a path
            raise SpaceError(f"search: study {name!r}: use letters, digits, _ . - (at most 64)")
        runner = self.runners.get(name)
        if runner is not None and runner.alive():
            runner.stop(by_user=True)
            return {"study": name, "status": "stopping"}
        path = self.service.workspace.search_request(name)
        if path.exists():  # not running (a failed start, say), but the next service would resume it
            data = json.loads(path.read_text(encoding="utf-8"))
            write_json_atomic(path, {**data, "active": False})
            return {"study": name, "status": "stopped"}
        raise JobError(f"no search study {name!r} in this workspace")

    def resume_all(self) -> None:
        """At the service's start: every study whose request is still active goes on."""
        for path in sorted((self.service.workspace.root / "search").glob("*/request.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if not data.get("active"):
                    continue
                self.start(data)
            except (LtmError, OSError, ValueError, TypeError, KeyError) as exc:
                why = exc.one_line() if isinstance(exc, LtmError) else f"{type(exc).__name__}: {exc}"
                self.service.log(f"search {path.parent.name} not resumed: {why}")

    def stop_all(self, timeout: float = 5.0) -> None:
        """The service stops: each loop ends at its next look; the trials' jobs go on."""
        for runner in self.runners.values():
            runner.stop(by_user=False)
        deadline = time.monotonic() + timeout
        for runner in self.runners.values():
            runner.thread.join(max(0.0, deadline - time.monotonic()))
