"""The election core without sockets, sleeps or disks: every transition from a table, the core's
purity, and the seeded fault simulator (thousands of schedules, each replayable, and able to
find each election bug it is shown)."""

from __future__ import annotations

import ast
import functools
import multiprocessing
import time
from pathlib import Path

import pytest

from chorus_p2p.consensus import election, mutants
from chorus_p2p.consensus import pause as pause_rules
from chorus_p2p.consensus import rounds as rounds_rules
from chorus_p2p.consensus.pause import PauseStamp
from chorus_p2p.consensus.election import (CANDIDATE, COORDINATOR, FOLLOWER, Election,
                                           ElectionTiming, VoteRequest)
from chorus_p2p.consensus.simulation import Faults, Simulation, explore

CONSENSUS = Path(election.__file__).resolve().parent
TIMING = ElectionTiming(heartbeat_s=0.25, election_min_s=1.0, election_max_s=2.0)


class Lowest:
    """A 'random' source that always picks the shortest timeout: deadlines are exact."""

    def uniform(self, a: float, b: float) -> float:
        return a


def core(term: int = 3, voted_for: str | None = None, now: float = 100.0) -> Election:
    return Election("me", term, voted_for, now, Lowest(), TIMING)


def following(term: int = 3, heard_at: float = 100.0) -> Election:
    c = core(term)
    ok, _ = c.follow(term, "lead", "http://lead", heard_at, diverged=False)
    assert ok
    return c


def leading(term: int = 3, now: float = 100.0) -> Election:
    c = core(term - 1)
    c.become_coordinator(term, now, "http://me")
    return c


# -- votes ---------------------------------------------------------------------------------------
VOTES = [
    # (case, the voter, request, member, voter's log, granted, term after, vote persisted)
    ("a non-member gets nothing and moves no term", core(),
     VoteRequest(9, "c", 9, 9), False, (3, 5), False, 3, None),
    ("pre-vote: granted, nothing recorded", core(),
     VoteRequest(4, "c", 3, 5, pre=True), True, (3, 5), True, 3, None),
    ("pre-vote refused while our coordinator is heard", following(heard_at=100.0),
     VoteRequest(4, "c", 3, 5, pre=True), True, (3, 5), False, 3, None),
    ("pre-vote refused to a staler log", core(),
     VoteRequest(4, "c", 3, 4, pre=True), True, (3, 5), False, 3, None),
    ("pre-vote for our own term is refused", core(),
     VoteRequest(3, "c", 3, 5, pre=True), True, (3, 5), False, 3, None),
    ("a vote from an older term is refused", core(),
     VoteRequest(2, "c", 9, 9), True, (3, 5), False, 3, None),
    ("a newer term, free: granted, term and vote persisted", core(),
     VoteRequest(4, "c", 3, 5), True, (3, 5), True, 4, (4, "c")),
    ("a newer log term wins over a longer log", core(),
     VoteRequest(4, "c", 4, 1), True, (3, 9), True, 4, (4, "c")),
    ("one vote per term: refused to a second candidate", core(3, voted_for="other"),
     VoteRequest(3, "c", 3, 5), True, (3, 5), False, 3, None),
    ("asking again for the same vote is granted again", core(3, voted_for="c"),
     VoteRequest(3, "c", 3, 5), True, (3, 5), True, 3, (3, "c")),
    ("a staler log moves our term but gets no vote", core(),
     VoteRequest(5, "c", 2, 9), True, (3, 5), False, 5, None),
    ("CheckQuorum: no vote and no new term while our coordinator lives",
     following(heard_at=100.0), VoteRequest(5, "c", 3, 5), True, (3, 5), False, 3, None),
    ("a handover (transfer) is voted for though the coordinator lives",
     following(heard_at=100.0), VoteRequest(4, "c", 3, 5, transfer=True), True, (3, 5), True,
     4, (4, "c")),
    ("a coordinator with a majority refuses a candidate", leading(3),
     VoteRequest(4, "c", 3, 5), True, (3, 5), False, 3, None),
]


