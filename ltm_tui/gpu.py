"""The device panel's short text forms: sizes in GiB and one-line sparklines of a history.
The readings themselves are `backend.core.devices`."""

from __future__ import annotations


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.1f}"


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values, width: int) -> str:
    """The last `width` shares (0..1) as block characters; a missing sample is a space."""
    vals = list(values)[-width:]
    out = []
    for v in vals:
        if v is None:
            out.append(" ")
        else:
            out.append(SPARK[min(len(SPARK) - 1, max(0, int(v * len(SPARK))))])
    return "".join(out).rjust(width)
