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
        return self in TERMINAL

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