@pytest.mark.parametrize("case,voter,request_,member,log,granted,term,persisted", VOTES,
                         ids=[v[0] for v in VOTES])
def test_vote_table(case, voter, request_, member, log, granted, term, persisted):
    ready = voter.on_vote(request_, 100.5, member=member, quorum=2, log_position=log)
    assert ready.answer == {"term": term, "granted": granted}
    assert voter.term == term
    assert ready.persist_vote == persisted
    if term > 3 and not request_.pre:
        assert ready.persist_term == term  # a newer term is on disk before the answer leaves
    if granted and not request_.pre:
        assert voter.voted_for == request_.candidate
        assert voter.deadline == pytest.approx(100.5 + TIMING.election_min_s)


def test_a_stepped_down_coordinator_can_vote_in_the_new_term():
    c = leading(3)
    ready = c.on_vote(VoteRequest(4, "c", 3, 5), 102.0, member=True, quorum=2,
                      log_position=(3, 5))  # 2 s without a majority: quorum is stale
    assert ready.answer == {"term": 4, "granted": True}
    assert c.role == FOLLOWER and "follow" in ready.start
    assert ("coordinator_stepped_down" in [e for e, _, _ in ready.publish])


# -- ticks -------------------------------------------------------------------------------------
TICKS = [
    # (case, core, now, joined, woke, role after, starts, published)
    ("before the deadline nothing happens", core(), 100.5, True, False, FOLLOWER, [], []),
    ("the deadline passes: an election", core(), 101.0, True, False, FOLLOWER, ["election"], []),
    ("not joined: the chance is counted, not taken", core(), 101.0, False, False, FOLLOWER,
     [], []),
    ("a quiet coordinator is forgotten", following(heard_at=100.0), 102.1, True, False,
     FOLLOWER, ["election"], ["coordinator_lost"]),
    ("a coordinator beats at once", leading(), 100.0, True, False, COORDINATOR,
     ["heartbeat"], []),
    ("CheckQuorum: no majority for an election timeout, it steps down", leading(), 101.5, True,
     False, FOLLOWER, ["heartbeat", "follow"], ["coordinator_stepped_down"]),
]


@pytest.mark.parametrize("case,c,now,joined,woke,role,starts,published", TICKS,
                         ids=[t[0] for t in TICKS])
def test_tick_table(case, c, now, joined, woke, role, starts, published):
    before = c.election_timeouts
    ready = c.tick(now, quorum=2, joined=joined, woke=woke)
    assert c.role == role
    assert ready.start == starts
    assert [event for event, _, _ in ready.publish] == published
    if "election" in starts or not joined and now >= 101.0:
        assert c.election_timeouts == before + 1
        assert c.deadline == pytest.approx(now + TIMING.election_min_s)


def test_heartbeats_follow_their_interval_and_a_wake():
    c = leading(now=100.0)
    assert c.tick(100.0, quorum=2, joined=True).start == ["heartbeat"]
    assert c.tick(100.1, quorum=2, joined=True).start == []
    assert c.tick(100.1, quorum=2, joined=True, woke=True).start == ["heartbeat"]
    assert c.tick(100.36, quorum=2, joined=True).start == ["heartbeat"]
    assert c.heartbeats_sent == 3


def test_a_majority_answering_keeps_the_role():
    c = leading(now=100.0)
    c.heartbeat_quorum(3, 100.9)
    assert c.tick(101.5, quorum=2, joined=True).start == ["heartbeat"]
    assert c.role == COORDINATOR
    c.heartbeat_quorum(2, 101.6)  # an answer to an older term's heartbeat proves nothing
    assert c.last_quorum_at == 100.9


def test_the_bootstrap_wait_holds_the_first_election():
    c = core(now=100.0)
    c.start(100.0, alone=False, bootstrap_s=5.0, url=None)
    assert c.tick(103.0, quorum=2, joined=True).start == []
    assert c.tick(105.0, quorum=2, joined=True).start == ["election"]


