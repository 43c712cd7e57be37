"""The TUI: pilot tests against a real node on loopback, and snapshots of every view."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from textual.widgets import DataTable

from chorus_p2p.client import AsyncNodeClient
from chorus_p2p.tui.app import ChorusApp
from chorus_p2p.tui.state import FederationState

from chorus_p2p.trust.identity import init_data_dir
from chorus_p2p.tui.state import STALE_AFTER_S

from nodeutil import Federation, NodeProcess, start_node, wait_for, write_update

RECORDING = Path(__file__).parent / "fixtures" / "tui_recording.json"
VIEWS = {"federation": [], "round": ["2"], "history": ["3"], "events": ["4"],
         "help": ["question_mark"], "confirm-reject": ["down", "down", "down", "x"]}


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
            await wait_for(lambda: app.state.status.get("paused"), timeout=10)
            await pilot.press("p")  # and resumed: round 2 must open below
            await wait_for(lambda: not node.rounds.paused, timeout=10)
            # a approves only a pending member under the cursor, never the first row
            await pilot.press("1")
            await pilot.press("a")
            await pilot.pause()
            assert app.screen.__class__.__name__ != "ConfirmScreen"
            assert any("select a pending member first" in n for n in notifications(app))
            # r asks first, naming the round; n leaves the round alone
            await pilot.press("r")
            await pilot.pause()
            assert app.screen.__class__.__name__ == "ConfirmScreen"
            assert "round 1 now" in str(app.screen.query_one("#confirm-question").render())
            await pilot.press("n")
            await pilot.pause()
            assert node.ledger.round(1)["state"] == "collecting"
            # y closes the round the question named: here round 1 committed (another admin)
            # while the question was open, and y must not cut round 2 short
            await pilot.press("r")
            await pilot.pause()
            await client.close_round()
            await wait_for(lambda: (node.ledger.round(2) or {}).get("state") in ("open",
                                                                                 "collecting"),
                           timeout=20)
            await pilot.press("y")
            await wait_for(lambda: any("no longer collecting" in n
                                       for n in notifications(app)), timeout=10)
            assert node.ledger.round(2)["state"] in ("open", "collecting")
            # and with nothing submitted, r does not offer to aggregate 0 updates
            await wait_for(lambda: (app.state.current_round or {}).get("round") == 2, timeout=10)
            await pilot.press("r")
            await pilot.pause()
            assert app.screen.__class__.__name__ != "ConfirmScreen"
            assert any("round 2 has no updates yet" in n for n in notifications(app))
            # ? opens the help screen
            await pilot.press("question_mark")
            await pilot.pause()
            assert app.screen.__class__.__name__ == "HelpScreen"
        # quitting closes the app's HTTP session on its own loop (no "Unclosed client session")
        assert client._session is None
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
    assert len(state.members) == 4 and state.current_round["round"] == 4
    assert [m["name"] for m in state.members if m["status"] == "pending"] == ["lab-laptop"]
    assert [r["round"] for r in state.committed_rounds()] == [1, 2, 3]
    assert state.training["bob"].step == 12
    assert [e["kind"] for e in state.events_at("warning")] == ["update_rejected"]


async def test_history_shows_what_the_nodes_measured_of_each_round():
    """Issue 21 #5: with ``up --eval-data`` each node measures every committed global model on
    its own held-out text; the history's held-out column is their mean, "-" where none did."""
    app = recorded_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("3")
        await pilot.pause()
        table = app.query_one("#history", DataTable)
        column = [c.label.plain for c in table.columns.values()].index("held-out")
        cells = {table.get_row_at(i)[0]: table.get_row_at(i)[column]
                 for i in range(table.row_count)}
    assert cells == {"3": f"{(2.437 + 2.559) / 2:.3f}", "2": f"{(2.511 + 2.603) / 2:.3f}",
                     "1": "-"}
    async with recorded_app().run_test(size=(80, 24)) as pilot:  # and every column fits 80
        await pilot.press("3")
        await pilot.pause()
        table = pilot.app.query_one("#history", DataTable)
        assert table.virtual_size.width <= table.size.width, (table.virtual_size, table.size)


def selected_key(table: DataTable) -> str:
    return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value


