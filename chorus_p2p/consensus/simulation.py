"""Seeded fault schedules for the election core: several :class:`Election` cores over a
simulated network, clock and disk, checked after every step.

Why: a wall-clock chaos run on real processes tries one schedule in 25 minutes; this tries
hundreds a second against the same rules the node runs (``Cluster`` is only their shell). One
seed is one exact schedule of message delays, losses, duplicates, one-way partitions, crashes,
restarts, clock drift and jumps, stalled event loops and slow disks, so every failure replays
from its seed:
``Simulation(seed).run()`` (or ``benchmarks/simulate_faults.py --seed N``).

The shell here mirrors ``Cluster``'s: a campaign asks everyone at once and decides on a
majority or when the peer timeout passes; heartbeats count a majority of answers. Each node also
holds a log of rounds (one entry per heartbeat a coordinator sends while it has a majority), so
that "at least as up to date" is exercised and a committed round can be seen to change.

Checked after every step:
- at most one coordinator per term (election safety);
- no node votes for two candidates in one term, and no persisted term goes back;
- a committed round (held by a majority, of the coordinator's own term) is never changed, is
  held by every coordinator of a later term (leader completeness: the analogue of an
  acknowledged update lost), and no follower is told to drop it;
- an admin's pause or resume, once confirmed by a majority, is known to every later coordinator
  (the value it runs on comes from that decision or a newer one: ``consensus.pause``);
- once faults stop, one coordinator is followed by every node within ``settle_s``.

An admin pauses or resumes now and then on whichever node believes it coordinates; a paused
coordinator opens no round until it resumes (and the admin resumes once faults stop).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import heapq
import random
from dataclasses import dataclass, field
from typing import Any

from chorus_p2p.consensus import pause as pause_rules
from chorus_p2p.consensus.election import (COORDINATOR, FOLLOWER, Election, ElectionTiming,
                                           Ready, VoteRequest)
from chorus_p2p.consensus.pause import PauseStamp
from chorus_p2p.consensus.mutants import MUTANTS
from chorus_p2p.consensus.rounds import (closes, commits, log_position, recovers_first,
                                         replaces_closed, takes_over)

TIMING = ElectionTiming(heartbeat_s=0.25, election_min_s=1.0, election_max_s=2.0)
PEER_TIMEOUT_S = max(0.5, TIMING.election_min_s * 0.8)  # as Cluster's PeerClient
TICK_S = 0.05  # Cluster's ticker wakes at least this often
CLIENTS = 3  # each submits one update per round through whichever node it thinks leads
ROUND_SIZE = 2  # a round closes with this many updates (a coordinator's min_updates)
CLIENT_TIMEOUT_S = 1.0  # a client that heard nothing tries again (maybe elsewhere)
PROGRESS_S = 8.0  # once settled, a round must commit within this (liveness of rounds)
ADMIN_EVERY_S = (0.5, 4.0)  # an admin pauses or resumes this often while faults run

# A log entry is a closed round: (term, round, ((client, digest), ...)).
Entry = tuple[int, int, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Faults:
    """How hostile one schedule is; every number is a probability per opportunity or a range."""

    loss: float = 0.05
    duplicate: float = 0.03
    delay_s: tuple[float, float] = (0.001, 0.08)
    slow_delay_s: float = 1.5  # now and then a message takes this long (reordering)
    slow: float = 0.03
    partition: float = 0.02  # per fault step: a new partition (a third of them one-way)
    crash: float = 0.02  # per fault step, per schedule: crash one node
    crash_after_answer: float = 0.01  # per answer sent: kill -9 right after it leaves
    stall: float = 0.02  # per fault step: one node's event loop stops (training, swapping)
    stall_s: tuple[float, float] = (0.5, 4.0)
    clock_jump: float = 0.01  # per fault step: one node's clock jumps forward (a laptop slept)
    drift: float = 0.05  # clock rates in [1 - drift, 1 + drift]
    slow_disk: float = 0.01  # per fault step: one node's disk turns slow for a few seconds
    disk_latency_s: tuple[float, float] = (0.02, 0.6)  # each write there, loop blocked


QUIET = Faults(loss=0, duplicate=0, delay_s=(0.001, 0.02), slow=0, partition=0, crash=0,
               crash_after_answer=0, stall=0, clock_jump=0, slow_disk=0)


@dataclass
class Disk:
    """What survives a crash: everything the core asked to persist (the ledger is SQLite with
    FULL sync, so a write is on disk before any answer leaves). With the ``unsynced_writes``
    mutant, a crash loses what was written since the node's last tick instead."""

    term: int = 0
    votes: dict[int, str] = field(default_factory=dict)
    log: list[Entry] = field(default_factory=list)  # closed rounds, in order
    # the live round's updates as held here: round -> client -> (digest, accepted in term)
    live: dict[int, dict[str, tuple[str, int]]] = field(default_factory=dict)
    log_from: tuple[int, str] | None = None  # (term, coordinator) the log was last taken from
    commit: int = 0  # how many of the log's rounds this node knows to be committed
    pause: PauseStamp = PauseStamp()  # the pause decision this node holds


@dataclass
class Campaign:
    id: int
    phase: str  # "pre" or "vote"
    start_term: int
    term: int
    votes: int = 1
    answered: set[str] = field(default_factory=set)
    transfer: bool = False
    pauses: list[PauseStamp] = field(default_factory=list)  # granting voters' stamps


