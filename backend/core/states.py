"""Job states and the transitions allowed between them.

queued → starting → training → evaluating → done, or failed / cancelled / interrupted.
A terminal state is left only by an explicit retry, which goes back to queued.
"""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    QUEUED = "queued"
    STARTING = "starting"
    TRAINING = "training"
    EVALUATING = "evaluating"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    def is_terminal(self) -> bool:
        """Nothing moves it any more, unless a retry queues it again."""
        return self in TERMINAL

    def ended_without_result(self) -> bool:
        """Failed, cancelled or interrupted: a retry can still finish it."""
        return self.is_terminal() and self is not JobState.DONE

    def __str__(self) -> str:  # so f-strings and SQL parameters get the plain value
        return self.value


TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED})

_ACTIVE_EXITS = {JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED}

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.STARTING, JobState.CANCELLED, JobState.FAILED}),
    JobState.STARTING: frozenset({JobState.TRAINING, JobState.EVALUATING} | _ACTIVE_EXITS),
    JobState.TRAINING: frozenset({JobState.EVALUATING} | _ACTIVE_EXITS),
    JobState.EVALUATING: frozenset({JobState.DONE} | _ACTIVE_EXITS),
    # Retry is the only way out of a terminal state; `done` is final.
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
    JobState.INTERRUPTED: frozenset({JobState.QUEUED}),
}


def can_transition(old: JobState, new: JobState) -> bool:
    return new in ALLOWED[old]


# How a worker process ends (python -m backend.compute.worker), read by the job manager.
EXIT_OK, EXIT_SOME_FAILED, EXIT_BAD_SESSION, EXIT_STOPPED = 0, 1, 2, 3
EXIT_DISK_FULL = 4  # the disk filled up so far that not even the error could be written
EXIT_DEVICE_LOST = 5  # the device can run nothing more in this process (a sticky CUDA error)
