"""Jepsen-style: 5 nodes on a virtual LAN with real mDNS, clients submitting through the SDK
while a seeded nemesis partitions (random splits, the coordinator alone, bridges), kills -9 and
restarts (some with a skewed clock) and flaps links. Then the checker (chorus_p2p.chaos): no
acknowledged update lost or counted twice, no refused update counted, no committed round ever
changed, the same history and byte-identical state everywhere, and new rounds still commit.

Bounded: 60 s of faults (CHORUS_CHAOS_SECONDS), then at most a few minutes to heal and check.
``benchmarks/chaos.py`` runs the same for 30 minutes.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from chorus_p2p.chaos import Chaos
from chorus_p2p.netlab import NetLab, namespaces_unavailable
from chorus_p2p.trust.identity import copy_admin_key, init_data_dir
from chorus_p2p.federation.spec import FederationSpec

from nodeutil import ALPHA, RANK, TARGETS, write_update

REASON = namespaces_unavailable()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"virtual LAN unavailable: {REASON}"),
              pytest.mark.timeout(600)]
NODE_ARGS = ["--rank", str(RANK), "--alpha", str(ALPHA), "--target-modules", ",".join(TARGETS),
             "--election-timeout", "0.5", "--min-updates", "2", "--round-deadline", "4",
             "--keep-rounds", "5", "--checkpoint-every", "5"]


def test_no_acknowledged_update_is_lost_under_faults(tmp_path, tiny_base, capsys):
    spec = FederationSpec.build(str(tiny_base), RANK, ALPHA, TARGETS)
    first = init_data_dir(tmp_path / "d0", "jepsen")
    for i in range(1, 5):  # the checker pauses and closes rounds from whichever node leads
        init_data_dir(tmp_path / f"d{i}", join_token=first.join_token())
        copy_admin_key(tmp_path / "d0", tmp_path / f"d{i}")
    seed = int(os.environ.get("CHORUS_CHAOS_SEED", "7"))
    seconds = float(os.environ.get("CHORUS_CHAOS_SECONDS", "45"))
    with NetLab(5) as lab:
        chaos = Chaos(lab, [tmp_path / f"d{i}" for i in range(5)], tiny_base, NODE_ARGS,
                      first.secret, lambda path, s: write_update(path, spec, s), seed=seed)
        report = asyncio.run(chaos.run(seconds))
    with capsys.disabled():
        print(f"\njepsen (seed {seed}, {seconds:.0f} s): {report.summary()}")
    assert report.acknowledged > 0 and sum(report.faults.values()) > 0
    assert not report.lost, report.lost
    assert not report.duplicated, report.duplicated
    assert not report.refused_but_counted, report.refused_but_counted
    assert not report.changed_rounds, report.changed_rounds
    assert report.histories_agree and report.states_agree
    assert report.new_round_after_healing
