"""The worker side of a task (`backend.jobs.tasks`): `python -m backend.compute.worker tasks/<id>/task.json`.

It writes only into the task's folder (and, for a calibration, the workspace's calibration
cache): `log` events as it goes, then `result.json` and a `result` event, or one `error` event
with the line the user sees. Exit code 0 when the result is written, 1 otherwise. SIGTERM (a
cancel) ends it at once: a task keeps nothing worth a checkpoint.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED = 0, 1


def run_task(task: dict[str, Any]) -> int:
    from backend.core.errors import LtmError, describe
    from backend.core.events import EventLog, LoadWatch, write_json_atomic

    folder = Path(task["task_dir"])
    events = EventLog(folder / "events.jsonl", task["task_id"])

    def log(line: str) -> None:
        print(line, flush=True)
        events.emit("log", message=line)

    try:
        # a calibration's or a judge's model loads without a word: moving bytes, it shows signs
        # of life (a download longer than the service's stall limit is not a hang)
        with LoadWatch(events, f"the {task['task']} task's model"):
            result = TASKS[task["task"]](task, log)
        write_json_atomic(folder / "result.json", result)
        events.emit("result")
        return EXIT_OK
    except LtmError as exc:
        events.emit("error", message=exc.one_line())
    except Exception as exc:  # noqa: BLE001 - one line for the user, the traceback in task.log
        print(traceback.format_exc(), flush=True)
        events.emit("error", message=describe(exc))
    finally:
        events.close()
    return EXIT_FAILED


def calibrate(task: dict[str, Any], log) -> dict[str, Any]:
    """Measure the speed and memory of a few real training steps (backend.compute.estimate) and cache it."""
    from backend.compute.estimate import ensure_calibration
    from backend.compute.train import keep_freed_memory
    from backend.core.workspace import Workspace

    keep_freed_memory()  # as a run's worker does, so the steps run at the worker's speed
    calib, _ = ensure_calibration(
        Workspace(Path(task["workspace"])), task["base"], task.get("train") or {}, task.get("lora") or None,
        force=True, steps=max(1, int(task.get("steps") or 8)), scenes=task.get("scenes"),
        sample=[Path(p) for p in task.get("sample") or []] or None, log=log,
    )
    return {"calibration": calib}


def judge(task: dict[str, Any], log) -> dict[str, Any]:
    """A local judge model grades each run's generations; the service stores the new scores."""
    from backend.compute.judge import LocalJudge, judge_rows, rescore

    judge_model = LocalJudge(task["model"], device=task.get("device"))
    log(f"judge {judge_model.name} loaded on {judge_model.device}")
    runs = []
    for run_id, rows in task["runs"].items():
        rows, counts = judge_rows(rows, judge_model)
        scores, overall = rescore(rows)
        log(f"{run_id}: {counts['graded']} graded: {counts['yes']} yes, {counts['no']} no")
        runs.append({"run_id": run_id, "judge": judge_model.name, "scene_results": rows, "scores": scores,
                     "overall": overall, "counts": counts})
    return {"runs": runs}


TASKS = {"calibrate": calibrate, "judge": judge}
