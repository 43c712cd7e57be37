"""`doctor --repair` loses nothing that is still good (issue 20 #6, issue 26 #4).

A flipped bit in one client update used to mark its round pruned, so the next GC deleted that
round's global adapter, residual and every other update; blobs named by dropped updates and
archived rounds were deleted as orphans at once; a repaired one-node federation could not start.
"""

from __future__ import annotations

import os
import sqlite3
import time

import pytest

from chorus_p2p.cli.main import main
from chorus_p2p.node.blobs import sha256_file
from chorus_p2p.node.ledger import Ledger

from nodeutil import Federation, blob_files, run_round, start_node, wait_for, write_update
from nodeutil import node_client as client

pytestmark = pytest.mark.timeout(180)


def flip_a_bit(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def repair(data_dir) -> int:
    return main(["doctor", "--data-dir", str(data_dir), "--repair"])


async def commit_two_rounds(tmp_path, tiny_base):
    node = await start_node(tmp_path / "n", tiny_base, min_updates=2)
    for number in (1, 2):
        for k, cid in enumerate(("a", "b")):
            async with client(node, cid) as c:
                await c.submit(write_update(tmp_path / f"u{number}{cid}.safetensors", node.spec,
                                            number * 10 + k), examples=1)
        await wait_for(lambda: node.ledger.round(number)["state"] == "committed")
    return node


async def test_a_damaged_update_of_a_committed_round_costs_that_file_not_the_round(
        tmp_path, tiny_base):
    node = await commit_two_rounds(tmp_path, tiny_base)
    data = tmp_path / "n"
    round1 = node.ledger.round(1)
    damaged = node.ledger.update(1, "a")["blob_sha"]
    good = {round1[k] for k in ("adapter_sha", "adapter_config_sha", "residual_sha")} | {
        node.ledger.update(1, "b")["blob_sha"]}
    await node.stop()
    flip_a_bit(node.blobs.path(damaged))
    assert main(["doctor", "--data-dir", str(data)]) == 3
    assert repair(data) == 0

    ledger = Ledger(data / "ledger.sqlite")
    try:
        assert ledger.lost_blobs() == [damaged]
        assert all(r["pruned_at"] is None for r in ledger.list_rounds(limit=10))
    finally:
        ledger.close()
    assert (data / "blobs" / "quarantine" / damaged).exists()
    node = await start_node(data, tiny_base, min_updates=2)
    try:
        await node.retention.collect(node.state_store.recovery_round, grace_s=0.0)
        for sha in good:  # the round's result and the other client's update: all still here
            assert sha256_file(node.blobs.verified_path(sha)) == sha
        async with client(node, "r") as c:
            pulled = await c.pull(tmp_path / "r1", round=1)
        assert sha256_file(pulled / "adapter_model.safetensors") == round1["adapter_sha"]
    finally:
        await node.stop()


async def test_a_damaged_acknowledged_update_is_fetched_back_from_a_peer(tmp_path, tiny_base):
    """The open round is not pruned; the repaired node fetches the bytes from a member."""
    fed = Federation(tmp_path, tiny_base, 3, min_updates=2)
    try:
        leader = await fed.start_all()
        await run_round(fed, leader, 1)
        async with fed.client(leader, "a") as c:  # acknowledged: a majority holds it
            await c.submit(write_update(tmp_path / "pending.safetensors", leader.spec, 99),
                           examples=1)
        follower = next(i for i, n in fed.nodes.items() if n is not leader)
        sha = fed.nodes[follower].ledger.update(2, "a")["blob_sha"]
        path = fed.nodes[follower].blobs.path(sha)
        await fed.stop(follower)
        flip_a_bit(path)
        assert repair(tmp_path / f"n{follower}") == 0
        node = await fed.start(follower)
        assert node.ledger.round(2)["pruned_at"] is None
        await wait_for(lambda: not node.ledger.lost_blobs(), timeout=30)
        assert sha256_file(node.blobs.verified_path(sha)) == sha
        assert node.ledger.update(2, "a")["blob_sha"] == sha
    finally:
        await fed.close()


async def test_repair_deletes_only_blobs_no_row_names_and_only_after_the_grace(
        tmp_path, tiny_base):
    node = await commit_two_rounds(tmp_path, tiny_base)
    data = tmp_path / "n"
    dropped = node.blobs.put_bytes(b"an update a later coordinator's history left out")
    node.ledger.db["dropped_updates"].insert({
        "round": 2, "node_id": "c", "blob_sha": dropped, "examples": 1, "trained_from": 1,
        "dropped_at": time.time(), "reason": "round 2 was superseded"})
    archived = node.blobs.put_bytes(b"a diverged history's adapter")
    node.ledger.db["rounds_archive"].insert({"archived_at": time.time(), "round": 9,
                                             "record": f'{{"adapter_sha": "{archived}"}}'})
    fresh = node.blobs.put_bytes(b"an upload in flight, not yet recorded")
    old = node.blobs.put_bytes(b"left by a crash long ago")
    await node.stop()
    two_hours_ago = time.time() - 7200
    for sha in (dropped, archived, old):
        os.utime(node.blobs.path(sha), (two_hours_ago, two_hours_ago))
    before = blob_files(data)
    assert repair(data) == 0
    assert blob_files(data) == before - {old}


async def test_a_corrupt_ledger_is_salvaged_and_a_lone_founder_restarts_with_bootstrap(
        tmp_path, tiny_base):
    node = await commit_two_rounds(tmp_path, tiny_base)
    data = tmp_path / "n"
    node.ledger.set_meta("dp_rounds", "9")  # the privacy budget spent so far
    await node.stop()
    ledger_file = data / "ledger.sqlite"
    conn = sqlite3.connect(ledger_file)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("select rootpage from sqlite_master where name = 'events'").fetchone()[0]
    conn.close()
    raw = bytearray(ledger_file.read_bytes())  # garbage over the events table's first page
    start = (root - 1) * page
    raw[start: start + page] = b"\xa5" * page
    ledger_file.write_bytes(bytes(raw))
    assert main(["doctor", "--data-dir", str(data)]) == 3
    assert repair(data) == 0
    salvaged = Ledger(ledger_file)
    try:
        committed = [r["round"] for r in salvaged.list_rounds(limit=10)
                     if r["state"] == "committed"]
        assert sorted(committed) == [0, 1, 2]
        assert salvaged.get_meta("dp_rounds") == "9"
        assert salvaged.get_meta("rebuild") == "1"
    finally:
        salvaged.close()
    node = await start_node(data, tiny_base, min_updates=2, bootstrap=True)
    try:
        await wait_for(lambda: node.cluster.role == "coordinator", timeout=20)
        for cid in ("a", "b"):  # round 3 was opened for two updates before the damage
            async with client(node, cid) as c:
                await c.submit(write_update(tmp_path / f"u3{cid}.safetensors", node.spec,
                                            {"a": 33, "b": 34}[cid]), examples=1)
        await wait_for(lambda: (node.ledger.round(3) or {}).get("state") == "committed")
    finally:
        await node.stop()