@dataclass
class Beat:
    term: int
    sent: float
    reached: set[str]


class SimNode:
    def __init__(self, node_id: str, rate: float, offset: float):
        self.node_id = node_id
        self.disk = Disk()
        self.core: Election | None = None
        self.rate = rate
        self.offset = offset
        self.stalled_until = 0.0
        self.disk_slow_until = 0.0  # a slow disk: each message handled blocks the loop a while
        self.writes_done_at = 0.0  # what it sends leaves once its writes are done
        self.synced: Disk | None = None  # unsynced_writes: the disk as of the last tick
        self.campaign: Campaign | None = None
        self.beats: dict[int, Beat] = {}
        self.acked: dict[str, int] = {}  # as coordinator: log length each follower holds
        self.generation = 0  # incarnation: timers of a crashed one never fire
        self.recovering: int | None = None  # as a new coordinator: the round being gathered
        self.recover_next = False  # as a new coordinator: recover the first round it opens
        self.recovered: dict[str, dict[str, tuple[str, int]]] = {}  # answers, by member
        self.pending: dict[tuple[int, str, str], set[str]] = {}  # unacked update -> holders
        self.waiting_resume = False  # as coordinator: paused, its next round not opened
        self.pause_pending: PauseStamp | None = None  # as coordinator: decided, unconfirmed
        self.pause_held: dict[str, PauseStamp] = {}  # as coordinator: each follower's stamp
        self.voters_pause: list[PauseStamp] = []  # the winning campaign's granted stamps

    def clock(self, t: float) -> float:
        return self.offset + self.rate * t

    def log_position(self) -> tuple[int, int]:
        """As RoundManager.log_position (the same function)."""
        held = self.disk.live.get(self.live_round(), {})
        return log_position((self.disk.log[-1][0], len(self.disk.log)) if self.disk.log else None,
                            self.live_round(), [term for _, term in held.values()])

    def live_round(self) -> int:
        return len(self.disk.log) + 1

    def live(self) -> dict[str, tuple[str, int]]:
        return self.disk.live.setdefault(self.live_round(), {})


@dataclass
class Client:
    """A training machine: one update per round, retried until acknowledged."""

    name: str
    target: str | None = None  # the node it believes coordinates
    round: int | None = None
    digest: str | None = None
    made: int = 0
    sent_at: float | None = None  # awaiting an answer since
    next_at: float = 0.0  # when to send (again) if not awaiting one
    acked_round: int | None = None  # the round its last acknowledged update went to

    def new_update(self, round_no: int) -> None:
        self.made += 1
        self.round, self.digest = round_no, f"{self.name}.{self.made}"


@dataclass
class Outcome:
    seed: int
    events: int  # messages, faults, restarts and timeouts (clock ticks not counted)
    violations: list[str]
    terms: int  # the highest term reached
    digest: str  # of the whole trace: the same seed gives the same digest
    trace: list[str]


