"""The checker behind every "0 lost" figure can see a loss (issue 27 #2).

`chorus_p2p.chaos.judge` is fed a clean history, then the same history with one known
violation injected at a time; each must be reported, and the clean one must pass.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest

from chorus_p2p.chaos import Op, Report, judge


def clean_run():
    """Three nodes, rounds 1-2 committed; alice's two updates acknowledged and counted once,
    bob's refused one never counted, carol's unknown one counted once."""
    ops = [Op("alice", 1, "a1", 0, outcome="ok", round=1),
           Op("alice", 2, "a2", 1, outcome="ok", round=2),
           Op("bob", 1, "b1", 2, outcome="fail", code="round_closed"),
           Op("carol", 1, "c1", 0, outcome="info")]
    counted = Counter({("alice", "a1"): 1, ("alice", "a2"): 1, ("carol", "c1"): 1})
    seen = {1: {"r1"}, 2: {"r2"}}
    rows = [{"round": 2, "log_hash": "h2"}, {"round": 1, "log_hash": "h1"},
            {"round": 0, "log_hash": "h0"}]
    histories = {i: copy.deepcopy(rows) for i in range(3)}
    return ops, counted, seen, histories, 3, {"state-digest"}


def verdict(ops, counted, seen, histories, nodes, digests) -> Report:
    report = judge(Report(), ops, counted, seen, histories, nodes, digests)
    report.new_round_after_healing = True  # liveness is judged elsewhere (a live federation)
    return report


def test_a_clean_history_passes():
    report = verdict(*clean_run())
    assert report.ok, report.summary()
    assert (report.acknowledged, report.refused, report.unknown) == (2, 1, 1)
    assert report.committed_rounds == 2


def inject_lost(run):
    run[1][("alice", "a2")] = 0  # an acknowledged update no committed round lists


def inject_double(run):
    run[1][("alice", "a1")] = 2  # the same update counted in two rounds


def inject_refused_counted(run):
    run[1][("bob", "b1")] = 1  # refused to the client, yet in the history


def inject_changed_round(run):
    run[2][1].add("another-result")  # round 1 shown with two different results


def inject_diverged_history(run):
    run[3][2][0]["log_hash"] = "fork"  # node 2's head differs


def inject_lost_middle_commit(run):
    del run[3][1][1]  # node 1 shows the same head but lacks committed round 1


def inject_missing_node(run):
    del run[3][1]  # a node whose history could not be read


def inject_diverged_state(run):
    run[5].add("another-digest")  # one node's R differs


@pytest.mark.parametrize("inject,field", [
    (inject_lost, "lost"), (inject_double, "duplicated"),
    (inject_refused_counted, "refused_but_counted"), (inject_changed_round, "changed_rounds"),
    (inject_diverged_history, "histories_agree"), (inject_missing_node, "histories_agree"),
    (inject_lost_middle_commit, "histories_agree"),
    (inject_diverged_state, "states_agree"),
])
def test_each_injected_violation_is_reported(inject, field):
    run = list(clean_run())
    inject(run)
    report = verdict(*run)
    assert not report.ok, f"{inject.__name__} passed the checker"
    value = getattr(report, field)
    if isinstance(value, bool):
        assert value is False, field
    else:
        assert len(value) == 1, (field, value)  # exactly the injected one
    assert report.summary()  # and it can be printed
