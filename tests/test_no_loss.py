"""Peers never lose an acknowledged update or a committed round: the cases found from outside.

Each test reproduces one way 0.1 lost work (the issue's numbering) on loopback with static peers:
real node processes where a kill -9 matters, in-process nodes elsewhere. The same properties
are checked under random faults on a virtual LAN by ``test_jepsen_netns.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3

import pytest

from chorus_p2p.client import AsyncNodeClient, ConflictError, NodeClient, NodeError
from chorus_p2p.netlab import free_loopback_ports
from chorus_p2p.trust import auth
from chorus_p2p.trust.identity import init_data_dir

from nodeutil import (EventTap, Federation, NodeProcess, chances_to_lead, committed_updates,
                      history, node_client, run_round, start_node, wait_for, wait_for_sync,
                      write_update)

pytestmark = pytest.mark.timeout(300)
# -- 1. an acknowledged update survives its coordinator's kill -9 right after the answer --------
def test_kill9_right_after_201_loses_no_acknowledged_update(processes, tmp_path, spec):
    cluster = processes(3, extra=["--min-updates", "9"])  # the round stays open: we close it
    for i in range(3):
        cluster.start(i)
    acknowledged: list[tuple[str, str]] = []
    for trial in range(4):
        leader = cluster.coordinator()
        cid = f"client{trial}"
        update = write_update(tmp_path / f"t{trial}.safetensors", spec, 500 + trial)
        with cluster.client(leader, cid) as c:
            answer = c.submit(update, examples=3)
        cluster.procs[leader].kill9()  # the moment the 201 is in
        assert answer["durable"] and answer["replicas"] >= 2
        acknowledged.append((cid, answer["sha256"]))
        survivors = [i for i in range(3) if i != leader]
        cluster.coordinator(among=survivors)
        cluster.start(leader)  # it comes back: it must not delete anything it holds
    leader = cluster.coordinator()
    with NodeClient.from_data_dir(cluster.dirs[leader], cluster.url(leader)) as admin:
        admin.close_round()
    for i in range(3):
        wait_for_sync(lambda i=i: {(n, s) for _, n, s in committed_updates(cluster.dirs[i])}
                      >= set(acknowledged), 60)
    counted = [(n, s) for _, n, s in committed_updates(cluster.dirs[leader])]
    for ack in acknowledged:  # every acknowledged update counted exactly once
        assert counted.count(ack) == 1, ack


def test_kill9_right_after_a_pause_leaves_the_federation_paused(processes, tmp_path, spec):
    """An admin told "paused" keeps a paused federation when the coordinator that answered is
    killed at once. The pause was one machine's flag, copied by the next heartbeat: here the
    successor never heard of it and opened the next round (reverting consensus.pause's use
    fails this test). Now the answer waits until a majority holds it, and the winner of the
    next election adopts the newest pause among its voters'."""
    cluster = processes(3)
    for i in range(3):
        cluster.start(i)
    leader = cluster.coordinator()
    with NodeClient.from_data_dir(cluster.dirs[leader], cluster.url(leader)) as admin:
        answer = admin.pause()
    cluster.procs[leader].kill9()  # the moment the answer is in
    assert answer["paused"] is True
    survivors = [i for i in range(3) if i != leader]
    successor = cluster.coordinator(among=survivors)
    status = cluster.status(successor)
    assert status["paused"] is True, status
    # The round in flight still finishes; none opens after it while the pause holds.
    update = write_update(tmp_path / "u.safetensors", spec, 7)
    with cluster.client(successor, "ann") as c:
        number = c.submit(update, examples=3)["round"]
    def rounds_at(i: int) -> tuple[int | None, int | None]:
        """(latest committed round, live round) on node i."""
        status = cluster.status(i) or {}
        return ((status.get("latest_committed") or {}).get("round"),
                (status.get("current_round") or {}).get("round"))

    def heartbeats() -> int:  # the survivors' together: the role may move between them
        return sum((cluster.status(i) or {}).get("heartbeats_sent", 0) for i in survivors)

    wait_for_sync(lambda: rounds_at(successor)[0] == number, 60, f"round {number} committed")
    sent = heartbeats()  # periodic work ran on whoever leads, not merely seconds passed
    wait_for_sync(lambda: heartbeats() >= sent + 8, 30, "8 more heartbeats")
    for i in survivors:
        assert rounds_at(i) == (number, None) and cluster.status(i)["paused"] is True
    with NodeClient.from_data_dir(cluster.dirs[successor], cluster.url(successor)) as admin:
        assert admin.resume()["paused"] is False
    wait_for_sync(lambda: rounds_at(successor)[1] == number + 1, 30, "the next round opened")