async def test_selection_stays_on_its_member_and_reject_asks_first():
    app = recorded_app()
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.query_one("#members", DataTable)
        await pilot.pause()
        assert app.focused is table  # on attach: the arrows work without a Tab first
        await pilot.press("down", "j")
        chosen = selected_key(table)
        assert table.cursor_row == 2
        # A refresh brings a new member at the top and new heartbeat ages: the cursor follows
        # the member, not the row number.
        app.state.members = [{"node_id": "0" * 64, "name": "newcomer", "status": "pending",
                              "role": None, "last_seen_age_s": 0.2, "addresses": []},
                             *[{**m, "last_seen_age_s": 1.5} for m in app.state.members]]
        app.render_all()
        await pilot.pause()
        assert selected_key(table) == chosen and table.cursor_row == 3
        # x and a act only on a pending member: on a live one they say so and ask nothing
        for key in ("x", "a"):
            await pilot.press(key)
            await pilot.pause()
            assert app.screen.__class__.__name__ != "ConfirmScreen"
        assert sum("select a pending member" in n for n in notifications(app)) == 2
        # on the pending newcomer, x asks before a permanent rejection, naming it; n cancels
        await pilot.press("k", "k", "k")  # j/k move as the arrows do
        assert selected_key(table) == "0" * 64
        await pilot.press("x")
        await pilot.pause()
        assert app.screen.__class__.__name__ == "ConfirmScreen"
        assert "newcomer" in str(app.screen.query_one("#confirm-question").render())
        await pilot.press("n")
        await pilot.pause()
        assert app.screen.__class__.__name__ != "ConfirmScreen"
        assert not any("not connected" in n for n in notifications(app))
        await pilot.press("x", "y")  # yes goes ahead (here: no node to send it to)
        await pilot.pause()
        assert any("not connected" in n for n in notifications(app))


@pytest.mark.parametrize("size", [(80, 24), (60, 20)], ids=["80x24", "60x20"])
async def test_small_terminals_keep_help_and_quit_and_the_help_scrolls(size):
    app = recorded_app()
    async with app.run_test(size=size) as pilot:
        def footer_keys() -> dict:
            return {k.key: k.region for k in app.query("FooterKey")}

        # the footer is laid out a refresh or more after start (on a loaded machine, later
        # than one pause): wait, bounded, for it to have a size before reading its regions
        for _ in range(100):
            await pilot.pause(0.05)
            regions = footer_keys()
            if all(regions.get(k) is not None and regions[k].width > 0
                   for k in ("question_mark", "q")):
                break
        for key in ("question_mark", "q"):
            region = footer_keys()[key]
            assert region.width > 0 and region.right <= size[0], (key, region)
        # every column but the address (last, the one to lose) is shown whole
        table = app.query_one("#members", DataTable)
        columns = list(table.columns.values())
        through_status = sum(c.get_render_width(table) for c in columns[:-1])
        assert [str(c.label) for c in columns][-2:] == ["status", "address"]
        if size[0] >= 80:
            assert through_status <= table.region.width
        await pilot.press("question_mark")
        await pilot.pause()
        scroll = app.screen.query_one("#help-scroll")
        assert scroll.max_scroll_y > 0  # the help is longer than the window...
        await pilot.press("end")
        await pilot.pause()
        assert scroll.scroll_y == scroll.max_scroll_y > 0  # ...and scrolls to its end


async def test_event_log_keeps_the_scroll_position_the_user_chose():
    app = recorded_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("4")
        log = app.query_one("#event-log")

        def more(n: int, start: int) -> None:
            for i in range(start, start + n):
                app.state.apply_event({"id": 1000 + i, "ts": 1795614051.0 + i,
                                       "kind": "update_accepted", "round": 4,
                                       "data": {"count": i}})
            app.render_all()
        more(60, 0)
        await pilot.pause()
        assert log.is_vertical_scroll_end  # at the bottom, it follows new events
        log.scroll_home(animate=False)
        await pilot.pause()
        lines = len(log.lines)
        more(5, 60)
        await pilot.pause()
        assert len(log.lines) == lines + 5 and log.scroll_y == 0  # scrolled up: it stays put
        log.scroll_end(animate=False)
        await pilot.pause()
        more(5, 65)
        await pilot.pause()
        assert log.is_vertical_scroll_end


async def test_attach_shows_recent_events_and_a_frozen_node_is_stale_within_3s(tmp_path,
                                                                             tiny_base):
    data = tmp_path / "node"
    init_data_dir(data, "frozenlab")
    proc = NodeProcess(data, tiny_base)
    url = proc.start()
    client = AsyncNodeClient.from_data_dir(data, url, client_id="tui")
    try:
        app = ChorusApp(client, url=url)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(lambda: app.state.connected and app.state.events, timeout=15)
            # history on attach: the events recorded before the TUI started
            assert any(e.get("replayed") and e.get("kind") == "round_opened"
                       for e in app.state.events)
            await pilot.pause()
            assert not app.query_one("#banner").display
            proc.proc.send_signal(signal.SIGSTOP)
            frozen_at = time.monotonic()
            try:
                await wait_for(lambda: app.query_one("#banner").display, timeout=15,
                               interval=0.1)
                noticed = time.monotonic() - frozen_at
                assert "no answer" in str(app.query_one("#banner").render())
                # stale at STALE_AFTER_S after the last answer, which came <= 1 poll earlier
                assert noticed <= STALE_AFTER_S + 1.5, noticed
            finally:
                proc.proc.send_signal(signal.SIGCONT)
            await wait_for(lambda: not app.query_one("#banner").display, timeout=15,
                           interval=0.1)
    finally:
        await client.close()
        proc.terminate()


