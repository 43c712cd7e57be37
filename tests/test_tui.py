"""The TUI: pilot tests against a real node on loopback, and snapshots of every view."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from textual.widgets import DataTable

from chorus_p2p.client import AsyncNodeClient
from chorus_p2p.tui.app import ChorusApp
from chorus_p2p.tui.state import FederationState

from nodeutil import start_node, wait_for, write_update

RECORDING = Path(__file__).parent / "fixtures" / "tui_recording.json"
VIEWS = {"federation": [], "round": ["2"], "history": ["3"], "events": ["4"]}


def notifications(app) -> list[str]:
    return [n.message for n in app._notifications]


async def test_tui_follows_a_live_node_and_its_actions(tmp_path, tiny_base):
    node = await start_node(tmp_path / "node", tiny_base)
    client = AsyncNodeClient(node.url, secret=node.identity.secret, client_id="tui",
                             admin_token=node.identity.admin_token)
    app = ChorusApp(client, url=node.url)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(lambda: app.state.connected, timeout=10)
            await pilot.pause()
            members = app.query_one("#members", DataTable)
            assert members.row_count == 1  # the node itself
            # A round progresses: an update arrives and the round view counts it.
            async with AsyncNodeClient(node.url, secret=node.identity.secret,
                                       client_id="alice") as alice:
                await alice.submit(write_update(tmp_path / "a.safetensors", node.spec, 1),
                                   examples=3)
            await wait_for(lambda: (app.state.current_round or {}).get("updates") == 1, timeout=10)
            await pilot.press("2")
            await pilot.pause()
            assert "1 / 2 updates needed" in str(app.query_one("#round-deadline").render())
            assert any(e.get("kind") == "update_accepted" for e in app.state.events)
            # An action reaches the node.
            await pilot.press("p")
            await wait_for(lambda: node.rounds.paused, timeout=10)
            assert any("paused" in n for n in notifications(app))
            # A refusal shows the node's message: there is no pending member to approve.
            await pilot.press("1")
            await pilot.press("a")
            await wait_for(lambda: any("refused" in n for n in notifications(app)), timeout=10)
            assert any("only pending members" in n for n in notifications(app))
            # ? opens the help screen
            await pilot.press("question_mark")
            await pilot.pause()
            assert app.screen.__class__.__name__ == "HelpScreen"
    finally:
        await client.close()
        await node.stop()


async def test_tui_reconnects_and_says_when_the_node_is_down(tmp_path, tiny_base):
    data = tmp_path / "node"
    node = await start_node(data, tiny_base)
    port = node.address[1]
    client = AsyncNodeClient(node.url, secret=node.identity.secret, client_id="tui")
    app = ChorusApp(client, url=node.url)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(lambda: app.state.connected, timeout=10)
            await node.stop()
            await wait_for(lambda: not app.state.connected, timeout=10)
            await pilot.pause()
            banner = app.query_one("#banner")
            assert banner.display and "node unreachable" in str(banner.render())
            node = await start_node(data, tiny_base, port=port)
            await wait_for(lambda: app.state.connected, timeout=15)
            await pilot.pause()
            assert not app.query_one("#banner").display
    finally:
        await client.close()
        await node.stop()


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.delenv("TZ")
    time.tzset()


def recorded_app() -> ChorusApp:
    state = FederationState.from_recording(json.loads(RECORDING.read_text()))
    return ChorusApp(None, state=state, url="http://127.0.0.1:8470")


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
@pytest.mark.parametrize("view", sorted(VIEWS))
def test_view_snapshots(snap_compare, utc, view, size):
    assert snap_compare(recorded_app(), terminal_size=size, press=VIEWS[view])


def test_recorded_state_is_what_the_views_show():
    state = FederationState.from_recording(json.loads(RECORDING.read_text()))
    assert len(state.members) == 3 and state.current_round["round"] == 4
    assert [r["round"] for r in state.committed_rounds()] == [1, 2, 3]
    assert state.training["bob"].step == 12
    assert [e["kind"] for e in state.events_at("warning")] == ["update_rejected"]
