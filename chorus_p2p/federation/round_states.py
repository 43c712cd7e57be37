"""Round states, in order, and the only moves between them: a round moves forward, or back to
collecting when its aggregation could not produce a result.

A round is "proposed" once its result blobs exist and the coordinator is collecting
acknowledgements; it is "committed" when a majority of members hold the record, and never
changes again. The ledger refuses any other move (``check_move``), so a coordinator's bug
cannot silently rewrite a round; ``tests/test_round_states.py`` walks the whole table.

(A follower mirrors the coordinator's records wholesale, outside this table: it copies a
decision, it does not make one.)
"""

from __future__ import annotations

OPEN, COLLECTING, AGGREGATING = "open", "collecting", "aggregating"
PROPOSED, COMMITTED = "proposed", "committed"
STATES = (OPEN, COLLECTING, AGGREGATING, PROPOSED, COMMITTED)

# state -> {next state: why}. Staying in a state is a move too: a new coordinator re-arms the
# round's deadline and term (open, collecting) or proposes the same result again (proposed).
MOVES: dict[str, dict[str, str]] = {
    OPEN: {OPEN: "a new coordinator resumes it", COLLECTING: "its first update",
           AGGREGATING: "an admin closes it (close-round)"},
    COLLECTING: {COLLECTING: "a new coordinator resumes it",
                 AGGREGATING: "enough updates, or the deadline"},
    AGGREGATING: {COLLECTING: "every update was left out, the aggregation failed, or a new "
                              "coordinator recovers it",
                  PROPOSED: "the result is written"},
    PROPOSED: {PROPOSED: "a new coordinator proposes it again",
               COMMITTED: "a majority holds the result"},
    COMMITTED: {},
}


class InvalidMove(RuntimeError):
    """A move the table does not allow: a bug in the caller, refused before it reaches disk."""


def check_move(number: int, old: str, new: str) -> None:
    if new not in MOVES.get(old, {}):
        allowed = ", ".join(MOVES.get(old, {})) or "nothing (it is final)"
        raise InvalidMove(f"round {number}: {old} -> {new} is not a move of the round state "
                          f"machine ({old} may become {allowed})")
