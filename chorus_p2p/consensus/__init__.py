"""The protocol's decisions, with no clock, network, disk or global random of their own.

``election`` is the coordinator election (Raft with Pre-Vote, CheckQuorum and leadership
transfer): the node's ``Cluster`` drives it, feeding in the time and what peers said, and does
what each step returns. ``membership``, ``rounds`` and ``pause`` hold the rules for member
statuses, for keeping acknowledged updates through a change of coordinator, and for an admin's
pause. ``simulation`` runs several of the same cores, with clients and an admin, over a seeded,
simulated network, clock and crash schedule, and checks the invariants after every step.

This package imports nothing from the rest of chorus_p2p (``tests/test_layout.py``) and
nothing that does I/O (``tests/test_consensus_core.py``).
"""
