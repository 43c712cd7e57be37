"""Fan-out of node events to WebSocket subscribers (and the log).

Events that record state carry the ledger's event id, so a subscriber that reconnects with
``?since=ID`` misses none of them: round committed on every node; round opened and update
accepted on the coordinator that took them. The rest (update rejected, aggregation started,
member seen/lost) are live-only. A subscriber that stops reading is dropped
rather than allowed to grow memory without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger("chorus_p2p.events")

QUEUE_LIMIT = 1000


# Refusals are logged at most this often per (kind, peer) and minute; the rest are counted and
# summed up in one line, so a flood of bad requests cannot fill the disk with log.
REFUSALS_LOGGED_PER_MINUTE = 10
LIMITED_KINDS = ("request_refused", "update_rejected", "peer_refused")


# The level of each kind the ledger records, for events replayed from it (the table keeps no
# level column: the kind decides it). Unlisted kinds are "info".
RECORDED_LEVELS = {"update_dropped": "warning", "update_excluded": "warning",
                   "history_diverged": "error", "state_mismatch": "warning"}


def recorded_level(kind: str) -> str:
    return RECORDED_LEVELS.get(kind, "info")


# Put in every subscriber's queue when the node stops: the stream handler closes its WebSocket
# (1001 "going away") at once instead of holding the shutdown for as long as a dashboard stays.
CLOSING = None


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue] = set()
        self.closed = False
        self._budget: dict[tuple[str, Any], list[float]] = {}  # key -> [window start, count]

    def _should_log(self, kind: str, data: dict[str, Any]) -> bool:
        if kind not in LIMITED_KINDS:
            return True
        key = (kind, data.get("peer") or data.get("url"))
        now = time.monotonic()
        window = self._budget.get(key)
        if window is None or now - window[0] >= 60.0:
            if window is not None and window[1] > REFUSALS_LOGGED_PER_MINUTE:
                log.warning("%s: %d more from %s in the last minute were not logged", kind,
                            int(window[1] - REFUSALS_LOGGED_PER_MINUTE), key[1])
            if len(self._budget) > 10_000:
                self._budget.clear()
            window = self._budget[key] = [now, 0]
        window[1] += 1
        return window[1] <= REFUSALS_LOGGED_PER_MINUTE

    def publish(self, kind: str, round_no: int | None = None, data: dict[str, Any] | None = None,
                *, event_id: int | None = None, level: str = "info") -> dict[str, Any]:
        event = {"id": event_id, "ts": time.time(), "kind": kind, "round": round_no,
                 "level": level, "data": data or {}}
        if self._should_log(kind, event["data"]):
            log.log({"warning": logging.WARNING, "error": logging.ERROR}.get(level, logging.INFO),
                    kind, extra={"event": event})
        for queue in list(self._subscribers):
            try:
                if queue.qsize() >= QUEUE_LIMIT:
                    raise asyncio.QueueFull
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._subscribers.discard(queue)
        return event

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(QUEUE_LIMIT + 1)  # + 1: room for CLOSING
        if self.closed:
            queue.put_nowait(CLOSING)
        else:
            self._subscribers.add(queue)
        return queue

    def close(self) -> None:
        """Tell every stream the node is stopping (see CLOSING); later subscribers hear it too."""
        self.closed = True
        for queue in list(self._subscribers):
            queue.put_nowait(CLOSING)
        self._subscribers.clear()

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)

    def is_subscribed(self, queue: asyncio.Queue) -> bool:
        return queue in self._subscribers
