"""Project exceptions: each carries a short title and one line a user can act on."""

from __future__ import annotations

# control characters as escapes; \t stays (it is one gap on the line)
_VISIBLE = {c: ("\\n" if c == 10 else "\\r" if c == 13 else f"\\x{c:02x}")
            for c in [*range(32), *range(127, 160)] if c != 9}  # C0, DEL and C1 (U+009B starts a CSI)


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
        `\\n`, and any other control character (an escape sequence in a name would move the
        terminal's cursor or clear it) as `\\x1b`, so one error is always one line of a log or
        a terminal."""
        text = str(self.args[0]) if self.args else self.title
        return text.translate(_VISIBLE)

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


def describe(exc: BaseException) -> str:
    """One line for an unexpected failure in a worker: the fix where one is known (out of memory,
    a full disk), else the exception's type and first line. torch's out-of-memory error is
    recognised by name, so this module never imports torch."""
    if type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.startswith("torch"):
        return "out of memory: use --quant 4bit, a smaller micro preset, or a smaller micro_batch"
    if isinstance(exc, OSError) and exc.errno == 28:
        return f"disk full while writing {exc.filename or 'the run folder'}: free space and retry"
    if "No space left on device" in str(exc):  # a library's own error around ENOSPC (safetensors, torch)
        return "disk full while writing the run folder: free space and retry"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]
