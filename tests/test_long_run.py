"""Long federations through the node: exact state, flat disk, pruning, late joiners at high round
counts, kill -9 during the state update, the checkpoint and garbage collection, and the upgrade
of a data dir written by chorus-p2p 0.1."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import tarfile
from pathlib import Path

import pytest
import torch

from chorus_p2p.client import AsyncNodeClient, PrunedError
from chorus_p2p.cli.main import main
from chorus_p2p.lora.residual import ResidualFile
from chorus_p2p.node.blobs import BlobStore
from chorus_p2p.trust.identity import init_data_dir
from chorus_p2p.node.ledger import SCHEMA_VERSION, Ledger
from chorus_p2p.node.retention import FAULT_GC_DELAY_ENV, data_dir_bytes
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.state.store import FAULT_APPLY_DELAY_ENV, FAULT_CHECKPOINT_DELAY_ENV

from nodeutil import (Federation, NodeProcess, blob_files, dir_client,
                      periodic_work, run_round, same_state_bytes, start_node, wait_for,
                      write_update)

pytestmark = pytest.mark.timeout(300)
FIXTURE = Path(__file__).parent / "fixtures" / "datadir-v0.1.tar.gz"


def add_residual(total: dict[str, torch.Tensor], path: Path) -> None:
    with ResidualFile(path) as residual:
        for prefix in residual.modules:
            left, right = residual.factors(prefix)
            total[prefix] = total.get(prefix, 0) + left.double() @ right.double()


def state_error(node, exact: dict[str, torch.Tensor]) -> float:
    got = dict(node.state_store.read(node.state_store.round))
    return max(float((got[p].double() - e).norm() / e.norm()) for p, e in exact.items())


async def submit_round(node, tmp_path: Path, number: int, clients=("a", "b")) -> None:
    for k, cid in enumerate(clients):
        async with AsyncNodeClient(node.url, secret=node.identity.secret, client_id=cid) as c:
            await c.submit(write_update(tmp_path / f"u{number}{cid}.safetensors", node.spec,
                                        number * 10 + k), examples=k + 1)
    await wait_for(lambda: (node.ledger.round(number) or {}).get("state") == "committed")


def gc_settled(node, data_dir, first_kept: int) -> bool:
    if node.ledger.first_retained_round() != first_kept:
        return False
    _, pruned_only = node.ledger.blob_references()
    return not (pruned_only & blob_files(data_dir))


async def test_forty_rounds_keep_the_state_exact_and_the_disk_flat(tmp_path, tiny_base):
    node = await start_node(tmp_path / "d", tiny_base, keep_rounds=4, checkpoint_every=5)
    exact: dict[str, torch.Tensor] = {}
    footprint = {}
    try:
        for number in range(1, 41):
            await submit_round(node, tmp_path, number)
            add_residual(exact, node.blobs.path(node.ledger.round(number)["residual_sha"]))
            if number in (20, 40):
                await node.state.reader(number)
                # Wait for what is asserted below: the GC has deleted every blob that only
                # pruned rounds name (marking rounds pruned comes first, the deletes after).
                await wait_for(lambda: gc_settled(node, tmp_path / "d", number - 3))
                footprint[number] = (len(blob_files(tmp_path / "d")),
                                     data_dir_bytes(tmp_path / "d" / "blobs"))
        assert node.state.verified_round == 40
        assert state_error(node, exact) <= 1e-5
        # Flat: the same blobs (4 rounds' worth) at round 20 and at round 40.
        assert footprint[20] == footprint[40]
        assert node.state_store.latest_checkpoint().round == 40
        async with AsyncNodeClient(node.url, secret=node.identity.secret, client_id="x",
                                   admin_token=node.identity.admin_token) as c:
            listed = {r["round"]: r for r in await c.all_rounds()}
            assert len(listed) == 42 and listed[10]["pruned"] and not listed[38]["pruned"]
            old = await c.round(10)  # the record and its hashes stay for good
            assert old["pruned"] and old["adapter_sha"] and old["log_hash"]
            with pytest.raises(PrunedError) as refused:
                await c.pull(tmp_path / "old", round=10)
            assert refused.value.status == 410 and "--keep-rounds" in refused.value.message
            with pytest.raises(PrunedError):
                await c.blob(old["updates"][0]["blob_sha"])
            with pytest.raises(PrunedError):
                await c.download("cumulative", 20, tmp_path / "R20.safetensors")
            await c.download("cumulative", 40, tmp_path / "R40.safetensors")
            state = await c.state()
            assert state["round"] == 40 and state["retained_from"] == 37
            assert (await c.gc())["pruned_rounds"] == []  # nothing more to do
        with ResidualFile(tmp_path / "R40.safetensors") as r40:
            assert max(float((r40.delta(p).double() - e).norm() / e.norm())
                       for p, e in exact.items()) <= 1e-5
    finally:
        await node.stop()
    # Offline, with a tighter window: `chorus-node gc` takes the data dir's lock and prunes.
    assert await asyncio.to_thread(
        main, ["gc", "--data-dir", str(tmp_path / "d"), "--keep-rounds", "2", "--json"]) == 0
    ledger = Ledger(tmp_path / "d" / "ledger.sqlite")
    try:
        assert ledger.first_retained_round() == 39
    finally:
        ledger.close()


async def test_a_late_joiner_at_round_40_fetches_one_checkpoint_and_later_residuals(
        tmp_path, tiny_base):
    fed = Federation(tmp_path, tiny_base, 2, keep_rounds=4, checkpoint_every=10)
    try:
        first = await fed.start(0)
        await wait_for(lambda: first.cluster.role == "coordinator", timeout=15)
        for number in range(1, 41):
            await run_round(fed, first, number)
        await first.state.reader(40)
        residuals = {first.ledger.round(n)["residual_sha"] for n in range(1, 41)}
        late = await fed.start(1)
        await wait_for(lambda: (late.ledger.latest_committed() or {}).get("round") == 40,
                       timeout=30)
        await late.state.reader(40)
        # One checkpoint (round 40, the same bytes) and no residual of any round before it.
        assert late.state_store.latest_checkpoint().sha256 == \
            first.state_store.latest_checkpoint().sha256
        assert late.state.verified_round == 40
        assert not residuals & blob_files(tmp_path / "n1")
        assert late.ledger.round(12)["pruned_at"] is not None and late.ledger.count_rounds() >= 41
        # From here both apply the same residuals to the same state.
        leader = await fed.one_coordinator()
        for number in (41, 42, 43):
            await run_round(fed, leader, number)
        await late.state.reader(43)
        await first.state.reader(43)
        assert same_state_bytes(late, first)
        assert late.state.verified_round == first.state.verified_round == 43
    finally:
        await fed.close()


async def test_a_0_1_data_dir_upgrades_in_place(tmp_path, tiny_base):
    """The fixture was written by chorus-p2p 0.1: 3 committed fedex-svd rounds with a factored
    cumulative R blob per round, and round 4 collecting with one update."""
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    data_dir = tmp_path / "data"
    con = sqlite3.connect(data_dir / "ledger.sqlite")
    rows = con.execute("select round, cumulative_sha, residual_sha from rounds order by round"
                       ).fetchall()
    con.close()
    legacy_r = data_dir / "blobs" / rows[3][1][:2] / rows[3][1]
    expected = {}
    add_residual(expected, legacy_r)  # R after round 3, as 0.1 stored it (factored)
    node = await start_node(data_dir, tiny_base)
    try:
        assert node.ledger.get_meta("schema_version") == str(SCHEMA_VERSION)
        assert node.state_store.round == 3 and state_error(node, expected) <= 1e-6
        assert not legacy_r.exists() and all(r["cumulative_sha"] is None
                                             for r in node.ledger.list_rounds())
        assert all(node.ledger.round(n)["log_hash"] for n in range(4))
        # Round 4 goes on where 0.1 left it: one update in, one more closes it.
        assert node.ledger.round(4)["state"] == "collecting"
        async with AsyncNodeClient(node.url, secret=node.identity.secret, client_id="bob") as c:
            await c.submit(write_update(tmp_path / "u.safetensors", node.spec, 77), examples=5)
        await wait_for(lambda: node.ledger.round(4)["state"] == "committed")
        await node.state.reader(4)
        add_residual(expected, node.blobs.path(node.ledger.round(4)["residual_sha"]))
        assert node.state.verified_round == 4 and state_error(node, expected) <= 1e-5
    finally:
        await node.stop()


# -- kill -9 ---------------------------------------------------------------------------------
def _client(url: str, data_dir: Path, cid: str) -> AsyncNodeClient:
    return dir_client(url, data_dir, cid, admin=True)


async def _process_round(url: str, data_dir: Path, tmp_path: Path, spec: FederationSpec,
                         number: int) -> None:
    for k, cid in enumerate(("a", "b")):
        async with _client(url, data_dir, cid) as c:
            await c.submit(write_update(tmp_path / f"k{number}{cid}.safetensors", spec,
                                        100 * number + k), examples=k + 1)


async def _wait_state(url: str, data_dir: Path, number: int) -> dict:
    async def ready():
        async with _client(url, data_dir, "probe") as c:
            state = await c.state()
        return state if state["verified_round"] == number and state["round"] == number else None
    return await wait_for(ready, timeout=60, interval=0.2)


def _exact_state(data_dir: Path, upto: int) -> dict[str, torch.Tensor]:
    ledger = Ledger(data_dir / "ledger.sqlite")
    blobs = BlobStore(data_dir / "blobs")
    total: dict[str, torch.Tensor] = {}
    try:
        for number in range(1, upto + 1):
            add_residual(total, blobs.path(ledger.round(number)["residual_sha"]))
    finally:
        ledger.close()
    return total


def _working_error(data_dir: Path, exact) -> float:
    with ResidualFile(data_dir / "state" / "working.safetensors") as working:
        return max(float((working.delta(p).double() - e).norm() / e.norm())
                   for p, e in exact.items())


@pytest.fixture
def data_dir(tmp_path) -> Path:
    init_data_dir(tmp_path / "d", "crashlab")
    return tmp_path / "d"


async def test_kill_during_the_state_update_rebuilds_it_exactly(tmp_path, tiny_base, spec, data_dir):
    proc = NodeProcess(data_dir, tiny_base, env={FAULT_APPLY_DELAY_ENV: "1.0"})
    url = proc.start()
    try:
        await _process_round(url, data_dir, tmp_path, spec, 1)
        marker = data_dir / "state" / "working.json"
        await wait_for(lambda: marker.exists() and "applying" in marker.read_text(), timeout=30)
        await _wait_modules_touched(data_dir)
    finally:
        proc.kill9()
    assert json.loads(marker.read_text())["applying"] == 1  # torn: some modules have D1
    proc = NodeProcess(data_dir, tiny_base)
    url = proc.start()
    try:
        await _wait_state(url, data_dir, 1)
        assert _working_error(data_dir, _exact_state(data_dir, 1)) <= 1e-6
        await _process_round(url, data_dir, tmp_path, spec, 2)
        await _wait_state(url, data_dir, 2)
        assert _working_error(data_dir, _exact_state(data_dir, 2)) <= 1e-6
    finally:
        proc.terminate()


async def _wait_modules_touched(data_dir: Path) -> None:
    """Half way: the first module already holds D1 (non-zero), the state is torn."""
    def torn():
        with ResidualFile(data_dir / "state" / "working.safetensors") as working:
            return any(float(working.delta(p).abs().max()) > 0 for p in working.modules)
    await wait_for(torn, timeout=30, interval=0.1)


async def test_kill_during_a_checkpoint_leaves_a_usable_state(tmp_path, tiny_base, spec, data_dir):
    proc = NodeProcess(data_dir, tiny_base, env={FAULT_CHECKPOINT_DELAY_ENV: "3"},
                       extra=["--checkpoint-every", "1"])
    url = proc.start()
    partial = data_dir / "state" / "checkpoints" / ".R-00000001.safetensors.partial"
    try:
        await _process_round(url, data_dir, tmp_path, spec, 1)
        await wait_for(partial.exists, timeout=30)
    finally:
        proc.kill9()
    proc = NodeProcess(data_dir, tiny_base, extra=["--checkpoint-every", "1"])
    url = proc.start()
    try:
        await _wait_state(url, data_dir, 1)
        # The cut copy is gone and the checkpoint is written again before anything else.
        final = data_dir / "state" / "checkpoints" / "R-00000001.safetensors"
        await wait_for(lambda: final.exists() and not partial.exists(), timeout=30)
        await _process_round(url, data_dir, tmp_path, spec, 2)
        await _wait_state(url, data_dir, 2)

        async def checkpointed() -> bool:  # written after the state reaches the round
            async with _client(url, data_dir, "probe") as c:
                return ((await c.state()).get("checkpoint") or {}).get("round") == 2
        await wait_for(checkpointed, timeout=60, interval=0.2)
        assert _working_error(data_dir, _exact_state(data_dir, 2)) <= 1e-6
        assert sorted(p.name for p in (data_dir / "state" / "checkpoints").iterdir()) == [
            "R-00000002.json", "R-00000002.safetensors"]
    finally:
        proc.terminate()


async def test_kill_during_garbage_collection_loses_nothing_still_referenced(
        tmp_path, tiny_base, spec, data_dir):
    flags = ["--keep-rounds", "1", "--checkpoint-every", "1"]
    proc = NodeProcess(data_dir, tiny_base, env={FAULT_GC_DELAY_ENV: "1.0"}, extra=flags)
    url = proc.start()
    try:
        for number in (1, 2):
            await _process_round(url, data_dir, tmp_path, spec, number)
            await _wait_state(url, data_dir, number)
        before = blob_files(data_dir)

        def pruning_started():
            con = sqlite3.connect(f"file:{data_dir / 'ledger.sqlite'}?mode=ro", uri=True)
            try:
                row = con.execute("select pruned_at from rounds where round = 1").fetchone()
            finally:
                con.close()
            return row[0] is not None and len(blob_files(data_dir)) < len(before)
        await wait_for(pruning_started, timeout=30, interval=0.1)
    finally:
        proc.kill9()
    half_done = blob_files(data_dir)
    proc = NodeProcess(data_dir, tiny_base, extra=flags)
    url = proc.start()
    try:
        await _process_round(url, data_dir, tmp_path, spec, 3)
        await _wait_state(url, data_dir, 3)
        ledger = Ledger(data_dir / "ledger.sqlite")
        try:
            kept, pruned = ledger.blob_references()
            assert pruned & half_done  # the kill did cut the collection short
            await wait_for(lambda: not (pruned & blob_files(data_dir)), timeout=30)
            assert kept <= blob_files(data_dir)  # every blob a kept round names is there
            assert ledger.first_retained_round() == 3
        finally:
            ledger.close()
        async with _client(url, data_dir, "x") as c:
            pulled = await c.pull(tmp_path / "pulled", round=3)
        assert (pulled / "adapter_model.safetensors").exists()
    finally:
        proc.terminate()


async def test_a_state_that_cannot_match_the_log_stops_and_is_never_read(tmp_path, tiny_base):
    """A damaged residual on disk (same hash name, other numbers: bit rot) makes the rebuilt
    state disagree with the log's fingerprint twice: the node reports it and refuses readers."""
    from safetensors.torch import load_file, save_file

    from chorus_p2p.state.store import StateError

    node = await start_node(tmp_path / "d", tiny_base, checkpoint_every=100)
    try:
        for number in (1, 2, 3):
            await submit_round(node, tmp_path, number)
        await node.state.reader(3)
    finally:
        await node.stop()
    ledger = Ledger(tmp_path / "d" / "ledger.sqlite")
    try:
        sha = ledger.round(2)["residual_sha"]
    finally:
        ledger.close()
    damaged = BlobStore(tmp_path / "d" / "blobs").path(sha)
    tensors = load_file(str(damaged))
    save_file({k: v * 1.5 for k, v in tensors.items()}, str(damaged),
              metadata={"format": "chorus-residual", "version": "1"})
    # The working file is wiped too, so the node must rebuild from the (damaged) residuals.
    (tmp_path / "d" / "state" / "working.json").write_text(json.dumps({"round": 3,
                                                                       "applying": 4}))
    node = await start_node(tmp_path / "d", tiny_base, checkpoint_every=100)
    try:
        await wait_for(lambda: node.state.diverged is not None, timeout=30)
        with pytest.raises(StateError, match="disagrees with the federation's log"):
            await node.state.reader(3, timeout=2)
        async with AsyncNodeClient(node.url, secret=node.identity.secret, client_id="x") as c:
            assert (await c.state())["diverged"]
        stuck_at = node.state_store.round
        await periodic_work(node, 5)  # the node's periodic work ran: time to loop, if it would
        assert node.state_store.round == stuck_at  # it stopped: no restore loop
    finally:
        await node.stop()


