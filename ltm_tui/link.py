"""The dashboard's line to the job service, on asyncio, so that no request blocks the screen.

Each request opens its own short connection (the service serves each in a thread), so requests
made at the same time never interleave on one stream; the event stream holds one connection open
for as long as the dashboard runs. The lines are `backend.jobs.protocol`'s, as for every client.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any, AsyncIterator

from backend.jobs.protocol import ServiceError, event_of, is_stop, reply_result, request_line

# A `results` reply for 10,000 runs is a few megabytes on one line.
LINE_LIMIT = 256 * 1024 * 1024


class Link:
    def __init__(self, socket_path: Path, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._ids = itertools.count(1)

    async def _open(self):
        try:
            return await asyncio.open_unix_connection(str(self.socket_path), limit=LINE_LIMIT)
        except OSError as exc:
            raise ServiceError(f"the service does not answer on {self.socket_path} ({exc.strerror or exc})") from None

    async def call(self, op: str, **args: Any) -> Any:
        reader, writer = await self._open()
        try:
            rid = next(self._ids)
            writer.write(request_line(rid, op, args))
            await writer.drain()
            raw = await asyncio.wait_for(reader.readline(), self.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ServiceError(f"the service did not answer {op!r}: {exc or 'timeout'}") from None
        finally:
            writer.close()
        return reply_result(raw, op, str(self.socket_path.parent))

    async def events(self) -> AsyncIterator[dict]:
        """Every event the service sees from the moment this is subscribed, until it stops."""
        reader, writer = await self._open()
        try:
            writer.write(request_line(0, "subscribe", {}))
            await writer.drain()
            reply_result(await reader.readline(), "subscribe", str(self.socket_path.parent))
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                event = event_of(raw)
                if event is None:
                    continue
                yield event
                if is_stop(event):
                    return
        finally:
            writer.close()

