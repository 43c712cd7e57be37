"""Who coordinates: Raft's election with Pre-Vote, CheckQuorum and leadership transfer, as a
pure state machine.

Why pure: every election bug this project had was found by 25-minute chaos runs on real
processes, because the rules lived among timers, sockets and SQLite. Here the rules take the
time as an argument, draw randomness from the ``Random`` they were given, and return a
:class:`Ready` that says what the caller must do, in order: persist, publish, start, answer
(the shape of etcd's raft ``Step``/``Ready``). The node's ``Cluster`` is the shell that does it
over HTTP and SQLite; ``consensus.simulation`` is another shell, over a seeded fake network,
that runs thousands of fault schedules a minute against the same code.

Inputs the core does not own, passed in by the shell: the quorum size (membership), whether
this node has joined its federation, whether its history diverged, and its log position
(the newest (term, round) it holds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from chorus_p2p.consensus.mutants import MUTANTS  # test-only bug switches; empty in real runs

FOLLOWER, CANDIDATE, COORDINATOR = "follower", "candidate", "coordinator"


class Uniform(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True)
class ElectionTiming:
    heartbeat_s: float = 0.25
    election_min_s: float = 1.0
    election_max_s: float = 2.0


@dataclass
class Ready:
    """What one step asks of the shell, in this order: persist (before anything is sent or
    answered: a vote that is not on disk can be given twice after a crash), publish, start,
    answer."""

    persist_term: int | None = None
    persist_vote: tuple[int, str] | None = None  # (term, candidate)
    persist_leader: tuple[int, str] | None = None  # (term, coordinator): the terms history
    publish: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    # "heartbeat" (send one to every member), "election" (run one), "lead" (open the rounds
    # as coordinator of this term), "follow" (stop acting as coordinator)
    start: list[str] = field(default_factory=list)
    answer: dict[str, Any] | None = None

    def add(self, other: "Ready") -> "Ready":
        """Fold a later step into this one (later persists overwrite: they are newer)."""
        for name in ("persist_term", "persist_vote", "persist_leader", "answer"):
            if getattr(other, name) is not None:
                setattr(self, name, getattr(other, name))
        self.publish += other.publish
        self.start += other.start
        return self


@dataclass(frozen=True)
class VoteRequest:
    term: int
    candidate: str
    last_term: int
    last_round: int
    pre: bool = False  # a pre-vote: "would you vote for me?", changing nothing
    transfer: bool = False  # the coordinator handed over (timeout-now): vote even if it lives
    # the candidate's newest round is closed (proposed or committed), not only updates held
    # for it (consensus.rounds.log_position); absent from older nodes, which meant closed
    last_closed: bool = True

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "VoteRequest":
        return cls(int(body["term"]), str(body["candidate"]), int(body["last_term"]),
                   int(body["last_round"]), body.get("pre") is True,
                   body.get("transfer") is True, body.get("last_closed") is not False)

    @property
    def position(self) -> tuple[int, int, int]:
        return (self.last_term, self.last_round, int(self.last_closed))


class Election:
    """One node's view of the election. Durable state: ``term`` and ``voted_for`` (this
    term's vote). Everything else is volatile and rebuilt from nothing after a restart."""

    def __init__(self, node_id: str, term: int, voted_for: str | None, now: float,
                 rng: Uniform, timing: ElectionTiming | None = None):
        self.node_id = node_id
        self.timing = timing or ElectionTiming()
        self.rng = rng
        self.term = term
        self.voted_for = voted_for
        self.role = FOLLOWER
        self.coordinator: str | None = None
        self.coordinator_url: str | None = None
        self.last_heartbeat = float("-inf")  # from our coordinator
        self.last_quorum_at = now  # a majority answered our heartbeat (as coordinator)
        self.bootstrap_until = now
        self.deadline = now
        self.next_beat = now
        self.transfer = False  # the next election is a handover: no pre-vote
        self.election_timeouts = 0  # chances to lead (status shows them; tests wait on them)
        self.heartbeats_sent = 0
        self.reset_timer(now)

    # -- queries -------------------------------------------------------------------------------
    def quorum_fresh(self, now: float, quorum: int) -> bool:
        """A coordinator that heard from a majority within an election timeout."""
        return self.role == COORDINATOR and (
            quorum <= 1 or now - self.last_quorum_at <= self.timing.election_min_s)

    def hears_coordinator(self, now: float, quorum: int) -> bool:
        """We lead with a majority, or heard our coordinator within an election timeout."""
        if self.role == COORDINATOR:
            return self.quorum_fresh(now, quorum)
        return self.coordinator is not None and \
            now - self.last_heartbeat < self.timing.election_min_s

    def has_quorum(self, now: float, quorum: int) -> bool:
        """In contact with a majority now (as follower: heard our coordinator lately)."""
        if self.role == COORDINATOR:
            return self.quorum_fresh(now, quorum)
        return self.coordinator is not None and \
            now - self.last_heartbeat < self.timing.election_max_s

    # -- timers --------------------------------------------------------------------------------
    def reset_timer(self, now: float) -> None:
        self.deadline = now + self.rng.uniform(self.timing.election_min_s,
                                               self.timing.election_max_s)

    def start(self, now: float, *, alone: bool, bootstrap_s: float, url: str | None) -> Ready:
        """Begin: a node alone (no discovery, no peers) leads at once; others wait
        ``bootstrap_s`` so that machines started together find each other first."""
        ready = Ready()
        if alone:
            ready.add(self.become_coordinator(self.term + 1, now, url))
        self.bootstrap_until = now + (0 if alone else bootstrap_s)
        self.reset_timer(now)
        return ready

    def tick(self, now: float, *, quorum: int, joined: bool, woke: bool = False) -> Ready:
        ready = Ready()
        if self.role == COORDINATOR:
            if woke or now >= self.next_beat:
                self.next_beat = now + self.timing.heartbeat_s
                self.heartbeats_sent += 1
                ready.start.append("heartbeat")
            if not self.quorum_fresh(now, quorum):
                # CheckQuorum: no majority within an election timeout. Writes stopped already
                # (quorum_fresh); the role goes so that the majority side can elect.
                ready.add(self.step_down(self.term, now,
                                         "lost contact with a majority (no quorum)"))
            return ready
        if self.coordinator is not None and \
                now - self.last_heartbeat > self.timing.election_max_s:
            # Our coordinator went quiet: stop sending writers to it.
            self.coordinator = self.coordinator_url = None
            ready.publish.append(("coordinator_lost", {"term": self.term}, "warning"))
        if now >= self.deadline and now >= self.bootstrap_until:
            # A chance to lead, taken when joined.
            self.election_timeouts += 1
            if joined:
                ready.start.append("election")
            self.reset_timer(now)
        return ready

    # -- role changes --------------------------------------------------------------------------
    def become_coordinator(self, term: int, now: float, url: str | None) -> Ready:
        ready = Ready(persist_leader=(term, self.node_id), start=["lead"])
        if term > self.term:
            self.voted_for = None
        self.term = term
        self.role = COORDINATOR
        self.coordinator = self.node_id
        self.coordinator_url = url
        self.last_quorum_at = now
        self.next_beat = now
        if self.voted_for is None:  # a node alone votes for itself without asking
            self.voted_for = self.node_id
            ready.persist_vote = (term, self.node_id)
        ready.publish.append(("coordinator_elected", {"term": term, "node_id": self.node_id},
                              "info"))
        return ready

    def step_down(self, term: int, now: float, reason: str) -> Ready:
        ready = Ready()
        was = self.role
        if term > self.term:
            self.term = term
            self.voted_for = None
            ready.persist_term = term
        self.role = FOLLOWER
        if was == COORDINATOR:
            self.coordinator = self.coordinator_url = None
            ready.start.append("follow")
            ready.publish.append(("coordinator_stepped_down",
                                  {"term": self.term, "reason": reason}, "warning"))
        self.reset_timer(now)
        return ready

    def resign(self) -> Ready:
        """Stopping cleanly: stop acting as coordinator before anything else, so that no
        upload is acknowledged that this node will no longer replicate."""
        if self.role != COORDINATOR:
            return Ready()
        self.role = FOLLOWER
        return Ready(start=["follow"])

    # -- this node's campaign ------------------------------------------------------------------
    def may_campaign(self, *, joined: bool, diverged: bool) -> bool:
        """A node whose history diverged must not lead anyone into it."""
        return self.role != COORDINATOR and joined and not diverged

    def take_transfer(self) -> bool:
        transfer, self.transfer = self.transfer, False
        return transfer

    def vote_request(self, term: int, log_position: tuple[int, ...], *, pre: bool = False,
                     transfer: bool = False) -> VoteRequest:
        term_, round_, closed = _position(log_position)
        return VoteRequest(term, self.node_id, term_, round_, pre, transfer, bool(closed))

    def pre_vote_won(self, start_term: int, votes: int, quorum: int) -> bool:
        """A pre-vote counts only if nothing changed while we asked."""
        return votes >= quorum and self.term == start_term and self.role != COORDINATOR

    def campaign(self, now: float, voters: int) -> tuple[int, Ready]:
        """Start a real election: a new term, our own vote persisted before anyone is asked."""
        term = self.term + 1
        self.term = term
        self.role = CANDIDATE
        self.coordinator = self.coordinator_url = None
        self.voted_for = self.node_id
        ready = Ready(persist_vote=(term, self.node_id))
        ready.publish.append(("election_started", {"term": term, "voters": voters}, "info"))
        return term, ready

    def election_result(self, term: int, votes: int, quorum: int, now: float,
                        url: str | None) -> Ready:
        if self.role != CANDIDATE or self.term != term:
            return Ready()  # the world moved on while we asked (a newer term, a coordinator)
        if votes >= quorum:
            return self.become_coordinator(term, now, url)
        self.role = FOLLOWER
        return Ready(publish=[("no_quorum", {"term": term, "votes": votes, "needed": quorum},
                               "warning")])

    def on_reply_term(self, term: int, now: float, granted: bool = False,
                      who: str = "a peer") -> Ready:
        """Any answer from a newer term sends us back to follower in that term (a vote that
        was granted never does: it is our own term)."""
        if term > self.term and not granted:
            return self.step_down(term, now, f"{who} is in a newer term")
        return Ready()

    def heartbeat_quorum(self, term: int, sent: float) -> None:
        """A majority answered the heartbeat sent at ``sent``: we led until then at least."""
        if self.role == COORDINATOR and self.term == term:
            self.last_quorum_at = max(self.last_quorum_at, sent)

    # -- other nodes' requests -----------------------------------------------------------------
    def on_vote(self, request: VoteRequest, now: float, *, member: bool, quorum: int,
                log_position: tuple[int, ...]) -> Ready:
        """Answer a (pre-)vote. ``member``: the candidate is a verified member (a pending,
        rejected or unknown node can neither win votes nor push our term up)."""
        if not member:
            return Ready(answer={"term": self.term, "granted": False})
        up_to_date = request.position >= _position(log_position) \
            or "vote_for_stale_log" in MUTANTS
        if request.pre:
            # Pre-Vote: would we vote? Nothing is recorded and no term changes.
            return Ready(answer={"term": self.term,
                                 "granted": request.term > self.term and up_to_date
                                 and not self.hears_coordinator(now, quorum)})
        if request.term < self.term:
            return Ready(answer={"term": self.term, "granted": False})
        if not request.transfer and self.hears_coordinator(now, quorum):
            # CheckQuorum's other half: while a coordinator is alive, a candidate (say, one
            # back from a partition) neither gets our vote nor raises our term.
            return Ready(answer={"term": self.term, "granted": False})
        ready = Ready()
        if request.term > self.term:
            ready.add(self.step_down(request.term, now, "a candidate started a newer term"))
        free = self.voted_for in (None, request.candidate) or "vote_twice" in MUTANTS
        granted = free and up_to_date
        if granted:
            self.voted_for = request.candidate
            if "unpersisted_vote" not in MUTANTS:
                ready.persist_vote = (request.term, request.candidate)  # before the answer leaves
            self.reset_timer(now)
        ready.answer = {"term": self.term, "granted": granted}
        return ready

    def follow(self, term: int, coordinator: str, url: str | None, now: float, *,
               diverged: bool) -> tuple[bool, Ready]:
        """A coordinator's heartbeat (or hold) for ``term``: follow it if Raft allows. The
        shell has already checked that the sender is a member it may follow."""
        if term < self.term or diverged:
            return False, Ready()
        if self.role == COORDINATOR and term == self.term and coordinator != self.node_id:
            # Two coordinators in one term can only come from disjoint bootstraps: both yield.
            return False, self.step_down(term, now, "another coordinator holds this term")
        ready = Ready()
        if term > self.term or self.role != FOLLOWER:
            ready.add(self.step_down(term, now, "following a coordinator"))
        if self.coordinator != coordinator:
            ready.persist_leader = (term, coordinator)
            ready.publish.append(("coordinator_seen", {"term": term, "node_id": coordinator},
                                  "info"))
        self.coordinator = coordinator
        self.coordinator_url = url
        self.last_heartbeat = now
        self.reset_timer(now)
        return True, ready

    def on_timeout_now(self, term: int) -> bool:
        """The coordinator hands over to us: campaign at once, without a pre-vote."""
        if term >= self.term and self.role != COORDINATOR:
            self.transfer = True
            self.campaign_soon()
            return True
        return False

    def campaign_soon(self) -> None:
        """Take the next chance to lead at the next tick (a handover; a forced removal)."""
        self.bootstrap_until = float("-inf")
        self.deadline = float("-inf")

    def on_leave(self, node_id: str) -> None:
        if node_id == self.coordinator:
            self.coordinator = self.coordinator_url = None


def _position(log_position: tuple[int, ...]) -> tuple[int, int, int]:
    """(term, round, closed); a (term, round) pair is a closed round."""
    return (*log_position, 1)[:3] if len(log_position) == 2 else tuple(log_position)[:3]
