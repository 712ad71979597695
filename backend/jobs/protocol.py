"""The job service's wire format, for every client (the CLI's socket client and the dashboard's
asyncio link) and the service: one JSON object a line.

    request  {"id": 1, "op": "jobs", "args": {...}}
    reply    {"id": 1, "ok": true, "result": ...}  or  {"id": 1, "ok": false, "error": {"title", "message"}}
    event    {"event": {...}}                        (after a `subscribe`, until the service stops)
"""

from __future__ import annotations

import json
from typing import Any

from backend.core.errors import LtmError

# The request/reply format's version. A client and a service of different versions (an upgrade
# while a service ran) refuse each other with one line instead of misreading replies.
PROTOCOL_VERSION = 3


class ServiceError(LtmError):
    title = "service"


def request_line(rid: int, op: str, args: dict[str, Any]) -> bytes:
    # ASCII: a file name that is not valid UTF-8 (a lone surrogate in Python) still travels, and
    # the service names it in its one-line error rather than the request failing to encode
    return (json.dumps({"id": rid, "op": op, "args": args}) + "\n").encode()


def reply_result(raw: bytes, op: str, where: str) -> Any:
    """The result of a reply line, or its error raised as the one line the service gave."""
    if not raw:
        raise ServiceError(f"the service on {where} closed the connection during {op!r}; see its service.log")
    try:
        reply = json.loads(raw)
    except ValueError:
        raise ServiceError(f"the service's answer to {op!r} is not JSON; see its service.log") from None
    if not reply.get("ok"):
        err = reply.get("error") or {}
        raise LtmError(err.get("message", "request failed"), title=err.get("title", "service"))
    return reply.get("result")


def event_of(raw: bytes) -> dict | None:
    """The event a stream line carries (None for anything else)."""
    return json.loads(raw).get("event")


def is_stop(event: dict) -> bool:
    """The last event of a stream: the service stops."""
    return event.get("type") == "service" and event.get("status") == "stopped"