async def test_a_pause_no_majority_confirms_is_refused_as_not_durable(federation):
    """Cut off from its followers, a coordinator cannot promise a pause that outlives it: the
    admin hears not_durable (503), told to check and retry, instead of "paused"."""
    fed = federation(3)
    leader = await fed.start_all()
    leader.cluster.timing = dataclasses.replace(leader.cluster.timing, confirm_pause_s=1.0)
    for i in [i for i, n in fed.nodes.items() if n is not leader]:
        await fed.vanish(i)
    async with node_client(leader, "admin", admin=True) as admin:
        with pytest.raises(NodeError) as refused:
            await admin.pause()
    assert refused.value.status == 503 and refused.value.code == "not_durable"
    assert "did not confirm" in str(refused.value)


# -- 3. split start: a joiner never makes a history of its own; diverged ones are reported -----
async def test_two_histories_are_reported_never_replaced_and_resolved_by_an_admin(tmp_path,
                                                                                  tiny_base):
    fed = Federation(tmp_path, tiny_base, 2, min_updates=1)
    try:
        first = await fed.start(0)  # the founder, alone (its peer is down)
        await wait_for(lambda: first.cluster.role == "coordinator", timeout=15)
        for number in (1, 2):
            await run_round(fed, first, number, clients=("a",))
        ours = history(first)
        await fed.stop(0)
        fed.overrides["bootstrap"] = True  # an operator tells the joiner to start a history
        second = await fed.start(1)
        await wait_for(lambda: second.cluster.role == "coordinator", timeout=15)
        for number in (1, 2):
            await run_round(fed, second, number, clients=("b",), seed=1000)
        theirs = history(second)
        await fed.stop(1)
        fed.overrides.pop("bootstrap")
        first, second = await fed.start(0), await fed.start(1)
        node = await wait_for(lambda: next((n for n in (first, second) if n.rounds.diverged),
                                           None), timeout=30)
        # Both heads are reported and neither node's committed rounds changed.
        assert node.rounds.diverged["ours"]["round"] == 2
        assert {node.rounds.diverged["ours"]["log_hash"],
                node.rounds.diverged["theirs"]["log_hash"]} == {ours[0][3], theirs[0][3]}
        # both kept running their protocol (heartbeats or election timers) and changed nothing
        def work(n):
            return n.cluster.heartbeats_sent + n.cluster.election_timeouts
        start = {id(n): work(n) for n in (first, second)}
        await wait_for(lambda: all(work(n) >= start[id(n)] + 3 for n in (first, second)),
                       timeout=30)
        assert sorted([history(first), history(second)]) == sorted([ours, theirs])
        kept = history(node)
        other = second if node is first else first
        async with AsyncNodeClient(node.url, secret=node.identity.secret, client_id="admin",
                                   admin_token=node.identity.admin_token) as c:
            resolved = await c.resolve()
        assert resolved["archived_rounds"] >= 2  # rounds 1 and 2 (and an open round 3)
        await wait_for(lambda: history(node) == history(other), timeout=30)
        archived = {r["round"]: json.loads(r["record"])
                    for r in node.ledger.db.query("select round, record from rounds_archive")}
        assert {n: archived[n]["log_hash"] for n in (1, 2)} == \
            {n: h for n, _, _, h in kept if n > 0}  # kept, not deleted
    finally:
        await fed.close()


