"""Whether the federation is paused: a replicated register that a change of coordinator cannot
lose.

An admin's "pause" (finish the round in flight, open no new one) was once one coordinator's
flag, copied to followers by the next heartbeat. A coordinator killed between its answer and
that heartbeat left a successor that never heard of the pause and opened the next round: the
admin was told "paused" and the federation went on. So a pause or resume is now a decision with
a stamp, and it follows Raft's rules for a log entry:

1. The coordinator stamps each decision ``(its term, a number counting up within the term)``
   (:func:`decide`) and answers the admin only once a majority holds that stamp or a newer one
   (:func:`confirmed`).
2. A vote carries the voter's stamp. The winner adopts the newest stamp among its own and its
   granting voters' (:func:`at_election`); that majority overlaps the one that confirmed any
   answered decision, so the winner knows it.
3. The winner restamps what it adopted with its own term, the way a new Raft leader commits an
   entry of its own term: a decision that was never confirmed and that it did not adopt can
   then not come back later with a higher stamp than what it runs on.
4. A follower takes its coordinator's stamp when it is newer than its own (:func:`follows`).
   Every stamp a coordinator sends carries its own term, so a new coordinator's word always
   replaces what an earlier one left unconfirmed; an older stamp of the same term is a late,
   reordered heartbeat, and taking it would undo a decision this follower had confirmed (the
   fault simulator found that schedule, seed 319, before this rule shipped).

A decision that no majority confirmed may or may not take effect; its admin was told so
(``not_durable``) and may retry: deciding the same thing again is harmless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from chorus_p2p.consensus.mutants import MUTANTS


@dataclass(frozen=True, order=True)
class PauseStamp:
    """One decision: (term, seq) order decisions; one (term, seq) is one decision."""

    term: int = 0
    seq: int = 0
    paused: bool = False

    def to_wire(self) -> list[Any]:
        return [self.term, self.seq, self.paused]

    @classmethod
    def from_wire(cls, value: Any) -> "PauseStamp | None":
        """A peer's stamp, or None when absent or malformed (an older node sends none)."""
        if (isinstance(value, list) and len(value) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                        for v in value[:2]) and isinstance(value[2], bool)):
            return cls(value[0], value[1], value[2])
        return None


def decide(current: PauseStamp, term: int, paused: bool) -> PauseStamp:
    """The coordinator of ``term`` decides: a stamp newer than anything it holds."""
    return PauseStamp(term, current.seq + 1 if current.term == term else 1, paused)


def at_election(own: PauseStamp, granted: Iterable[PauseStamp], term: int) -> PauseStamp:
    """What the winner of ``term`` runs on: the newest of its own stamp and those its granting
    voters sent, restamped with its term."""
    newest = own if "forget_pause_at_election" in MUTANTS else max([own, *granted])
    return PauseStamp(term, 0, newest.paused)


def follows(own: PauseStamp, coordinator: PauseStamp) -> bool:
    """Whether a follower takes the stamp its coordinator's heartbeat carries."""
    return coordinator > own


def confirmed(stamp: PauseStamp, held: Mapping[str, PauseStamp], quorum: int) -> bool:
    """Whether a majority holds ``stamp`` or a newer one (``held``: each member's stamp as it
    last answered, the coordinator's own included)."""
    if "pause_answered_at_once" in MUTANTS:
        return True
    return sum(1 for other in held.values() if other >= stamp) >= quorum
