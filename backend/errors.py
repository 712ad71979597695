"""Project exceptions: each carries a short title and one line a user can act on."""

from __future__ import annotations


class LtmError(Exception):
    """Base of every error ltm-tui reports to a user as one line, never a traceback."""

    title = "error"

    def __init__(self, message: str, *, title: str | None = None) -> None:
        super().__init__(message)
        if title is not None:
            self.title = title

    @property
    def message(self) -> str:
        """The message on one line: a newline inside it (a file name may hold one) is shown as
        `\\n`, so one error is always one line of a log or a terminal."""
        text = str(self.args[0]) if self.args else self.title
        return text.replace("\r", "\\r").replace("\n", "\\n")

    def one_line(self) -> str:
        return f"{self.title}: {self.message}"


class CorpusError(LtmError):
    """A corpus file cannot be read: names the file and the reason."""

    title = "corpus"


class BatteryError(LtmError):
    """A scene battery is malformed: names the file, line and field."""

    title = "battery"


class ModelError(LtmError):
    """A base model cannot be loaded (unknown, not available offline, bad flags)."""

    title = "model"


class StoreError(LtmError):
    """The results database cannot be opened or written."""

    title = "store"


class JobError(LtmError):
    """A job cannot be queued, moved to a state, or run."""

    title = "job"


class SpaceError(LtmError):
    """A search space (ltm-tui search --space) is malformed: names the file and the field."""

    title = "search space"