def test_a_node_alone_leads_at_once_and_votes_for_itself():
    c = core(term=3)
    ready = c.start(100.0, alone=True, bootstrap_s=5.0, url="http://me")
    assert (c.role, c.term, c.coordinator) == (COORDINATOR, 4, "me")
    assert ready.persist_vote == (4, "me") and ready.persist_leader == (4, "me")
    assert ready.start == ["lead"]


# -- a campaign --------------------------------------------------------------------------------
def test_a_campaign_persists_its_own_vote_and_wins_with_a_majority():
    c = core(term=3)
    assert c.may_campaign(joined=True, diverged=False)
    assert not c.may_campaign(joined=True, diverged=True)
    assert c.pre_vote_won(3, 2, 2) and not c.pre_vote_won(3, 1, 2)
    assert not c.pre_vote_won(2, 2, 2)  # our term moved while we asked
    term, ready = c.campaign(100.0, voters=3)
    assert (term, c.role, c.voted_for, ready.persist_vote) == (4, CANDIDATE, "me", (4, "me"))
    won = c.election_result(4, 2, 2, 100.2, "http://me")
    assert (c.role, c.coordinator) == (COORDINATOR, "me")
    assert won.start == ["lead"] and won.persist_leader == (4, "me")
    assert won.persist_vote is None  # already on disk from the campaign


@pytest.mark.parametrize("case,votes,moved,role,published", [
    ("too few votes", 1, False, FOLLOWER, ["no_quorum"]),
    ("a newer term came while asking", 2, True, FOLLOWER, []),
])
def test_a_campaign_that_fails(case, votes, moved, role, published):
    c = core(term=3)
    term, _ = c.campaign(100.0, voters=3)
    if moved:
        c.on_reply_term(7, 100.1, who="x")
    ready = c.election_result(term, votes, 2, 100.2, None)
    assert c.role == role and [e for e, _, _ in ready.publish] == published
    assert c.coordinator is None


def test_a_handover_skips_the_pre_vote_and_campaigns_at_the_next_tick():
    c = following(heard_at=100.0)
    assert not c.on_timeout_now(2)  # from an older term: ignored
    assert c.on_timeout_now(3)
    assert c.tick(100.01, quorum=2, joined=True).start == ["election"]
    assert c.take_transfer() and not c.take_transfer()
    assert not leading().on_timeout_now(3)


# -- following ---------------------------------------------------------------------------------
FOLLOWS = [
    # (case, core, term, coordinator, diverged, followed, role, term after, persisted leader)
    ("an older term is refused", core(3), 2, "lead", False, False, FOLLOWER, 3, None),
    ("a diverged history follows nobody", core(3), 3, "lead", True, False, FOLLOWER, 3, None),
    ("a newer term is followed and recorded", core(3), 4, "lead", False, True, FOLLOWER, 4,
     (4, "lead")),
    ("a candidate yields to its term's coordinator", None, 4, "lead", False, True, FOLLOWER, 4,
     (4, "lead")),
    ("two coordinators in one term both yield", leading(3), 3, "other", False, False, FOLLOWER,
     3, None),
    ("a coordinator follows a newer term", leading(3), 5, "other", False, True, FOLLOWER, 5,
     (5, "other")),
]


@pytest.mark.parametrize("case,c,term,coordinator,diverged,followed,role,after,leader", FOLLOWS,
                         ids=[f[0] for f in FOLLOWS])
def test_follow_table(case, c, term, coordinator, diverged, followed, role, after, leader):
    if c is None:
        c = core(3)
        c.campaign(99.0, voters=3)  # a candidate of term 4
    ok, ready = c.follow(term, coordinator, "http://x", 100.0, diverged=diverged)
    assert (ok, c.role, c.term) == (followed, role, after)
    assert ready.persist_leader == leader
    if ok:
        assert (c.coordinator, c.last_heartbeat) == (coordinator, 100.0)


