"""What the dashboard keeps between sessions: the results' sort, filter and intervals.

Kept in the workspace (`dashboard.json`), so that a dashboard reopened over SSH the next
morning shows the table as it was left. A file that cannot be read (hand-edited, from another
version) is ignored for the defaults; one that cannot be written costs only the memory of it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

VIEW_FILE = "dashboard.json"


@dataclass(frozen=True)
class DashboardView:
    sort: str = "overall"
    descending: bool = True
    filter: str = ""
    intervals: bool = False

    @classmethod
    def load(cls, path: Path) -> DashboardView:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls()
        if not isinstance(data, dict):
            return cls()
        default = cls()
        sort = data.get("sort")
        return cls(
            sort=sort if isinstance(sort, str) and sort else default.sort,
            descending=data.get("descending") if isinstance(data.get("descending"), bool) else default.descending,
            filter=data.get("filter") if isinstance(data.get("filter"), str) else default.filter,
            intervals=data.get("intervals") if isinstance(data.get("intervals"), bool) else default.intervals,
        )

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(asdict(self)), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