async def test_keep_rounds_all_keeps_every_rounds_files_through_gc(tmp_path, tiny_base):
    """README: `--keep-rounds all` (for audit) keeps every round's blobs: after 8 rounds, a
    checkpoint every 2 and an explicit GC, no round is pruned, every residual and client
    update is on disk, and round 1's files still download (audit, medium 10)."""
    from chorus_p2p.node.settings import parse_keep_rounds

    node = await start_node(tmp_path / "d", tiny_base, keep_rounds=parse_keep_rounds("all"),
                            checkpoint_every=2)
    try:
        for number in range(1, 9):
            await submit_round(node, tmp_path, number)
        await node.state.reader(8)
        async with AsyncNodeClient(node.url, secret=node.identity.secret, client_id="audit",
                                   admin_token=node.identity.admin_token) as c:
            await c.gc()
            await c.download("residual", 1, tmp_path / "r1.safetensors")
        on_disk = blob_files(tmp_path / "d")
        for number in range(1, 9):
            row = node.ledger.round(number)
            assert row["pruned_at"] is None, number
            assert row["residual_sha"] in on_disk, number
            assert {u["blob_sha"] for u in node.ledger.updates(number)} <= on_disk, number
        assert (tmp_path / "r1.safetensors").stat().st_size > 0
    finally:
        await node.stop()