class Simulation:
    def __init__(self, seed: int, *, nodes: int | None = None, events: int = 500,
                 faults: Faults | None = None, settle_s: float = 30.0, keep_trace: bool = False,
                 clients: int = CLIENTS):
        """``clients=0``: elections only (more of them per event: what finds vote bugs)."""
        self.seed = seed
        self.rng = random.Random(seed)
        # slow disks draw from their own generator, so that adding them left every other
        # fault of a seed where it was
        self.disk_rng = random.Random(seed * 7919 + 1)
        self.size = nodes or self.rng.choice((3, 3, 4, 5))
        self.min_events = events
        self.faults = faults or _mixed(self.rng, self.disk_rng)
        if not clients:
            # Elections only exists to pack elections densely (what finds vote bugs); slow
            # disks spread them thinner (one found in 7,570 schedules took 28,082 with them).
            self.faults = dataclasses.replace(self.faults, slow_disk=0.0)
        self.settle_s = settle_s
        self.keep_trace = keep_trace
        self.t = 0.0
        self.queue: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.nodes = {f"n{i}": SimNode(f"n{i}", self.rng.uniform(1 - self.faults.drift,
                                                                 1 + self.faults.drift),
                                       self.rng.uniform(0, 1000)) for i in range(self.size)}
        self.blocked: set[tuple[str, str]] = set()
        self.leaders: dict[int, str] = {}  # term -> the coordinator elected in it
        self.committed: dict[int, Entry] = {}  # log index -> the entry committed there
        self.committed_in: dict[int, int] = {}  # round index -> the term that committed it
        self.violations: list[str] = []
        self.trace: list[str] = []
        self.digest = hashlib.sha256()
        self.events = 0
        self.faulty = True
        self.campaign_ids = 0
        self.clients = {f"c{i}": Client(f"c{i}") for i in range(clients)}
        self.acked: dict[tuple[int, str], str] = {}  # (round, client) -> digest acknowledged
        self.acks = 0
        self.counted: dict[str, int] = {}  # digest -> the committed round that counts it
        # pause decisions: (term, seq) -> the decision whose value it carries (a winner's
        # restamp carries the one it adopted); and the decisions a majority confirmed
        self.pause_origin: dict[tuple[int, int], tuple[int, int]] = {(0, 0): (0, 0)}
        self.pause_confirmed: list[PauseStamp] = []

    # -- plumbing --------------------------------------------------------------------------
    def schedule(self, delay: float, kind: str, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (self.t + delay, self.seq, kind, payload))

    def note(self, text: str) -> None:
        line = f"{self.t:9.4f} {text}"
        self.digest.update(line.encode())
        if self.keep_trace:
            self.trace.append(line)

    def send(self, src: str, dst: str, kind: str, body: dict[str, Any]) -> None:
        if (src, dst) in self.blocked:
            return
        f = self.faults if self.faulty else QUIET
        if self.rng.random() < f.loss:
            return
        copies = 2 if self.rng.random() < f.duplicate else 1
        sender = self.nodes.get(src)
        writing = max(0.0, sender.writes_done_at - self.t) if sender is not None else 0.0
        for _ in range(copies):
            delay = f.slow_delay_s if self.rng.random() < f.slow else self.rng.uniform(*f.delay_s)
            self.schedule(writing + delay, "deliver", (src, dst, kind, body))

    def quorum(self) -> int:
        return self.size // 2 + 1

    def apply(self, node: SimNode, ready: Ready) -> None:
        """Cluster._apply's twin: persist, then start."""
        core = node.core
        assert core is not None
        if ready.persist_term is not None:
            self.persist_term(node, ready.persist_term)
        if ready.persist_vote is not None:
            term, candidate = ready.persist_vote
            earlier = node.disk.votes.get(term)
            if earlier not in (None, candidate):
                self.violate(f"{node.node_id} voted for {earlier} and {candidate} in term {term}")
            node.disk.votes[term] = candidate
            self.persist_term(node, max(node.disk.term, term))
        for action in ready.start:
            if action == "heartbeat":
                self.heartbeat(node)
            elif action == "election":
                self.begin_campaign(node)
            elif action == "lead":
                self.on_elected(node)
            elif action == "follow":
                node.recovering, node.recovered, node.pending = None, {}, {}
                node.waiting_resume, node.pause_pending = False, None
        for event, data, _ in ready.publish:
            self.note(f"{node.node_id} {event} {sorted(data.items())}")

    def persist_term(self, node: SimNode, term: int) -> None:
        if term < node.disk.term:
            self.violate(f"{node.node_id}'s persisted term went back {node.disk.term} -> {term}")
        node.disk.term = term

    def violate(self, text: str) -> None:
        self.note(f"VIOLATION {text}")
        self.violations.append(f"seed {self.seed} t={self.t:.3f}: {text}")

    # -- the shell, as Cluster ---------------------------------------------------------------
    def boot(self, node: SimNode) -> None:
        now = node.clock(self.t)
        term = node.disk.term
        node.core = Election(node.node_id, term, node.disk.votes.get(term), now,
                             random.Random(self.rng.random()), TIMING)
        node.campaign, node.beats, node.acked = None, {}, {}
        node.recovering, node.recovered, node.pending = None, {}, {}
        node.waiting_resume, node.pause_pending, node.pause_held = False, None, {}
        node.generation += 1
        self.apply(node, node.core.start(now, alone=False, bootstrap_s=self.rng.uniform(0, 2),
                                         url=node.node_id))
        self.schedule(TICK_S, "tick", (node.node_id, node.generation))

    def on_elected(self, node: SimNode) -> None:
        term = node.core.term
        other = self.leaders.get(term)
        if other not in (None, node.node_id):
            self.violate(f"two coordinators in term {term}: {other} and {node.node_id}")
        self.leaders[term] = node.node_id
        node.acked = {}
        self.adopt_pause_at_election(node, term)
        for index, entry in self.committed.items():
            if self.committed_in[index] >= term:
                continue  # committed by a later term: a late winner of an older term lacks it
            if index >= len(node.disk.log) or not _same(node.disk.log[index], entry):
                self.violate(f"{node.node_id} leads term {term} without committed round "
                             f"{entry[1]} (term {entry[0]})")
        self.note(f"{node.node_id} elected term {term} log {node.log_position()}")
        # RoundManager.lead: a proposed round is proposed again in this term; the live round
        # (now, or the first one opened after that proposal commits) is first recovered.
        node.recover_next = recovers_first(self.quorum())
        if len(node.disk.log) > node.disk.commit:
            *rest, (_, number, updates) = node.disk.log
            node.disk.log = [*rest, (term, number, updates)]
            node.disk.log_from = (term, node.node_id)
            self.note(f"{node.node_id} proposes round {number} again in term {term}")
        else:
            self.open_round(node)

    def open_round(self, node: SimNode) -> None:
        if node.disk.pause.paused:  # RoundManager: no new round while paused
            if not node.waiting_resume:
                self.note(f"{node.node_id} paused: round {node.live_round()} not opened")
            node.waiting_resume = True
            return
        node.waiting_resume = False
        if node.recover_next:
            node.recover_next = False
            node.recovering = node.live_round()
            node.recovered = {node.node_id: dict(node.live())}
            self.collect(node)
        self.maybe_close(node)

    # -- rounds, as RoundManager ----------------------------------------------------------------
    def collect(self, node: SimNode) -> None:
        for other in self.nodes:
            if other != node.node_id and other not in node.recovered:
                self.send(node.node_id, other, "collect", {"round": node.recovering,
                                                           "term": node.core.term})
        self.schedule(0.5 / node.rate, "recover_retry",
                      (node.node_id, node.generation, node.core.term, node.recovering))

    def finish_recovery(self, node: SimNode) -> None:
        """Every update a majority holds is now ours: the later term's wins (takes_over)."""
        mine = node.live()
        for answer in node.recovered.values():
            for client, (digest, term) in sorted(answer.items()):
                existing = mine.get(client)
                if takes_over(None if existing is None else
                              {"blob_sha": existing[0], "term": existing[1]},
                              {"blob_sha": digest, "term": term}):
                    mine[client] = (digest, term)
        self.note(f"{node.node_id} recovered round {node.recovering}: {sorted(mine.items())}")
        node.recovering, node.recovered = None, {}
        self.maybe_close(node)

    def may_write(self, node: SimNode) -> bool:
        """A coordinator with a majority, its live round recovered, no proposal pending."""
        return node.core.role == COORDINATOR and node.recovering is None and \
            not node.recover_next and not node.waiting_resume and \
            node.disk.commit == len(node.disk.log) and \
            node.core.quorum_fresh(node.clock(self.t), self.quorum())

    def on_submit(self, node: SimNode, src: str, body: dict[str, Any]) -> None:
        """RoundManager.accept: record, hold at a majority, then acknowledge."""
        core = node.core
        if not self.may_write(node):
            self.send(node.node_id, src, "refused", {"why": "not_coordinator",
                                                     "hint": core.coordinator,
                                                     "round": None})
            return
        number, client, digest = node.live_round(), body["client"], body["digest"]
        if body["round"] != number:
            self.send(node.node_id, src, "refused", {"why": "round", "hint": node.node_id,
                                                     "round": number})
            return
        live = node.live()
        existing = live.get(client)
        if existing is not None and existing[0] != digest:
            self.send(node.node_id, src, "refused", {"why": "conflict", "hint": node.node_id,
                                                     "round": number + 1})
            return
        if existing is None:
            live[client] = (digest, core.term)
        node.pending.setdefault((number, client, digest), {node.node_id})
        self.hold(node, number)
        self.count_holders(node)
        self.maybe_close(node)
        self.maybe_crash_after_answer(node)  # kill -9 mid-upload: held by some, acked by none

    def hold(self, node: SimNode, number: int) -> None:
        updates = dict(node.disk.live.get(number, {}))
        for other in self.nodes:
            if other != node.node_id:
                self.send(node.node_id, other, "hold", {"term": node.core.term,
                                                        "coordinator": node.node_id,
                                                        "round": number, "updates": updates})

    def count_holders(self, node: SimNode) -> None:
        for key, holders in list(node.pending.items()):
            if commits(holders, self.nodes, self.quorum()):
                number, client, digest = key
                del node.pending[key]
                earlier = self.acked.get((number, client))
                if earlier not in (None, digest):
                    self.violate(f"round {number}: {client}'s {earlier} and {digest} both "
                                 "acknowledged")
                self.acked[(number, client)] = digest
                self.acks += 1
                closed = self.committed.get(number - 1)
                if closed is not None and (client, digest) not in closed[2]:
                    self.violate(f"acknowledged update {digest} lost: round {number} was "
                                 f"committed without it {closed[2]}")
                self.note(f"{node.node_id} acknowledges {digest} in round {number}")
                self.send(node.node_id, client, "ack", {"round": number, "digest": digest})

    def maybe_close(self, node: SimNode) -> None:
        """Enough updates: the round closes into a log entry (aggregated, proposed)."""
        live = node.live()
        if not self.may_write(node) or not closes(len(live), ROUND_SIZE, ROUND_SIZE,
                                                  deadline_passed=False):
            return
        entry = (node.core.term, node.live_round(),
                 tuple(sorted((client, digest) for client, (digest, _) in live.items())))
        node.disk.log = node.disk.log + [entry]
        node.disk.log_from = (node.core.term, node.node_id)
        self.note(f"{node.node_id} closes round {entry[1]}: {entry[2]}")

    # -- the pause, as RoundManager and Cluster.confirm_pause ------------------------------------
    def admin_step(self) -> None:
        """An admin pauses or resumes on a node that believes it coordinates."""
        leaders = sorted(n for n, node in self.nodes.items()
                         if node.core is not None and node.core.role == COORDINATOR)
        if leaders:
            self.decide_pause(self.nodes[self.rng.choice(leaders)], self.rng.random() < 0.5)

    def decide_pause(self, node: SimNode, paused: bool) -> None:
        stamp = pause_rules.decide(node.disk.pause, node.core.term, paused)
        self.pause_origin[(stamp.term, stamp.seq)] = (stamp.term, stamp.seq)
        node.disk.pause, node.pause_pending = stamp, stamp
        self.note(f"{node.node_id} decides {stamp}")
        if node.waiting_resume and not paused:
            self.open_round(node)
        self.heartbeat(node)
        self.confirm_pause(node)

    def confirm_pause(self, node: SimNode) -> None:
        stamp = node.pause_pending
        if stamp is None:
            return
        held = {**node.pause_held, node.node_id: node.disk.pause}
        if pause_rules.confirmed(stamp, held, self.quorum()):
            node.pause_pending = None
            self.pause_confirmed.append(stamp)
            self.note(f"{node.node_id} confirms {stamp} to the admin")

    def adopt_pause_at_election(self, node: SimNode, term: int) -> None:
        """RoundManager.lead: the newest stamp among the winner's and its voters', restamped;
        checked against every decision a majority confirmed before this term."""
        candidates = [node.disk.pause, *node.voters_pause]
        adopted = pause_rules.at_election(node.disk.pause, node.voters_pause, term)
        basis = max(c for c in candidates if c.paused == adopted.paused)
        origin = self.pause_origin.get((basis.term, basis.seq), (basis.term, basis.seq))
        self.pause_origin[(term, 0)] = origin
        confirmed = [s for s in self.pause_confirmed if s.term < term]
        if confirmed and origin < (max(confirmed).term, max(confirmed).seq):
            self.violate(f"{node.node_id} leads term {term} on pause decision {origin} "
                         f"(paused={adopted.paused}), older than the confirmed "
                         f"{max(confirmed)}")
        node.disk.pause, node.voters_pause = adopted, []

    def begin_campaign(self, node: SimNode) -> None:
        core = node.core
        if not core.may_campaign(joined=True, diverged=False):
            return
        transfer = core.take_transfer()
        self.campaign_ids += 1
        camp = Campaign(self.campaign_ids, "pre", core.term, core.term + 1, transfer=transfer)
        node.campaign = camp
        if transfer or self.quorum() <= 1:
            self.campaign_vote(node, camp)
            return
        self.ask(node, camp, pre=True)

    def ask(self, node: SimNode, camp: Campaign, *, pre: bool) -> None:
        request = node.core.vote_request(camp.term, node.log_position(), pre=pre,
                                         transfer=camp.transfer and not pre)
        for other in self.nodes:
            if other != node.node_id:
                self.send(node.node_id, other, "vote", {"request": request, "campaign": camp.id,
                                                        "phase": camp.phase})
        self.schedule(PEER_TIMEOUT_S / node.rate, "campaign_timeout", (node.node_id, camp.id))

    def campaign_vote(self, node: SimNode, camp: Campaign) -> None:
        term, ready = node.core.campaign(node.clock(self.t), self.size)
        camp.phase, camp.term, camp.votes, camp.answered = "vote", term, 1, set()
        self.apply(node, ready)
        self.ask(node, camp, pre=False)
        if camp.votes >= self.quorum():
            self.decide(node, camp)

    def decide(self, node: SimNode, camp: Campaign) -> None:
        core = node.core
        if camp.phase == "pre":
            node.campaign = None
            if core.pre_vote_won(camp.start_term, camp.votes, self.quorum()):
                node.campaign = camp
                self.campaign_vote(node, camp)
            return
        node.campaign = None
        node.voters_pause = camp.pauses
        self.apply(node, core.election_result(camp.term, camp.votes, self.quorum(),
                                              node.clock(self.t), node.node_id))

    def heartbeat(self, node: SimNode) -> None:
        core = node.core
        beat = Beat(core.term, node.clock(self.t), {node.node_id})
        self.seq += 1
        beat_id = self.seq
        node.beats[beat_id] = beat
        if len(node.beats) > 16:
            node.beats.pop(next(iter(node.beats)))
        for other in self.nodes:
            if other != node.node_id:
                self.send(node.node_id, other, "append", {
                    "term": core.term, "coordinator": node.node_id, "beat": beat_id,
                    "log": list(node.disk.log), "commit": node.disk.commit,
                    "pause": node.disk.pause})
        self.heartbeat_counted(node, beat)

    def heartbeat_counted(self, node: SimNode, beat: Beat) -> None:
        if len(beat.reached) >= self.quorum():
            node.core.heartbeat_quorum(beat.term, beat.sent)

    def commit(self, node: SimNode) -> None:
        """Raft's rule: a round of the coordinator's own term held by a majority commits."""
        core = node.core
        lengths = sorted([len(node.disk.log)] + [node.acked.get(o, 0) for o in self.nodes
                                                  if o != node.node_id], reverse=True)
        held = lengths[self.quorum() - 1]
        known = node.disk.commit
        for index in range(held):
            if node.disk.log[index][0] == core.term:
                node.disk.commit = max(node.disk.commit, index + 1)
            if node.disk.log[index][0] == core.term and index not in self.committed:
                for earlier in range(index + 1):
                    entry = node.disk.log[earlier]
                    if earlier in self.committed and not _same(self.committed[earlier], entry):
                        self.violate(f"committed round {earlier + 1} changed "
                                     f"{self.committed[earlier]} -> {entry}")
                    if earlier not in self.committed:
                        self.committed[earlier] = entry
                        self.committed_in[earlier] = core.term
                        self.check_round(entry)
        if node.disk.commit > known and node.disk.commit == len(node.disk.log):
            self.open_round(node)

    def check_round(self, entry: Entry) -> None:
        """A committed round holds every update acknowledged for it; no update counts twice."""
        _, number, updates = entry
        for (round_no, client), digest in self.acked.items():
            if round_no == number and (client, digest) not in updates:
                self.violate(f"acknowledged update {digest} lost: committed round {number} "
                             f"holds {updates}")
        for _, client_digest in updates:
            other = self.counted.setdefault(client_digest, number)
            if other != number:
                self.violate(f"update {client_digest} counted in rounds {other} and {number}")

    def receive(self, src: str, dst: str, kind: str, body: dict[str, Any]) -> None:
        node = self.nodes[dst]
        core = node.core
        now = node.clock(self.t)
        if kind == "vote":
            request: VoteRequest = body["request"]
            ready = core.on_vote(request, now, member=True, quorum=self.quorum(),
                                 log_position=node.log_position())
            self.apply(node, ready)
            self.send(dst, src, "vote_reply", {"campaign": body["campaign"],
                                               "phase": body["phase"], **ready.answer,
                                               "pause": node.disk.pause})
            self.maybe_crash_after_answer(node)
        elif kind == "vote_reply":
            stepped = core.on_reply_term(body["term"], now, body["granted"], who=src)
            self.apply(node, stepped)
            camp = node.campaign
            if camp is None or camp.id != body["campaign"] or camp.phase != body["phase"] \
                    or src in camp.answered:
                return
            camp.answered.add(src)
            if body["granted"] and stepped.persist_term is None:
                camp.votes += 1
                camp.pauses.append(body["pause"])
                if camp.votes >= self.quorum():
                    self.decide(node, camp)
        elif kind == "append":
            followed, ready = core.follow(body["term"], body["coordinator"], body["coordinator"],
                                          now, diverged=False)
            self.apply(node, ready)
            source = (body["term"], body["coordinator"])
            log = body["log"]
            if followed and not (node.disk.log_from == source
                                 and node.disk.log[:len(log)] == log):
                # (a late, shorter copy from the same coordinator and term changes nothing)
                for index, round_term in self.committed.items():
                    if self.committed_in[index] >= body["term"]:
                        continue  # committed after that coordinator's term began: it may lack it
                    held = index < len(node.disk.log) and node.disk.log[index] == round_term
                    if held and (index >= len(log) or not _same(log[index], round_term)):
                        self.violate(f"{dst} told to drop committed round {index} by "
                                     f"{body['coordinator']} (term {body['term']})")
                node.disk.log, node.disk.log_from = list(log), source
            if followed:
                node.disk.commit = max(node.disk.commit, min(body["commit"], len(node.disk.log)))
                if pause_rules.follows(node.disk.pause, body["pause"]):
                    node.disk.pause = body["pause"]  # on disk before the ack
            self.send(dst, src, "append_reply", {"term": core.term, "ok": followed,
                                                 "beat": body["beat"],
                                                 "length": len(node.disk.log),
                                                 "pause": node.disk.pause})
            self.maybe_crash_after_answer(node)
        elif kind == "submit":
            self.on_submit(node, src, body)
        elif kind == "hold":
            # Cluster.on_hold: follow the sender if Raft allows, then keep its updates (the
            # later term's wins, as Ledger.mirror_round) and say which we hold.
            followed, ready = core.follow(body["term"], body["coordinator"],
                                          body["coordinator"], now, diverged=False)
            self.apply(node, ready)
            held: list[tuple[str, str]] = []
            number = body["round"]
            closed = node.disk.log[number - 1] if len(node.disk.log) >= number else None
            if not followed or node.disk.commit != number - 1:
                pass  # RoundManager.mirror_now: not caught up, holds nothing
            elif closed is not None and not replaces_closed(closed[0], body["term"]):
                held = list(closed[2])  # a late hold: we hold that round closed already
            else:
                # holding the coordinator's live round supersedes our uncommitted rounds
                for index in range(node.disk.commit, len(node.disk.log)):
                    if self.committed.get(index) == node.disk.log[index]:  # that very copy
                        self.violate(f"{dst} drops committed round {index + 1} for "
                                     f"{body['coordinator']}'s live round {number}")
                node.disk.log = node.disk.log[:node.disk.commit]
                mine = node.disk.live.setdefault(number, {})
                for client, (digest, term) in sorted(body["updates"].items()):
                    ours = mine.get(client)
                    theirs = {"blob_sha": digest, "term": term}
                    if ours is None or not takes_over(theirs, {"blob_sha": ours[0],
                                                               "term": ours[1]}):
                        mine[client] = (digest, term)
                held = sorted((client, digest) for client, (digest, _) in mine.items())
            self.send(dst, src, "hold_reply", {"term": core.term, "round": body["round"],
                                               "held": held})
            self.maybe_crash_after_answer(node)
        elif kind == "hold_reply":
            self.apply(node, core.on_reply_term(body["term"], now, who=src))
            if core.role != COORDINATOR or body["term"] != core.term:
                return
            for (number, client, digest), holders in node.pending.items():
                if number == body["round"] and (client, digest) in body["held"]:
                    holders.add(src)
            self.count_holders(node)
        elif kind == "collect":
            # Cluster.on_round_updates: what we hold for that round (no term involved)
            self.send(dst, src, "collect_reply", {
                "round": body["round"], "term": body["term"],
                "updates": dict(node.disk.live.get(body["round"], {}))})
        elif kind == "collect_reply":
            if node.recovering != body["round"] or core.term != body["term"] \
                    or core.role != COORDINATOR:
                return
            node.recovered[src] = body["updates"]
            if len(node.recovered) >= self.quorum():
                self.finish_recovery(node)
        elif kind == "append_reply":
            self.apply(node, core.on_reply_term(body["term"], now, who=src))
            beat = node.beats.get(body["beat"])
            if not body["ok"] or beat is None or core.role != COORDINATOR \
                    or core.term != beat.term:
                return
            node.acked[src] = max(node.acked.get(src, 0), body["length"])
            node.pause_held[src] = body["pause"]
            self.confirm_pause(node)
            beat.reached.add(src)
            self.heartbeat_counted(node, beat)
            self.commit(node)

    # -- clients -----------------------------------------------------------------------------
    def client_step(self, client: Client) -> None:
        self.schedule(self.rng.uniform(0.1, 0.3), "client", client.name)
        if client.sent_at is not None:
            if self.t - client.sent_at < CLIENT_TIMEOUT_S:
                return
            # no answer: maybe elsewhere, maybe retrained meanwhile
            client.target = self.rng.choice(sorted(self.nodes))
            if client.round is not None and self.rng.random() < 0.5:
                client.new_update(client.round)
        elif self.t < client.next_at:
            return
        self.submit(client)

    def submit(self, client: Client) -> None:
        if client.target is None:
            client.target = self.rng.choice(sorted(self.nodes))
        if client.digest is None:
            client.new_update(client.round or 1)
        client.sent_at = self.t
        self.send(client.name, client.target, "submit", {"client": client.name,
                                                         "round": client.round,
                                                         "digest": client.digest})

    def client_receive(self, client: Client, src: str, kind: str, body: dict[str, Any]) -> None:
        if kind == "ack":
            if body["digest"] == client.digest:
                client.acked_round = body["round"]
                client.new_update(body["round"] + 1)
                client.sent_at, client.next_at = None, self.t
            return
        # refused: go where the hint points, to the round it names
        client.target = body["hint"] or self.rng.choice(sorted(self.nodes))
        if body["round"] is not None and body["round"] != client.round \
                and body["round"] != client.acked_round:  # (ours is in that one: wait)
            client.new_update(body["round"])
        client.sent_at, client.next_at = None, self.t + 0.1  # try again shortly

    # -- faults -------------------------------------------------------------------------------
    def crash(self, node: SimNode, how: str) -> None:
        self.note(f"{how} {node.node_id}")
        node.core = None
        if "unsynced_writes" in MUTANTS and node.synced is not None:
            node.disk = node.synced  # what the OS had not flushed is gone
        self.schedule(self.rng.uniform(0.05, 5), "restart", node.node_id)

    def maybe_crash_after_answer(self, node: SimNode) -> None:
        if self.faulty and self.rng.random() < self.faults.crash_after_answer:
            self.crash(node, "kill -9 after answering:")

    def fault_step(self) -> None:
        f, rng = self.faults, self.rng
        ids = sorted(self.nodes)
        if rng.random() < f.partition:
            side = set(rng.sample(ids, rng.randint(1, self.size - 1)))
            pairs = {(a, b) for a in side for b in ids if b not in side}
            if rng.random() < 1 / 3:
                self.note(f"one-way partition from {sorted(side)}")
            else:
                pairs |= {(b, a) for a, b in pairs}
                self.note(f"partition {sorted(side)}")
            self.blocked = pairs
            self.schedule(rng.uniform(0.5, 6), "heal", None)
        if rng.random() < f.crash:
            node = self.nodes[rng.choice(ids)]
            if node.core is not None:
                self.crash(node, "crash")
        if rng.random() < f.stall:
            node = self.nodes[rng.choice(ids)]
            node.stalled_until = max(node.stalled_until, self.t + rng.uniform(*f.stall_s))
            self.note(f"stall {node.node_id} until {node.stalled_until:.3f}")
        if rng.random() < f.clock_jump:
            node = self.nodes[rng.choice(ids)]
            jump = rng.uniform(0.5, 10)
            node.offset += jump
            self.note(f"clock of {node.node_id} jumps {jump:.3f}s")
        if self.disk_rng.random() < f.slow_disk:
            node = self.nodes[self.disk_rng.choice(ids)]
            node.disk_slow_until = self.t + self.disk_rng.uniform(1, 8)
            self.note(f"disk of {node.node_id} slow until {node.disk_slow_until:.3f}")

    # -- the run -------------------------------------------------------------------------------
    def step(self) -> bool:
        if not self.queue:
            return False
        self.t, _, kind, payload = heapq.heappop(self.queue)
        if kind != "tick":  # a tick is a clock reading, not an event of the schedule
            self.events += 1
        if kind == "fault":
            if self.faulty:
                self.fault_step()
                self.schedule(self.rng.uniform(0.05, 0.3), "fault", None)
            return True
        if kind == "heal":
            self.blocked = set()
            self.note("heal")
            return True
        if kind == "client":
            self.client_step(self.clients[payload])
            return True
        if kind == "admin":
            if self.faulty:
                self.admin_step()
                self.schedule(self.rng.uniform(*ADMIN_EVERY_S), "admin", None)
            return True
        if kind == "deliver" and payload[1] in self.clients:
            src, dst, message, body = payload
            self.note(f"{src}->{dst} {message} {_brief(body)}")
            self.client_receive(self.clients[dst], src, message, body)
            return True
        if kind == "restart":
            node = self.nodes[payload]
            if node.core is None:
                self.note(f"restart {payload}")
                self.boot(node)
            return True
        target = payload[1] if kind == "deliver" else payload[0]
        node = self.nodes[target]
        if node.core is None or (kind == "tick" and payload[1] != node.generation):
            return True  # crashed: its timers and inbox are gone
        if node.stalled_until > self.t:
            self.seq += 1
            heapq.heappush(self.queue, (node.stalled_until, self.seq, kind, payload))
            return True
        if kind == "deliver" and self.faulty and node.disk_slow_until > self.t:
            # its writes for this message block the loop, and its answers wait for them
            latency = self.disk_rng.uniform(*self.faults.disk_latency_s)
            node.writes_done_at = node.stalled_until = self.t + latency
        if kind == "tick":
            if "unsynced_writes" in MUTANTS:
                node.synced = _copy(node.disk)
            ready = node.core.tick(node.clock(self.t), quorum=self.quorum(), joined=True)
            self.apply(node, ready)
            self.schedule(TICK_S / node.rate, "tick", payload)
        elif kind == "deliver":
            src, dst, message, body = payload
            self.note(f"{src}->{dst} {message} {_brief(body)}")
            self.receive(src, dst, message, body)
        elif kind == "recover_retry":
            _, generation, term, number = payload
            if generation == node.generation and node.core.term == term \
                    and node.recovering == number and node.core.role == COORDINATOR:
                self.collect(node)
        elif kind == "campaign_timeout":
            camp = node.campaign
            if camp is not None and camp.id == payload[1]:
                self.decide(node, camp)
        return True

    def settled(self) -> bool:
        """One coordinator, with a majority, followed by every node."""
        cores = [n.core for n in self.nodes.values()]
        if any(c is None for c in cores):
            return False
        leaders = [c for c in cores if c.role == COORDINATOR]
        if len(leaders) != 1:
            return False
        leader = leaders[0]
        return all(c is leader or (c.role == FOLLOWER and c.coordinator == leader.node_id
                                   and c.term == leader.term) for c in cores)

    def run(self) -> Outcome:
        for node in self.nodes.values():
            self.boot(node)
        self.schedule(self.rng.uniform(0.05, 0.3), "fault", None)
        for name in self.clients:
            self.schedule(self.rng.uniform(0.5, 1.5), "client", name)
        if self.clients:
            self.schedule(self.rng.uniform(*ADMIN_EVERY_S), "admin", None)
        while self.events < self.min_events and self.step():
            pass
        # Faults stop: heal, restart, and the federation must settle (liveness).
        self.faulty = False
        self.blocked = set()
        for node in self.nodes.values():
            node.stalled_until = min(node.stalled_until, self.t)
            if node.core is None:
                self.boot(node)
        self.note("faults stop")
        quiet_from = self.t
        while self.t - quiet_from < self.settle_s and self.step():
            if self.settled():
                break
        if not self.settled():
            states = {n.node_id: (n.core.role, n.core.term, n.core.coordinator)
                      for n in self.nodes.values() if n.core is not None}
            self.violate(f"no single coordinator {self.settle_s:.0f}s after faults stopped: "
                         f"{states}")
        elif self.clients:
            # ... and rounds go on: the clients' updates commit (and are checked as they do),
            # once the admin resumes a paused federation (again, as long as a coordinator
            # runs paused with no decision pending: an unconfirmed resume may be lost).
            committed, settled_at = len(self.committed), self.t
            while self.t - settled_at < PROGRESS_S and self.step():
                for node in self.nodes.values():
                    if node.core.role == COORDINATOR and node.disk.pause.paused \
                            and node.pause_pending is None:
                        self.decide_pause(node, False)
            if len(self.committed) <= committed:
                self.violate(f"no round committed in {PROGRESS_S:.0f}s after the federation "
                             "settled")
        return Outcome(self.seed, self.events, self.violations, max(self.leaders, default=0),
                       self.digest.hexdigest(), self.trace)


