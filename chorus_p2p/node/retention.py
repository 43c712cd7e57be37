"""Retention: which blobs a node keeps, and the garbage collector that drops the rest.

Policy (``--keep-rounds N``, default 10; ``all`` keeps everything for audit):

- every round's ledger row (metadata, metrics, hashes, the state fingerprint) is kept for good;
- the blobs of a committed round (client updates, ``D``, the global adapter) are kept while the
  round is among the last N committed ones, *and* for every round after the state's newest
  checkpoint (an interrupted state update, or a late joiner, replays those ``D`` s);
- rounds in flight are never touched.

A collection first marks the rounds it prunes in the ledger (one transaction), then deletes the
blobs that only pruned rounds name. A ``kill -9`` between the two leaves files that the next
collection deletes; nothing a kept round names is ever a candidate, because the candidates are
computed as "named by pruned rounds" minus "named by kept rounds". Blobs no row names at all
(left by a crash between writing a blob and recording it) go after an hour's grace, so a result
that is being written right now is never taken for one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from chorus_p2p.node.blobs import BlobStore
from chorus_p2p.node.ledger import Ledger

if TYPE_CHECKING:
    from chorus_p2p.node.events import EventBus

log = logging.getLogger("chorus_p2p.retention")

ORPHAN_GRACE_S = 3600.0
# Test-only fault injection: seconds to sleep after each deleted blob, so a test can kill -9 in
# the middle of a collection.
FAULT_GC_DELAY_ENV = "CHORUS_FAULT_GC_DELAY"


@dataclass
class GcReport:
    pruned_rounds: list[int] = field(default_factory=list)
    deleted_blobs: int = 0
    freed_bytes: int = 0
    orphans: int = 0

    def to_json(self) -> dict[str, object]:
        return {"pruned_rounds": self.pruned_rounds, "deleted_blobs": self.deleted_blobs,
                "freed_bytes": self.freed_bytes, "orphans": self.orphans}


def prune_upto(latest: int, keep_rounds: int | None, recovery_round: int) -> int | None:
    """The newest round whose blobs may go, or None when nothing may."""
    if keep_rounds is None:
        return None
    upto = min(latest - keep_rounds, recovery_round)
    return upto if upto >= 0 else None


def _delete(blobs: BlobStore, shas: set[str]) -> tuple[int, int]:
    delay = float(os.environ.get(FAULT_GC_DELAY_ENV, "0") or 0)
    deleted = freed = 0
    for sha in sorted(shas):
        path = blobs.path(sha)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        deleted += 1
        freed += size
        if delay:
            time.sleep(delay)
    return deleted, freed


def orphan_blobs(blobs: BlobStore, named: set[str], grace_s: float) -> set[str]:
    cutoff = time.time() - grace_s
    found = set()
    for path in blobs.root.glob("??/*"):
        if path.name not in named:
            try:
                if path.stat().st_mtime <= cutoff:
                    found.add(path.name)
            except FileNotFoundError:
                continue
    return found


class Retention:
    def __init__(self, ledger: Ledger, blobs: BlobStore, keep_rounds: int | None,
                 bus: "EventBus | None" = None, lock: asyncio.Lock | None = None):
        self.ledger = ledger
        self.blobs = blobs
        self.keep_rounds = keep_rounds
        self.bus = bus
        # The round manager's lock: no upload is being recorded while we pick what to delete
        # (an upload of bytes identical to a pruned blob would otherwise lose its file).
        self.lock = lock or asyncio.Lock()
        self.last: GcReport | None = None

    async def collect(self, recovery_round: int, *, grace_s: float = ORPHAN_GRACE_S) -> GcReport:
        """Prune what the policy allows (ledger on the event loop, deletes in a thread)."""
        async with self.lock:
            latest = self.ledger.committed_round()
            upto = prune_upto(latest, self.keep_rounds, recovery_round)
            report = GcReport()
            if upto is not None:
                report.pruned_rounds = self.ledger.mark_pruned(upto)
            kept, candidates = self.ledger.blob_references()
            aside = self.ledger.kept_aside_blobs()
            # A ledger being rebuilt (doctor --repair) does not name its blobs yet: keep them.
            rebuilding = self.ledger.get_meta("rebuild") == "1"
            orphans = set() if rebuilding else await asyncio.to_thread(
                orphan_blobs, self.blobs, kept | candidates | aside, grace_s)
            report.orphans = len(orphans)
            report.deleted_blobs, report.freed_bytes = await asyncio.to_thread(
                _delete, self.blobs, (candidates | orphans) - aside)
        if report.pruned_rounds or report.deleted_blobs:
            log.info("gc: pruned %d round(s), deleted %d blob(s), freed %.1f MB",
                     len(report.pruned_rounds), report.deleted_blobs, report.freed_bytes / 1e6)
            if self.bus is not None:
                self.bus.publish("gc_finished", latest, report.to_json())
        self.last = report
        return report

    def is_pruned_blob(self, sha: str) -> bool:
        """A blob this node no longer holds because its rounds were pruned (HTTP 410)."""
        _, pruned = self.ledger.blob_references()
        return sha in pruned


def data_dir_bytes(root: Path) -> int:
    """Bytes a data dir occupies on disk (allocated blocks: sparse state files count as written)."""
    total = 0
    for path in root.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_blocks * 512
        except FileNotFoundError:
            continue
    return total
