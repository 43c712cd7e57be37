"""``R`` after a round as a file to serve: built once per round, shared by every request.

``GET /v1/rounds/{n}/cumulative`` used to build a dense copy of ``R`` per request and hold it
while the client read slowly: 20 concurrent requests held 1 GB, and at 8B shapes three stalled
ones would need 84 GB. Now one build runs at a time, a round's file is built once and served to
every caller from disk (``sendfile``: a slow reader holds a file handle, not memory), and only
the last few rounds' files are kept. A failed build leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Awaitable, Callable

KEPT_ROUNDS = 2  # built files kept for reuse; older ones go (open streams keep their bytes)


class CumulativeFiles:
    def __init__(self, root: Path, kept: int = KEPT_ROUNDS):
        self.root = root
        shutil.rmtree(root, ignore_errors=True)  # left by a previous run: rebuilt on demand
        root.mkdir(parents=True, exist_ok=True)
        self.kept = kept
        # keyed by (round, log hash): after a diverged history is resolved, round n's R is
        # another one, and the file of the archived history must not be served for it
        self._files: OrderedDict[tuple[int, str], Path] = OrderedDict()
        self._building: dict[tuple[int, str], asyncio.Future] = {}
        self._one_build = asyncio.Semaphore(1)  # a build is a full pass over R: one at a time

    async def get(self, round_no: int, log_hash: str,
                  build: Callable[[Path], Awaitable[int]]) -> Path:
        """The file of ``R`` after ``round_no`` of the history ``log_hash`` names;
        ``build(path)`` writes it when none exists. Concurrent callers for the same round share
        one build (and its failure)."""
        key = (round_no, log_hash)
        path = self._files.get(key)
        if path is not None and path.exists():
            self._files.move_to_end(key)
            return path
        pending = self._building.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._build(key, build))
            self._building[key] = pending
            pending.add_done_callback(lambda _: self._building.pop(key, None))
        return await asyncio.shield(pending)

    async def _build(self, key: tuple[int, str], build: Callable[[Path], Awaitable[int]]
                     ) -> Path:
        async with self._one_build:
            path = self.root / f"R-{key[0]:08d}-{key[1][:16]}.state"
            await build(path)  # writes a partial name and renames: all or nothing
            self._files[key] = path
            while len(self._files) > self.kept:
                _, old = self._files.popitem(last=False)
                old.unlink(missing_ok=True)
            return path

    def close(self) -> None:
        for pending in self._building.values():
            pending.cancel()
        shutil.rmtree(self.root, ignore_errors=True)
