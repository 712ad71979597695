"""The dashboard's line to the job service, on asyncio, so that no request blocks the screen.

Each request opens its own short connection (the service serves each in a thread), so requests
made at the same time never interleave on one stream; the event stream holds one connection open
for as long as the dashboard runs. The protocol is `backend.service`'s JSON lines.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any, AsyncIterator

from backend.errors import LtmError

# A `results` reply for 10,000 runs is a few megabytes on one line.
LINE_LIMIT = 256 * 1024 * 1024


class LinkError(LtmError):
    title = "service"


class Link:
    def __init__(self, socket_path: Path, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._ids = itertools.count(1)

    async def _open(self):
        try:
            return await asyncio.open_unix_connection(str(self.socket_path), limit=LINE_LIMIT)
        except OSError as exc:
            raise LinkError(f"the service does not answer on {self.socket_path} ({exc.strerror or exc})") from None

    async def call(self, op: str, **args: Any) -> Any:
        reader, writer = await self._open()
        try:
            rid = next(self._ids)
            writer.write((json.dumps({"id": rid, "op": op, "args": args}, ensure_ascii=False) + "\n").encode())
            await writer.drain()
            raw = await asyncio.wait_for(reader.readline(), self.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise LinkError(f"the service did not answer {op!r}: {exc or 'timeout'}") from None
        finally:
            writer.close()
        return _result(raw, op)

    async def events(self) -> AsyncIterator[dict]:
        """Every event the service sees from the moment this is subscribed, until it stops."""
        reader, writer = await self._open()
        try:
            writer.write((json.dumps({"id": 0, "op": "subscribe", "args": {}}) + "\n").encode())
            await writer.drain()
            _result(await reader.readline(), "subscribe")
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                event = json.loads(raw).get("event")
                if event is None:
                    continue
                yield event
                if event.get("type") == "service" and event.get("status") == "stopped":
                    return
        finally:
            writer.close()


def _result(raw: bytes, op: str) -> Any:
    if not raw:
        raise LinkError(f"the service closed the connection during {op!r}; see its service.log")
    try:
        reply = json.loads(raw)
    except ValueError:
        raise LinkError(f"the service's answer to {op!r} is not JSON; see its service.log") from None
    if not reply.get("ok"):
        err = reply.get("error") or {}
        raise LtmError(err.get("message", "request failed"), title=err.get("title", "service"))
    return reply.get("result")