async def test_admin_keys_follow_the_coordinator(tmp_path, tiny_base):
    """Attached to a follower, the admin's pause reaches the coordinator (forwarded).

    The nodes share the event loop with the app here, so a render that holds the loop delays
    heartbeats: at the usual test timeout of 0.4 s, CI load once made the coordinator step
    down (CheckQuorum) right after its election, and the follower the app was attached to
    became the coordinator. A lab's election timeout is seconds; 2 s keeps this test on the
    case it is about."""
    fed = Federation(tmp_path, tiny_base, 2, election_timeout=2.0)
    fed.grant_admin()  # the follower's operator holds the federation admin key
    try:
        leader = await fed.start_all()
        follower = next(n for n in fed.nodes.values() if n is not leader)
        client = AsyncNodeClient(follower.url, secret=follower.identity.secret, client_id="tui",
                                 admin_token=follower.identity.admin_token)
        app = ChorusApp(client, url=follower.url)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(lambda: app.state.connected, timeout=10)
            await pilot.press("p")
            try:
                await wait_for(lambda: leader.rounds.paused, timeout=20)
            except AssertionError:
                raise AssertionError(f"not paused; the TUI said {notifications(app)}") from None
            await wait_for(lambda: any("paused" in n for n in notifications(app)), timeout=5)
        await client.close()
    finally:
        await fed.close()


async def test_tui_exit_code_is_nonzero_when_it_fails(tmp_path):
    class Broken(ChorusApp):
        CSS_PATH = tmp_path / "missing.tcss"

    app = Broken(None, state=FederationState(connected=True))
    await app.run_async(headless=True, size=(80, 24))
    assert app.return_code not in (None, 0)


async def test_history_follows_new_rounds_until_the_user_picks_one():
    """Issue 22: the history stayed at round 110 while the node was at 133 (the cursor kept
    the key of the round that was newest at attach, and the view followed it down)."""
    app = recorded_app()
    template = app.state.committed_rounds()[-1]

    def rounds_up_to(last: int) -> list[dict]:
        return [{**template, "round": n} for n in range(last, 0, -1)]
    async with app.run_test(size=(80, 24)) as pilot:
        app.state.rounds = rounds_up_to(110)
        app.render_all()
        await pilot.press("3")
        await pilot.pause()
        table = app.query_one("#history", DataTable)
        assert app.focused is table and selected_key(table) == "110"
        for last in (111, 120, 133):  # live, one refresh after another
            app.state.rounds = rounds_up_to(last)
            app.render_all()
            await pilot.pause()
            assert selected_key(table) == str(last) and table.scroll_y == 0, last
        # a reconnect replaces the whole list: still the newest
        app.state.rounds = rounds_up_to(140)
        app.render_all()
        await pilot.pause()
        assert selected_key(table) == "140"
        # the user moves to an older round: it stays there as rounds arrive
        await pilot.press("j", "j", "j")
        assert selected_key(table) == "137"
        app.state.rounds = rounds_up_to(145)
        app.render_all()
        await pilot.pause()
        assert selected_key(table) == "137"


async def test_read_only_hides_the_admin_keys():
    """Attached with a join token only (no admin token), the admin keys leave the footer and
    do nothing; with the admin token they are there."""
    class JoinTokenOnly:
        url, admin_token = "http://127.0.0.1:1", None

    for client, read_only in ((JoinTokenOnly(), True), (None, False)):
        app = ChorusApp(None, state=recorded_app().state, url="http://127.0.0.1:1",
                        read_only=ChorusApp(client).read_only if client else None)
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot.pause()
            footer = {k.key for k in app.query("FooterKey")}
            assert app.read_only is read_only
            assert ({"r", "p", "c"} & footer == set()) is read_only, footer
            await pilot.press("down", "down", "down", "x")  # the pending member
            await pilot.pause()
            assert (app.screen.__class__.__name__ == "ConfirmScreen") is not read_only
            assert ("read-only" in app.sub_title) is read_only


