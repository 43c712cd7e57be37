"""The round state machine's table (federation/round_states.py), walked whole on a real ledger
file: every allowed move is written, every other one is refused and writes nothing. No sockets,
no sleeps; the node's own moves are exercised by every round the other tests run."""

from __future__ import annotations

import itertools

import pytest

from chorus_p2p.federation.round_states import (COMMITTED, MOVES, PROPOSED, STATES, InvalidMove,
                                                check_move)
from chorus_p2p.node.ledger import Ledger


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    yield ledger
    ledger.close()


def _round(ledger: Ledger, number: int, state: str) -> None:
    ledger.insert_round({"round": number, "state": state, "term": 1, "trained_from": number - 1,
                         "opened_at": 1.0, "deadline_at": 2.0})


def test_the_table_names_only_known_states_and_committed_is_final():
    assert set(MOVES) == set(STATES)
    assert all(set(targets) <= set(STATES) for targets in MOVES.values())
    assert MOVES[COMMITTED] == {}
    # forward only, except one way back: an aggregation that produced nothing collects again
    order = {state: i for i, state in enumerate(STATES)}
    backwards = {(old, new) for old, targets in MOVES.items() for new in targets
                 if order[new] < order[old]}
    assert backwards == {("aggregating", "collecting")}


@pytest.mark.parametrize("old,new", list(itertools.product(STATES, STATES)))
def test_each_move_is_written_or_refused_whole(ledger, old, new):
    _round(ledger, 5, old)
    if new in MOVES[old]:
        ledger.set_round_state(5, new, deadline_at=9.0)
        assert (ledger.round(5)["state"], ledger.round(5)["deadline_at"]) == (new, 9.0)
        check_move(5, old, new)
    else:
        with pytest.raises(InvalidMove, match=f"round 5: {old} -> {new} is not a move"):
            ledger.set_round_state(5, new, deadline_at=9.0)
        assert (ledger.round(5)["state"], ledger.round(5)["deadline_at"]) == (old, 2.0)


@pytest.mark.parametrize("old", [s for s in STATES if s != PROPOSED])
def test_only_a_proposal_commits_and_a_refused_commit_opens_nothing(ledger, old):
    _round(ledger, 3, old)
    events = len(ledger.events_tail(100))
    with pytest.raises(InvalidMove):
        ledger.commit_round(3, {"committed_at": 5.0}, {"round": 4, "state": "open", "term": 1,
                                                       "trained_from": 3},
                            ("round_committed", {}))
    assert ledger.round(3)["state"] == old and ledger.round(4) is None
    assert len(ledger.events_tail(100)) == events


def test_a_proposal_commits_and_opens_the_next_round(ledger):
    _round(ledger, 3, PROPOSED)
    ledger.commit_round(3, {"committed_at": 5.0}, {"round": 4, "state": "open", "term": 1,
                                                   "trained_from": 3}, ("round_committed", {}))
    assert ledger.round(3)["state"] == COMMITTED and ledger.round(4)["state"] == "open"


def test_a_round_that_does_not_exist_cannot_move(ledger):
    with pytest.raises(InvalidMove, match="round 9 does not exist"):
        ledger.set_round_state(9, "collecting")
