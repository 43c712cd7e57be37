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
from textual.widgets import (DataTable, Footer, Header, Input, Markdown, RichLog, Static,
                             TabbedContent, TabPane)
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
| arrows, `j` `k`, PgUp/PgDn | move in tables and logs; the selection stays on its member |
| `/` | show only events that contain a text (Enter; an empty text shows all) |
| `f` | filter the event log by severity |
| `r` | aggregate the current round now (admin; asks first, names the round) |
| `p` | pause / resume rounds (admin) |
| `a` | approve the selected pending member (admin; asks first) |
| `x` | reject the selected pending member for good (admin; asks first) |
| `c` | copy the join token to the clipboard (admin, on the node's machine) |
| `?` | this help (scroll it with the arrows) |
| `q` | quit |

Admin actions go to the attached node, which forwards them to the current coordinator, so
they keep working after an election moves the coordinator elsewhere. When the node refuses,
its message is shown. Attached without the node's admin token (a join token only), the TUI
is read-only: the admin keys are hidden and do nothing.

The History view follows new rounds while its cursor is on the newest one; move the cursor
down and it stays on the round you chose.

A red banner means the node is unreachable, or has not answered for more than
3 seconds (frozen, overloaded or cut off): the data under it is from the time it shows.
"""

# Keys that change the federation: hidden, and refused, without the admin token.
ADMIN_ACTIONS = frozenset({"close_round", "toggle_pause", "approve", "reject", "copy_token"})
# The widget that takes the keys in each view (focused on attach and on every switch).
VIEW_FOCUS = {"federation": "#members", "round": "#participants", "history-tab": "#history",
              "events": "#event-log"}


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


class FilterScreen(ModalScreen["str | None"]):
    """``/``: the text the event log must contain; Enter applies, Esc leaves it as it was."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, current: str) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="filter-box"):
            yield Static("show events containing (Enter; empty: all, Esc: cancel)",
                         id="filter-hint")
            yield Input(value=self.current, id="filter-input")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip())

    def action_cancel(self) -> None:
        self.dismiss(None)


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
        Binding("slash", "text_filter", "search", show=False),
        Binding("j", "cursor('down')", "down", show=False),
        Binding("k", "cursor('up')", "up", show=False),
    ]

    def __init__(self, client: Any = None, *, state: FederationState | None = None,
                 url: str = "", read_only: bool | None = None):
        """``client``: an AsyncNodeClient; without one the app just shows ``state`` (tests).
        ``read_only``: hide the admin keys; by default, when the client has no admin token."""
        super().__init__()
        self.client = client
        self.state = state or FederationState()
        self.url = url or getattr(client, "url", "")
        self.severity = "all"
        self.text_filter = ""
        self.read_only = (client is not None and not getattr(client, "admin_token", None)
                          if read_only is None else read_only)
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
        self.sub_title = self.url + ("  (read-only)" if self.read_only else "")
        self.render_all()
        self.call_after_refresh(self._focus_view, "federation")
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
        self.query_one(EventLog).render_state(self.state, self.severity, self.text_filter)

    def _focus_view(self, tab: str) -> None:
        """Keys go to the view's table or log at once: no Tab first (not under a dialog,
        which gives the focus back itself when it closes)."""
        if len(self.screen_stack) > 1:
            return
        try:
            if self.query_one(TabbedContent).active != tab:
                return  # a late call for a view the user already left: focusing into a
                # hidden pane would switch back to it
            self.query_one(VIEW_FOCUS[tab]).focus()
        except (KeyError, NoMatches):
            pass

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self._focus_view(event.pane.id or "")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Read-only: the admin keys leave the footer and do nothing."""
        return not (self.read_only and action in ADMIN_ACTIONS)

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
        pane = "history-tab" if tab == "history" else tab
        self.query_one(TabbedContent).active = pane
        self.call_after_refresh(self._focus_view, pane)  # once the pane is shown

    def action_cursor(self, direction: str) -> None:
        """``j``/``k``: what the arrows do, in the focused table or log."""
        widget = self.focused
        if isinstance(widget, DataTable):
            getattr(widget, f"action_cursor_{direction}")()
        elif isinstance(widget, RichLog):
            getattr(widget, f"action_scroll_{direction}")()

    def action_text_filter(self) -> None:
        self.query_one(TabbedContent).active = "events"

        def chosen(text: str | None) -> None:
            if text is not None:
                self.text_filter = text
                self.query_one(EventLog).render_state(self.state, self.severity, text)
            self.call_after_refresh(self._focus_view, "events")
        self.push_screen(FilterScreen(self.text_filter), chosen)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_cycle_filter(self) -> None:
        self.severity = SEVERITIES[(SEVERITIES.index(self.severity) + 1) % len(SEVERITIES)]
        self.query_one(EventLog).render_state(self.state, self.severity, self.text_filter)

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
        number = current["round"]
        if not current.get("updates"):
            self.notify(f"round {number} has no updates yet: nothing to aggregate",
                        severity="warning")
            return

        async def close() -> None:
            # Bound to the round the question named: if round N committed meanwhile and N + 1
            # is collecting, the node refuses instead of cutting N + 1 short.
            result = await self._call(f"aggregate round {number}",
                                      lambda: self.client.close_round(round=number))
            if result:
                self.notify(f"round {result['round']} is aggregating")
        self._confirm(f"Aggregate round {number} now, with the {current['updates']} "
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

    def _selected_pending(self) -> dict[str, Any] | None:
        """The pending member under the Federation view's cursor; None (and why) otherwise:
        the cursor is always on some row, so a row alone is not a choice."""
        member = self._selected_member() if self.query_one(TabbedContent).active == \
            "federation" else None
        if member is None or member.get("status") != "pending":
            self.notify("select a pending member first (Federation view: arrows or j/k)",
                        severity="warning")
            return None
        return member

    def action_approve(self) -> None:
        member = self._selected_pending()
        if member is None:
            return
        name = member.get("name") or "-"
        self._confirm(f"Approve {name} ({short(member['node_id'])}) as a member? It will count "
                      "toward the majority and receive every round.",
                      lambda: self._decide(member, True))

    def action_reject(self) -> None:
        member = self._selected_pending()
        if member is None:
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