async def test_a_joiner_that_reaches_no_member_waits_and_makes_no_history(tmp_path, tiny_base):
    fed = Federation(tmp_path, tiny_base, 2)
    try:
        joiner = await fed.start(1)  # its founder is not running
        await chances_to_lead(joiner)  # past its bootstrap wait, with chances to elect itself
        assert joiner.cluster.role == "follower" and not joiner.cluster.joined
        assert joiner.ledger.latest_committed()["round"] == 0
        await fed.start(0)
        leader = await fed.one_coordinator()  # either may lead once they have met
        assert joiner.cluster.joined
        await run_round(fed, leader, 1)
    finally:
        await fed.close()


# -- 4. a two-node federation goes on after one machine dies --------------------------------
async def test_two_nodes_remove_the_dead_one_and_go_on(tmp_path, tiny_base):
    fed = Federation(tmp_path, tiny_base, 2, min_updates=1)
    fed.grant_admin()  # the survivor's operator may remove the dead one
    try:
        await fed.start(0)
        await fed.start(1)
        leader = await fed.one_coordinator()
        await run_round(fed, leader, 1, clients=("a",))
        dead = next(i for i, n in fed.nodes.items() if n is leader)
        survivor = fed.nodes[1 - dead]
        await fed.vanish(dead)
        await wait_for(lambda: survivor.cluster.role != "coordinator", timeout=15)
        await chances_to_lead(survivor)
        assert survivor.cluster.role != "coordinator" and not survivor.cluster.has_quorum()
        async with AsyncNodeClient(survivor.url, secret=survivor.identity.secret,
                                   client_id="admin",
                                   admin_token=survivor.identity.admin_token) as c:
            with pytest.raises(ConflictError) as refused:  # no majority: only --force will do
                await c.remove_member(leader.node_id)
            assert "--force" in refused.value.message
            result = await c.remove_member(leader.node_id[:12], force=True)
        assert result["forced"] is True
        await wait_for(lambda: survivor.cluster.role == "coordinator", timeout=15)
        await run_round(fed, survivor, 2, clients=("b",))
        assert survivor.ledger.round(2)["state"] == "committed"
    finally:
        await fed.close()


async def test_the_coordinator_removes_a_dead_follower_with_a_majority(tmp_path, tiny_base):
    fed = Federation(tmp_path, tiny_base, 3, min_updates=1)
    fed.grant_admin()
    try:
        for i in range(3):
            await fed.start(i)
        leader = await fed.one_coordinator()
        dead = next(i for i, n in fed.nodes.items() if n is not leader)
        dead_id = fed.nodes[dead].node_id
        await fed.vanish(dead)
        async with AsyncNodeClient(leader.url, secret=leader.identity.secret, client_id="admin",
                                   admin_token=leader.identity.admin_token) as c:
            result = await c.remove_member(dead_id)
        assert result == {"node_id": dead_id, "status": "removed", "forced": False}
        assert leader.cluster.quorum() == 2 and len(leader.cluster.voting_members()) == 2
        other = next(n for n in fed.nodes.values() if n is not leader)
        await wait_for(lambda: other.cluster.peers[dead_id].status == "removed", timeout=10)
        await run_round(fed, leader, 1, clients=("a",))
    finally:
        await fed.close()


# -- 5. a node whose spec differs from its federation's stops with the reason ------------------
async def test_a_joiner_with_another_rank_exits_non_zero(tmp_path, tiny_base):
    founder = await start_node(tmp_path / "f", tiny_base)
    try:
        init_data_dir(tmp_path / "j", join_token=founder.identity.join_token())
        joiner = NodeProcess(tmp_path / "j", tiny_base,
                             extra=["--peer", founder.url.split("//")[1], "--rank", "8"])
        joiner.start()
        code = await asyncio.to_thread(joiner.proc.wait, 60)
        assert code == 3
        err = joiner.proc.stderr.read()
        assert "refused this node" in err and "rank" in err
    finally:
        await founder.stop()