def test_the_same_coordinator_is_recorded_once_and_a_leave_forgets_it():
    c = following()
    again, ready = c.follow(3, "lead", "http://lead", 100.2, diverged=False)
    assert again and ready.persist_leader is None and ready.publish == []
    c.on_leave("someone-else")
    assert c.coordinator == "lead"
    c.on_leave("lead")
    assert c.coordinator is None


def test_a_reply_from_a_newer_term_sends_a_coordinator_back():
    c = leading(3)
    assert c.on_reply_term(4, 100.1, granted=True).start == []  # a granted vote: our own term
    ready = c.on_reply_term(4, 100.1, who="x")
    assert (c.role, c.term, ready.persist_term) == (FOLLOWER, 4, 4)
    assert c.resign().start == []  # nothing left to resign
    assert leading().resign().start == ["follow"]


# -- membership ---------------------------------------------------------------------------------
# Every (status, event) pair, written out rather than derived from the module's table.
# (columns: live, lost, left, dormant, pending, rejected, removed)
MEMBERSHIP = {
    "answered": ("live", "live", "live", "live", "pending", "rejected", "removed"),
    "silent": ("lost", "lost", "left", "dormant", "pending", "rejected", "removed"),
    "member_timeout": ("live", "dormant", "dormant", "dormant", "pending", "rejected", "removed"),
    "said_goodbye": ("left", "left", "left", "left", "pending", "rejected", "removed"),
    "came_back": ("live", "lost", "lost", "dormant", "pending", "rejected", "removed"),
    "approved": ("live", "lost", "left", "dormant", "lost", "rejected", "removed"),
    "rejected": ("live", "lost", "left", "dormant", "rejected", "rejected", "removed"),
    "removed": ("removed", "removed", "removed", "removed", "removed", "removed", "removed"),
    "listed_live": ("live", "live", "live", "live", "live", "rejected", "removed"),
    "listed_lost": ("lost", "lost", "left", "dormant", "pending", "rejected", "removed"),
    "listed_left": ("left", "left", "left", "left", "left", "rejected", "removed"),
    "listed_dormant": ("dormant", "dormant", "dormant", "dormant", "dormant",
                       "rejected", "removed"),
    "listed_rejected": ("rejected", "rejected", "rejected", "rejected", "rejected",
                        "rejected", "removed"),
    "listed_removed": ("removed", "removed", "removed", "removed", "removed",
                       "removed", "removed"),
}


@pytest.mark.parametrize("event", sorted(MEMBERSHIP))
def test_membership_table(event):
    from chorus_p2p.consensus import membership

    assert set(MEMBERSHIP) == set(membership.EVENTS)
    for status, expected in zip(membership.STATUSES, MEMBERSHIP[event]):
        assert membership.after(status, event) == expected, (status, event)


def test_an_admins_decision_stands_against_a_stale_member_list():
    """The old code let a list saying "dormant" turn a removed member into a dormant one, which
    counts again the moment it answers."""
    from chorus_p2p.consensus import membership

    for decided in ("rejected", "removed"):
        for status in ("live", "lost", "left", "dormant"):
            assert membership.after(decided, membership.listed(status)) == decided
            assert not membership.counts(membership.after(decided, "answered"), True)
    assert membership.listed("pending") is None
    with pytest.raises(ValueError, match="unknown membership event"):
        membership.after("live", "listed_pending")
    with pytest.raises(ValueError, match="unknown member status"):
        membership.after("gone", "answered")


def test_who_counts_toward_a_majority():
    from chorus_p2p.consensus import membership

    counted = [s for s in membership.STATUSES if membership.counts(s, True)]
    assert counted == ["live", "lost", "left"]  # a goodbye never shrinks the majority
    assert not membership.counts("live", False)  # unverified: a hello from a made-up key


