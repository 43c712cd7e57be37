"""Keeps a node's state ``R`` in step with its committed log, and checks it.

After every commit (as coordinator) or every round caught up (as follower), the keeper applies
the round's factored ``D`` to the node's dense state in a worker thread, compares the state's
fingerprint with the one the round recorded (:mod:`chorus_p2p.state.sketch`), writes a checkpoint
when one is due and runs the retention policy. It never sits on the commit path: rounds commit
and the next round opens while the state catches up behind them.

When the state cannot advance from what this node holds (a residual it never fetched or has
pruned, a state that disagrees with the log), it restores: a follower fetches the coordinator's
latest checkpoint and replays the residuals after it; a coordinator rebuilds from its own
checkpoint. A state that still disagrees stops advancing and says so (``state_diverged``):
training from it would silently break the exactness promise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator

import torch

from chorus_p2p.federation.round_states import COMMITTED
from chorus_p2p.state import sketch as sketches
from chorus_p2p.state.store import PinnedCheckpoint, Plan, StateError, StateStore

if TYPE_CHECKING:
    from chorus_p2p.node.blobs import BlobStore
    from chorus_p2p.node.events import EventBus
    from chorus_p2p.node.ledger import Ledger
    from chorus_p2p.node.retention import Retention

log = logging.getLogger("chorus_p2p.state")

# (destination file) -> (round, sha256) of the coordinator's checkpoint written there
CheckpointFetcher = Callable[[Path], Awaitable[tuple[int, str]]]
BlobFetcher = Callable[[str], Awaitable[None]]


def residual_plan(ledger: "Ledger", blobs: "BlobStore", start: int, upto: int) -> Plan | None:
    """``(round, residual path)`` for the committed rounds after ``start`` up to ``upto``, or None
    when one of them is not committed or its residual is not held here."""
    plan: list[tuple[int, Path | None]] = []
    for number in range(start + 1, upto + 1):
        row = ledger.round(number)
        if row is None or row["state"] != COMMITTED:
            return None
        sha = row.get("residual_sha")
        if sha and not blobs.has(sha):
            return None
        plan.append((number, blobs.path(sha) if sha else None))
    return plan


class ResidualMissing(Exception):
    """A round's ``D`` is not on this node and could not be fetched."""


class StateReader:
    """``R`` after one round, for training, evaluation and export; iterate it in any thread.
    It holds the checkpoint its plan starts from open, so a newer checkpoint written meanwhile
    (by this node, or by the node whose data dir an export reads) does not pull it away."""

    def __init__(self, store: StateStore, round_no: int, plan: Plan,
                 pinned: PinnedCheckpoint | None = None):
        self.store = store
        self.round = round_no
        self.plan = list(plan)
        self.pinned = pinned

    @classmethod
    def of(cls, store: StateStore, ledger: "Ledger", blobs: "BlobStore", round_no: int
           ) -> "StateReader | None":
        """A reader for ``R`` after ``round_no`` from this store's checkpoint, forward or
        backward; None when a residual between the two is not held here."""
        pinned = store.pin_checkpoint()
        low, high = sorted((pinned.round, round_no))
        plan = residual_plan(ledger, blobs, low, high)
        if plan is None or not pinned.hold(plan):
            return None
        return cls(store, round_no, plan, pinned)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.store.read(self.round, self.plan, self.pinned)

    def write(self, out: Path) -> int:
        return self.store.write_copy(self.round, out, self.plan, self.pinned)


# (checkpoint fetcher, blob fetcher) of the coordinator this node follows, or None when it
# follows none: where a follower restores from when its own files do not reach.
CoordinatorFetchers = Callable[[], "tuple[Any, Any] | None"]