# -- 6. the same bytes are counted once --------------------------------------------------------
async def test_resubmitting_counted_bytes_is_refused_with_the_round(tmp_path, tiny_base):
    node = await start_node(tmp_path / "n", tiny_base, min_updates=1)
    try:
        update = write_update(tmp_path / "u.safetensors", node.spec, 9)
        async with AsyncNodeClient(node.url, secret=node.identity.secret, client_id="a") as c:
            await c.submit(update, examples=4)
            await wait_for(lambda: node.ledger.round(1)["state"] == "committed")
            with pytest.raises(ConflictError) as again:
                await c.submit(update, examples=4)
        assert again.value.code == "already_counted" and again.value.details["round"] == 1
        assert node.ledger.count_updates(2) == 0
    finally:
        await node.stop()


# -- 7. smaller: moved members, clock skew --------------------------------------------------------
async def test_a_member_that_moves_is_found_at_its_new_address(tmp_path, tiny_base):
    fed = Federation(tmp_path, tiny_base, 3)
    try:
        for i in range(3):
            await fed.start(i)
        leader = await fed.one_coordinator()
        mover = next(i for i, n in fed.nodes.items() if n is not leader)
        mover_id = fed.nodes[mover].node_id
        await fed.stop(mover)
        fed.ports[mover] = free_loopback_ports(1)[0]  # the machine comes back with a new address
        await fed.start(mover)
        new = f"127.0.0.1:{fed.ports[mover]}"
        await wait_for(lambda: any(m["node_id"] == mover_id and m["addresses"] == [new]
                                   for m in leader.ledger.members()), timeout=15)
        others = [n for n in fed.nodes.values() if n is not leader and n.node_id != mover_id]
        await wait_for(lambda: all(n.cluster.peers[mover_id].url.endswith(new) for n in others),
                       timeout=15)
    finally:
        await fed.close()


async def test_a_joiner_with_a_skewed_clock_is_told_to_check_ntp_and_waits(tmp_path,
                                                                           tiny_base,
                                                                           monkeypatch):
    founder = await start_node(tmp_path / "f", tiny_base)
    stream = EventTap(founder)  # the founder's event stream, as a dashboard sees it

    def founder_refused() -> list[dict]:
        return [e.get("data") or {} for e in stream.of("request_refused")]
    try:
        init_data_dir(tmp_path / "j", join_token=founder.identity.join_token())
        joiner = NodeProcess(tmp_path / "j", tiny_base, env={"CHORUS_CLOCK_OFFSET_S": "600"},
                             extra=["--peer", founder.url.split("//")[1]])
        joiner.start()
        try:
            await wait_for(lambda: joiner.events("peer_refused"), timeout=20)
            said = joiner.events("peer_refused")[0]["data"]
            assert said["code"] == "stale_request" and "check NTP" in said["reason"]
            await wait_for(lambda: any("check NTP" in d.get("message", "")
                                       for d in founder_refused()), timeout=10)
            async def joiner_chances() -> int:  # asked with a clock as skewed as the joiner's
                monkeypatch.setattr(auth, "_CLOCK_OFFSET", 600.0)
                try:
                    async with AsyncNodeClient.from_data_dir(tmp_path / "j", joiner.url) as c:
                        return (await c.status())["election_timeouts"]
                finally:
                    monkeypatch.setattr(auth, "_CLOCK_OFFSET", 0.0)
            first = await joiner_chances()
            # past its bootstrap wait, with chances to elect itself: a 0.1 joiner did
            async def three_more() -> bool:
                return await joiner_chances() >= first + 3
            await wait_for(three_more, timeout=30, interval=0.2)
            assert not joiner.events("coordinator_elected")
            con = sqlite3.connect(f"file:{tmp_path / 'j' / 'ledger.sqlite'}?mode=ro", uri=True)
            try:
                assert con.execute("select max(round) from rounds").fetchone()[0] == 0
            finally:
                con.close()
        finally:
            joiner.terminate()
    finally:
        await founder.stop()


