"""What a member's status becomes on each thing that can happen to it: one table.

Why a table: the statuses decide who counts toward a majority, and they change from eight
places in the node (answers, silences, goodbyes, admin decisions, the coordinator's member
list). Written as scattered assignments, one of them let a stale member list turn a member an
admin had removed into "dormant", which counts again the moment it answers. Here every pair
(status, event) has one answer, and a test walks all of them.

Statuses:
- ``live``: answered lately. ``lost``: silent for ``lost_after_s`` (still counts).
- ``left``: said goodbye (a restart, a laptop closing); still counts, so a goodbye can never
  shrink the majority to the nodes that stayed.
- ``dormant``: unseen for ``--member-timeout``; the coordinator stopped counting it; it counts
  again the moment it answers.
- ``pending``: waits for an admin's approval. ``rejected``/``removed``: an admin's decision;
  only another admin decision changes them.
"""

from __future__ import annotations

STATUSES = ("live", "lost", "left", "dormant", "pending", "rejected", "removed")
# Do not vote or count toward a majority.
NOT_COUNTED = ("pending", "rejected", "removed", "dormant")
# Get no heartbeats (a member that left says hello again when it is back).
NOT_CONTACTED = ("left", "pending", "rejected", "removed")
# An admin's decisions: only another admin decision changes them.
DECIDED = ("pending", "rejected", "removed")
# Statuses with which a coordinator's member list vouches for a node: admitted, gone or not.
VOUCHED = ("live", "lost", "left", "dormant")
ADMITTED = ("live", "lost", "left", "dormant")

EVENTS = (
    "answered",  # it answered us (a heartbeat, a hello, a vote)
    "silent",  # no answer for lost_after_s
    "member_timeout",  # unseen for --member-timeout, judged by a coordinator with a majority
    "said_goodbye",  # a leave message, or a hello that says it left
    "came_back",  # its own hello after it left
    "approved", "rejected", "removed",  # an admin's decisions
    # what the coordinator's member list says of it
    "listed_live", "listed_lost", "listed_left", "listed_dormant", "listed_rejected",
    "listed_removed",
)


def _moves() -> dict[tuple[str, str], str]:
    table: dict[tuple[str, str], str] = {}
    for status in ADMITTED:
        table[(status, "answered")] = "live"
        table[(status, "said_goodbye")] = "left"
        table[(status, "listed_live")] = "live"
        table[(status, "listed_left")] = "left"
        table[(status, "listed_dormant")] = "dormant"
        table[(status, "listed_rejected")] = "rejected"
    table[("live", "silent")] = "lost"
    table[("live", "listed_lost")] = "lost"
    table[("lost", "member_timeout")] = "dormant"
    table[("left", "member_timeout")] = "dormant"
    table[("left", "came_back")] = "lost"  # then its answer makes it live
    # The coordinator approved a pending member, here or in its list.
    table[("pending", "approved")] = "lost"
    table[("pending", "listed_live")] = "live"
    table[("pending", "listed_left")] = "left"
    table[("pending", "listed_dormant")] = "dormant"
    table[("pending", "rejected")] = "rejected"
    table[("pending", "listed_rejected")] = "rejected"
    # Removal is final; every other status can be removed, by an admin or by the list.
    for status in STATUSES:
        if status != "removed":
            table[(status, "removed")] = "removed"
            table[(status, "listed_removed")] = "removed"
    return table


# (status, event) -> the new status; a pair that is not here leaves the status as it is.
MOVES = _moves()


def after(status: str, event: str) -> str:
    """The status after ``event``. Raises on an unknown status or event (a typo must not read
    as "nothing happens")."""
    if status not in STATUSES:
        raise ValueError(f"unknown member status {status!r}")
    if event not in EVENTS:
        raise ValueError(f"unknown membership event {event!r}")
    return MOVES.get((status, event), status)


def listed(status: str) -> str | None:
    """The event a coordinator's member list makes of the status it gives a member (None for a
    status the list does not speak for, such as ``pending``)."""
    event = f"listed_{status}"
    return event if event in EVENTS else None


def counts(status: str, verified: bool) -> bool:
    """Votes and counts toward a majority."""
    return status not in NOT_COUNTED and verified
