"""Rounds: open -> collecting -> aggregating -> proposed -> committed, durable across kill -9.

Only the coordinator runs a round; followers mirror it (see :meth:`RoundManager.apply_from_coordinator`).

Invariants that make crash recovery and failover simple:

- A blob is on disk (fsynced, renamed) before any ledger row names it.
- An update row is inserted in the same transaction as its ``update_accepted`` event, keyed by
  ``(round, node)``: a re-send of the same bytes is a no-op, different bytes are refused.
- A round's result blobs are written before the round is marked ``proposed``; it becomes
  ``committed`` (and the next round opens, in the same transaction) once a majority of members
  hold the proposal. A round left ``aggregating`` by a crash is aggregated again from its stored
  updates; a ``proposed`` one is proposed again, never recomputed.
- Every coordinator action is fenced by its term: a result computed under a term the node no
  longer leads is dropped.
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
from typing import Any, Awaitable, Callable, Iterable

import torch

from chorus_p2p.lora.aggregate import aggregate_adapters
from chorus_p2p.lora.safetensors_stream import StreamingSafetensorsWriter
from chorus_p2p.consensus import pause as pause_rules
from chorus_p2p.consensus.pause import PauseStamp
from chorus_p2p.consensus.rounds import (closes, commits, log_position, participation,
                                         recovers_first, takes_over)
from chorus_p2p.federation import wire
from chorus_p2p.federation.refusals import UpdateRejected
from chorus_p2p.federation.round_states import AGGREGATING, COLLECTING, COMMITTED, OPEN, PROPOSED
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.federation.wire import round_record
from chorus_p2p.node.blobs import BlobStore
from chorus_p2p.node.events import EventBus
from chorus_p2p.node.ledger import Ledger, chain_hash
from chorus_p2p.node.round_aggregation import aggregate_round, canonical_json
from chorus_p2p.node.robust import FilterPolicy, Scale, bound_exclusions, filter_updates
from chorus_p2p.state import sketch as sketches

log = logging.getLogger("chorus_p2p.rounds")

# Test-only fault injection: seconds to sleep inside aggregation, so a test can kill -9 mid-way.
FAULT_DELAY_ENV = "CHORUS_FAULT_AGGREGATION_DELAY"
RESULT_KEYS = ("adapter_sha", "adapter_config_sha", "residual_sha")
# A follower this many rounds (or fewer) behind the coordinator's checkpoint replays residuals;
# further behind, one checkpoint is cheaper than the residuals since (each D is up to ~1/8 of R).
REPLAY_RATHER_THAN_FETCH = 2
PAUSE_KEY = "pause"  # ledger meta: the pause stamp this node holds (consensus.pause)


@dataclass
class RoundPolicy:
    strategy: str = "fedex-svd"
    min_updates: int = 2
    deadline_s: float = 600.0
    filters: FilterPolicy = FilterPolicy()


@dataclass
class Accepted:
    round: int
    node_id: str
    blob_sha: str
    duplicate: bool
    event_id: int | None
    replicas: int = 1  # members holding it durably (ledger row + blob) when it was acknowledged
    members: int = 1


# (round, sha) -> how many voting members hold the update now (this node included)
Replicator = Callable[[int, str], Awaitable[int]]
# round -> [(peer label, blob fetcher from that peer, the peer's update rows of that round)]
UpdateCollector = Callable[[int], Awaitable[list[tuple[str, Callable[[str], Awaitable[None]],
                                                       list[dict[str, Any]]]]]]


BlobFetcher = Callable[[str], Awaitable[None]]


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
        self.pause = _stored_pause(ledger)
        self.leading_term: int | None = None
        # Set by the cluster: how many members make a majority, who to tell, where the leader is.
        self.quorum: Callable[[], int] = lambda: 1
        self.voting_members: Callable[[], list[str]] = lambda: [node_id]
        self.abstaining: Callable[[], set[str]] = lambda: set()
        self._short_reported: int | None = None
        # Round -> callers whose update for it came too late: the next round waits for them,
        # so a machine a little slower than the rest misses one round, not every round.
        self._late: dict[int, set[str]] = {}
        self.notify_followers: Callable[[], None] = lambda: None
        self.coordinator_hint: Callable[[], dict[str, Any]] = lambda: {}
        # Set by the node: wake the state keeper when rounds commit; what our state offers peers.
        self.on_committed: Callable[[], None] = lambda: None
        # Set by the cluster: push the live round to followers and count who holds an update;
        # gather a round's updates from a majority when taking over; hand ours to the leader.
        self.replicate: Replicator = self._replicate_alone
        self.collect_updates: UpdateCollector = self._collect_alone
        self.handoff: Callable[[dict[str, Any]], None] = lambda update: None
        self.quorum_fresh: Callable[[], bool] = lambda: True
        self.keep_rounds: int | None = None  # set by the node: its retention window
        self._recovering: int | None = None
        self._recover_next_open: int | None = None  # the term whose first opened round to recover
        self.diverged: dict[str, Any] | None = None
        self.on_history_replaced: Callable[[], None] = lambda: None
        self.state_hint: Callable[[], dict[str, Any]] = lambda: {}
        self.probes = sketches.Probes(federation, spec.modules)
        self.lock = asyncio.Lock()  # serialises accept-vs-close of the current round (and GC)
        self._sync_lock = asyncio.Lock()  # one follower sync at a time
        self._tasks: set[asyncio.Task] = set()
        self._deadline_task: asyncio.Task | None = None
        self._acks: dict[int, set[str]] = {}

    # -- start -------------------------------------------------------------------------------
    async def start(self) -> None:
        swept = await asyncio.to_thread(self.blobs.sweep_partials)
        if swept:
            log.info("removed %d partial blob(s) left by an earlier crash", swept)
        if self.ledger.round(0) is None:
            await self._create_round_zero()

    async def _create_round_zero(self) -> None:
        """Round 0 is the shared starting point: PEFT's init, derived identically on every node."""
        def build() -> tuple[str, str]:
            writer = StreamingSafetensorsWriter(self.blobs.tmp)
            for name, tensor in self.spec.initial_adapter(self.federation).items():
                writer.add(name, tensor)
            out, temp = self.blobs.new_temp()
            out.close()
            writer.finish(temp, {"format": "pt"})
            adapter_sha = self.blobs.put_file(temp, move=True)
            return adapter_sha, self.blobs.put_bytes(canonical_json(self.spec.adapter_config()))

        adapter_sha, config_sha = await asyncio.to_thread(build)
        row = {"round": 0, "term": 0, "coordinator": None, "state": COMMITTED,
               "strategy": "init", "config": {"spec": self.spec.fingerprint()}, "trained_from": None,
               "opened_at": 0.0, "deadline_at": None, "aggregating_at": None, "committed_at": 0.0,
               "adapter_sha": adapter_sha, "adapter_config_sha": config_sha, "residual_sha": None,
               "state_sketch": sketches.encode(self.probes.zero()), "metrics": {"updates": 0}}
        self.ledger.insert_round({**row, "log_hash": chain_hash(None, row)})

    def _round_config(self) -> dict[str, Any]:
        return {"strategy": self.policy.strategy, "min_updates": self.policy.min_updates,
                "deadline_s": self.policy.deadline_s, "spec": self.spec.fingerprint()}

    # -- leadership --------------------------------------------------------------------------
    @property
    def is_coordinator(self) -> bool:
        return self.leading_term is not None

    async def _replicate_alone(self, round_no: int, sha: str) -> int:
        return 1

    async def _collect_alone(self, round_no: int):
        return []

    async def lead(self, term: int, voters_pause: Iterable[PauseStamp] = ()) -> None:
        """Take over as coordinator: continue whatever round the ledger says is in flight.

        A round still collecting (or aggregating) is first *recovered*: its updates are gathered
        from a majority of members, so every update a previous coordinator acknowledged (which
        it did only once a majority held it) is in the round before it can close. Whether the
        federation is paused comes from the voters too (``voters_pause``: the stamps of those
        that granted their vote; see consensus.pause)."""
        self.adopt_pause(pause_rules.at_election(self.pause, voters_pause, term))
        self.leading_term = term
        latest = self.ledger.latest_round()
        assert latest is not None
        state = latest["state"]
        # The round after our latest may be live elsewhere: the previous coordinator may have
        # opened it and acknowledged updates (held by a majority, not necessarily by us) before
        # we heard of it. So the first round we open is recovered like an in-flight one.
        self._recover_next_open = term if state in (COMMITTED, PROPOSED) else None
        if state in (OPEN, COLLECTING, AGGREGATING) and recovers_first(self.quorum()):
            self._recovering = latest["round"]
            self.ledger.set_round_state(latest["round"], COLLECTING if state == AGGREGATING
                                        else state, term=term, coordinator=self.node_id)
            self._spawn(self._recover(latest["round"], term, state))
            return
        if state == COMMITTED:
            if not self.paused:
                self._open_next(latest["round"])
        elif state == PROPOSED:
            log.info("round %d was proposed by an earlier coordinator; proposing it again",
                     latest["round"])
            self.ledger.set_round_state(latest["round"], PROPOSED, term=term,
                                        coordinator=self.node_id)
            self._acks[latest["round"]] = {self.node_id}
            self.notify_followers()
            await self.on_ack(latest["round"], self.node_id, latest["adapter_sha"])
        elif state == AGGREGATING:
            log.warning("round %d was aggregating when its coordinator stopped; aggregating it "
                        "again from its %d stored update(s)", latest["round"],
                        self.ledger.count_updates(latest["round"]))
            self._spawn(self._aggregate(latest["round"], term))
        else:
            deadline = time.time() + self.policy.deadline_s
            self.ledger.set_round_state(latest["round"], state, term=term,
                                        coordinator=self.node_id, deadline_at=deadline)
            self.bus.publish("round_resumed", latest["round"], {
                "term": term, "updates": self.ledger.count_updates(latest["round"])})
            self._arm_deadline({**latest, "deadline_at": deadline})
            await self._maybe_close(latest["round"])

    async def _recover(self, round_no: int, term: int, state: str) -> None:
        try:
            while self.leading_term == term:
                try:
                    answers = await self.collect_updates(round_no)
                except Exception as exc:  # peers unreachable: try again while we lead
                    log.info("recovering round %d: %s", round_no, exc)
                    await asyncio.sleep(0.5)
                    continue
                if 1 + len(answers) >= self.quorum():
                    break
                await asyncio.sleep(0.2)
            else:
                return
            recovered = 0
            for label, fetch_blob, rows in answers:
                for update in rows:
                    if await self.adopt_update(round_no, update, fetch_blob, why=f"from {label}"):
                        recovered += 1
            if self.leading_term != term:
                return
            deadline = time.time() + self.policy.deadline_s
            self.ledger.set_round_state(round_no, self.ledger.round(round_no)["state"],
                                        deadline_at=deadline)
            self.bus.publish("round_resumed", round_no, {
                "term": term, "updates": self.ledger.count_updates(round_no),
                "recovered": recovered})
            self._recovering = None
            self._arm_deadline({**self.ledger.round(round_no), "deadline_at": deadline})
            self.notify_followers()
            await self._maybe_close(round_no, force=state == AGGREGATING)
        finally:
            if self._recovering == round_no and self.leading_term != term:
                self._recovering = None

    async def adopt_update(self, round_no: int, update: dict[str, Any],
                           fetch_blob: Callable[[str], Awaitable[None]], why: str) -> bool:
        """Record an update another member holds for our live round (recovery, hand-off)."""
        async with self.lock:
            row = self.ledger.round(round_no)
            if (row is None or row["state"] not in (OPEN, COLLECTING)
                    or update.get("round") != round_no
                    or update.get("trained_from") != row["trained_from"]):
                return False
            if not takes_over(self.ledger.update(round_no, update["node_id"]), update):
                return False
        if not self.blobs.has(update["blob_sha"]):
            await fetch_blob(update["blob_sha"])
        async with self.lock:
            row = self.ledger.round(round_no)
            existing = self.ledger.update(round_no, update["node_id"])
            if not takes_over(existing, update) or row["state"] not in (OPEN, COLLECTING):
                return False
            if existing is not None:  # ours is from an earlier term: it was never acknowledged
                self.ledger.drop_updates([existing], "a different update from this client was "
                                         f"accepted in a later term ({update.get('term')})")
            record = {k: v for k, v in wire.update_record(update).items()
                      if k not in ("status", "reason")}
            self.ledger.add_update(record, {"node_id": update["node_id"],
                                            "sha256": update["blob_sha"],
                                            "examples": update["examples"], "recovered": why})
            if row["state"] == OPEN:
                self.ledger.set_round_state(round_no, COLLECTING)
        log.info("round %d: took %s's update %s (%s)", round_no, update["node_id"],
                 update["blob_sha"][:12], why)
        self.notify_followers()
        return True

    def follow(self) -> None:
        """Stop acting as coordinator (a newer term exists, or quorum was lost)."""
        self.leading_term = None
        self._recovering = None
        if self._deadline_task is not None:
            self._deadline_task.cancel()
            self._deadline_task = None

    # -- opening -------------------------------------------------------------------------------
    def _open_next(self, committed: int) -> dict[str, Any]:
        row = self._next_round_row(committed)
        self.ledger.insert_round(row)
        event_id = self.ledger.add_event("round_opened", row["round"], {"trained_from": committed})
        self._publish_opened(row, event_id)
        self._arm_or_recover(row)
        self.notify_followers()
        return row

    def _arm_or_recover(self, row: dict[str, Any]) -> None:
        """A freshly opened round gets its deadline; the first one a new coordinator opens is
        first recovered from a majority (see :meth:`lead`), and gets its deadline after."""
        term = self.leading_term
        if self._recover_next_open is not None and self._recover_next_open == term \
                and recovers_first(self.quorum()):
            self._recover_next_open = None
            self._recovering = row["round"]
            self._spawn(self._recover(row["round"], term, OPEN))
            return
        self._recover_next_open = None
        self._arm_deadline(row)

    def _publish_opened(self, row: dict[str, Any], event_id: int | None) -> None:
        self.bus.publish("round_opened", row["round"], {"trained_from": row["trained_from"],
                                                        "deadline_at": row["deadline_at"]},
                         event_id=event_id)

    def _next_round_row(self, committed: int) -> dict[str, Any]:
        now = time.time()
        return {"round": committed + 1, "term": self.leading_term or 0,
                "coordinator": self.node_id, "state": OPEN, "strategy": self.policy.strategy,
                "config": self._round_config(), "trained_from": committed, "opened_at": now,
                "deadline_at": now + self.policy.deadline_s, "aggregating_at": None,
                "committed_at": None, "adapter_sha": None, "adapter_config_sha": None,
                "residual_sha": None, "state_sketch": None, "log_hash": None, "metrics": None}

    # -- updates ---------------------------------------------------------------------------
    def require_coordinator(self) -> None:
        """Refuse a write on a follower, saying where the coordinator is (clients retry there)."""
        if self.is_coordinator and not self.quorum_fresh():
            # CheckQuorum: a coordinator cut off from a majority acknowledges nothing.
            raise UpdateRejected("no_quorum", "this coordinator has not heard from a majority of "
                                 "members within an election timeout; it takes no writes until "
                                 "it does (or a new coordinator is elected)")
        if not self.is_coordinator:
            hint = self.coordinator_hint()
            where = f" at {hint['coordinator_url']}" if hint.get("coordinator_url") else \
                " (none elected right now: no quorum or an election is running)"
            raise UpdateRejected("not_coordinator", f"this node is not the coordinator; submit "
                                 f"to the coordinator{where}", extra=hint)

    def check_open(self, round_no: int, trained_from: int | None,
                   caller: str | None = None) -> dict[str, Any]:
        """Cheap checks done before an upload's body is read, and again before it is recorded.

        ``caller``: who sends it. A caller refused because it came too late is waited for in
        the next round (``_participation``)."""
        self.require_coordinator()
        row = self.ledger.round(round_no)
        if row is None:
            current = self.ledger.latest_round()
            raise UpdateRejected("unknown_round", f"round {round_no} does not exist (the current "
                                 f"round is {current['round'] if current else 'none'})")
        if row["state"] not in (OPEN, COLLECTING):
            self._note_late(caller, round_no)
            raise UpdateRejected("round_closed", f"round {round_no} is {row['state']}; submit to "
                                 "the current round (the next round waits for this sender)")
        if trained_from is not None and trained_from != row["trained_from"]:
            # Not noted as late: a client that trained from an old round is told to pull and
            # train again, and may not; one that sent to a round just closed was in step.
            raise UpdateRejected("stale_base", f"this update was trained from round {trained_from}"
                                 f" but round {round_no} builds on round {row['trained_from']}; "
                                 "pull the latest adapter and train again")
        return row

    def _note_late(self, caller: str | None, round_no: int) -> None:
        if caller is None or round_no < 1:
            return
        self._late.setdefault(round_no, set()).add(caller)
        for old in [r for r in self._late if r < round_no - 4]:
            del self._late[old]  # only the round before the collecting one is read

    async def accept(self, round_no: int, node_id: str, temp_path: Path, sha: str, size: int,
                     examples: int, trained_from: int, norm: float,
                     losses: dict[str, float] | None = None) -> Accepted:
        """Record an update, then acknowledge it only once a majority of voting members hold it
        durably (ledger row + blob): a coordinator that dies right after answering cannot take
        an acknowledged update with it."""
        async with self.lock:
            existing = self.ledger.update(round_no, node_id)
            if existing is not None:
                temp_path.unlink(missing_ok=True)
                if existing["blob_sha"] != sha:
                    raise UpdateRejected("update_conflict", f"{node_id} already submitted a "
                                         f"different update to round {round_no}")
                duplicate = True
            else:
                duplicate = False
                earlier = self.ledger.counted_elsewhere(node_id, sha, round_no)
                if earlier is not None:
                    temp_path.unlink(missing_ok=True)
                    raise UpdateRejected("already_counted", (
                        f"{node_id} sent these exact bytes to round {earlier} already; an update "
                        "counts once (pull the latest adapter and train again)"),
                        extra={"round": earlier})
                row = self.check_open(round_no, trained_from, node_id)
                existed = self.blobs.has(sha)
                await asyncio.to_thread(self.blobs.adopt, temp_path, sha)
                record = {"round": round_no, "node_id": node_id, "blob_sha": sha,
                          "examples": examples, "trained_from": trained_from, "size": size,
                          "norm": norm, "received_at": time.time(), "term": self.leading_term,
                          "eval_loss": (losses or {}).get("eval_loss"),
                          "train_loss": (losses or {}).get("train_loss")}
                details = {"node_id": node_id, "sha256": sha, "examples": examples}
                try:
                    event_id = self.ledger.add_update(record, details)
                except BaseException:
                    if not existed:  # a refused request leaves the blob store as it found it
                        self.blobs.path(sha).unlink(missing_ok=True)
                    raise
                if row["state"] == OPEN:
                    self.ledger.set_round_state(round_no, COLLECTING)
        if duplicate:
            return await self._durable(Accepted(round_no, node_id, sha, True, None))
        count = self.ledger.count_updates(round_no)
        self.bus.publish("update_accepted", round_no, {**details, "count": count,
                                                       "min_updates": self.policy.min_updates},
                         event_id=event_id)
        self.notify_followers()
        try:
            return await self._durable(Accepted(round_no, node_id, sha, False, event_id))
        finally:
            await self._maybe_close(round_no)

    async def _durable(self, accepted: Accepted) -> Accepted:
        """Wait until a majority holds the update; refuse to acknowledge otherwise (503)."""
        needed = self.quorum()
        accepted.members = len(self.voting_members())
        accepted.replicas = await self.replicate(accepted.round, accepted.blob_sha)
        if accepted.replicas < needed:
            raise UpdateRejected("not_durable", (
                f"the update is recorded on the coordinator but only {accepted.replicas} of "
                f"{accepted.members} members hold it ({needed} needed), so it is not acknowledged: "
                "it could be lost if the coordinator failed now. Send the same file again (the "
                "re-send is idempotent) once the federation has a majority."),
                extra={"replicas": accepted.replicas, "needed": needed})
        return accepted

    async def exclude(self, round_no: int, node_id: str, reason: str) -> dict[str, Any]:
        """Admin: leave one update of the collecting round out (a bad or hostile one)."""
        self.require_coordinator()
        async with self.lock:
            row = self.ledger.round(round_no)
            if row is None:
                raise UpdateRejected("unknown_round", f"round {round_no} does not exist")
            if row["state"] not in (OPEN, COLLECTING):
                raise UpdateRejected("round_closed", f"round {round_no} is {row['state']}; only "
                                     "the collecting round's updates can be excluded")
            if not self.ledger.exclude_update(round_no, node_id, reason):
                raise UpdateRejected("not_found", f"round {round_no} has no update from "
                                     f"{node_id}")
        self.bus.publish("update_excluded", round_no, {"node_id": node_id, "reason": reason},
                         level="warning")
        self.notify_followers()
        return {"round": round_no, "node_id": node_id, "status": "excluded", "reason": reason}

    def expected_participants(self, round_no: int) -> int:
        """Wait for everyone who took part last round, or ``min_updates`` in the first round,
        less the members that said they take no part any more (a spent privacy budget); never
        fewer than ``min_updates``, which stays the floor (a round of one update publishes it)."""
        return self._participation(round_no)[1]

    def _participation(self, round_no: int) -> tuple[int, int]:
        """(updates needed at least, updates to wait for before the deadline).

        Waited for: who took part in the previous round, and who sent an update to it after
        it closed (refused ``round_closed``). Without the latter, a member a little
        slower than the rest is still training round t when round t+1 opens, is refused, and
        stays one round behind for good."""
        previous = {u["node_id"] for u in self.ledger.updates(round_no - 1)} \
            if round_no > 1 else set()
        previous |= self._late.get(round_no - 1, set())
        abstaining = self.abstaining()
        needed, expected, short = participation(self.policy.min_updates, previous, abstaining)
        if short is not None and self._short_reported != round_no:
            self._short_reported = round_no  # said once per round; the admin decides
            self.bus.publish("participants_short", round_no, {
                "active": short, "min_updates": needed,
                "abstaining": sorted(previous & abstaining)}, level="warning")
        return needed, expected

    async def reconsider(self) -> None:
        """Participation changed: the collecting round may be complete now."""
        latest = self.ledger.latest_round()
        if self.is_coordinator and latest is not None and latest["state"] in (OPEN, COLLECTING):
            await self._maybe_close(latest["round"])

    async def _maybe_close(self, round_no: int, *, deadline_passed: bool = False,
                           force: bool = False) -> bool:
        async with self.lock:
            term = self.leading_term
            row = self.ledger.round(round_no)
            if term is None or row is None or row["state"] not in (OPEN, COLLECTING) \
                    or self._recovering == round_no:
                return False
            # Count what aggregation would keep: an update the robust filters are going to
            # leave out must not be what closes the round.
            eligible = self.ledger.eligible_updates(round_no)
            reference = self._scale(round_no, eligible)
            bounded = bound_exclusions(eligible, self.policy.filters, reference)
            if bounded:  # decided now, so the client learns it now (status, events)
                self._record_exclusions(round_no, bounded, others_accepted=False)
                eligible = [u for u in eligible if u["node_id"] not in bounded]
            count = len(eligible) - len(filter_updates(eligible, self.policy.filters,
                                                       reference))
            deadline_passed = deadline_passed or time.time() >= (row["deadline_at"] or 0)
            needed, expected = self._participation(round_no)
            if not closes(count, needed, expected, deadline_passed=deadline_passed,
                          force=force):
                if deadline_passed and count < needed:
                    self.bus.publish("deadline_passed", round_no,
                                     {"count": count, "min_updates": needed},
                                     level="warning")
                return False
            self.ledger.set_round_state(round_no, AGGREGATING, aggregating_at=time.time())
        self.notify_followers()
        self._spawn(self._aggregate(round_no, term))
        return True

    async def close_now(self, expected: int | None = None) -> int:
        """Admin action: aggregate the current round with whatever updates it has.

        ``expected``: the round the admin was asked about (the TUI's confirmation names one);
        if another round is collecting by the time the answer arrives, nothing is closed."""
        current = self.ledger.latest_round()
        self.require_coordinator()
        if current is None or current["state"] not in (OPEN, COLLECTING):
            raise UpdateRejected("round_closed", "no round is collecting updates right now")
        if expected is not None and current["round"] != expected:
            raise UpdateRejected("round_closed", f"round {expected} is no longer collecting "
                                 f"(round {current['round']} is); nothing was closed")
        if not await self._maybe_close(current["round"], force=True):
            raise UpdateRejected("no_updates", f"round {current['round']} has no updates yet")
        return current["round"]

    @property
    def paused(self) -> bool:
        """Paused: the current round finishes, but no new round opens until resumed."""
        return self.pause.paused

    def decide_pause(self, paused: bool) -> PauseStamp:
        """The coordinator decides an admin's pause or resume, stamped in its term; the admin
        hears back once a majority holds it (``Cluster.confirm_pause``)."""
        self.require_coordinator()
        stamp = pause_rules.decide(self.pause, self.leading_term or 0, paused)
        self.adopt_pause(stamp)
        return stamp

    def adopt_pause(self, stamp: PauseStamp) -> None:
        """Hold ``stamp`` (our own decision, what we adopt on winning an election, or our
        coordinator's word), on disk before any answer says we hold it."""
        was = self.pause.paused
        self.pause = stamp
        self.ledger.set_meta(PAUSE_KEY, json.dumps(stamp.to_wire()))
        if stamp.paused == was:
            return
        self.bus.publish("paused" if stamp.paused else "resumed")
        latest = self.ledger.latest_round()
        if (not stamp.paused and self.is_coordinator and latest is not None
                and latest["state"] == COMMITTED):
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

    # -- aggregation and commit ----------------------------------------------------------------
    async def _aggregate(self, round_no: int, term: int) -> None:
        updates = self.ledger.eligible_updates(round_no)
        previous = self.ledger.latest_committed()
        assert previous is not None
        excluded = filter_updates(updates, self.policy.filters, self._scale(round_no, updates))
        fields = None
        while fields is None:
            self._record_exclusions(round_no, excluded)
            kept = [u for u in updates if u["node_id"] not in excluded]
            if not kept:
                # Nothing acceptable: keep collecting (excluded updates no longer count).
                self.ledger.set_round_state(round_no, COLLECTING)
                self.bus.publish("round_stalled", round_no, {"reason": "every update was "
                                                             "excluded"}, level="warning")
                self.notify_followers()
                return
            self.bus.publish("aggregation_started", round_no, {"updates": len(kept),
                                                               "strategy": self.policy.strategy})
            try:
                fields = await asyncio.to_thread(self._aggregate_blocking, round_no, kept,
                                                 previous)
                # Every update left out, by the filters, by an admin or for breaking the math.
                fields["metrics"]["excluded"] = sorted(
                    u["node_id"] for u in self.ledger.updates(round_no)
                    if u.get("status") == "excluded")
            except Exception as exc:
                culprit = _named_culprit(exc, kept)
                if culprit is None and _numerical(exc) and len(kept) > 1:
                    culprit = await asyncio.to_thread(self._culprit_by_effect, kept)
                if culprit is None:  # a bug or a disk problem: keep the round, say why
                    log.exception("aggregation of round %d failed", round_no)
                    self.bus.publish("aggregation_failed", round_no, {"error": str(exc)},
                                     level="warning")
                    if self.leading_term == term:  # keep the round: collect again, close again
                        self.ledger.set_round_state(round_no, COLLECTING)
                        self.notify_followers()
                        self._arm_deadline({**self.ledger.round(round_no), "deadline_at":
                                            time.time() + min(60.0, self.policy.deadline_s)})
                    return
                # One update broke the arithmetic: leave it out, say why, aggregate the rest.
                log.warning("round %d: aggregation failed on %s's update (%s); leaving it out",
                            round_no, culprit, exc)
                excluded = {**excluded, culprit: f"aggregation failed on this update: {exc}"}
        if self.leading_term != term:
            log.warning("dropping round %d's result: term %d is over", round_no, term)
            return
        # The proposal names its place in history: the hash chain over every committed round.
        fields["log_hash"] = chain_hash(previous.get("log_hash"), {
            **self.ledger.round(round_no), **fields})
        # The proposal carries the term that produced it: that is what the vote's
        # "at least as up to date" check must compare (Raft's Figure 8).
        self.ledger.set_round_state(round_no, PROPOSED, term=term, coordinator=self.node_id,
                                    **fields)
        self.bus.publish("aggregation_finished", round_no, fields["metrics"])
        self._acks[round_no] = {self.node_id}
        self.notify_followers()
        await self.on_ack(round_no, self.node_id, fields["adapter_sha"])

    async def on_ack(self, round_no: int, node_id: str, adapter_sha: str | None) -> None:
        """A member holds our proposal for ``round_no``; commit once a majority does."""
        row = self.ledger.round(round_no)
        if (not self.is_coordinator or row is None or row["state"] != PROPOSED
                or adapter_sha != row["adapter_sha"]):
            return
        acks = self._acks.setdefault(round_no, {self.node_id})
        acks.add(node_id)
        if not commits(acks, self.voting_members(), self.quorum()):
            return
        committed_at = time.time()
        next_row = None if self.paused else self._next_round_row(round_no)
        event_id = self.ledger.commit_round(
            round_no, {"committed_at": committed_at}, next_row,
            ("round_committed", {"adapter_sha": row["adapter_sha"], "acks": sorted(acks)}))
        self._acks.pop(round_no, None)
        self.bus.publish("round_committed", round_no,
                         {**{k: row[k] for k in ("adapter_sha", "residual_sha", "log_hash")},
                          "acks": len(acks)}, event_id=event_id)
        self.on_committed()
        if next_row is not None:
            event_id = self.ledger.add_event("round_opened", next_row["round"],
                                             {"trained_from": round_no})
            self._publish_opened(next_row, event_id)
            self._arm_or_recover(next_row)
        self.notify_followers()

    def _scale(self, round_no: int, updates: list[dict[str, Any]]) -> Scale:
        return Scale(self.ledger.recent_norm_median(round_no), self.ledger.recent_own_norms(
            round_no, [u["node_id"] for u in updates]))

    def _record_exclusions(self, round_no: int, excluded: dict[str, str], *,
                           others_accepted: bool = True) -> None:
        self.ledger.mark_excluded(round_no, excluded, others_accepted=others_accepted)
        for node_id, reason in excluded.items():
            self.bus.publish("update_excluded", round_no,
                             {"node_id": node_id, "reason": reason}, level="warning")

    def _culprit_by_effect(self, updates: list[dict[str, Any]]) -> str | None:
        """The one update without which the round aggregates (leave-one-out, in a worker
        thread). Its size proves nothing: "largest norm" once blamed an honest update for a
        hostile one whose factors cancel. None when no single update is to blame."""
        for suspect in updates:
            rest = [u for u in updates if u is not suspect]
            scratch = Path(tempfile.mkdtemp(dir=self.blobs.tmp))
            try:
                aggregate_adapters(
                    [str(self.blobs.verified_path(u["blob_sha"])) for u in rest],
                    scratch / "out", strategy=self.policy.strategy,
                    weights=[u["examples"] for u in rest], rank=self.spec.rank,
                    settings=self.spec.settings, labels=[u["node_id"] for u in rest],
                    canonical=True)
            except Exception as exc:  # still failing: not (only) this one
                log.info("leaving out %s does not help: %s", suspect["node_id"], exc)
                continue
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return suspect["node_id"]
        return None

    def _aggregate_blocking(self, round_no: int, updates: list[dict[str, Any]],
                            previous: dict[str, Any]) -> dict[str, Any]:
        """Runs in a worker thread: touches blobs and files only, never the ledger."""
        delay = float(os.environ.get(FAULT_DELAY_ENV, "0") or 0)
        if delay:
            time.sleep(delay)
        return aggregate_round(self.blobs, self.spec, self.policy.strategy, self.probes, updates,
                               previous)

    # -- replication: coordinator side ----------------------------------------------------------
    def replication_payload(self) -> dict[str, Any]:
        """What a heartbeat carries: the commit point, a pending proposal, the live round, and
        whether an admin paused the federation (so the pause outlives this coordinator)."""
        committed = self.ledger.latest_committed()
        latest = self.ledger.latest_round()
        payload: dict[str, Any] = {"commit": committed["round"] if committed else 0,
                                   "commit_id": _commit_id(committed),
                                   "proposal": None, "current": None, "state": self.state_hint(),
                                   "paused": self.paused, "pause": self.pause.to_wire()}
        if latest is not None and latest["state"] != COMMITTED:
            # A proposal travels with its updates: a follower that becomes coordinator before
            # the commit must be able to re-propose it with its full record.
            row = wire.live_round(latest, self.ledger.updates(latest["round"]))
            payload["proposal" if latest["state"] == PROPOSED else "current"] = row
        return payload

    def ack_state(self) -> dict[str, Any] | None:
        """A follower's acknowledgement: the newest proposed/committed round it holds."""
        latest = self.ledger.latest_round()
        if latest is None:
            return None
        if latest["state"] not in (PROPOSED, COMMITTED):
            latest = self.ledger.latest_committed()
        return {"round": latest["round"], "adapter_sha": latest["adapter_sha"]}

    def log_position(self) -> tuple[int, int, int]:
        """(term, round) of the newest thing this node holds, for Raft's "up to date" check:
        its newest proposed or committed round, or its live round's updates (each counts in
        the term it was accepted in; see consensus.rounds.log_position)."""
        latest = self.ledger.latest_round()
        closed = latest
        if closed is not None and closed["state"] not in (PROPOSED, COMMITTED):
            closed = self.ledger.latest_committed()
        live = latest if latest is not None and latest is not closed else None
        return log_position(
            (int(closed["term"] or 0), int(closed["round"])) if closed else None,
            int(live["round"]) if live else None,
            [u.get("term") for u in self.ledger.updates(live["round"])] if live else [])

    # -- replication: follower side --------------------------------------------------------------
    async def apply_from_coordinator(self, payload: dict[str, Any], fetch_blob: BlobFetcher,
                                     fetch_history: Callable[[int], Awaitable[dict[str, Any]]]
                                     ) -> None:
        """Mirror the coordinator: committed history first, then its proposal and live round.

        A committed round is never replaced: if our committed history and the coordinator's
        differ, we stop following, report both heads (``history_diverged``) and wait for an
        admin to resolve it (``chorus-node resolve``, which archives ours)."""
        async with self._sync_lock:
            if self._stopped_following():
                return
            committed = self.ledger.latest_committed()
            mine = committed["round"] if committed else 0
            if payload["commit"] > mine or (payload["commit"] == mine
                                            and payload.get("commit_id") != _commit_id(committed)):
                history = await fetch_history(max(0, mine - 1))
                if self._stopped_following():
                    return
                ours = next((r for r in history["rounds"] if r["round"] == mine), None)
                if mine > 0 and (ours is None or _commit_id(ours) != _commit_id(committed)):
                    self._report_divergence(committed, payload)
                    return
                history["rounds"] = [r for r in history["rounds"] if r["round"] > mine]
                history["updates"] = [u for u in history["updates"] if u["round"] > mine]
                await self._apply_history(history, fetch_blob, payload.get("state"))
                committed = self.ledger.latest_committed()
                mine = committed["round"] if committed else 0
            proposal = payload.get("proposal")
            if proposal and proposal["round"] > mine:
                updates = proposal.get("updates") or []
                for key in RESULT_KEYS:
                    if proposal.get(key):
                        await fetch_blob(proposal[key])
                for update in updates:
                    await fetch_blob(update["blob_sha"])
                if self._stopped_following():
                    return
                _check_chain(committed, proposal)
                self._hand_off(self.ledger.mirror_round(round_record(proposal), updates, mine))
            current = payload.get("current")
            if current and current["round"] > mine:
                await self._mirror_current(current, mine, fetch_blob)

    def _stopped_following(self) -> bool:
        """Checked again after every await of the follower's sync: a payload fetched as a
        follower must not be written once this node leads (it may have committed the round
        meanwhile) or has reported a divergence."""
        return self.is_coordinator or bool(self.diverged)

    def _report_divergence(self, committed: dict[str, Any], payload: dict[str, Any]) -> None:
        self.diverged = {"ours": {"round": committed["round"], "log_hash": committed["log_hash"]},
                         "theirs": {"round": payload["commit"],
                                    "log_hash": payload.get("commit_id")},
                         "coordinator": payload.get("coordinator")}
        log.error("committed history diverges from the coordinator's: ours ends at round %d "
                  "(%s), theirs at round %d (%s). Not following it; an admin decides "
                  "(chorus-node resolve archives ours and takes theirs).",
                  committed["round"], str(committed["log_hash"])[:12], payload["commit"],
                  str(payload.get("commit_id"))[:12])
        self.bus.publish("history_diverged", committed["round"], self.diverged, level="error")

    def resolve_divergence(self) -> dict[str, Any]:
        """Admin: archive our diverged committed rounds (kept in ``rounds_archive``) and follow
        the coordinator's history from round 0; the state is rebuilt from it."""
        if not self.diverged:
            raise UpdateRejected("not_diverged", "this node's history agrees with the "
                                 "coordinator's; there is nothing to resolve")
        moved = self.ledger.archive_rounds_after(0)
        resolved, self.diverged = self.diverged, None
        self.on_history_replaced()
        self.bus.publish("history_resolved", None, {**resolved, "archived_rounds": moved},
                         level="warning")
        return {"archived_rounds": moved, **resolved}

    async def mirror_now(self, current: dict[str, Any], fetch_blob: BlobFetcher) -> list[str]:
        """For a coordinator waiting to acknowledge: hold its live round's updates durably now;
        returns the update hashes this node holds for that round."""
        async with self._sync_lock:
            mine = self.ledger.committed_round()
            if self.is_coordinator or self.diverged or current["round"] != mine + 1 \
                    or current["trained_from"] != mine:
                return []  # not caught up (the heartbeats will bring us there): holds nothing
            await self._mirror_current(dict(current), mine, fetch_blob)
            return [u["blob_sha"] for u in self.ledger.updates(current["round"])]

    async def _mirror_current(self, current: dict[str, Any], mine: int,
                              fetch_blob: BlobFetcher) -> None:
        updates = current.pop("updates", [])
        for update in updates:
            if not self.blobs.has(update["blob_sha"]):
                await fetch_blob(update["blob_sha"])
        if self._stopped_following():
            return
        known = self.ledger.round(current["round"])
        self._hand_off(self.ledger.mirror_round(round_record(current), updates, mine))
        if known is None:
            self._publish_opened(current, None)

    def _hand_off(self, extras: list[dict[str, Any]]) -> None:
        """Updates we hold that the coordinator lacks go to it, never to the bin: we may have
        been the coordinator that acknowledged them."""
        for update in extras:
            self.handoff(update)

    async def _apply_history(self, history: dict[str, Any], fetch_blob: BlobFetcher,
                             coordinator_state: dict[str, Any] | None) -> None:
        """Record committed rounds from the coordinator, fetching only the blobs this node needs:
        those of rounds after the point its state can replay from (its own state, or the
        coordinator's checkpoint when the residuals in between are pruned there), and always
        the newest round's adapter. Rows before that point are recorded without their blobs."""
        rounds = sorted(history["rounds"], key=lambda r: r["round"])
        if not rounds:
            return
        updates = history["updates"]
        previous = self.ledger.latest_committed()
        base = self._fetch_base(coordinator_state)
        # Client updates of committed rounds are for audit: only within our own window.
        audit_from = rounds[-1]["round"] - self.keep_rounds if self.keep_rounds else -1
        without_blobs = []
        for row in rounds:
            _check_chain(previous, row)
            previous = row
            if row["round"] <= base and row is not rounds[-1]:
                without_blobs.append(row["round"])
                continue
            for key in ("adapter_sha", "adapter_config_sha"):
                await fetch_blob(row[key])
            if row["round"] > base and row.get("residual_sha"):
                try:
                    await fetch_blob(row["residual_sha"])
                except Exception as exc:  # pruned there meanwhile: the state keeper restores
                    if getattr(exc, "status", None) != 410:
                        raise
            for update in updates:
                if update["round"] == row["round"] and row["round"] > max(base, audit_from) \
                        and not self.blobs.has(update["blob_sha"]):
                    await fetch_blob(update["blob_sha"])
        if self._stopped_following():
            return
        self.ledger.settle_committed([round_record(r) for r in rounds], updates)
        self.ledger.set_pruned([n for n in without_blobs if not self._holds_round(n)])
        for row in rounds:
            # recorded here too, so a dashboard attached to a follower that reconnects with
            # ?since= gets the commits it missed, as on the coordinator
            data = {k: row[k] for k in ("adapter_sha", "residual_sha", "log_hash")}
            self.bus.publish("round_committed", row["round"], data,
                             event_id=self.ledger.add_event("round_committed", row["round"], data))
        self.on_committed()

    def _fetch_base(self, coordinator_state: dict[str, Any] | None) -> int:
        """Rounds up to this one need no blobs here (see :meth:`_apply_history`): our state's
        round when we replay from it, or the coordinator's checkpoint when it is well ahead of
        us (one dense file instead of many residuals) or the residuals in between are pruned."""
        mine = int(self.state_hint().get("round", 0))
        if not coordinator_state:
            return mine
        retained_from = int(coordinator_state.get("retained_from") or 0)
        checkpoint = int(coordinator_state.get("checkpoint_round") or 0)
        if retained_from > mine + 1 or checkpoint > mine + REPLAY_RATHER_THAN_FETCH:
            return max(mine, checkpoint)
        return mine

    def _holds_round(self, number: int) -> bool:
        row = self.ledger.round(number)
        return row is not None and all(self.blobs.has(row[k]) for k in RESULT_KEYS if row.get(k))

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


