"""Test-only switches that bring back protocol bugs, so that a test can show the fault
simulator finds each one (a mutation check). Empty in every real run; nothing outside
``tests/`` and ``benchmarks/simulate_faults.py --mutant`` adds to it.

- ``vote_twice``: a vote ignores the one already given this term.
- ``unpersisted_vote``: a vote is answered before it is on disk (a restart forgets it).
- ``vote_for_stale_log``: no "at least as up to date" check (a coordinator without a
  committed round).
- ``open_without_recovery``: a new coordinator takes updates and closes its first round
  without first gathering that round's updates from a majority (the first loss bug).
- ``ignore_accept_term``: when two members hold different updates from one client for the
  same round, the one already held wins, whatever term each was accepted in (the second).
- ``ignore_held_updates``: the "up to date" check looks only at proposed and committed rounds,
  not at the updates a member holds for its live round (a bug the simulator found).
- ``stale_hold_reopens``: a late hold of the live round from the same term turns a round this
  member holds proposed back into a live one (another bug the simulator found).
- ``pause_answered_at_once``: an admin's pause or resume is answered before a majority holds
  it (the node's behaviour before ``consensus.pause``).
- ``forget_pause_at_election``: a new coordinator runs on its own pause stamp, not the newest
  of its voters'.
- ``unsynced_writes`` (simulator only): a node answers before its writes reach the disk, as
  SQLite with ``synchronous=OFF`` would; a crash loses what it wrote since its last tick.
"""

MUTANTS: set[str] = set()
KNOWN = ("vote_twice", "unpersisted_vote", "vote_for_stale_log", "open_without_recovery",
         "ignore_accept_term", "ignore_held_updates", "stale_hold_reopens", "pause_answered_at_once",
         "forget_pause_at_election", "unsynced_writes")