async def test_slash_filters_the_event_log_by_text_and_lines_fit_80_columns():
    app = recorded_app()
    node_id = "9f" * 16  # a node id as events carry it: 32 hex digits
    app.state.apply_event({"id": 9000, "ts": 1795614051.0, "kind": "training_progress",
                           "round": 4, "data": {"node_id": node_id, "step": 17, "steps": 30,
                                                "loss": 2.1234}})
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("slash")
        await pilot.pause()
        assert app.screen.__class__.__name__ == "FilterScreen"
        await pilot.press(*"training", "enter")
        await pilot.pause()
        log = app.query_one("#event-log")
        assert app.focused is log
        text = [strip.text for strip in log.lines]
        assert "containing 'training'" in str(app.query_one("#event-filter").render())
        shown = " ".join(text)
        assert "training_progress" in shown and "update_accepted" not in shown
        # at 80 columns nothing of the detail is cut: every line fits the log's own width
        # (the scrollbar's columns excluded), step and loss come first, the id short
        assert max(strip.cell_length for strip in log.lines) <= \
            log.scrollable_content_region.width < 80
        assert "step=17" in shown and "loss=2.123" in shown and node_id[:8] in shown
        assert node_id not in shown
        await pilot.press("slash", *["backspace"] * len("training"), "enter")  # empty: all
        await pilot.pause()
        assert "update_accepted" in " ".join(strip.text for strip in log.lines)


async def test_f_cycles_the_event_log_through_the_severities():
    """Audit finding 12: ``f`` was untested. all -> info -> warning -> all, and the log shows
    exactly the recorded events of that level."""
    app = recorded_app()
    levels = [e.get("level", "info") for e in app.state.events]
    assert "warning" in levels and "info" in levels  # the recording holds both
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("4")
        log = app.query_one("#event-log")

        def shown() -> str:
            return "\n".join(strip.text for strip in log.lines)
        for severity in ("info", "warning", "all"):
            await pilot.press("f")
            await pilot.pause()
            assert app.severity == severity
            assert f"events: {severity}" in str(app.query_one("#event-filter").render())
            text = shown()
            kept = {e["kind"] for e in app.state.events
                    if severity == "all" or e.get("level", "info") == severity}
            dropped = {e["kind"] for e in app.state.events} - kept
            assert all(kind in text for kind in kept), (severity, kept)
            assert not any(kind in text for kind in dropped), (severity, dropped)


async def test_c_copies_the_join_token_and_a_reconnect_replays_what_it_missed(tmp_path,
                                                                           tiny_base):
    """Audit finding 5: ``c`` and the replay on reconnect were untested. ``c`` puts the node's
    own join token on the clipboard. While the TUI cannot reach the node, the node runs a
    whole round elsewhere (another port); when the node is back at the TUI's address, the
    reconnect asks for the events after the last one it saw and shows that round's commit,
    once."""
    data = tmp_path / "node"
    node = await start_node(data, tiny_base)
    port = node.address[1]
    token = node.identity.join_token()
    client = AsyncNodeClient(node.url, secret=node.identity.secret, client_id="tui",
                             admin_token=node.identity.admin_token)
    app = ChorusApp(client, url=node.url)
    try:
        async with app.run_test(size=(120, 32)) as pilot:
            await wait_for(lambda: app.state.connected and app.state.last_event_id >= 0,
                           timeout=15)
            await pilot.press("c")
            await wait_for(lambda: app.clipboard == token, timeout=10)
            seen = app.state.last_event_id
            await node.stop()
            await wait_for(lambda: not app.state.connected, timeout=10)
            # Meanwhile, at an address the TUI does not know, round 1 commits.
            away = await start_node(data, tiny_base)
            for k, cid in enumerate(("a", "b")):
                async with AsyncNodeClient(away.url, secret=away.identity.secret,
                                           client_id=cid) as c:
                    await c.submit(write_update(tmp_path / f"{cid}.safetensors", away.spec, k),
                                   examples=1)
            await wait_for(lambda: (away.ledger.round(1) or {}).get("state") == "committed",
                           timeout=15)
            await away.stop()
            assert not app.state.connected
            node = await start_node(data, tiny_base, port=port)
            await wait_for(lambda: app.state.connected and any(
                e["kind"] == "round_committed" and e.get("round") == 1
                for e in app.state.events), timeout=20)
            missed = [e for e in app.state.events if (e.get("id") or -1) > seen]
            ids = [e["id"] for e in missed if e.get("id") is not None]
            assert len(ids) == len(set(ids)), "a replayed event was shown twice"
            await pilot.press("4")

            def shown() -> str:  # the log redraws on the TUI's 1 s tick
                return "\n".join(strip.text for strip in app.query_one("#event-log").lines)
            await wait_for(lambda: "round_committed" in shown(), timeout=10)
            assert shown().count("round_committed") == 1
    finally:
        await client.close()
        await node.stop()