def _same(one: Entry, other: Entry) -> bool:
    """The same round: number and updates. The term stamp is not part of it: a new coordinator
    proposes a pending round again in its own term (as the ledger's hash chain, which leaves
    the term out)."""
    return one[1:] == other[1:]


def _copy(disk: Disk) -> Disk:
    """Every field, however many Disk grows: a field left out here would survive a crash that
    loses unsynced writes, and the mutant would test less than it claims."""
    return copy.deepcopy(disk)


def _mixed(rng: random.Random, disk_rng: random.Random) -> Faults:
    """Each seed weighs the faults differently: some schedules are mostly crashes, some mostly
    partitions or lossy links, so that rarer interleavings come up too."""
    base = Faults()
    scale = {name: rng.choice((0.0, 0.5, 1.0, 3.0, 6.0)) for name in
             ("loss", "duplicate", "slow", "partition", "crash", "crash_after_answer", "stall",
              "clock_jump")}
    scale["slow_disk"] = disk_rng.choice((0.0, 0.5, 1.0, 3.0, 6.0))
    return Faults(**{name: min(0.5, getattr(base, name) * factor)
                     for name, factor in scale.items()})


def _brief(body: dict[str, Any]) -> str:
    out = []
    for key, value in sorted(body.items()):
        if isinstance(value, VoteRequest):
            value = (value.term, value.candidate, value.last_term, value.last_round, value.pre,
                     value.transfer)
        elif isinstance(value, list):
            value = (len(value), value[-1] if value else None)
        out.append(f"{key}={value}")
    return " ".join(out)


def explore(seeds: range, **kwargs: Any) -> tuple[int, int, list[str]]:
    """Run one schedule per seed; returns (schedules, events, violations). (A module-level
    function, so that a process pool can run ranges of seeds side by side.)"""
    events, violations = 0, []
    for seed in seeds:
        outcome = Simulation(seed, **kwargs).run()
        events += outcome.events
        violations += outcome.violations
    return len(seeds), events, violations
