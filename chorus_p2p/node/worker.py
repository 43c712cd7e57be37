"""A node's background work that runs one step at a time, forever: training, evaluation."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, TypeVar

log = logging.getLogger("chorus_p2p.train")
T = TypeVar("T")


class Stopping(Exception):
    """Raised inside a step's thread (from its progress callback) once the node stops."""


class StepLoop:
    """Run ``_step`` again and again on the node's event loop. A failing step is logged and
    published (``failure_event``), and the node stays up: a bad dataset or a full disk is the
    operator's to fix, not a reason to stop serving the federation."""

    failure_event = "worker_failed"
    name = "worker"
    poll_s = 0.2
    retry_s = 2.0

    def __init__(self, node) -> None:
        self.node = node
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._threads: set[asyncio.Future] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Cancel the step, then wait for its threads: cancelling an await of a thread leaves
        the thread running, and the node closes its ledger next (a DP release still writing
        to it crashed the process). Training threads end at their next step (``Stopping``)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._threads:
            await asyncio.gather(*self._threads, return_exceptions=True)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``asyncio.to_thread`` whose thread ``stop`` waits for."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._threads.add(future)
        future.add_done_callback(self._threads.discard)
        return await asyncio.shield(future)

    def _check_stopping(self) -> None:
        """Call from a long thread's progress callback: it ends the thread when the node stops."""
        if self._stopping:
            raise Stopping(f"{self.name}: the node is stopping")

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the node up; say what went wrong
                log.warning("%s: %s", self.name, exc)
                self.node.bus.publish(self.failure_event, None, {"error": str(exc)},
                                      level="warning")
                await asyncio.sleep(self.retry_s)
            await asyncio.sleep(self.poll_s)

    async def _step(self) -> None:
        raise NotImplementedError