def test_of_two_updates_from_one_client_the_later_terms_wins(tmp_path):
    """The 30-minute chaos run's find: a client's first update to a round had an unknown outcome
    (its coordinator lost the role before acknowledging), its second, different one was
    acknowledged by the next coordinator; a later coordinator still holding the first kept it
    and followers dropped the acknowledged one. The update accepted in the later term wins:
    a follower keeps it (and hands it on) however the coordinator's list reads, and gives way
    only to a later term's."""
    from chorus_p2p.node.ledger import Ledger
    from chorus_p2p.consensus.rounds import takes_over as _takes_over

    ledger = Ledger(tmp_path / "ledger.sqlite")
    record = {"round": 1, "term": 5, "coordinator": "c", "state": "collecting",
              "strategy": "fedex", "config": {}, "trained_from": 0, "opened_at": 0.0,
              "deadline_at": 0.0}

    def update(sha: str, term: int | None) -> dict:
        return {"round": 1, "node_id": "alice", "blob_sha": sha * 64, "examples": 1,
                "trained_from": 0, "size": 1, "norm": 1.0, "received_at": 0.0, "term": term}
    try:
        acknowledged, unknown = update("b", 4), update("a", 3)
        ledger.mirror_round(record, [acknowledged], 0)
        # the coordinator's list carries the earlier term's update: ours stays, to hand on
        extras = ledger.mirror_round(record, [unknown], 0)
        assert [u["blob_sha"] for u in extras] == [acknowledged["blob_sha"]]
        assert ledger.update(1, "alice")["blob_sha"] == acknowledged["blob_sha"]
        # and the coordinator, recovering, takes it over its own earlier one (not the reverse)
        assert _takes_over(unknown, acknowledged) and not _takes_over(acknowledged, unknown)
        assert not _takes_over(acknowledged, acknowledged)
        # a later term's different update does replace ours, recorded, never silently
        newer = update("c", 6)
        assert ledger.mirror_round(record, [newer], 0) == []
        assert ledger.update(1, "alice")["blob_sha"] == newer["blob_sha"]
        dropped = list(ledger.db.query("select blob_sha, reason from dropped_updates"))
        assert dropped == [{"blob_sha": acknowledged["blob_sha"],
                            "reason": "the coordinator holds a different update from this client"}]
    finally:
        ledger.close()


def test_a_late_hold_never_turns_a_proposal_back_into_a_live_round(tmp_path):
    """Found by the fault simulator: a hold of round 5 from the term-1 coordinator, delayed
    on the network, arrived after that coordinator's proposal of round 5, which this member had
    acknowledged (and which may have committed on that acknowledgement). Mirroring it made
    round 5 'collecting' again here; elected later, this member would have closed round 5
    anew. A live round of a later term does replace a proposal (the earlier coordinator's,
    never committed)."""
    from chorus_p2p.node.ledger import Ledger

    ledger = Ledger(tmp_path / "ledger.sqlite")

    def record(state: str, term: int) -> dict:
        return {"round": 1, "term": term, "coordinator": "c", "state": state,
                "strategy": "fedex", "config": {}, "trained_from": 0, "opened_at": 0.0,
                "deadline_at": 0.0, "adapter_sha": "a" * 64 if state == "proposed" else None}

    update = {"round": 1, "node_id": "alice", "blob_sha": "b" * 64, "examples": 1,
              "trained_from": 0, "size": 1, "norm": 1.0, "received_at": 0.0, "term": 1}
    try:
        ledger.mirror_round(record("proposed", 1), [update], 0)
        assert ledger.mirror_round(record("collecting", 1), [update], 0) == []
        assert ledger.round(1)["state"] == "proposed"
        assert ledger.round(1)["adapter_sha"] == "a" * 64
        ledger.mirror_round(record("collecting", 2), [update], 0)  # a later term's
        assert ledger.round(1)["state"] == "collecting" and ledger.round(1)["term"] == 2
    finally:
        ledger.close()


