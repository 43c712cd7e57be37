"""The two rules that keep an acknowledged update through a change of coordinator.

A coordinator acknowledges an update only once a majority holds it. Two rules make that
enough, and each was once missing (each lost acknowledged updates in a chaos run):

1. A new coordinator first gathers its live round's updates from a majority before it takes a
   new update or closes the round (:func:`recovers_first`). Any majority overlaps the one that
   held an acknowledged update.
2. When two members hold different updates from the same client for the same round, the one
   accepted in the later term wins (:func:`takes_over`). An update of an earlier term cannot
   have been acknowledged: the later term's coordinator recovered the round from a majority
   before accepting anything, and it did not see that one.

A third rule keeps the second one true through elections (:func:`log_position`): an update
held for the live round counts as a log entry of the term it was accepted in, for Raft's "at
least as up to date" check. Without it, a member holding an acknowledged update of term 2 for
round 2 voted for a node whose only claim was a proposal of round 2 from term 1 (made while
it was cut off, without that update); the winner re-proposed it and the acknowledged update
was lost. The fault simulator found that schedule (seed 2964).

The node's RoundManager and Ledger apply these rules; ``consensus.simulation`` applies the same
functions to thousands of fault schedules, and switching either off (``mutants``) is found.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from chorus_p2p.consensus.mutants import MUTANTS


def recovers_first(quorum: int) -> bool:
    """Whether a new coordinator must gather its live round from a majority before using it
    (a federation of one holds everything itself)."""
    return quorum > 1 and "open_without_recovery" not in MUTANTS


def takes_over(existing: Mapping[str, Any] | None, update: Mapping[str, Any]) -> bool:
    """Whether ``update`` (another member's, for the same round and client) replaces
    ``existing`` (ours): we hold none from that client, or a different one accepted in an
    earlier term."""
    if existing is None:
        return True
    if "ignore_accept_term" in MUTANTS:
        return False  # the bug: what we hold wins
    return (existing["blob_sha"] != update.get("blob_sha")
            and (update.get("term") or 0) > (existing.get("term") or 0))


def log_position(closed: tuple[int, int] | None, live_round: int | None,
                 held_terms: Iterable[int | None]) -> tuple[int, int, int]:
    """(term, round, closed) of the newest thing this node holds, for Raft's "up to date"
    check (compared as a tuple).

    ``closed``: (term, round) of its newest proposed or committed round. ``live_round`` and
    ``held_terms``: its live round after that, and the terms its updates were accepted in. A
    held update is a log entry of its term at that round, just before the round's own closing
    (the third element: 0 for updates held, 1 for a closed round): a majority that
    acknowledged an update refuses any candidate without it, and a candidate that only holds
    updates of a round is behind one that holds the round closed in the same term."""
    position = (*closed, 1) if closed else (0, 0, 1)
    terms = [t or 0 for t in held_terms]
    if live_round is not None and terms and "ignore_held_updates" not in MUTANTS:
        position = max(position, (max(terms), live_round, 0))
    return position


def replaces_closed(closed_term: int | None, live_term: int | None) -> bool:
    """Whether a coordinator's live round replaces the same round that we hold closed
    (aggregating or proposed): only from a later term. From the same term it is old news, a
    hold that arrived after the proposal it preceded; taking it would turn a proposal this
    node acknowledged (and that may have committed on that acknowledgement) back into a live
    round. The fault simulator found that schedule (a late, reordered hold)."""
    if "stale_hold_reopens" in MUTANTS:
        return True
    return (live_term or 0) > (closed_term or 0)


# -- when a round closes and when it commits ---------------------------------------------------
def participation(min_updates: int, previous: set[str], abstaining: set[str]
                  ) -> tuple[int, int, int | None]:
    """(updates needed at least, updates to wait for before the deadline, members short).

    Waited for: who took part in the previous round, and who sent an update to it after it
    closed (``previous``), so a member a little slower than the rest misses one round, not
    every round. ``min_updates`` is a floor that a member who stopped taking part (its privacy
    budget spent: ``abstaining``) never lowers. The third value, when not None, is how many
    active members remain where that is fewer than the floor: the admin must decide."""
    gone = previous & abstaining
    if not gone:
        return min_updates, max(min_updates, len(previous)), None
    active = len(previous - gone)
    return min_updates, max(min_updates, active), active if active < min_updates else None


def closes(count: int, needed: int, expected: int, *, deadline_passed: bool,
           force: bool = False) -> bool:
    """Whether a collecting round closes now, with ``count`` updates that aggregation would
    keep: enough of them and everyone expected (or the deadline passed); an admin's close
    (``force``) needs one."""
    if force:
        return count >= 1
    return count >= needed and (count >= expected or deadline_passed)


def commits(holders: Iterable[str], voting: Iterable[str], quorum: int) -> bool:
    """Whether a majority of the current voting members holds a proposal (or an update):
    holders that left since do not count."""
    return len(set(holders) & set(voting)) >= quorum

