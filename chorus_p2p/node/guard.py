"""Connection limits aiohttp does not have: a header deadline and a cap on open connections.

aiohttp's server waits as long as a client likes for a request's headers (``keepalive_timeout``
only covers idle time between requests), so a slowloris client holds a connection, and a file
descriptor, with a byte every few seconds; a thousand of them exhaust the process. The guard
watches the server's connections once a second:

- a connection with no request in progress (none started since it opened, or since its last
  request finished) for ``header_timeout_s`` is closed: that covers half-sent headers and idle
  keep-alive connections alike (clients reconnect transparently);
- beyond ``max_connections``, the connections idle the longest are closed first.

Requests in progress are never touched: uploads have their own deadline, and event streams
(WebSockets) are requests in progress for as long as they live.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

log = logging.getLogger("chorus_p2p.api")

HEADER_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 512


class ConnectionGuard:
    def __init__(self, header_timeout_s: float = HEADER_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS):
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        # keyed by id(): aiohttp's handlers take no weak references; entries of closed
        # connections are dropped at each sweep
        self._since: dict[int, float] = {}
        self._active: dict[int, int] = {}
        self._task: asyncio.Task | None = None
        self.closed = 0

    def request_started(self, protocol: Any) -> None:
        self._active[id(protocol)] = self._active.get(id(protocol), 0) + 1

    def request_finished(self, protocol: Any) -> None:
        key = id(protocol)
        left = self._active.get(key, 1) - 1
        if left > 0:
            self._active[key] = left
        else:
            self._active.pop(key, None)
        self._since[key] = time.monotonic()

    def start(self, runner: web.BaseRunner) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(runner))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self, runner: web.BaseRunner) -> None:
        while True:
            await asyncio.sleep(1.0)
            server = runner.server
            if server is not None:
                self.sweep(server.connections)

    def sweep(self, connections: list[Any]) -> None:
        now = time.monotonic()
        live = {id(p) for p in connections}
        for table in (self._since, self._active):
            for key in [k for k in table if k not in live]:
                del table[key]
        idle = []
        for protocol in connections:
            since = self._since.setdefault(id(protocol), now)
            if id(protocol) not in self._active:
                idle.append((since, protocol))
        idle.sort(key=lambda pair: pair[0])
        excess = max(0, len(connections) - self.max_connections)
        for since, protocol in idle:
            if now - since > self.header_timeout_s or excess > 0:
                excess -= 1
                self.closed += 1
                protocol.force_close()
        if excess > 0:
            log.warning("%d connections open (limit %d), all busy", len(connections),
                        self.max_connections)


def guard_middleware(guard: ConnectionGuard):
    @web.middleware
    async def middleware(request: web.Request, handler):
        protocol = request.protocol
        guard.request_started(protocol)
        try:
            return await handler(request)
        finally:
            guard.request_finished(protocol)
    return middleware