async def test_a_member_holding_the_live_rounds_updates_says_so_in_its_vote(federation, spec):
    """The log position a node sends in its vote requests counts the updates it holds for the
    live round, in the term they were accepted in (consensus.rounds.log_position)."""
    fed = federation(3, min_updates=9)
    leader = await fed.start_all()
    followers = [n for n in fed.nodes.values() if n is not leader]
    before = [n.rounds.log_position() for n in fed.nodes.values()]
    assert all(p[2] == 1 for p in before)  # a closed round (round 0) and nothing held
    async with fed.client(leader, "alice") as c:
        answer = await c.submit(write_update(fed.tmp_path / "alice.safetensors", spec, 7))
    assert answer["durable"]
    term = leader.cluster.term
    holders = [n for n in fed.nodes.values() if n.ledger.update(1, "alice") is not None]
    assert len(holders) >= 2  # a majority held it before the answer
    for node in holders:
        assert node.rounds.log_position() == (term, 1, 0)
    assert {n.node_id for n in holders} >= {leader.node_id} and followers


async def test_a_proposal_fetched_as_follower_never_replaces_the_round_it_then_committed(
        tmp_path, spec):
    """The 60 s chaos run's loss (seed 7): node b2b5 followed the term-8 coordinator and began
    fetching its proposal of round 57; while the fetch waited, b2b5 won term 9, recovered and
    committed round 57 itself, and then the finished fetch wrote the term-8 proposal over its
    own commit. Its history then lacked round 57 and the updates counted there looked lost.
    Here the fetch is held open until this node has led and committed that round."""
    from chorus_p2p.node.blobs import BlobStore
    from chorus_p2p.node.events import EventBus
    from chorus_p2p.federation.round_states import COMMITTED, PROPOSED
    from chorus_p2p.federation.wire import round_record
    from chorus_p2p.node.ledger import Ledger
    from chorus_p2p.node.rounds import RoundManager, RoundPolicy

    ledger = Ledger(tmp_path / "ledger.sqlite")
    blobs = BlobStore(tmp_path / "blobs")
    rounds = RoundManager(ledger, blobs, spec, "race", "b2b5", RoundPolicy(), EventBus())
    try:
        base = {"strategy": "fedex", "config": {}, "opened_at": 0.0, "deadline_at": 0.0,
                "log_hash": None}
        ledger.insert_round({**base, "round": 1, "term": 1, "coordinator": "x",
                             "state": COMMITTED, "trained_from": 0, "adapter_sha": "a" * 64})
        ledger.insert_round({**base, "round": 2, "term": 8, "coordinator": "e642",
                             "state": "collecting", "trained_from": 1})
        proposal = {**round_record({**base, "round": 2, "term": 8, "coordinator": "e642",
                                    "state": PROPOSED, "trained_from": 1,
                                    "adapter_sha": "b" * 64}), "updates": []}
        fetching, release = asyncio.Event(), asyncio.Event()

        async def slow_fetch(sha: str) -> None:
            fetching.set()
            await release.wait()

        async def no_history(after: int) -> dict:
            raise AssertionError("the payload's commit is ours: no history to fetch")

        # the coordinator's commit is ours (round 1, no chain hash): only its proposal is new
        payload = {"commit": 1, "commit_id": None, "proposal": proposal, "current": None}
        follow = asyncio.create_task(rounds.apply_from_coordinator(payload, slow_fetch,
                                                                   no_history))
        await asyncio.wait_for(fetching.wait(), 10)
        # meanwhile this node leads term 9 and commits round 2 with its own result
        rounds.leading_term = 9
        ledger.set_round_state(2, "aggregating")
        ledger.set_round_state(2, PROPOSED, term=9, coordinator="b2b5", adapter_sha="c" * 64)
        ledger.commit_round(2, {"committed_at": 1.0}, None, ("round_committed", {}))
        release.set()
        await asyncio.wait_for(follow, 10)
        row = ledger.round(2)
        assert (row["state"], row["term"], row["adapter_sha"]) == (COMMITTED, 9, "c" * 64)
        # and the ledger itself refuses a stale mirror of a committed round, whoever calls it
        rounds.leading_term = None
        assert ledger.mirror_round(round_record(proposal), [], 1) == []
        assert ledger.round(2)["state"] == COMMITTED
    finally:
        ledger.close()
