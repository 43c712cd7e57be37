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
from textual.css.query import NoMatches
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Header, Markdown, Static, TabbedContent, TabPane
from textual.worker import Worker

from .state import SEVERITIES, FederationState
from .views import EventLog, FederationView, HistoryView, RoundView, clock, short

REFRESH_S = 1.0
REQUEST_TIMEOUT_S = 2.5  # one poll may not hold the next ones back (a frozen node never answers)
# An admin action may be forwarded to the coordinator and race an election; it gets longer than
# a poll, but never holds the dashboard: it runs in a worker while the screen keeps updating.
ACTION_TIMEOUT_S = 20.0
EVENT_HISTORY = 200  # recorded events shown on attach

HELP = """\
# chorus-node tui

| key | action |
|---|---|
| `1` `2` `3` `4` | federation, round, history, events |
| `r` | aggregate the current round now (admin; asks first) |
| `p` | pause / resume rounds (admin) |
| `a` | approve the selected pending member (admin, Federation view) |
| `x` | reject the selected pending member for good (admin; asks first) |
| `c` | copy the join token to the clipboard (admin, on the node's machine) |
| `f` | filter the event log by severity |
| arrows, PgUp/PgDn | move in tables and logs; the selection stays on its member |
| `?` | this help (scroll it with the arrows) |
| `q` | quit |

Admin actions go to the attached node, which forwards them to the current coordinator, so
they keep working after an election moves the coordinator elsewhere. When the node refuses,
its message is shown.

A red banner means the node is unreachable, or has not answered for more than
3 seconds (frozen, overloaded or cut off): the data under it is from the time it shows.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            with VerticalScroll(id="help-scroll"):
                yield Markdown(HELP)
            yield Static("arrows scroll; ? or Esc closes", id="help-hint")

    def on_mount(self) -> None:
        self.query_one("#help-scroll").focus()


class ConfirmScreen(ModalScreen[bool]):
    """y/n before an action that cannot be undone or that cuts a round short."""

    BINDINGS = [Binding("y", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(self.question, id="confirm-question")
            yield Static("y: yes    n / Esc: no", id="confirm-hint")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class ChorusApp(App[None]):
    TITLE = "chorus-p2p"
    CSS_PATH = Path(__file__).with_name("chorus.tcss")
    # Help and quit come first so that they stay in the footer at any width (80x24 included);
    # the views' keys are on the tabs and in the help.
    BINDINGS = [
        Binding("question_mark", "help", "help"),
        Binding("q", "quit", "quit"),
        Binding("1", "show('federation')", "federation", show=False),
        Binding("2", "show('round')", "round", show=False),
        Binding("3", "show('history')", "history", show=False),
        Binding("4", "show('events')", "events", show=False),
        Binding("r", "close_round", "round now"),
        Binding("p", "toggle_pause", "pause"),
        Binding("a", "approve", "approve", show=False),
        Binding("x", "reject", "reject", show=False),
        Binding("c", "copy_token", "token"),
        Binding("f", "cycle_filter", "filter", show=False),
    ]

    def __init__(self, client: Any = None, *, state: FederationState | None = None,
                 url: str = ""):
        """``client``: an AsyncNodeClient; without one the app just shows ``state`` (tests)."""
        super().__init__()
        self.client = client
        self.state = state or FederationState()
        self.url = url or getattr(client, "url", "")
        self.severity = "all"
        self._poll: Worker | None = None

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

    async def on_unmount(self) -> None:
        # Close the HTTP session on the loop that opened it (no "Unclosed client session").
        if self.client is not None:
            await self.client.close()

    # -- rendering ---------------------------------------------------------------------------------
    def render_all(self) -> None:
        try:
            banner = self.query_one("#banner", Static)
        except NoMatches:  # the app is closing: a last timer tick after the widgets went
            return
        quiet = self.state.quiet_for()
        if self.client is not None and not self.state.connected:
            banner.update(f"node unreachable at {self.url}: {self.state.error or 'connecting'}"
                          " - retrying")
            banner.display = True
        elif self.client is not None and self.state.stale and quiet is not None:
            banner.update(f"no answer from {self.url} for {quiet:.0f}s (frozen, overloaded or "
                          f"cut off?) - data below is from {clock(self.state.last_contact)}")
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
        self.state.error = None
        self.state.touch()

    @work(exclusive=True, group="connection")
    async def connect(self) -> None:
        """Keep a live connection: refresh, then follow events; on failure, back off and retry.

        The first attach replays the last recorded events (the log is not empty on attach);
        a reconnect asks for everything after the last one seen, so nothing is missed.
        """
        delay = 0.5
        while True:
            try:
                await asyncio.wait_for(self.refresh_state(), REQUEST_TIMEOUT_S * 4)
                self.state.connected = True
                self.render_all()
                delay = 0.5
                seen = self.state.last_event_id
                stream = (self.client.events(since=seen) if seen >= 0
                          else self.client.events(tail=EVENT_HISTORY))
                async for event in stream:
                    self.state.touch()
                    if event.get("kind") != "hello":
                        self.state.apply_event(event)
                raise ConnectionError("event stream closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # unreachable, restarting, auth: show it, then retry
                self.state.connected = False
                self.state.error = (str(exc).splitlines() or [exc.__class__.__name__])[0][:160]
                self.render_all()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _tick(self) -> None:
        """Every second: poll in the background (never two polls at once) and redraw, so the
        staleness banner appears on time even while a poll hangs on a frozen node."""
        if self.state.connected and (self._poll is None or self._poll.is_finished):
            self._poll = self.run_worker(self._poll_once(), group="poll", exit_on_error=False)
        self.render_all()

    async def _poll_once(self) -> None:
        try:
            await asyncio.wait_for(self.refresh_state(), REQUEST_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.state.error = f"no answer in {REQUEST_TIMEOUT_S:g}s"
        except Exception as exc:
            self.state.error = (str(exc).splitlines() or [exc.__class__.__name__])[0][:160]
        else:
            self.render_all()

    # -- actions -----------------------------------------------------------------------------------
    def action_show(self, tab: str) -> None:
        self.query_one(TabbedContent).active = "history-tab" if tab == "history" else tab

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_cycle_filter(self) -> None:
        self.severity = SEVERITIES[(SEVERITIES.index(self.severity) + 1) % len(SEVERITIES)]
        self.query_one(EventLog).render_state(self.state, self.severity)

    def _in_background(self, coro) -> None:
        """Run an admin action in a worker: key presses and redraws go on while it waits."""
        self.run_worker(coro, group="actions", exit_on_error=False)

    async def _call(self, what: str, coro_factory) -> Any:
        if self.client is None:
            self.notify("not connected to a node", severity="error")
            return None
        try:
            result = await asyncio.wait_for(coro_factory(), ACTION_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.notify(f"{what}: no answer in {ACTION_TIMEOUT_S:g}s; it may still take effect "
                        "(watch the event log)", severity="warning", timeout=8)
            return None
        except Exception as exc:
            message = getattr(exc, "message", None) or str(exc)
            code = getattr(exc, "code", None)
            self.notify(f"{what} refused: {message}" + (f" [{code}]" if code else ""),
                        severity="error", timeout=8)
            return None
        self._tick()
        return result

    def _confirm(self, question: str, then) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self._in_background(then())
        self.push_screen(ConfirmScreen(question), answered)

    def action_close_round(self) -> None:
        current = self.state.current_round
        if current is None:
            self.notify("no round is collecting updates right now", severity="warning")
            return

        async def close() -> None:
            result = await self._call("start round", lambda: self.client.close_round())
            if result:
                self.notify(f"round {result['round']} is aggregating")
        self._confirm(f"Aggregate round {current['round']} now, with the {current['updates']} "
                      f"update(s) it has ({current['min_updates']} wanted)?", close)

    def action_toggle_pause(self) -> None:
        self._in_background(self._toggle_pause())

    async def _toggle_pause(self) -> None:
        paused = bool(self.state.status.get("paused"))
        action = self.client.resume if paused and self.client else (
            self.client.pause if self.client else None)
        result = await self._call("resume" if paused else "pause", lambda: action())
        if result is not None:
            self.notify("rounds resumed" if paused else "rounds paused after the current one")

    def _selected_member(self) -> dict[str, Any] | None:
        table = self.query_one("#members", DataTable)
        if table.row_count == 0:
            return None
        node_id = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        return next((m for m in self.state.members if m["node_id"] == node_id),
                    {"node_id": node_id})

    async def _decide(self, member: dict[str, Any], approve: bool) -> None:
        node_id = member["node_id"]
        verb = "approve" if approve else "reject"
        result = await self._call(verb, lambda: self.client.decide_member(node_id, approve))
        if result is not None:
            self.notify(f"{member.get('name') or short(node_id)}: {result.get('status')}")

    def action_approve(self) -> None:
        member = self._selected_member()
        if member is None:
            self.notify("select a member first (Federation view)", severity="warning")
            return
        self._in_background(self._decide(member, True))

    def action_reject(self) -> None:
        member = self._selected_member()
        if member is None:
            self.notify("select a member first (Federation view)", severity="warning")
            return
        name = member.get("name") or "-"
        self._confirm(f"Reject {name} ({short(member['node_id'])}) for good? A rejected node "
                      "cannot rejoin with the same identity.", lambda: self._decide(member, False))

    def action_copy_token(self) -> None:
        self._in_background(self._copy_token())

    async def _copy_token(self) -> None:
        token = await self._call("copy join token", lambda: self.client.join_token())
        if token:
            self.copy_to_clipboard(token)
            self.notify("join token copied to the clipboard (it is a secret)")


def run_tui(client: Any, url: str) -> int:
    """Run the dashboard; the exit code is non-zero when it stopped on an error."""
    app = ChorusApp(client, url=url)
    app.run()
    return app.return_code or 0