# -- the round rules ---------------------------------------------------------------------------
POSITIONS = [
    # (case, closed (term, round), live round, held terms, position)
    ("nothing yet", None, None, [], (0, 0, 1)),
    ("a committed round", (2, 4), None, [], (2, 4, 1)),
    ("an open round holding nothing is no claim", (2, 4), 5, [], (2, 4, 1)),
    ("held updates of a later term than the newest closed round", (1, 4), 5, [3, 2], (3, 5, 0)),
    ("held updates rank below the same term's closed round", (3, 5), None, [], (3, 5, 1)),
    ("an update accepted before terms were recorded counts as term 0", (0, 1), 2, [None],
     (0, 2, 0)),
]


@pytest.mark.parametrize("case,closed,live,terms,position", POSITIONS,
                         ids=[p[0] for p in POSITIONS])
def test_log_position_table(case, closed, live, terms, position):
    from chorus_p2p.consensus.rounds import log_position

    assert log_position(closed, live, terms) == position


def test_a_member_holding_an_acknowledged_update_refuses_a_stale_proposer():
    """The schedule the simulator found: a member holding an update acknowledged in term 2
    for round 2 voted for a node whose only claim was its term-1 proposal of round 2."""
    from chorus_p2p.consensus.rounds import log_position

    voter = core(term=2)
    holding = log_position((1, 1), 2, [2])
    stale = voter.on_vote(VoteRequest(3, "c", 1, 2), 100.0, member=True, quorum=2,
                          log_position=holding)
    assert stale.answer["granted"] is False
    # one that holds the round closed in the same term is ahead of held updates
    voter = core(term=2)
    ahead = voter.on_vote(VoteRequest(3, "c", 2, 2), 100.0, member=True, quorum=2,
                          log_position=holding)
    assert ahead.answer["granted"] is True
    # and a candidate holding only updates is behind a voter holding that round closed
    voter = core(term=2)
    behind = voter.on_vote(VoteRequest(3, "c", 2, 2, last_closed=False), 100.0, member=True,
                           quorum=2, log_position=log_position((2, 2), None, []))
    assert behind.answer["granted"] is False
    assert VoteRequest.from_body({"term": 3, "candidate": "c", "last_term": 2,
                                  "last_round": 2}).last_closed  # an older node's request


@pytest.mark.parametrize("closed_term,live_term,replaces", [(3, 3, False), (3, 2, False),
                                                              (3, 4, True), (None, 1, True)])
def test_only_a_later_terms_live_round_reopens_a_closed_one(closed_term, live_term, replaces):
    from chorus_p2p.consensus.rounds import replaces_closed

    assert replaces_closed(closed_term, live_term) is replaces


# -- when a round closes and commits (consensus.rounds) ----------------------------------------
@pytest.mark.parametrize("case,min_updates,previous,abstaining,result", [
    ("first round: the floor", 2, set(), set(), (2, 2, None)),
    ("wait for last round's participants", 2, {"a", "b", "c"}, set(), (2, 3, None)),
    ("one stopped taking part: wait for the rest", 2, {"a", "b", "c"}, {"c"}, (2, 2, None)),
    ("too few left: the floor stays and the admin is told", 2, {"a", "b"}, {"b"},
     (2, 2, 1)),
    ("an abstainer outside the round changes nothing", 1, {"a"}, {"z"}, (1, 1, None)),
])
def test_participation_table(case, min_updates, previous, abstaining, result):
    assert rounds_rules.participation(min_updates, previous, abstaining) == result


@pytest.mark.parametrize("count,needed,expected,deadline,force,closes", [
    (1, 2, 3, False, False, False),  # too few
    (2, 2, 3, False, False, False),  # enough, but someone expected is still training
    (3, 2, 3, False, False, True),   # everyone expected
    (2, 2, 3, True, False, True),    # enough, and the deadline passed
    (1, 2, 3, True, False, False),   # the deadline passed with too few: it waits
    (1, 2, 3, False, True, True),    # an admin's close needs one update
    (0, 2, 3, True, True, False),    # ... and refuses with none
])
def test_close_table(count, needed, expected, deadline, force, closes):
    assert rounds_rules.closes(count, needed, expected, deadline_passed=deadline,
                               force=force) is closes


