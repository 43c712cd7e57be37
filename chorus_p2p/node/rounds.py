"""Rounds: open -> collecting -> aggregating -> committed, durable across kill -9.

Invariants that make crash recovery simple:

- A blob is on disk (fsynced, renamed) before any ledger row names it.
- An update row is inserted in the same transaction as its ``update_accepted`` event, keyed by
  ``(round, node)``: a re-send of the same bytes is a no-op, different bytes are refused.
- A round's result blobs are written before the single transaction that marks it committed and
  opens the next round. A crash before that transaction leaves the round ``aggregating``; on start
  it is aggregated again from its stored updates, which are never modified.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chorus_p2p.lora.aggregate import aggregate_adapters
from chorus_p2p.lora.residual import RESIDUAL_FILE, FactoredResidual, load_residual
from chorus_p2p.lora.safetensors_stream import StreamingSafetensorsWriter
from chorus_p2p.node.blobs import BlobStore
from chorus_p2p.node.events import EventBus
from chorus_p2p.node.ledger import AGGREGATING, COLLECTING, COMMITTED, OPEN, Ledger
from chorus_p2p.node.spec import FederationSpec, UpdateRejected

log = logging.getLogger("chorus_p2p.rounds")

# Test-only fault injection: seconds to sleep inside aggregation, so a test can kill -9 mid-way.
FAULT_DELAY_ENV = "CHORUS_FAULT_AGGREGATION_DELAY"


@dataclass
class RoundPolicy:
    strategy: str = "fedex-svd"
    min_updates: int = 2
    deadline_s: float = 600.0


@dataclass
class Accepted:
    round: int
    node_id: str
    blob_sha: str
    duplicate: bool
    event_id: int | None


def _canonical_json(data: Any) -> bytes:
    return (json.dumps(data, sort_keys=True, indent=2) + "\n").encode()


class RoundManager:
    def __init__(self, ledger: Ledger, blobs: BlobStore, spec: FederationSpec, federation: str,
                 node_id: str, policy: RoundPolicy, bus: EventBus):
        self.ledger = ledger
        self.blobs = blobs
        self.spec = spec
        self.federation = federation
        self.node_id = node_id
        self.policy = policy
        self.bus = bus
        self.paused = ledger.get_meta("paused", "0") == "1"
        self._lock = asyncio.Lock()  # serialises accept-vs-close of the current round
        self._tasks: set[asyncio.Task] = set()
        self._deadline_task: asyncio.Task | None = None
        self._aggregating: int | None = None

    # -- start and recovery ----------------------------------------------------------------
    async def start(self) -> None:
        swept = await asyncio.to_thread(self.blobs.sweep_partials)
        if swept:
            log.info("removed %d partial blob(s) left by an earlier crash", swept)
        if self.ledger.round(0) is None:
            await self._create_round_zero()
        current = self.ledger.latest_round()
        assert current is not None
        if current["state"] == COMMITTED:
            if not self.paused:
                self._open_next(current["round"])
        elif current["state"] == AGGREGATING:
            log.warning("round %d was aggregating when the node stopped; aggregating it again "
                        "from its %d stored update(s)", current["round"],
                        self.ledger.count_updates(current["round"]))
            self._spawn(self._aggregate(current["round"]))
        else:
            self._arm_deadline(current)
            await self._maybe_close(current["round"])

    async def _create_round_zero(self) -> None:
        """Round 0 is the shared starting point: PEFT's init, derived identically on every node."""
        def build() -> tuple[str, str]:
            writer = StreamingSafetensorsWriter(self.blobs.tmp)
            for name, tensor in self.spec.initial_adapter(self.federation).items():
                writer.add(name, tensor)
            out, temp = self.blobs.new_temp()
            out.close()
            writer.finish(temp, {"format": "pt"})
            adapter_sha = self.blobs.put_file(temp)
            temp.unlink()
            return adapter_sha, self.blobs.put_bytes(_canonical_json(self.spec.adapter_config()))

        adapter_sha, config_sha = await asyncio.to_thread(build)
        now = time.time()
        self.ledger.insert_round({
            "round": 0, "term": 0, "coordinator": self.node_id, "state": COMMITTED,
            "strategy": "init", "config": self._round_config(), "trained_from": None,
            "opened_at": now, "deadline_at": None, "aggregating_at": None, "committed_at": now,
            "adapter_sha": adapter_sha, "adapter_config_sha": config_sha, "residual_sha": None,
            "cumulative_sha": None, "metrics": {"updates": 0}})

    def _round_config(self) -> dict[str, Any]:
        return {"strategy": self.policy.strategy, "min_updates": self.policy.min_updates,
                "deadline_s": self.policy.deadline_s, "spec": self.spec.fingerprint()}

    def _open_next(self, committed: int) -> dict[str, Any]:
        row = self._next_round_row(committed)
        self.ledger.insert_round(row)
        event_id = self.ledger.add_event("round_opened", row["round"], {"trained_from": committed})
        self.bus.publish("round_opened", row["round"], {"trained_from": committed,
                                                        "deadline_at": row["deadline_at"]},
                         event_id=event_id)
        self._arm_deadline(row)
        return row

    def _next_round_row(self, committed: int) -> dict[str, Any]:
        now = time.time()
        return {"round": committed + 1, "term": 0, "coordinator": self.node_id, "state": OPEN,
                "strategy": self.policy.strategy, "config": self._round_config(),
                "trained_from": committed, "opened_at": now,
                "deadline_at": now + self.policy.deadline_s, "aggregating_at": None,
                "committed_at": None, "adapter_sha": None, "adapter_config_sha": None,
                "residual_sha": None, "cumulative_sha": None, "metrics": None}

    # -- updates ---------------------------------------------------------------------------
    def check_open(self, round_no: int, trained_from: int | None) -> dict[str, Any]:
        """Cheap checks done before an upload's body is read, and again before it is recorded."""
        row = self.ledger.round(round_no)
        if row is None:
            current = self.ledger.latest_round()
            raise UpdateRejected("unknown_round", f"round {round_no} does not exist (the current "
                                 f"round is {current['round'] if current else 'none'})")
        if row["state"] not in (OPEN, COLLECTING):
            raise UpdateRejected("round_closed", f"round {round_no} is {row['state']}; submit to "
                                 "the current round")
        if trained_from is not None and trained_from != row["trained_from"]:
            raise UpdateRejected("stale_base", f"this update was trained from round {trained_from}"
                                 f" but round {round_no} builds on round {row['trained_from']}; "
                                 "pull the latest adapter and train again")
        return row

    async def accept(self, round_no: int, node_id: str, temp_path: Path, sha: str, size: int,
                     examples: int, trained_from: int, norm: float) -> Accepted:
        async with self._lock:
            existing = self.ledger.update(round_no, node_id)
            if existing is not None:
                temp_path.unlink(missing_ok=True)
                if existing["blob_sha"] == sha:
                    return Accepted(round_no, node_id, sha, True, None)
                raise UpdateRejected("update_conflict", f"{node_id} already submitted a different "
                                     f"update to round {round_no}")
            row = self.check_open(round_no, trained_from)
            await asyncio.to_thread(self.blobs.adopt, temp_path, sha)
            record = {"round": round_no, "node_id": node_id, "blob_sha": sha,
                      "examples": examples, "trained_from": trained_from, "size": size,
                      "norm": norm, "received_at": time.time()}
            details = {"node_id": node_id, "sha256": sha, "examples": examples}
            event_id = self.ledger.add_update(record, details)
            if row["state"] == OPEN:
                self.ledger.set_round_state(round_no, COLLECTING)
        count = self.ledger.count_updates(round_no)
        self.bus.publish("update_accepted", round_no, {**details, "count": count,
                                                       "min_updates": self.policy.min_updates},
                         event_id=event_id)
        await self._maybe_close(round_no)
        return Accepted(round_no, node_id, sha, False, event_id)

    def expected_participants(self, round_no: int) -> int:
        """Wait for everyone who took part last round, or ``min_updates`` in the first round."""
        previous = self.ledger.updates(round_no - 1) if round_no > 1 else []
        return max(self.policy.min_updates, len(previous))

    async def _maybe_close(self, round_no: int, *, deadline_passed: bool = False,
                           force: bool = False) -> bool:
        async with self._lock:
            row = self.ledger.round(round_no)
            if row is None or row["state"] not in (OPEN, COLLECTING):
                return False
            count = self.ledger.count_updates(round_no)
            deadline_passed = deadline_passed or time.time() >= (row["deadline_at"] or 0)
            ready = count >= self.policy.min_updates and (
                count >= self.expected_participants(round_no) or deadline_passed)
            if force:
                ready = count >= 1
            if not ready:
                if deadline_passed and count < self.policy.min_updates:
                    self.bus.publish("deadline_passed", round_no,
                                     {"count": count, "min_updates": self.policy.min_updates},
                                     level="warning")
                return False
            self.ledger.set_round_state(round_no, AGGREGATING, aggregating_at=time.time())
        self._spawn(self._aggregate(round_no))
        return True

    async def close_now(self) -> int:
        """Admin action: aggregate the current round with whatever updates it has."""
        current = self.ledger.latest_round()
        if current is None or current["state"] not in (OPEN, COLLECTING):
            raise UpdateRejected("round_closed", "no round is collecting updates right now")
        if not await self._maybe_close(current["round"], force=True):
            raise UpdateRejected("no_updates", f"round {current['round']} has no updates yet")
        return current["round"]

    def set_paused(self, paused: bool) -> None:
        """Paused: the current round finishes, but no new round opens until resumed."""
        self.paused = paused
        self.ledger.set_meta("paused", "1" if paused else "0")
        self.bus.publish("paused" if paused else "resumed")
        latest = self.ledger.latest_round()
        if not paused and latest is not None and latest["state"] == COMMITTED:
            self._open_next(latest["round"])

    # -- deadline --------------------------------------------------------------------------
    def _arm_deadline(self, row: dict[str, Any]) -> None:
        if self._deadline_task is not None:
            self._deadline_task.cancel()
        delay = max(0.0, (row["deadline_at"] or time.time()) - time.time())

        async def fire() -> None:
            await asyncio.sleep(delay)
            await self._maybe_close(row["round"], deadline_passed=True)

        self._deadline_task = self._spawn(fire())

    # -- aggregation -----------------------------------------------------------------------
    async def _aggregate(self, round_no: int) -> None:
        self._aggregating = round_no
        updates = self.ledger.updates(round_no)
        previous = self.ledger.latest_committed()
        assert previous is not None
        self.bus.publish("aggregation_started", round_no, {"updates": len(updates),
                                                           "strategy": self.policy.strategy})
        try:
            fields = await asyncio.to_thread(self._aggregate_blocking, round_no, updates, previous)
        except Exception as exc:  # a bug or a disk problem: keep the round, say why
            log.exception("aggregation of round %d failed", round_no)
            self.bus.publish("aggregation_failed", round_no, {"error": str(exc)}, level="warning")
            self._aggregating = None
            return
        next_row = None if self.paused else self._next_round_row(round_no)
        event_id = self.ledger.commit_round(round_no, fields, next_row,
                                            ("round_committed", {"adapter_sha": fields["adapter_sha"]}))
        self._aggregating = None
        self.bus.publish("aggregation_finished", round_no, fields["metrics"])
        self.bus.publish("round_committed", round_no,
                         {k: fields[k] for k in ("adapter_sha", "residual_sha", "cumulative_sha")},
                         event_id=event_id)
        if next_row is not None:
            event_id = self.ledger.add_event("round_opened", next_row["round"],
                                             {"trained_from": round_no})
            self.bus.publish("round_opened", next_row["round"],
                             {"trained_from": round_no, "deadline_at": next_row["deadline_at"]},
                             event_id=event_id)
            self._arm_deadline(next_row)

    def _aggregate_blocking(self, round_no: int, updates: list[dict[str, Any]],
                            previous: dict[str, Any]) -> dict[str, Any]:
        delay = float(os.environ.get(FAULT_DELAY_ENV, "0") or 0)
        if delay:
            time.sleep(delay)
        started = time.perf_counter()
        scratch = Path(tempfile.mkdtemp(dir=self.blobs.tmp))
        try:
            paths = [str(self.blobs.verified_path(u["blob_sha"])) for u in updates]
            report = aggregate_adapters(
                paths, scratch / "out", strategy=self.policy.strategy,
                weights=[u["examples"] for u in updates], rank=self.spec.rank,
                settings=self.spec.settings, labels=[u["node_id"] for u in updates])
            adapter_sha = self.blobs.put_file(scratch / "out" / "adapter_model.safetensors")
            config_sha = self.blobs.put_bytes(_canonical_json(self.spec.adapter_config()))
            cumulative_sha = previous["cumulative_sha"]  # fedavg leaves R unchanged
            residual_sha = None
            residual_file = scratch / "out" / RESIDUAL_FILE
            if residual_file.exists():
                residual_sha = self.blobs.put_file(residual_file)
                cumulative = (load_residual(self.blobs.verified_path(previous["cumulative_sha"]))
                              if previous["cumulative_sha"] else FactoredResidual())
                cumulative.add(load_residual(residual_file))
                cumulative.save(scratch / "cumulative.safetensors", {"round": str(round_no)})
                cumulative_sha = self.blobs.put_file(scratch / "cumulative.safetensors")
            metrics = {"updates": len(updates), "examples": sum(u["examples"] for u in updates),
                       "strategy": self.policy.strategy,
                       "aggregation_ms": round(report.seconds * 1000, 3),
                       "total_ms": round((time.perf_counter() - started) * 1000, 3),
                       "residual_energy": (None if self.policy.strategy == "fedavg"
                                           else report.residual_energy),
                       "nodes": [u["node_id"] for u in updates]}
            return {"adapter_sha": adapter_sha, "adapter_config_sha": config_sha,
                    "residual_sha": residual_sha, "cumulative_sha": cumulative_sha,
                    "committed_at": time.time(), "metrics": metrics}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # -- housekeeping ----------------------------------------------------------------------
    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        """Cancel timers; let an aggregation in flight finish so its result is not thrown away."""
        if self._deadline_task is not None:
            self._deadline_task.cancel()
        pending = [t for t in self._tasks if t is not self._deadline_task]
        if pending:
            await asyncio.wait(pending, timeout=60)
        for task in list(self._tasks):
            task.cancel()
