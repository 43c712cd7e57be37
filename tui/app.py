"""``chorus-node tui``: watch and steer the whole federation from any node.

A client of the node's public API only: HTTP for state and actions, the WebSocket for events.
It reconnects by itself (with a banner saying so) when the node restarts or goes away.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Header, Markdown, Static, TabbedContent, TabPane

from .state import SEVERITIES, FederationState
from .views import EventLog, FederationView, HistoryView, RoundView

REFRESH_S = 1.0

HELP = """\
# chorus-node tui

| key | action |
|---|---|
| `1` `2` `3` `4` | federation, round, history, events |
| `r` | start aggregating the current round now (admin) |
| `p` | pause / resume rounds (admin) |
| `a` / `x` | approve / reject the selected pending member (admin, Federation view) |
| `c` | copy the join token to the clipboard (admin) |
| `f` | filter the event log by severity |
| `?` | this help |
| `q` | quit |

Actions are sent to the node; when it refuses, its message is shown.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            yield Markdown(HELP)
            yield Static("press ? or Esc to close", id="help-hint")


class ChorusApp(App[None]):
    TITLE = "chorus-p2p"
    CSS_PATH = Path(__file__).with_name("chorus.tcss")
    BINDINGS = [
        Binding("1", "show('federation')", "federation"),
        Binding("2", "show('round')", "round"),
        Binding("3", "show('history')", "history"),
        Binding("4", "show('events')", "events"),
        Binding("r", "close_round", "round now"),
        Binding("p", "toggle_pause", "pause/resume"),
        Binding("a", "approve", "approve", show=False),
        Binding("x", "reject", "reject", show=False),
        Binding("c", "copy_token", "join token"),
        Binding("f", "cycle_filter", "filter", show=False),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, client: Any = None, *, state: FederationState | None = None,
                 url: str = ""):
        """``client``: an AsyncNodeClient; without one the app just shows ``state`` (tests)."""
        super().__init__()
        self.client = client
        self.state = state or FederationState()
        self.url = url or getattr(client, "url", "")
        self.severity = "all"
        self._refresh_pending = False

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield Static("", id="banner")
        with TabbedContent(initial="federation"):
            with TabPane("Federation", id="federation"):
                yield FederationView()
            with TabPane("Round", id="round"):
                yield RoundView()
            with TabPane("History", id="history-tab"):
                yield HistoryView()
            with TabPane("Events", id="events"):
                yield EventLog()
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.url
        self.render_all()
        if self.client is not None:
            self.connect()
            self.set_interval(REFRESH_S, self._tick)

    # -- rendering ---------------------------------------------------------------------------------
    def render_all(self) -> None:
        banner = self.query_one("#banner", Static)
        if self.client is not None and not self.state.connected:
            banner.update(f"node unreachable at {self.url}: {self.state.error or 'connecting'}"
                          " - retrying")
            banner.add_class("down")
            banner.display = True
        else:
            banner.display = False
        self.query_one(FederationView).render_state(self.state)
        self.query_one(RoundView).render_state(self.state)
        self.query_one(HistoryView).render_state(self.state)
        self.query_one(EventLog).render_state(self.state, self.severity)

    # -- data --------------------------------------------------------------------------------------
    async def refresh_state(self) -> None:
        status = await self.client.status()
        members = await self.client.members()
        rounds = (await self.client.rounds(limit=100))["rounds"]
        current = status.get("current_round")
        detail = await self.client.round(current["round"]) if current else None
        self.state.status, self.state.members, self.state.rounds = status, members, rounds
        self.state.current_detail = detail
        self.state.connected, self.state.error = True, None

    @work(exclusive=True, group="connection")
    async def connect(self) -> None:
        """Keep a live connection: refresh, then follow events; on failure, back off and retry."""
        delay = 0.5
        last_event = -1
        while True:
            try:
                await self.refresh_state()
                self.render_all()
                delay = 0.5
                async for event in self.client.events(since=last_event if last_event >= 0 else None):
                    if event.get("id") is not None:
                        last_event = max(last_event, int(event["id"]))
                    if event.get("kind") == "hello":
                        continue
                    self.state.apply_event(event)
                    self._refresh_pending = True
                raise ConnectionError("event stream closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # unreachable, restarting, auth: show it, then retry
                self.state.connected = False
                self.state.error = str(exc).splitlines()[0][:160]
                self.render_all()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _tick(self) -> None:
        if not self.state.connected:
            return
        try:
            await self.refresh_state()
        except Exception as exc:
            self.state.connected, self.state.error = False, str(exc).splitlines()[0][:160]
        self._refresh_pending = False
        self.render_all()

    # -- actions -----------------------------------------------------------------------------------
    def action_show(self, tab: str) -> None:
        self.query_one(TabbedContent).active = "history-tab" if tab == "history" else tab

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_cycle_filter(self) -> None:
        self.severity = SEVERITIES[(SEVERITIES.index(self.severity) + 1) % len(SEVERITIES)]
        self.query_one(EventLog).render_state(self.state, self.severity)

    async def _call(self, what: str, coro_factory) -> Any:
        if self.client is None:
            self.notify("not connected to a node", severity="error")
            return None
        try:
            result = await coro_factory()
        except Exception as exc:
            message = getattr(exc, "message", None) or str(exc)
            code = getattr(exc, "code", None)
            self.notify(f"{what} refused: {message}" + (f" [{code}]" if code else ""),
                        severity="error", timeout=8)
            return None
        await self._tick()
        return result

    async def action_close_round(self) -> None:
        result = await self._call("start round", lambda: self.client.close_round())
        if result:
            self.notify(f"round {result['round']} is aggregating")

    async def action_toggle_pause(self) -> None:
        paused = bool(self.state.status.get("paused"))
        action = self.client.resume if paused and self.client else (
            self.client.pause if self.client else None)
        result = await self._call("resume" if paused else "pause", lambda: action())
        if result is not None:
            self.notify("rounds resumed" if paused else "rounds paused after the current one")

    def _selected_member(self) -> str | None:
        table = self.query_one("#members", DataTable)
        if table.row_count == 0:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    async def _decide(self, approve: bool) -> None:
        node_id = self._selected_member()
        if node_id is None:
            self.notify("select a member first (Federation view)", severity="warning")
            return
        verb = "approve" if approve else "reject"
        result = await self._call(verb, lambda: self.client.decide_member(node_id, approve))
        if result is not None:
            self.notify(f"{node_id[:12]}: {result.get('status')}")

    async def action_approve(self) -> None:
        await self._decide(True)

    async def action_reject(self) -> None:
        await self._decide(False)

    async def action_copy_token(self) -> None:
        token = await self._call("copy join token", lambda: self.client.join_token())
        if token:
            self.copy_to_clipboard(token)
            self.notify("join token copied to the clipboard (it is a secret)")


def run_tui(client: Any, url: str) -> None:
    ChorusApp(client, url=url).run()