@pytest.mark.parametrize("holders,voting,quorum,commits", [
    ({"a", "b"}, ["a", "b", "c"], 2, True),
    ({"a"}, ["a", "b", "c"], 2, False),
    ({"a", "gone"}, ["a", "b", "c"], 2, False),  # a member that left since does not count
    ({"a"}, ["a"], 1, True),
])
def test_commit_table(holders, voting, quorum, commits):
    assert rounds_rules.commits(holders, voting, quorum) is commits


# -- the pause register (consensus.pause) ------------------------------------------------------
P = PauseStamp


@pytest.mark.parametrize("case,held,term,paused,stamp", [
    ("first decision of a term", P(2, 3, True), 4, False, P(4, 1, False)),
    ("next decision in the same term", P(4, 1, False), 4, True, P(4, 2, True)),
    ("the same decision again is still a new stamp", P(4, 2, True), 4, True, P(4, 3, True)),
])
def test_decide_table(case, held, term, paused, stamp):
    assert pause_rules.decide(held, term, paused) == stamp


@pytest.mark.parametrize("case,own,granted,term,adopted", [
    ("a voter holds a newer decision", P(2, 1, False), [P(3, 2, True), P(1, 1, False)], 5,
     P(5, 0, True)),
    ("ours is the newest", P(3, 4, False), [P(3, 2, True)], 5, P(5, 0, False)),
    ("alone (no voters)", P(1, 1, True), [], 2, P(2, 0, True)),
    ("nothing ever decided", P(), [P(), P()], 1, P(1, 0, False)),
])
def test_a_winner_adopts_the_newest_pause_and_restamps_it(case, own, granted, term, adopted):
    assert pause_rules.at_election(own, granted, term) == adopted


@pytest.mark.parametrize("case,own,theirs,follows", [
    ("the coordinator's next decision", P(4, 1, True), P(4, 2, False), True),
    ("a late heartbeat of the same coordinator (the simulator's seed 319)", P(1, 1, True),
     P(1, 0, False), False),
    ("a new coordinator replaces an unconfirmed decision", P(3, 2, True), P(4, 0, False), True),
    ("the same stamp again", P(4, 1, True), P(4, 1, True), False),
])
def test_follow_table_of_the_pause(case, own, theirs, follows):
    assert pause_rules.follows(own, theirs) is follows


@pytest.mark.parametrize("held,quorum,confirmed", [
    ({"a": P(4, 2, True), "b": P(4, 1, False), "c": P(3, 9, True)}, 2, False),
    ({"a": P(4, 2, True), "b": P(4, 2, True), "c": P(3, 9, True)}, 2, True),
    ({"a": P(4, 2, True), "b": P(4, 3, False)}, 2, True),  # b holds a later decision
    ({"a": P(4, 2, True)}, 1, True),  # a federation of one
])
def test_a_pause_is_confirmed_by_a_majority_holding_it_or_newer(held, quorum, confirmed):
    assert pause_rules.confirmed(P(4, 2, True), held, quorum) is confirmed


@pytest.mark.parametrize("value,stamp", [
    ([4, 2, True], P(4, 2, True)), (None, None), ([4, 2], None), ([4, "2", True], None),
    ([True, 2, True], None), ([4, 2, 1], None), ([-1, 0, False], None)])
def test_a_peers_pause_stamp_is_read_or_ignored(value, stamp):
    assert PauseStamp.from_wire(value) == stamp
    if stamp is not None:
        assert stamp.to_wire() == value