def _stored_pause(ledger: Ledger) -> PauseStamp:
    """The stamp on disk; a data dir from before stamps kept only the flag ("paused")."""
    stamp = PauseStamp.from_wire(json.loads(ledger.get_meta(PAUSE_KEY, "null")))
    return stamp or PauseStamp(paused=ledger.get_meta("paused", "0") == "1")


def _commit_id(row: dict[str, Any] | None) -> str | None:
    """What identifies a committed history: the latest round's log hash (a hash chain)."""
    return None if row is None else row.get("log_hash")


def _check_chain(previous: dict[str, Any] | None, row: dict[str, Any]) -> None:
    """A round from a peer must extend the history we hold: its log hash is recomputed here."""
    if previous is None or previous.get("log_hash") is None:
        return  # rounds converted from 0.1 before the chain existed
    expected = chain_hash(previous["log_hash"], row)
    if row.get("log_hash") != expected:
        raise ValueError(f"round {row['round']}'s log hash does not extend round "
                         f"{previous['round']}'s: refusing it")


def _named_culprit(exc: Exception, updates: list[dict[str, Any]]) -> str | None:
    """The update an aggregation error names (adapter errors carry the client as source)."""
    source = getattr(exc, "source", None)
    if source and any(u["node_id"] == source for u in updates):
        return source
    return None


def _numerical(exc: Exception) -> bool:
    """Whether an aggregation error is arithmetic (non-finite values, a failed SVD), which
    some update's numbers can cause, rather than a bug or a full disk."""
    text = str(exc).lower()
    return isinstance(exc, (torch.linalg.LinAlgError, ArithmeticError)) or any(
        word in text for word in ("finite", "nan", "inf", "svd", "converge", "overflow"))