class StateKeeper:
    """Applies committed rounds to the node's state. Its parts come in by constructor (the
    ledger and blobs it reads, where events and garbage collection go, how to reach the
    coordinator's files), never the node object."""

    def __init__(self, store: StateStore, ledger: "Ledger", blobs: "BlobStore", bus: EventBus,
                 retention: "Retention", coordinator_fetchers: CoordinatorFetchers):
        self.store = store
        self.ledger = ledger
        self.blobs = blobs
        self.bus = bus
        self.retention = retention
        self.coordinator_fetchers = coordinator_fetchers
        self.last_apply_ms: float | None = None
        self.last_checkpoint_ms: float | None = None
        self.verified_round: int | None = None
        self.ready_round = -1  # the newest round whose state passed its check (readers wait)
        self.diverged: str | None = None
        self._restored_for: int | None = None
        self._discard = False
        self._wake = asyncio.Event()
        self._advanced = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    def history_replaced(self) -> None:
        """The ledger now holds another history: this state is not its sum any more."""
        self._discard = True
        self._wake.set()

    async def _loop(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                break
            try:
                await self.advance()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the node up; say what is wrong, retry on next wake
                if isinstance(exc, StateError):  # expected while no coordinator can help
                    log.warning("state update waits: %s; retrying", exc)
                else:
                    log.exception("state update failed")
                self.bus.publish("state_stalled", self.store.round,
                                      {"error": f"{exc.__class__.__name__}: {exc}"},
                                      level="warning")
                await asyncio.sleep(1.0)
                self._wake.set()

    # -- advancing -----------------------------------------------------------------------------
    def _target(self) -> int:
        return self.ledger.committed_round()

    async def advance(self) -> None:
        """Bring the state to the latest committed round, one round at a time, checking each
        against the log. Readers only ever get a round that passed its check (``ready_round``)."""
        if self.diverged:
            return
        if self._discard:
            self._discard = False
            self.ready_round = -1
            await asyncio.to_thread(self.store.discard)
            self.verified_round = None
        if self.store.dirty:
            await self._restore("an update was interrupted (crash or kill)")
        elif self.ready_round < self.store.round:
            # Once per start: the state on disk must still be what the log says; a power cut
            # or a stray write shows here, before anyone trains from it (a mismatch restores).
            await self._check_all(self.store.round)
            if self.diverged:
                return
        await self._ensure_checkpoint()
        while not self._stopping and not self.diverged and self.store.round < self._target():
            number = self.store.round + 1
            row = self.ledger.round(number)
            if row is None or row["state"] != COMMITTED:
                return
            try:
                path = await self._residual_path(row)
            except ResidualMissing as exc:
                await self._restore(str(exc))
                continue
            report = await asyncio.to_thread(self.store.apply, number, path)
            self.last_apply_ms = round(report.seconds * 1000, 3)
            if not await self._verify(row, report.sketch):
                continue
            self.bus.publish("state_applied", number, {"ms": self.last_apply_ms})
            if self.store.checkpoint_due():
                # A checkpoint is what every later restore starts from: check all of it first.
                if not await self._check_all(number):
                    continue
                await self._write_checkpoint()
            self._ready(number)
            await self.retention.collect(self.store.recovery_round)

    def _ready(self, number: int) -> None:
        self.ready_round = number
        if self._restored_for is not None and number >= self._restored_for:
            self._restored_for = None  # the restore got us past the round that failed
        self._advanced.set()

    async def _check_all(self, number: int) -> bool:
        """Every module of the working state against round ``number``'s fingerprint."""
        row = self.ledger.round(number)
        if row is None or not row.get("state_sketch"):
            self._ready(number)  # rounds converted from 0.1 before the first fingerprint
            return True
        if not await self._verify(row, await asyncio.to_thread(self.store.sketch)):
            return False
        self._ready(number)
        return True

    async def _ensure_checkpoint(self) -> None:
        """A clean state with no checkpoint (a checkpoint cut short, a fresh install) gets one
        now: restores and late joiners need it, and GC keeps residuals until it exists."""
        if self.store.latest_checkpoint() is None and self.store.round > 0 \
                and self.ready_round == self.store.round and not self.store.dirty:
            await self._write_checkpoint()

    async def _write_checkpoint(self) -> None:
        started = time.perf_counter()
        checkpoint = await asyncio.to_thread(self.store.checkpoint)
        self.last_checkpoint_ms = round((time.perf_counter() - started) * 1000, 3)
        self.bus.publish("checkpoint_written", checkpoint.round, {
            **checkpoint.to_json(), "ms": self.last_checkpoint_ms})

    async def _residual_path(self, row: dict[str, Any]) -> Path | None:
        sha = row.get("residual_sha")
        if not sha:
            return None
        remote = self.coordinator_fetchers()
        if not self.blobs.has(sha) and remote is not None:
            try:
                await remote[1](sha)
            except Exception as exc:
                raise ResidualMissing(f"round {row['round']}'s residual could not be fetched "
                                      f"({exc})") from exc
        if not self.blobs.has(sha):
            raise ResidualMissing(f"round {row['round']}'s residual is not on this node")
        return self.blobs.path(sha)

    async def _verify(self, row: dict[str, Any], actual: sketches.Sketch | None) -> bool:
        """Compare the state with the round's recorded fingerprint; restore on a mismatch. A
        second mismatch before the state gets past the first one's round is divergence."""
        expected_text = row.get("state_sketch")
        if actual is None or not expected_text:
            return True
        expected = sketches.decode(expected_text, self.store.layout.shapes)
        bad = sketches.compare(actual, {p: expected[p] for p in actual})
        if not bad:
            self.verified_round = row["round"]
            return True
        worst = max(bad, key=lambda m: m.relative_error)
        reason = (f"state after round {row['round']} differs from the log's fingerprint in "
                  f"{len(bad)} module(s) (worst {worst.prefix}: {worst.relative_error:.2e})")
        if self._restored_for is not None:
            self.diverged = reason + ", again after a restore"
            log.error("%s; this node stops training from its state (chorus-node doctor)",
                      self.diverged)
            self.bus.publish("state_diverged", row["round"], {"reason": self.diverged},
                                  level="error")
            return False
        self._restored_for = row["round"]
        self.bus.publish("state_mismatch", row["round"], {"reason": reason}, level="warning")
        await self._restore(reason, suspect=True)
        return False

    async def _restore(self, reason: str, suspect: bool = False) -> None:
        """Reset the working state to a checkpoint the loop can replay from: the coordinator's
        when we follow one and our own residuals do not reach (or our state is suspect), else
        our own (zeros when there is none yet)."""
        log.warning("state: %s; restoring", reason)
        remote = self.coordinator_fetchers()
        if remote is not None and (suspect or not self._replayable()):
            if await self._install_remote_checkpoint(remote[0]):
                return
        if not self._replayable():
            raise StateError(f"{reason}, and the residuals needed to rebuild the state are gone "
                             "and no coordinator offered a checkpoint")
        self.ready_round = -1
        await asyncio.to_thread(self.store.reset_to_checkpoint)
        self.bus.publish("state_restored", self.store.round, {"reason": reason},
                              level="warning")

    def _plan_from(self, start: int, upto: int) -> Plan | None:
        return residual_plan(self.ledger, self.blobs, start, upto)

    def _replayable(self) -> bool:
        """Whether this node's own checkpoint and residuals reach the latest committed round."""
        checkpoint = self.store.latest_checkpoint()
        return self._plan_from(checkpoint.round if checkpoint else 0, self._target()) is not None

    async def _install_remote_checkpoint(self, fetch: CheckpointFetcher) -> bool:
        dest = self.store.root / ".incoming.safetensors"
        try:
            number, sha = await fetch(dest)
            row = self.ledger.round(number)
            if row is None or row["state"] != COMMITTED:
                raise StateError(f"the coordinator's checkpoint is of round {number}, which this "
                                 "node has not committed yet")
            if row.get("state_sketch"):
                expected = sketches.decode(row["state_sketch"], self.store.layout.shapes)
                actual = await asyncio.to_thread(_sketch_of_file, self.store, dest)
                bad = sketches.compare(actual, expected)
                if bad:
                    raise StateError(f"the coordinator's checkpoint of round {number} does not "
                                     f"match the log's fingerprint ({len(bad)} module(s))")
            await asyncio.to_thread(self.store.install_checkpoint, dest, number, sha)
        except Exception as exc:
            log.warning("state: fetching the coordinator's checkpoint failed: %s", exc)
            dest.unlink(missing_ok=True)
            return False
        self.verified_round = number
        self._ready(number)
        self.bus.publish("checkpoint_installed", number, {"sha256": sha})
        return True

    # -- readers -------------------------------------------------------------------------------------
    async def reader(self, round_no: int, timeout: float = 600.0) -> StateReader:
        """``R`` after ``round_no`` once this node's state has reached it."""
        deadline = time.monotonic() + timeout
        while self.ready_round < round_no or self.diverged:
            if self.diverged:
                raise StateError(f"this node's state disagrees with the federation's log "
                                 f"({self.diverged}); it is not used (chorus-node doctor)")
            if time.monotonic() > deadline:
                raise StateError(f"the state has not reached round {round_no} in {timeout:.0f}s")
            self._advanced.clear()
            self._wake.set()
            try:
                await asyncio.wait_for(self._advanced.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
        reader = StateReader.of(self.store, self.ledger, self.blobs, round_no)
        return reader if reader is not None else StateReader(self.store, round_no, [])

    def info(self) -> dict[str, Any]:
        checkpoint = self.store.latest_checkpoint()
        return {"round": self.store.round, "dirty": self.store.dirty,
                "verified_round": self.verified_round,
                "diverged": self.diverged,
                "checkpoint": checkpoint.to_json() if checkpoint else None,
                "checkpoint_every": self.store.checkpoint_every,
                "state_bytes": self.store.layout.total_bytes,
                "last_apply_ms": self.last_apply_ms, "last_checkpoint_ms": self.last_checkpoint_ms}


def _sketch_of_file(store: StateStore, path: Path) -> sketches.Sketch:
    from chorus_p2p.state.dense_file import DenseFile

    assert store.probes is not None
    dense = DenseFile(path, store.layout)
    buffer = torch.empty(max(o * i for _, o, i in store.layout.modules))
    return {p: store.probes.of_dense(p, dense.read_module(p, buffer)) for p in dense.prefixes()}