# -- purity ------------------------------------------------------------------------------------
IO_MODULES = {"asyncio", "socket", "sqlite3", "sqlite_utils", "time", "aiohttp", "os",
              "threading", "subprocess", "selectors", "zeroconf", "datetime", "torch"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add((node.module or "").split(".")[0])
    return names


def test_the_core_has_no_clock_network_disk_or_global_random():
    for path in CONSENSUS.glob("*.py"):
        imported = _imports(path)
        assert not imported & IO_MODULES, f"{path.name} imports {imported & IO_MODULES}"
        assert imported <= {"__future__", "copy", "dataclasses", "typing", "heapq", "hashlib",
                            "random", "chorus_p2p"}, f"{path.name}: {imported}"
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # randomness only from a seeded or injected generator
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "random":
                assert node.attr == "Random", f"{path.name} uses random.{node.attr}"
        if path.name == "election.py":
            assert "random" not in imported  # the election draws only from what it is given


def test_the_node_drives_this_core():
    """Cluster is the shell: its election state is the core's, read-only."""
    from chorus_p2p.node import cluster

    source = Path(cluster.__file__).read_text()
    assert "Election(" in source
    for field in ("role", "term", "coordinator", "coordinator_url", "last_quorum_at"):
        assert f"self.{field} = " not in source, f"Cluster writes {field} itself"


# -- the simulator -----------------------------------------------------------------------------
def _explore(first: int, count: int, clients: int = 3) -> tuple[int, int, list[str]]:
    return explore(range(first, first + count), clients=clients)


def test_ten_thousand_seeded_fault_schedules_lose_nothing():
    """Elections, rounds, holds, recoveries and acknowledgements under seeded faults, both
    cores busy: no violation of any invariant the simulator checks (issue 23's target: 10,000
    in CI). benchmarks/simulate_faults.py --first-seed explores new seeds for longer."""
    started = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_explore, [(0, 5_000), (5_000, 5_000)])
    elapsed = time.monotonic() - started
    schedules = sum(r[0] for r in results)
    events = sum(r[1] for r in results)
    violations = [v for r in results for v in r[2]]
    assert violations == []
    assert schedules == 10_000 and events >= 200 * schedules
    print(f"{schedules} schedules, {events} events in {elapsed:.1f} s "
          f"({schedules / elapsed:.0f} schedules/s)")


def test_a_seed_replays_exactly():
    first, again, other = Simulation(41).run(), Simulation(41).run(), Simulation(42).run()
    assert first.digest == again.digest and first.events == again.events
    assert first.digest != other.digest


def test_schedules_really_are_hostile_and_rounds_really_commit():
    """A simulator that never crashes or partitions anything, or whose rounds never commit,
    proves nothing."""
    seen, commits, acks = set(), 0, 0
    for seed in range(60):
        simulation = Simulation(seed, keep_trace=True)
        outcome = simulation.run()
        commits += len(simulation.committed)
        acks += simulation.acks
        for line in outcome.trace:
            word = line.split()[1]
            if word in ("crash", "kill", "partition", "one-way", "stall", "clock", "disk"):
                seen.add(word)
            for what in ("elected", "recovered", "proposes round", "acknowledges", "confirms",
                         "not opened"):
                if what in line:
                    seen.add(what)
        seen.add(f"terms>={min(outcome.terms, 3)}")
    assert {"crash", "kill", "partition", "one-way", "stall", "clock", "disk", "elected",
            "recovered", "proposes round", "acknowledges", "confirms", "not opened",
            "terms>=3"} <= seen
    assert commits >= 60 * 5 and acks >= 60 * 10


def test_faults_stopping_leaves_one_coordinator_that_everyone_follows():
    simulation = Simulation(7, faults=Faults(loss=0.3, partition=0.2, crash=0.1))
    outcome = simulation.run()
    assert outcome.violations == []
    assert simulation.settled()


# Each bug brought back (mutants.MUTANTS), with the schedules that find it: the search is over
# seeds in order, so it is deterministic and stops at the first violation (10,000 at most).
BUGS = [
    ({"vote_twice"}, 3),
    ({"vote_for_stale_log"}, 3),
    ({"stale_hold_reopens"}, 3),
    # the two historical loss bugs, in the code as it was then (no held-update rule either)
    ({"open_without_recovery", "ignore_held_updates"}, 3),
    ({"ignore_accept_term", "ignore_held_updates"}, 3),
    # the pause as it was (answered at once), and a winner that ignores its voters' pause
    ({"pause_answered_at_once"}, 3),
    ({"forget_pause_at_election"}, 3),
    # a node that answers before its writes are on disk (a crash loses them)
    ({"unsynced_writes"}, 3),
]


