"""Membership, coordinator election and replication between peers (Raft-style, simplified).

- **Members** are nodes that proved they hold the federation secret (a signed ``hello`` both
  ways), or that our coordinator's member list vouches for. The coordinator's heartbeats carry
  that list, so everyone converges on it. A member that leaves gracefully is marked ``left``
  and one that crashes ``lost``; both keep counting toward the majority (only ``remove`` or
  ``--member-timeout`` changes that), which is what makes a minority partition, or the first
  node back after everyone restarted, unable to act alone. What each event does to a status
  is ``consensus.membership``'s table.
- **Election**: the rules are ``consensus.election`` (pure; this class feeds it the time and
  what peers said, and persists, sends and publishes what it decides): terms, randomised
  timeouts, one vote per term persisted before it is sent, Pre-Vote, CheckQuorum, and Raft's
  "at least as up to date" rule on (term, round, closed) of the newest thing a node holds, an
  update held for the live round included (``consensus.rounds.log_position``).
- **Replication**: heartbeats carry the commit point, a pending proposal and the live round; a
  follower fetches what it lacks (ledger rows, then blobs, hash-verified) from the coordinator.
  A proposal commits once a majority hold it.
- **Bootstrap**: a node waits ``bootstrap_s`` for discovery before its first election, so
  machines started together find each other instead of electing themselves alone. With no
  discovery and no static peers it is a federation of one and leads at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chorus_p2p.consensus import membership
from chorus_p2p.consensus import pause as pause_rules
from chorus_p2p.consensus.pause import PauseStamp
from chorus_p2p.consensus.election import (CANDIDATE, COORDINATOR, FOLLOWER, Election,
                                            ElectionTiming, Ready, VoteRequest)
from chorus_p2p.federation import wire
from chorus_p2p.federation.dp_policy import policy_json
from chorus_p2p.federation.refusals import UpdateRejected
from chorus_p2p.node.peers import PeerClient, PeerError

if TYPE_CHECKING:
    from chorus_p2p.node.service import Node

log = logging.getLogger("chorus_p2p.cluster")

# Bounds on what one hello can make this node do (a member list is another node's word).
MAX_MEMBERS_FOLLOWED = 64  # new addresses tried per hello
MAX_PENDING_HELLOS = 256  # second-hand addresses being tried at once
SECOND_HAND_ATTEMPTS = 5  # tries for an address only a member list names

__all__ = ["CANDIDATE", "COORDINATOR", "FOLLOWER", "Cluster", "ClusterTiming", "Peer"]
# Member statuses and what each event does to them: consensus.membership (one table). A member
# that *left* (stopped cleanly: a restart, a laptop closing) still counts: if a goodbye shrank
# the majority, a node that heard every other node restart would be a majority of one and commit
# alone (the chaos checker found exactly that). Leaving for good is `remove`, or
# --member-timeout ("dormant", which counts again the moment it is back).
NOT_CONTACTED = membership.NOT_CONTACTED
DECIDED = membership.DECIDED
VOUCHED = membership.VOUCHED


@dataclass
class ClusterTiming:
    heartbeat_s: float = 0.25
    election_min_s: float = 1.0
    election_max_s: float = 2.0
    bootstrap_s: float = 2.0
    lost_after_s: float = 3.0
    hello_retry_s: float = 1.0
    replicate_timeout_s: float = 30.0  # a follower fetching an update before it may be acked
    confirm_pause_s: float = 10.0  # a majority holding an admin's pause before it is answered
    rediscover_max_s: float = 10.0  # mDNS re-query backoff cap while someone is missing


@dataclass
class Peer:
    node_id: str
    url: str
    name: str = ""
    public_key: str = ""
    last_seen: float = 0.0
    status: str = "live"
    fail_count: int = 0
    # We reached it ourselves (our signed hello answered by this node id), or our coordinator
    # vouches for it. Only verified members vote or count toward a majority: a token holder
    # cannot stuff the membership with hellos from fresh keys at made-up addresses.
    verified: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Cluster:
    def __init__(self, node: "Node", timing: ClusterTiming | None = None,
                 static_peers: list[str] | None = None, discovery_enabled: bool = False,
                 approve_joins: bool = False):
        self.node = node
        self.timing = timing or ClusterTiming()
        self.scheme = "https" if node.settings.tls else "http"
        self.static_peers = [p if p.startswith("http") else f"{self.scheme}://{p}"
                             for p in static_peers or []]
        self.discovery_enabled = discovery_enabled
        # The federation's policy (from the join token) or this node's flag: either holds
        # newcomers as pending.
        self.approve_joins = approve_joins or node.identity.admission == "approval"
        self.client = PeerClient(node.request_key, node.node_id, timeout=max(
            0.5, self.timing.election_min_s * 0.8), private_key=node.identity.private_key,
            ssl_context=node.client_ssl)
        # The election's rules live in a pure core (consensus.election); this class is its
        # shell: it feeds in the time and what peers said, and persists, sends and publishes
        # what the core decides.
        term = node.ledger.current_term()
        self.election = Election(
            node.node_id, term, node.ledger.vote(term), time.monotonic(), random.Random(),
            ElectionTiming(self.timing.heartbeat_s, self.timing.election_min_s,
                           self.timing.election_max_s))
        self.peers: dict[str, Peer] = {}
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self._wake = asyncio.Event()
        self._pending_urls: set[str] = set()
        self._second_hand: set[str] = set()  # pending URLs only a member list names
        self._sync_body: dict[str, Any] | None = None
        self._sync_worker: asyncio.Task | None = None
        self._handed_off: dict[tuple[int, str, str], float] = {}
        self._rediscover_at = 0.0
        self._heal_at = 0.0
        self._healing: asyncio.Task | None = None
        self.split: dict[str, Any] | None = None  # see _on_removed_refusal
        self._removed_by: set[str] = set()  # members that refused our hello as removed
        self._rediscover_every = 2.0
        self._waiting_logged = 0.0
        # Only a founder (the node that ran `init --federation`, or one started with
        # --bootstrap) may create a federation's first history; a joiner waits until it has
        # reached a node that is part of the federation, and remembers that it has.
        # (a ledger rebuilt by `doctor --repair` never founds: its history is out there)
        # (--bootstrap overrides that: a repaired one-node federation has no one to ask)
        rebuilding = node.ledger.get_meta("rebuild") == "1"
        self.founder = bool(node.identity.founder and not rebuilding) or \
            bool(node.settings.bootstrap)
        if rebuilding and node.settings.bootstrap:
            log.warning("--bootstrap: founding from this node's own (repaired) ledger instead "
                        "of catching the history up from the federation")
            node.ledger.delete_meta("rebuild")
        committed = node.ledger.latest_committed()
        self.joined = (self.founder or node.ledger.get_meta("joined") == "1"
                       or (committed is not None and committed["round"] > 0))
        self._load_members()

    # The core's state, read-only here: only the core changes it.
    role = property(lambda self: self.election.role)
    term = property(lambda self: self.election.term)
    coordinator = property(lambda self: self.election.coordinator)
    coordinator_url = property(lambda self: self.election.coordinator_url)
    last_quorum_at = property(lambda self: self.election.last_quorum_at)
    election_timeouts = property(lambda self: self.election.election_timeouts)
    heartbeats_sent = property(lambda self: self.election.heartbeats_sent)

    def _apply(self, ready: Ready) -> None:
        """Do what the core decided: persist, start, publish (the caller answers). "lead" is
        awaited by the caller that asked for it (:meth:`_lead`)."""
        ledger = self.node.ledger
        if ready.persist_term is not None:
            ledger.set_term(ready.persist_term)
        if ready.persist_vote is not None:
            ledger.record_vote(*ready.persist_vote)  # FULL sync, before any answer leaves
        if ready.persist_leader is not None:
            ledger.record_term(*ready.persist_leader)
        for action in ready.start:
            if action == "heartbeat":
                self._spawn(self._heartbeat_all(self.term))
            elif action == "election":
                self._spawn(self._run_election())
            elif action == "follow":
                self.node.rounds.follow()
        for event, data, level in ready.publish:
            self.node.bus.publish(event, None, data, level=level)

    async def _lead(self, ready: Ready, voters_pause: list[PauseStamp] | None = None) -> None:
        self._apply(ready)
        if "lead" in ready.start:
            await self.node.rounds.lead(self.term, voters_pause or [])
            self._wake.set()

    # -- members -------------------------------------------------------------------------------
    def _load_members(self) -> None:
        for m in self.node.ledger.members():
            if m["node_id"] == self.node.node_id:
                continue
            url = next((f"{self.scheme}://{a}" for a in m["addresses"]), "")
            if url:
                status = m["status"] if m.get("status") in (*DECIDED, "dormant", "left") \
                    else "lost"
                # last seen: now, so --member-timeout counts from this start
                self.peers[m["node_id"]] = Peer(
                    m["node_id"], url, m["name"] or "", m["public_key"] or "",
                    time.monotonic(), status, verified=m.get("verified") in (None, 1))

    def abstaining(self) -> set[str]:
        """Members (this node included) that said they take no part in rounds any more."""
        out = {p.node_id for p in self.peers.values() if p.extra.get("abstaining")}
        return out | ({self.node.node_id} if self.node.abstaining else set())

    def voters(self) -> list[Peer]:
        return [p for p in self.peers.values() if membership.counts(p.status, p.verified)]

    def voting_members(self) -> list[str]:
        return [self.node.node_id] + [p.node_id for p in self.voters()]

    def established(self) -> bool:
        """Part of a running federation, judged from durable state (not from whether a
        coordinator happens to be known right now, which is false during every election)."""
        if self.role == COORDINATOR or self.coordinator is not None:
            return True
        committed = self.node.ledger.latest_committed()
        if committed is not None and committed["round"] > 0:
            return True
        return any(p.status in ("live", "lost", "left") for p in self.peers.values())

    def is_known(self, node_id: str) -> bool:
        """Admitted or pending, not rejected or removed: may talk to us beyond hello/append."""
        peer = self.peers.get(node_id)
        return peer is not None and peer.status not in ("rejected", "removed")

    def mark_joined(self) -> None:
        if not self.joined:
            self.joined = True
            self.node.ledger.set_meta("joined", "1")
            self.node.ledger.delete_meta("rebuild")
            self.node.bus.publish("federation_joined", None,
                                  {"federation": self.node.identity.federation})

    def is_member(self, node_id: str) -> bool:
        peer = self.peers.get(node_id)
        return peer is not None and membership.counts(peer.status, peer.verified)

    def quorum(self) -> int:
        return len(self.voting_members()) // 2 + 1

    def has_quorum(self) -> bool:
        """In contact with a majority now: as coordinator, heard from one within an election
        timeout (CheckQuorum); as follower, heard its coordinator within one."""
        return self.election.has_quorum(time.monotonic(), self.quorum())

    def member_json(self) -> list[dict[str, Any]]:
        me = {"node_id": self.node.node_id, "url": self.node.url, "name": socket.gethostname(),
              "public_key": self.node.identity.public_key_bytes.hex(), "status": "live"}
        return [me] + [{"node_id": p.node_id, "url": p.url, "name": p.name,
                        "public_key": p.public_key, "status": p.status}
                       for p in self.peers.values()]

    def _admit(self, info: dict[str, Any], url: str | None = None, direct: bool = False,
               verified: bool = False) -> Peer | None:
        """Record a verified peer; persist it so a restart remembers who counts for quorum."""
        node_id = info["node_id"]
        if node_id == self.node.node_id:
            return None
        url = url or info.get("url") or ""
        peer = self.peers.get(node_id)
        is_new = peer is None
        if peer is None:
            # With --approve-joins, an established federation (a coordinator exists) holds a
            # node it hears of directly until an admin approves it; one the coordinator lists
            # as a member was approved there already. A node that is itself new trusts the
            # federation it is joining: approval is the incumbents' decision.
            # When the join token carries the policy, a node that is new itself holds peers as
            # pending too (two newcomers must not make a majority of their own); the founder
            # the token names, and members the coordinator lists, are vouched for.
            vouched = (info.get("status") in VOUCHED and not direct) or \
                node_id == self.node.identity.founder_id
            bound = self.established() or self.node.identity.admission == "approval"
            status = "pending" if self.approve_joins and bound and not vouched else "live"
            peer = self.peers[node_id] = Peer(node_id, url, status=status)
        if direct:
            self._move(peer, "came_back")  # from left: lost, and its answer makes it live
        elif info.get("status") == "left":
            self._move(peer, "said_goodbye")
        moved = bool(url) and url != peer.url and not is_new
        newly_verified = verified and not peer.verified
        peer.verified = peer.verified or verified
        if newly_verified and not is_new:
            self.node.ledger.upsert_member({"node_id": node_id, "verified": 1})
        if url:
            peer.url = url
        peer.name = info.get("name") or peer.name
        peer.public_key = info.get("public_key") or peer.public_key
        if moved:  # a member's address changed (DHCP, another interface): remember the new one
            self.node.ledger.upsert_member({"node_id": node_id,
                                            "addresses": [url.split("//", 1)[-1]]})
            self.node.bus.publish("member_moved", None, {"node_id": node_id, "url": url})
        if is_new:
            self.node.ledger.upsert_member({
                "node_id": node_id, "name": peer.name, "addresses": [peer.url.split("//", 1)[-1]],
                "public_key": peer.public_key, "admitted_at": time.time(), "last_seen": time.time(),
                "status": peer.status, "verified": int(peer.verified)})
            kind = "member_pending" if peer.status == "pending" else "member_admitted"
            self.node.bus.publish(kind, None, {"node_id": node_id, "url": peer.url})
        return peer

    def _find(self, node_id: str) -> Peer | None:
        return self.peers.get(node_id) or next(
            (p for p in self.peers.values() if p.node_id.startswith(node_id)), None)

    async def remove(self, node_id: str, force: bool = False) -> dict[str, Any]:
        """Admin: take a member out of the federation for good (a machine that died).

        On the coordinator the change takes effect at once and is acknowledged once a majority
        of the *new* membership holds it (one change at a time, Raft's single-server change:
        the removed node alone can never form a majority of the old membership). Where no
        coordinator exists because the dead node was needed for a majority (a 2-node
        federation), ``force`` removes it from this node only, with a warning: if that node is
        in fact alive elsewhere, the two can diverge."""
        if self.node.node_id.startswith(node_id):
            raise UpdateRejected("bad_request", "a node cannot remove itself; stop it with "
                                 "SIGTERM to leave, or remove it from another member")
        peer = self._find(node_id)
        if peer is None:
            raise UpdateRejected("not_found", f"no member {node_id}")
        if peer.status == "removed":
            return {"node_id": peer.node_id, "status": "removed", "forced": False}
        if self.role != COORDINATOR and not force:
            raise UpdateRejected("not_coordinator", (
                "membership changes are made on the coordinator" + (
                    f" ({self.coordinator_url})" if self.coordinator_url else
                    "; there is none right now (no majority). If the other members are gone for "
                    "good, remove them with --force on this node")),
                extra={"coordinator_url": self.coordinator_url})
        if self.role == COORDINATOR and any(p.extra.get("removing") for p in self.peers.values()):
            raise UpdateRejected("busy", "another membership change is still being acknowledged")
        self._move(peer, "removed")
        forced = self.role != COORDINATOR
        self.node.bus.publish("member_removed", None, {"node_id": peer.node_id, "forced": forced},
                              level="warning")
        if forced:
            log.warning("removed %s from this node's membership WITHOUT a majority: if it is alive "
                        "on another network, the two sides can now diverge; never start it again "
                        "with its data dir", peer.node_id[:12])
            self.election.campaign_soon()
            self._wake.set()
            return {"node_id": peer.node_id, "status": "removed", "forced": True}
        peer.extra["removing"] = True
        try:
            started = time.monotonic()
            self._wake.set()
            while self.last_quorum_at < started and self.role == COORDINATOR:
                if time.monotonic() - started > 10 * self.timing.election_max_s:
                    raise UpdateRejected("not_durable", "the new membership was not acknowledged "
                                         "by a majority in time; it applies here and will "
                                         "spread with the next heartbeats")
                await asyncio.sleep(self.timing.heartbeat_s / 2)
        finally:
            peer.extra.pop("removing", None)
        return {"node_id": peer.node_id, "status": "removed", "forced": False}

    def decide(self, node_id: str, approve: bool) -> dict[str, Any]:
        """Admin decision on a pending member (on the coordinator; followers learn it by gossip)."""
        if self.node.node_id.startswith(node_id):
            raise UpdateRejected("not_pending", "that is this node itself; only pending members "
                                 "(nodes started with --approve-joins) can be approved or rejected")
        if self.role != COORDINATOR:  # first: a follower may not know a newcomer yet
            raise UpdateRejected("not_coordinator", "admission is decided on the coordinator",
                                 extra={"coordinator_url": self.coordinator_url})
        peer = self._find(node_id)
        if peer is None:
            raise UpdateRejected("not_found", f"no member {node_id}")
        if peer.status != "pending":
            raise UpdateRejected("not_pending", f"member {peer.node_id[:12]} is {peer.status}; only "
                                 "pending members (nodes started with --approve-joins) can be "
                                 "approved or rejected")
        self._move(peer, "approved" if approve else "rejected")
        if approve:
            self._seen(peer)
        self.node.bus.publish("member_approved" if approve else "member_rejected", None,
                              {"node_id": peer.node_id})
        self._wake.set()
        return {"node_id": peer.node_id, "status": peer.status}

    def _move(self, peer: Peer, event: str, **fields: Any) -> str:
        """Apply ``event`` to the member's status (membership.MOVES) and persist a change, so a
        restart counts the same members. Returns the status it had."""
        was = peer.status
        peer.status = membership.after(was, event)
        if peer.status != was:
            self.node.ledger.upsert_member({"node_id": peer.node_id, "status": peer.status,
                                            **fields})
        return was

    def _seen(self, peer: Peer, event: str = "answered") -> None:
        peer.last_seen = time.monotonic()
        peer.fail_count = 0
        was = self._move(peer, event, last_seen=time.time())
        if peer.status == "live" and was == "dormant":
            self.node.bus.publish("member_back", None, {"node_id": peer.node_id})
        elif peer.status == "live" and was in ("lost", "pending"):
            self.node.bus.publish("member_seen", None, {"node_id": peer.node_id, "url": peer.url})

    def _check_lost(self) -> None:
        """The coordinator judges everyone by heartbeat replies; a follower talks only to the
        coordinator, so it judges only the coordinator and takes the rest from its heartbeats.

        A member unseen for ``--member-timeout`` (a laptop closed for the night) stops counting
        toward the majority: only the coordinator, while it holds a majority, decides that, one
        member at a time, so a minority can never shrink the membership to a majority of its
        own. The member counts again the moment it is back."""
        now = time.monotonic()
        timeout = self.node.settings.member_timeout
        if timeout and self.role == COORDINATOR and self.quorum_fresh():
            stale = [p for p in self.voters() if p.status in ("lost", "left")
                     and now - p.last_seen > timeout]
            if stale:
                peer = stale[0]
                self._move(peer, "member_timeout")
                self.node.bus.publish("member_dormant", None, {
                    "node_id": peer.node_id, "unseen_s": round(now - peer.last_seen)},
                    level="warning")
        for peer in self.peers.values():
            if self.role != COORDINATOR and peer.node_id != self.coordinator:
                continue
            if peer.status == "live" and now - peer.last_seen > self.timing.lost_after_s:
                self._move(peer, "silent")
                self.node.bus.publish("member_lost", None, {"node_id": peer.node_id},
                                      level="warning")

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        rounds = self.node.rounds
        rounds.quorum = self.quorum
        rounds.voting_members = self.voting_members
        rounds.abstaining = self.abstaining
        rounds.notify_followers = self._wake.set
        rounds.coordinator_hint = lambda: {"coordinator": self.coordinator,
                                           "coordinator_url": self.coordinator_url}
        rounds.replicate = self.replicate
        rounds.collect_updates = self.collect_updates
        rounds.handoff = self.handoff
        rounds.quorum_fresh = self.quorum_fresh
        alone = not self.discovery_enabled and not self.static_peers and not self.peers
        if alone and not self.joined:
            from chorus_p2p.errors import UsageError

            raise UsageError("this node joined with a token but has no way to reach the "
                             "federation: give --peer HOST:PORT of a member, or leave mDNS on")
        await self._lead(self.election.start(
            time.monotonic(), alone=alone, bootstrap_s=self.timing.bootstrap_s,
            url=self.node.url if self.node.address else None))
        for url in self.static_peers:
            self.consider(url)
        for peer in list(self.peers.values()):
            self.consider(peer.url)
        self._spawn(self._ticker())

    async def stop(self) -> None:
        """Graceful leave: hand the role to the most up-to-date peer, tell everyone we go."""
        self._stopping = True
        live = [p for p in self.peers.values() if p.status == "live"]
        was_coordinator = self.role == COORDINATOR
        # Stop acting as coordinator before anything else: no upload may be acknowledged
        # that this node will no longer replicate, and no late result may be proposed.
        self._apply(self.election.resign())
        if was_coordinator and live:
            target = max(live, key=lambda p: p.extra.get("ack_round", -1))
            try:
                await self.client.call(target.url, "POST", "/v1/peer/timeout-now",
                                       {"term": self.term}, expect_node=target.node_id)
            except PeerError as exc:
                log.info("handover to %s failed: %s", target.node_id, exc)
        await asyncio.gather(*(self._quiet(self.client.call(
            p.url, "POST", "/v1/peer/leave", {"node_id": self.node.node_id}, timeout=1.0,
            expect_node=p.node_id)) for p in live))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()

    @staticmethod
    async def _quiet(coro) -> None:
        try:
            await coro
        except PeerError:
            pass

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- discovery hand-off ------------------------------------------------------------------------
    def consider(self, url: str, *, second_hand: bool = False) -> None:
        """A possible peer at ``url`` (from mDNS or --peer): verify it with a signed hello.

        ``second_hand``: named only in another member's list, which nobody here vouches for:
        tried a few times, not forever (a hello listing thousands of made-up URLs must not
        turn this node into a reflector or keep it busy for good)."""
        url = url.rstrip("/")
        if self.node.address and url == self.node.url:
            return
        if url in self._pending_urls:
            if not second_hand:
                self._second_hand.discard(url)  # someone vouches for it now: no more bound
            return
        if second_hand and len(self._second_hand) >= MAX_PENDING_HELLOS:
            log.warning("not trying %s: %d addresses named only by member lists are being "
                        "tried already", url, len(self._second_hand))
            return
        self._pending_urls.add(url)
        if second_hand:
            self._second_hand.add(url)
        self._spawn(self._hello_loop(url))

    async def _hello_loop(self, url: str) -> None:
        failures = 0
        try:
            while not self._stopping:
                try:
                    info = await self.client.call(url, "POST", "/v1/peer/hello", self.hello_body())
                except PeerError as exc:
                    failures += 1
                    if exc.code == "removed" and self._on_removed_refusal(url, exc):
                        return
                    if url in self._second_hand and failures >= SECOND_HAND_ATTEMPTS:
                        log.info("giving up on %s after %d tries (named by a member list "
                                 "only): %s", url, failures, exc)
                        return
                    if exc.code in ("spec_mismatch", "wire_version") and not self.joined:
                        # A node that never took part refuses to start a federation of its own
                        # beside the one its token names: stop, and say why.
                        self.node.fatal(f"the federation at {url} refused this node: {exc}")
                        return
                    if exc.code in ("bad_peer", "bad_signature", "spec_mismatch",
                                    "stale_request", "removed", "wire_version"):
                        self.node.bus.publish("peer_refused", None, {"url": url, "reason": str(exc),
                                                                     "code": exc.code},
                                              level="warning")
                        await asyncio.sleep(self.timing.hello_retry_s * 5)
                    else:
                        await asyncio.sleep(self.timing.hello_retry_s)
                    continue
                pinned = self.client.pins.get(url)
                if pinned is not None and pinned != info.get("node_id"):
                    # TLS proved one identity, the hello claims another: not believed.
                    self.node.bus.publish("peer_refused", None, {
                        "url": url, "reason": f"TLS key is {pinned[:12]}, hello claims "
                                              f"{str(info.get('node_id'))[:12]}"},
                        level="warning")
                    await asyncio.sleep(self.timing.hello_retry_s * 5)
                    continue
                self.accept_hello(info, url, verified=True)
                return
        finally:
            self._pending_urls.discard(url)
            self._second_hand.discard(url)

    def head(self) -> dict[str, Any]:
        """This node's committed head: what two sides of a split compare."""
        committed = self.node.ledger.latest_committed()
        return {"round": committed["round"] if committed else 0,
                "log_hash": committed.get("log_hash") if committed else None,
                "node_id": self.node.node_id, "role": self.role, "term": self.term}

    def _on_removed_refusal(self, url: str, exc: PeerError) -> bool:
        """A member says an admin removed us. If we removed it too (``remove --force`` on both
        sides of a partition), the federation is split: report both heads and keep trying.
        Otherwise we were removed: stop with the reason. Returns whether to stop trying."""
        refuser = str(exc.details.get("node_id") or "")
        ours = self.peers.get(refuser)
        if ours is not None and ours.status == "removed":
            theirs = exc.details.get("head") or {}
            split = {"peer": refuser, "url": url, "ours": self.head(), "theirs": theirs}
            if self.split is None or self.split.get("theirs") != theirs:
                log.error("federation split: %s and this node removed each other (remove "
                          "--force on both sides); ours ends at round %s, theirs at round %s. "
                          "Keep one side's history: stop the other and re-join it with a new "
                          "--data-dir", refuser[:12], split["ours"]["round"], theirs.get("round"))
                self.node.bus.publish("federation_split", None, split, level="error")
            self.split = split
            return False
        # One member's word is not enough (a token holder can answer anything, and a minority
        # can force a removal): stop only once a majority of our voting members say so.
        voters = {p.node_id for p in self.voters()}
        if refuser in voters:
            self._removed_by.add(refuser)
        if len(self._removed_by & voters) < self.quorum():
            log.warning("%s says an admin removed this node from the federation; %d of the %d "
                        "needed members agree so far", refuser[:12] or url,
                        len(self._removed_by & voters), self.quorum())
            self.node.bus.publish("removal_reported", None, {"by": refuser, "url": url},
                                  level="warning")
            return False
        self.node.fatal(f"an admin removed this node from federation "
                        f"{self.node.identity.federation!r} (a majority of its members say so); "
                        "start it again only with a new --data-dir and a join token")
        return True

    def hello_body(self) -> dict[str, Any]:
        return {"node_id": self.node.node_id, "url": self.node.url,
                "federation": self.node.identity.federation, "name": socket.gethostname(),
                "fingerprint": self.node.spec.fingerprint(),
                "dp_policy": policy_json(self.node.dp_policy),
                "public_key": self.node.identity.public_key_bytes.hex(), "term": self.term,
                "role": self.role, "coordinator": self.coordinator, "joined": self.joined,
                "members": self.member_json()}

    def accept_hello(self, info: dict[str, Any], url: str | None = None,
                     direct: bool = True, verified: bool = False) -> None:
        peer = self._admit(info, url, direct, verified)
        if peer is not None:
            self._seen(peer)
            if info.get("joined") and peer.verified:
                self.mark_joined()  # we reached the federation itself, not another newcomer
            if not peer.verified and peer.url:
                self.consider(peer.url)  # say hello back: a member is one we reached ourselves
        # Follow a member list only from a peer we reached ourselves, and only so far.
        if peer is not None and peer.verified:
            fresh = [m for m in info.get("members", [])
                     if isinstance(m, dict) and m.get("node_id") not in self.peers
                     and m.get("node_id") != self.node.node_id and isinstance(m.get("url"), str)
                     and m.get("status") != "left"]
            for member in fresh[:MAX_MEMBERS_FOLLOWED]:
                self.consider(member["url"], second_hand=True)
        self._wake.set()

    # -- the clock -----------------------------------------------------------------------------------
    async def _ticker(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=0.05)
            except asyncio.TimeoutError:
                pass
            woke = self._wake.is_set()
            self._wake.clear()
            now = time.monotonic()
            self._check_lost()
            self._maybe_rediscover(now)
            self._maybe_heal_blobs(now)
            self._apply(self.election.tick(now, quorum=self.quorum(), joined=self.joined,
                                           woke=woke))
            if self.role != COORDINATOR and not self.joined \
                    and now - self._waiting_logged > 10.0:
                self._waiting_logged = now
                ways = (["mDNS"] if self.discovery_enabled else []) + [
                    f"--peer {p.split('//', 1)[-1]}" for p in self.static_peers]
                log.warning("waiting to reach a member of federation %r (%s); this node "
                            "joined with a token and never creates a history of its own",
                            self.node.identity.federation, ", ".join(ways) or "no way set")

    def quorum_fresh(self) -> bool:
        """A coordinator that heard from a majority within an election timeout."""
        return self.election.quorum_fresh(time.monotonic(), self.quorum())

    def _maybe_rediscover(self, now: float) -> None:
        """mDNS answers a browser's first query; a node that missed it (a link that was down)
        is found again by re-querying, with backoff, while anyone is missing."""
        discovery = getattr(self.node, "discovery", None)
        if discovery is None or now < self._rediscover_at:
            return
        # A complete one-node federation looks too: another one of the same federation (a
        # --bootstrap split) must meet it once the link is back, not only after a restart.
        alone = not self.voters()
        missing = not self.joined or alone or any(p.status == "lost" for p in self.peers.values()) \
            or (self.role != COORDINATOR and self.coordinator is None)
        if not missing:
            self._rediscover_every = 2.0
            self._rediscover_at = now + self._rediscover_every
            return
        self._rediscover_at = now + self._rediscover_every
        self._rediscover_every = min(self._rediscover_every * 2, self.timing.rediscover_max_s)
        self._spawn(discovery.refresh())
        for peer in list(self.peers.values()):  # known addresses, once more
            if peer.status == "lost":
                self.consider(peer.url)

    def _maybe_heal_blobs(self, now: float) -> None:
        """Fetch back blobs ``doctor`` recorded as lost, from any member that holds them."""
        if now < self._heal_at or (self._healing is not None and not self._healing.done()):
            return
        self._heal_at = now + 5.0
        if self.node.ledger.lost_blobs():
            self._healing = self._spawn(self._heal_lost_blobs())

    async def _heal_lost_blobs(self) -> None:
        kept, _ = self.node.ledger.blob_references()
        needed = kept | self.node.ledger.kept_aside_blobs()
        for sha in self.node.ledger.lost_blobs():
            if sha not in needed:  # its rounds were pruned since: nothing needs it any more
                self.node.ledger.found_blob(sha)
                continue
            for peer in [p for p in self.peers.values() if p.status == "live"]:
                try:
                    await self._fetch_blob_from(peer.url, sha)
                except PeerError as exc:
                    log.debug("lost blob %s not from %s: %s", sha[:12], peer.node_id[:12], exc)
                    continue
                break
            if self.node.blobs.has(sha):
                self.node.ledger.found_blob(sha)
                self.node.bus.publish("blob_recovered", None, {"sha256": sha})

    # -- coordinator side ------------------------------------------------------------------------
    def _step_down(self, term: int, reason: str) -> None:
        self._apply(self.election.step_down(term, time.monotonic(), reason))

    async def _heartbeat_all(self, term: int) -> None:
        """One heartbeat to every member; the moment a majority has answered, the coordinator
        knows it still leads (a slow or dead member does not delay that)."""
        sent = time.monotonic()
        targets = [p for p in self.peers.values() if p.status not in NOT_CONTACTED]
        body = {"term": term, "coordinator": self.node.node_id, "url": self.node.url,
                "members": self.member_json(), **self.node.rounds.replication_payload()}
        reached = 1
        if reached >= self.quorum():
            self.election.heartbeat_quorum(term, sent)
        for done in asyncio.as_completed([self._heartbeat(p, body) for p in targets]):
            if await done and self.role == COORDINATOR and self.term == term:
                reached += 1
                if reached >= self.quorum():
                    self.election.heartbeat_quorum(term, sent)

    async def _heartbeat(self, peer: Peer, body: dict[str, Any]) -> bool:
        try:
            reply = await self.client.call(peer.url, "POST", "/v1/peer/append", body,
                                           expect_node=peer.node_id)
        except PeerError as exc:
            peer.fail_count += 1
            if peer.fail_count == 3:
                log.info("heartbeat to %s failing: %s", peer.node_id[:12], exc)
            return False
        self._seen(peer)
        if not isinstance(reply, dict) or not isinstance(reply.get("term"), int):
            return False
        if reply["term"] > self.term:
            self._apply(self.election.on_reply_term(reply["term"], time.monotonic(),
                                                    who=peer.node_id[:12]))
            return False
        if not reply.get("ok"):
            return False
        abstaining = reply.get("abstaining") is True
        if abstaining != peer.extra.get("abstaining", False):
            peer.extra["abstaining"] = abstaining
            if abstaining:
                log.warning("member %s takes no part in rounds any more (privacy budget spent); "
                            "rounds stop waiting for it", peer.node_id[:12])
                self.node.bus.publish("member_abstaining", None, {"node_id": peer.node_id},
                                      level="warning")
            self._spawn(self.node.rounds.reconsider())
        held = PauseStamp.from_wire(reply.get("pause"))
        if held is not None:
            peer.extra["pause"] = held  # what confirm_pause counts
        ack = reply.get("ack")
        if isinstance(ack, dict) and isinstance(ack.get("round"), int):
            peer.extra["ack_round"] = ack["round"]
            await self.node.rounds.on_ack(ack["round"], peer.node_id, ack["adapter_sha"])
        return True

    # -- election --------------------------------------------------------------------------------
    async def _gather_votes(self, body: dict[str, Any], voters: list[Peer],
                            pauses: list[PauseStamp] | None = None) -> int:
        """Votes for ``body`` (a pre-vote or a vote), this node's own included; stops asking
        once a majority has granted. ``pauses`` gathers the pause stamps granting voters hold
        (the winner adopts the newest: consensus.pause)."""
        async def ask(peer: Peer) -> bool:
            try:
                reply = await self.client.call(peer.url, "POST", "/v1/peer/vote", body,
                                               expect_node=peer.node_id)
            except PeerError:
                return False
            self._seen(peer)
            if not isinstance(reply, dict) or not isinstance(reply.get("term"), int):
                return False
            stepped = self.election.on_reply_term(reply["term"], time.monotonic(),
                                                  reply.get("granted") is True,
                                                  who=peer.node_id[:12])
            self._apply(stepped)
            granted = reply.get("granted") is True and stepped.persist_term is None
            held = PauseStamp.from_wire(reply.get("pause"))
            if granted and held is not None and pauses is not None:
                pauses.append(held)
            return granted

        votes, needed = 1, self.quorum()
        pending = {asyncio.ensure_future(ask(p)) for p in voters}
        try:
            while votes < needed and pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                votes += sum(1 for d in done if d.result())
        finally:
            for task in pending:
                task.cancel()
        return votes

    async def _run_election(self) -> None:
        """Raft election with Pre-Vote: first ask, without changing any term, whether a
        majority would vote for us (they would not while they hear from a live coordinator).
        An isolated or partitioned node therefore never inflates its term, and cannot depose a
        healthy coordinator when it comes back. A handover (timeout-now) skips the pre-vote."""
        core = self.election
        if self._stopping or not core.may_campaign(joined=self.joined,
                                                   diverged=bool(self.node.rounds.diverged)):
            return
        transfer = core.take_transfer()
        position = self.node.rounds.log_position()
        voters = self.voters()
        needed = self.quorum()
        url = self.node.url
        if not transfer and needed > 1:
            start_term = core.term
            request = core.vote_request(start_term + 1, position, pre=True)
            pre_votes = await self._gather_votes({**_vote_body(request), "url": url}, voters)
            if not core.pre_vote_won(start_term, pre_votes, needed):
                return  # no majority would follow us now; our term stays where it is
        term, ready = core.campaign(time.monotonic(), len(voters) + 1)
        self._apply(ready)  # our own vote persisted before anyone is asked
        request = core.vote_request(term, position, transfer=transfer)
        pauses: list[PauseStamp] = []
        votes = await self._gather_votes({**_vote_body(request), "url": url}, voters, pauses)
        await self._lead(core.election_result(term, votes, needed, time.monotonic(),
                                              url if self.node.address else None), pauses)

    # -- handlers for peer requests --------------------------------------------------------------
    def on_vote(self, body: dict[str, Any]) -> dict[str, Any]:
        request = VoteRequest.from_body(body)
        if not self.approve_joins and body.get("url"):
            self._admit({"node_id": request.candidate, "url": body["url"]}, body["url"], True)
        ready = self.election.on_vote(request, time.monotonic(),
                                      member=self.is_member(request.candidate),
                                      quorum=self.quorum(),
                                      log_position=self.node.rounds.log_position())
        self._apply(ready)  # the vote is on disk before the answer leaves
        answer = ready.answer or {"term": self.term, "granted": False}
        # a winner adopts the newest pause its voters hold (consensus.pause)
        return {**answer, "pause": self.node.rounds.pause.to_wire()}

    def _follow_leader(self, term: int, coordinator: str, url: str) -> bool:
        """Accept ``coordinator`` as the leader of ``term`` if Raft's rules allow it. It must be
        a member we reached ourselves: a token holder with a fresh key cannot make us (or a
        coordinator) step down with a forged heartbeat; a real coordinator we have not met yet
        is greeted now and followed from its next heartbeat."""
        sender = self.peers.get(coordinator)
        if sender is not None and sender.status in ("rejected", "removed"):
            return False
        if sender is None or not sender.verified:
            self.consider(url)
            return False
        if self.approve_joins and (sender.status == "pending" if sender is not None
                                   else self.established()):
            return False  # only an admitted member may lead an established federation
        followed, ready = self.election.follow(term, coordinator, url, time.monotonic(),
                                               diverged=bool(self.node.rounds.diverged))
        self._apply(ready)
        if not followed:
            return False
        self.mark_joined()  # a coordinator is the federation: we have reached it
        return True

    def on_append(self, body: dict[str, Any]) -> dict[str, Any]:
        term = int(body["term"])
        if not self._follow_leader(term, body["coordinator"], body["url"]):
            return {"term": self.term, "ok": False,
                    "diverged": self.node.rounds.diverged is not None}
        # The coordinator of a majority vouches for itself: admit it as a live member.
        self.accept_hello({"node_id": body["coordinator"], "url": body["url"], "status": "live",
                           "members": body.get("members", [])}, body["url"],
                          direct=not self.approve_joins)
        for member in body.get("members", []):
            if member["node_id"] == self.node.node_id and member.get("status") == "removed":
                self.node.fatal("an admin removed this node from the federation; start it again "
                                "only with a new --data-dir and a join token")
                return {"term": self.term, "ok": False}
            peer = self.peers.get(member["node_id"])
            if peer is None and member.get("url") and member.get("status") in VOUCHED:
                # A member we never met (it left before we joined, or mDNS has not shown it):
                # our coordinator counts it, so we must too, or our majorities would differ.
                peer = self._admit(member, member["url"], verified=True)
                if peer is not None:
                    self._move(peer, membership.listed(member["status"]))
            if peer is None or peer.node_id == body["coordinator"]:
                continue
            if member.get("url") and member["url"] != peer.url and peer.status not in DECIDED:
                self._admit({"node_id": peer.node_id}, member["url"])  # it moved
            # What the list says moves the status by the table: an admin's decision (rejected,
            # removed) stands against a stale list; approvals and removals spread.
            event = membership.listed(member.get("status", ""))
            if event == "listed_live":
                peer.verified = True  # our coordinator reached it
                self._seen(peer, event)
            elif event is not None:
                was = self._move(peer, event)
                if peer.status == "removed" and was != "removed":
                    self.node.bus.publish("member_removed", None, {"node_id": peer.node_id},
                                          level="warning")
        rounds, stamp = self.node.rounds, PauseStamp.from_wire(body.get("pause"))
        if stamp is not None and pause_rules.follows(rounds.pause, stamp):
            rounds.adopt_pause(stamp)  # on disk before we acknowledge
        elif stamp is None and isinstance(body.get("paused"), bool) \
                and body["paused"] != rounds.paused:  # an older coordinator sends only the flag
            rounds.adopt_pause(PauseStamp(term, 0, body["paused"]))
        self._sync_body = body  # only the newest heartbeat matters; older ones are dropped
        if self._sync_worker is None or self._sync_worker.done():
            self._sync_worker = self._spawn(self._sync_loop())
        return {"term": self.term, "ok": True, "node_id": self.node.node_id,
                "ack": self.node.rounds.ack_state(), "abstaining": self.node.abstaining,
                "pause": self.node.rounds.pause.to_wire()}

    async def on_hold(self, body: dict[str, Any]) -> dict[str, Any]:
        """The coordinator wants to acknowledge an update: store its live round's updates
        durably now and say which we hold (see :meth:`replicate`)."""
        term = int(body["term"])
        if not self._follow_leader(term, body["coordinator"], body["url"]):
            return {"term": self.term, "held": []}
        current = body.get("current")
        if not isinstance(current, dict):
            return {"term": self.term, "held": []}
        url = body["url"]
        held = await self.node.rounds.mirror_now(current, lambda sha: self._fetch_blob_from(
            url, sha))
        return {"term": self.term, "held": held}

    def on_round_updates(self, round_no: int) -> dict[str, Any]:
        """A new coordinator recovering a round: the updates we hold for it (if not committed)."""
        row = self.node.ledger.round(round_no)
        if row is None or row["state"] == "committed":
            return {"round": round_no, "updates": []}
        return {"round": round_no, "trained_from": row["trained_from"],
                "updates": [wire.update_record(u) for u in self.node.ledger.updates(round_no)]}

    async def on_handoff(self, caller: str, body: dict[str, Any]) -> dict[str, Any]:
        """A member hands us an update of our live round that we lack."""
        update = body.get("update")
        peer = self.peers.get(caller)
        if self.role != COORDINATOR or peer is None or not isinstance(update, dict):
            return {"adopted": False}
        try:
            adopted = await self.node.rounds.adopt_update(
                int(update["round"]), update, lambda sha: self._fetch_blob_from(peer.url, sha),
                why=f"handed over by {caller[:12]}")
        except (KeyError, TypeError, ValueError):
            return {"adopted": False}
        if adopted:
            self._wake.set()
        return {"adopted": adopted}

    # -- replication of an admin's pause before it is answered --------------------------------------
    async def confirm_pause(self, stamp: PauseStamp) -> None:
        """Return once a majority holds ``stamp`` (or a newer decision): heartbeats carry it at
        once, and again until they do. Refused (``not_durable``) after ``confirm_pause_s`` or
        if this node stops leading meanwhile: the decision may or may not survive a change of
        coordinator then, and the admin is told to check and retry (consensus.pause)."""
        term, deadline = self.term, time.monotonic() + self.timing.confirm_pause_s
        beat: asyncio.Task | None = None
        try:
            while True:
                held = {p.node_id: p.extra["pause"] for p in self.voters() if "pause" in p.extra}
                held[self.node.node_id] = self.node.rounds.pause
                if pause_rules.confirmed(stamp, held, self.quorum()):
                    return
                if self.role != COORDINATOR or self.term != term \
                        or time.monotonic() >= deadline:
                    what = "pause" if stamp.paused else "resume"
                    raise UpdateRejected("not_durable", f"the {what} is recorded on this "
                                         "coordinator, but a majority of members did not confirm "
                                         "it, so it may not outlive a change of coordinator; "
                                         "check `chorus-node status` and run it again")
                if beat is None or beat.done():
                    beat = self._spawn(self._heartbeat_all(term))
                await asyncio.sleep(0.02)
        finally:
            if beat is not None and not beat.done():
                beat.cancel()

    # -- replication of updates before they are acknowledged -------------------------------------
    async def replicate(self, round_no: int, sha: str) -> int:
        """Push the round (with its updates) to every voting member and count who holds ``sha``
        durably; returns as soon as a majority does (or after the timeout)."""
        needed = self.quorum()
        voters = self.voters()
        if needed <= 1 or self.role != COORDINATOR:
            return 1 if self.role == COORDINATOR else 0
        row = self.node.ledger.round(round_no)
        if row is not None and row["state"] == "committed":
            return len(voters) + 1  # committed by a majority, with its updates
        record = wire.live_round(row, self.node.ledger.updates(round_no))
        body = {"term": self.term, "coordinator": self.node.node_id, "url": self.node.url,
                "current": record}

        async def hold(peer: Peer) -> bool:
            try:
                reply = await self.client.call(peer.url, "POST", "/v1/peer/hold", body,
                                               timeout=self.timing.replicate_timeout_s,
                                               expect_node=peer.node_id)
            except PeerError:
                return False
            if isinstance(reply, dict) and isinstance(reply.get("term"), int) \
                    and reply["term"] > self.term:
                self._step_down(reply["term"], f"{peer.node_id[:12]} is in a newer term")
                return False
            return isinstance(reply, dict) and sha in (reply.get("held") or [])

        holders = 1
        pending = {self._spawn(hold(p)) for p in voters}
        deadline = time.monotonic() + self.timing.replicate_timeout_s
        # Followers may take a while to fetch a large update, but a coordinator cut off from
        # its majority (CheckQuorum) stops waiting at once: nothing it holds alone is acked.
        while pending and holders < needed and time.monotonic() < deadline \
                and self.quorum_fresh():
            done, pending = await asyncio.wait(pending, timeout=self.timing.heartbeat_s,
                                               return_when=asyncio.FIRST_COMPLETED)
            holders += sum(1 for d in done if d.result())
        return holders

    async def collect_updates(self, round_no: int) -> list[tuple[str, Any, list[dict[str, Any]]]]:
        """Every voting member's updates for ``round_no``, from those that answer."""
        voters = self.voters()

        async def ask(peer: Peer):
            try:
                reply = await self.client.call(peer.url, "GET",
                                               f"/v1/peer/round-updates?round={round_no}",
                                               expect_node=peer.node_id)
            except PeerError:
                return None
            if not isinstance(reply, dict) or not isinstance(reply.get("updates"), list):
                return None
            rows = []
            for row in reply["updates"]:
                try:
                    rows.append(wire.read_update(row, f"round-updates from {peer.node_id[:12]}"))
                except wire.WireError as exc:  # a peer's data is never trusted as it came
                    log.warning("%s", exc)
            return (peer.node_id[:12], lambda sha, url=peer.url: self._fetch_blob_from(url, sha),
                    rows)

        answers = await asyncio.gather(*(ask(p) for p in voters))
        return [a for a in answers if a is not None]

    def handoff(self, update: dict[str, Any]) -> None:
        """Give the coordinator an update we hold and it lacks (at most every few seconds)."""
        key = (update["round"], update["node_id"], update["blob_sha"])
        now = time.monotonic()
        if not self.coordinator_url or now - self._handed_off.get(key, 0.0) < 5.0:
            return
        self._handed_off[key] = now
        url = self.coordinator_url
        body = {"update": wire.update_record(update)}
        self._spawn(self._quiet(self.client.call(url, "POST", "/v1/peer/handoff", body,
                                                 timeout=self.timing.replicate_timeout_s,
                                                 expect_node=self.coordinator)))

    async def _sync_loop(self) -> None:
        while self._sync_body is not None:
            body, self._sync_body = self._sync_body, None
            if int(body["term"]) < self.term or self.role != FOLLOWER:
                continue  # from a coordinator that is no longer ours
            await self._sync(body)

    async def _fetch_blob_from(self, url: str, sha: str) -> None:
        if self.node.blobs.has(sha):
            return
        data = await self.client.fetch_blob(url, sha)
        await asyncio.to_thread(self.node.blobs.put_bytes, data)

    def coordinator_fetchers(self) -> tuple[Any, Any] | None:
        """(checkpoint fetcher, blob fetcher) from the coordinator we follow, if any: what the
        state keeper restores from when its own files do not reach."""
        if self.role == COORDINATOR or not self.coordinator_url or not self.has_quorum():
            return None
        url = self.coordinator_url
        return (lambda dest: self.client.fetch_checkpoint(url, dest),
                lambda sha: self._fetch_blob_from(url, sha))

    async def _sync(self, body: dict[str, Any]) -> None:
        url = body["url"]

        async def fetch_blob(sha: str) -> None:
            await self._fetch_blob_from(url, sha)

        async def fetch_history(after: int) -> dict[str, Any]:
            return wire.read_history(await self.client.call(
                url, "GET", f"/v1/peer/history?after={after}", timeout=30.0,
                expect_node=body["coordinator"]))

        try:
            await self.node.rounds.apply_from_coordinator(body, fetch_blob, fetch_history)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a peer's data is never trusted to be well-formed
            log.warning("catching up from %s failed: %s: %s", url, exc.__class__.__name__, exc)

    def on_hello(self, body: dict[str, Any]) -> dict[str, Any]:
        """A peer introduces itself; the signed request already proved it holds the secret."""
        if body.get("federation") != self.node.identity.federation:
            raise UpdateRejected("spec_mismatch", f"this node belongs to federation "
                                 f"{self.node.identity.federation!r}")
        known = self.peers.get(body.get("node_id", ""))
        if known is not None and known.status == "rejected":
            raise UpdateRejected("forbidden", "an admin rejected this node's admission")
        if known is not None and known.status == "removed":
            # Said, not silent: the caller learns it was removed (and stops), or, if it
            # removed us too, that the federation is split (both report it).
            raise UpdateRejected("removed", "an admin removed this node from the federation",
                                 extra={"node_id": self.node.node_id, "head": self.head()})
        if body.get("fingerprint") != self.node.spec.fingerprint():
            raise UpdateRejected("spec_mismatch", "this federation trains different modules, "
                                 "rank or alpha; check --rank/--alpha/--target-modules/--model")
        if body.get("dp_policy") != policy_json(self.node.dp_policy):
            # A token with the DP policy stripped (or another one) makes a node that would
            # send raw updates: it is not of this federation.
            raise UpdateRejected("spec_mismatch", f"this federation's DP policy is "
                                 f"{policy_json(self.node.dp_policy)}, the caller's "
                                 f"{body.get('dp_policy')}: make its data dir from this "
                                 "federation's join token")
        self.accept_hello(body, body.get("url"))
        return self.hello_body()

    def on_leave(self, body: dict[str, Any]) -> None:
        peer = self.peers.get(body["node_id"])
        # A pending, rejected or removed node saying goodbye stays what it was: as "left" it
        # would count toward the majority (members that left still count), which an admin
        # never granted it.
        if peer is not None and peer.status not in DECIDED:
            self._move(peer, "said_goodbye")
            self.node.bus.publish("member_left", None, {"node_id": peer.node_id})
            self.election.on_leave(body["node_id"])
            self._wake.set()

    def on_timeout_now(self, body: dict[str, Any]) -> None:
        if self.election.on_timeout_now(int(body["term"])):
            self._wake.set()

    def status_json(self) -> dict[str, Any]:
        return {"role": self.role, "term": self.term, "coordinator": self.coordinator,
                "coordinator_url": self.coordinator_url, "quorum": self.has_quorum(),
                "quorum_size": self.quorum(), "voting_members": len(self.voting_members()),
                "split": self.split, "election_timeouts": self.election_timeouts,
                "heartbeats_sent": self.heartbeats_sent}


def _vote_body(request: VoteRequest) -> dict[str, Any]:
    """A vote request as it travels (wire.MESSAGES["vote"])."""
    body: dict[str, Any] = {"candidate": request.candidate, "last_term": request.last_term,
                            "last_round": request.last_round, "term": request.term,
                            "last_closed": request.last_closed}
    if request.pre:
        body["pre"] = True
    else:
        body["transfer"] = request.transfer
    return body
