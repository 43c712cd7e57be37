"""Fan-out of node events to WebSocket subscribers (and the log).

Events that record state (round opened/committed, update accepted) carry the ledger's event id, so
a subscriber that reconnects with ``?since=ID`` misses nothing; the rest (update rejected,
aggregation started, member seen/lost) are live-only. A subscriber that stops reading is dropped
rather than allowed to grow memory without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger("chorus_p2p.events")

QUEUE_LIMIT = 1000


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue] = set()

    def publish(self, kind: str, round_no: int | None = None, data: dict[str, Any] | None = None,
                *, event_id: int | None = None, level: str = "info") -> dict[str, Any]:
        event = {"id": event_id, "ts": time.time(), "kind": kind, "round": round_no,
                 "level": level, "data": data or {}}
        log.log(logging.WARNING if level == "warning" else logging.INFO, kind,
                extra={"event": event})
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._subscribers.discard(queue)
        return event

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(QUEUE_LIMIT)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)

    def is_subscribed(self, queue: asyncio.Queue) -> bool:
        return queue in self._subscribers