def _first_violation(bug: frozenset[str], clients: int, seeds: range
                     ) -> tuple[int, list[str]] | None:
    """The first seed of ``seeds`` whose schedule breaks an invariant with ``bug`` on."""
    mutants.MUTANTS.clear()
    mutants.MUTANTS.update(bug)
    for seed in seeds:
        found = Simulation(seed, clients=clients).run().violations
        if found:
            return seed, found
    return None


@pytest.mark.parametrize("bug,clients", BUGS, ids=["+".join(sorted(b)) for b, _ in BUGS])
def test_the_simulator_finds_each_bug_brought_back(bug, clients):
    """Blocks of seeds, in order, on both cores: the first block with a violation gives the
    same seed as a search one by one would."""
    started, result = time.monotonic(), None
    blocks = [range(first, first + 100) for first in range(0, 10_000, 100)]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for result in pool.imap(functools.partial(_first_violation, frozenset(bug), clients),
                                blocks):
            if result is not None:
                break
    assert result is not None, f"{bug}: no violation in 10,000 schedules"
    seed, found = result
    print(f"{sorted(bug)}: after {seed + 1} schedules, {time.monotonic() - started:.1f} s: "
          f"{found[0]}")
    # and it was the bug, not the schedule
    assert mutants.MUTANTS == set()
    assert Simulation(seed, clients=clients).run().violations == []


# Bugs whose search from seed 0 takes the simulator longer than CI should spend (7,570 and 1,608
# schedules, 33 s and 11 s quiet): CI replays the seed the search found, with the bug and without;
# `benchmarks/simulate_faults.py --mutant ... --stop-at-first` repeats the search (README).
RARE_BUGS = [
    ({"unpersisted_vote"}, 0, 7569),  # elections only: more of them per event
    # the first historical loss bug with today's other rules in place
    ({"open_without_recovery"}, 3, 1607),
]


@pytest.mark.parametrize("bug,clients,seed", RARE_BUGS,
                         ids=["+".join(sorted(b)) for b, _, _ in RARE_BUGS])
def test_the_simulator_finds_rarer_bugs_at_the_seed_their_search_found(bug, clients, seed):
    mutants.MUTANTS.update(bug)
    try:
        found = Simulation(seed, clients=clients).run().violations
    finally:
        mutants.MUTANTS.clear()
    assert found, f"{sorted(bug)}: seed {seed} no longer shows it; search again (README)"
    assert Simulation(seed, clients=clients).run().violations == []  # the bug, not the schedule


def test_a_schedule_replays_from_the_command_line():
    """README's commands: replay a seed (with a bug brought back, it prints the violation and
    exits 1), trace it, and explore for a while."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "simulate_faults.py"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), *args], capture_output=True,
                              text=True, timeout=300)
    bug = run("--seed", "2010", "--mutant", "ignore_accept_term", "--mutant",
              "ignore_held_updates")
    assert bug.returncode == 1 and "acknowledged update" in bug.stdout, bug.stdout[-2000:]
    clean = run("--seed", "2010", "--trace")
    assert clean.returncode == 0 and clean.stdout.rstrip().endswith("no violation")
    assert " acknowledges " in clean.stdout and " elected term " in clean.stdout
    explored = run("--minutes", "0.01", "--workers", "1")
    assert explored.returncode == 0 and "violations: 0" in explored.stdout, explored.stdout
    searched = run("--mutant", "vote_twice", "--stop-at-first", "--minutes", "1", "--workers", "1")
    assert searched.returncode == 1, searched.stdout[-2000:]
    assert "first violation after 7 schedules (seed 6)" in searched.stdout, searched.stdout[:2000]
