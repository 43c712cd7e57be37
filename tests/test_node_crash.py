"""kill -9 a real node process during an upload, during aggregation and right after a commit;
on restart the ledger and blob store are consistent and no accepted update is lost or doubled."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest

from chorus_p2p.trust.auth import request_key, sign_headers
from chorus_p2p.node.blobs import BlobStore, sha256_file
from chorus_p2p.trust.identity import init_data_dir, load_identity
from chorus_p2p.node.ledger import Ledger
from chorus_p2p.node.rounds import FAULT_DELAY_ENV

from nodeutil import NodeProcess, blob_files, wait_for, write_update
from nodeutil import dir_client as client

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def data_dir(tmp_path):
    init_data_dir(tmp_path / "node", "crashlab")
    return tmp_path / "node"


def assert_consistent(data_dir) -> Ledger:
    """Every blob the ledger names exists and verifies; no partial files; one open round at most."""
    ledger = Ledger(data_dir / "ledger.sqlite")
    blobs = BlobStore(data_dir / "blobs")
    for row in ledger.list_rounds(limit=1000):
        for key in ("adapter_sha", "adapter_config_sha", "residual_sha"):
            if row[key]:
                assert sha256_file(blobs.verified_path(row[key])) == row[key]
    for number in range(ledger.count_rounds()):
        for update in ledger.updates(number):
            blobs.verified_path(update["blob_sha"])
    states = [r["state"] for r in ledger.list_rounds(limit=1000)]
    assert sum(s != "committed" for s in states) <= 1
    return ledger


async def test_kill_during_upload_loses_nothing(data_dir, tiny_base, spec, tmp_path):
    proc = NodeProcess(data_dir, tiny_base)
    url = proc.start()
    try:
        update = write_update(tmp_path / "u.safetensors", spec, 1).read_bytes()
        async with client(url, data_dir, "early") as c:
            await c.submit(write_update(tmp_path / "e.safetensors", spec, 7), examples=2)
        key = request_key(load_identity(data_dir).secret)
        path = "/v1/rounds/1/updates?examples=3&trained_from=0"
        headers = sign_headers(key, "POST", path, "slow", hashlib.sha256(update).hexdigest(),
                               to=load_identity(data_dir).node_id)
        headers["Content-Type"] = "application/octet-stream"
        headers["Content-Length"] = str(len(update))
        killed = asyncio.Event()

        async def slow_body():
            yield update[: len(update) // 2]
            await killed.wait()
            yield update[len(update) // 2:]

        async def upload():
            async with aiohttp.ClientSession() as session:
                try:
                    async with session.post(url + path, data=slow_body(), headers=headers) as r:
                        return r.status
                except aiohttp.ClientError:
                    return "connection lost"

        task = asyncio.create_task(upload())
        await wait_for(lambda: any((data_dir / "blobs" / "tmp").iterdir()), timeout=20)
        proc.kill9()
        killed.set()
        assert await asyncio.wait_for(task, 20) == "connection lost"
    finally:
        proc.terminate()

    restarted = NodeProcess(data_dir, tiny_base)
    url = restarted.start()
    try:
        assert list((data_dir / "blobs" / "tmp").iterdir()) == []  # partial upload swept
        ledger = assert_consistent(data_dir)
        assert [u["node_id"] for u in ledger.updates(1)] == ["early"]
        ledger.close()
        async with client(url, data_dir, "slow") as c:  # the interrupted client simply retries
            assert (await c.submit(tmp_path / "u.safetensors", examples=3))["duplicate"] is False
            await wait_for(lambda: _round_state(c, 1, "committed"), timeout=60)
    finally:
        restarted.terminate()
    ledger = assert_consistent(data_dir)
    assert sorted(u["node_id"] for u in ledger.updates(1)) == ["early", "slow"]


async def _round_state(c, number, state):
    return (await c.round(number))["state"] == state


async def test_kill_during_aggregation_reaggregates_on_restart(data_dir, tiny_base, spec, tmp_path):
    proc = NodeProcess(data_dir, tiny_base, env={FAULT_DELAY_ENV: "60"})
    url = proc.start()
    try:
        for i in range(2):
            async with client(url, data_dir, f"c{i}") as c:
                await c.submit(write_update(tmp_path / f"a{i}.safetensors", spec, i), examples=i + 1)
        async with client(url, data_dir, "watch") as c:
            await wait_for(lambda: _round_state(c, 1, "aggregating"), timeout=30)
        proc.kill9()
    finally:
        proc.terminate()
    ledger = Ledger(data_dir / "ledger.sqlite")
    assert ledger.round(1)["state"] == "aggregating" and ledger.round(2) is None
    ledger.close()

    restarted = NodeProcess(data_dir, tiny_base)
    url = restarted.start()
    try:
        async with client(url, data_dir, "watch") as c:
            await wait_for(lambda: _round_state(c, 1, "committed"), timeout=60)
            status = await c.status()
        assert status["current_round"]["round"] == 2
    finally:
        restarted.terminate()
    ledger = assert_consistent(data_dir)
    row = ledger.round(1)
    assert row["metrics"]["updates"] == 2 and sorted(row["metrics"]["nodes"]) == ["c0", "c1"]
    assert len(ledger.updates(1)) == 2
    kinds = [e["kind"] for e in ledger.events_since(0)]
    assert kinds.count("round_committed") == 1 and kinds.count("update_accepted") == 2


async def test_kill_right_after_commit_keeps_the_round(data_dir, tiny_base, spec, tmp_path):
    proc = NodeProcess(data_dir, tiny_base)
    url = proc.start()
    try:
        for i in range(2):
            async with client(url, data_dir, f"c{i}") as c:
                await c.submit(write_update(tmp_path / f"k{i}.safetensors", spec, i), examples=2)
        async with client(url, data_dir, "watch") as c:
            await wait_for(lambda: _round_state(c, 1, "committed"), timeout=60, interval=0.01)
        proc.kill9()
    finally:
        proc.terminate()
    blobs_before = blob_files(data_dir)
    restarted = NodeProcess(data_dir, tiny_base)
    url = restarted.start()
    try:
        async with client(url, data_dir, "watch") as c:
            rounds = await c.all_rounds()
            adapter_sha = (await c.round(1))["adapter_sha"]
            await c.pull(tmp_path / "pulled")
    finally:
        assert restarted.terminate() == 0  # SIGTERM is a clean exit
    assert [r["round"] for r in rounds] == [2, 1, 0]
    assert [r["state"] for r in rounds] == ["open", "committed", "committed"]
    assert sha256_file(tmp_path / "pulled" / "adapter_model.safetensors") == adapter_sha
    assert blob_files(data_dir) == blobs_before  # nothing recomputed, nothing lost
    ledger = assert_consistent(data_dir)
    assert len(ledger.updates(1)) == 2


async def test_sigterm_stops_quickly_while_a_dashboard_watches(data_dir, tiny_base):
    """Issue 20 #4: an event-stream subscriber (the TUI) held SIGTERM for ~33 s. The node now
    closes every stream with 1001 (going away) as it stops, and the subscriber sees the close."""
    import time

    proc = NodeProcess(data_dir, tiny_base)
    url = proc.start()
    closed = asyncio.Event()

    async def watch():
        async with client(url, data_dir, "tui") as c:
            async for _ in c.events(tail=10):
                pass
        closed.set()

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.sleep(1.0)  # attached and idle, as a dashboard is most of the time
        started = time.monotonic()
        code = await asyncio.to_thread(proc.terminate)
        took = time.monotonic() - started
        await asyncio.wait_for(closed.wait(), 10)
    finally:
        watcher.cancel()
    assert code == 0 and took < 10, (code, took)
