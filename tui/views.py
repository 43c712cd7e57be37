"""The four panes: federation, round, history, events. Each renders a FederationState."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Label, ProgressBar, RichLog, Static
from textual_plotext import PlotextPlot

from .state import EVENT_LIMIT, FederationState

ROLE_STYLE = {"coordinator": "bold green", "follower": "cyan", "candidate": "yellow"}
STATUS_STYLE = {"live": "green", "lost": "red", "left": "dim", "pending": "yellow"}
LEVEL_STYLE = {"info": "", "warning": "yellow", "error": "bold red"}


def short(node_id: str | None, width: int = 12) -> str:
    return (node_id or "-")[:width]


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 60 else f"{seconds / 60:.0f}m"


def clock(ts: float | None) -> str:
    return "-" if not ts else dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S")


Row = tuple[str, tuple[Any, ...]]  # (row key, cells)


def refill(table: DataTable, rows: list[Row], follow_first: bool = False) -> None:
    """Replace a table's rows while the cursor stays on the same *key* (the member the user
    selected, not row 0) and the scroll position stays where the user put it.

    ``follow_first``: a table whose newest row comes first (History) follows it like
    ``tail -f`` while its cursor is on the first row; keeping the cursor on that row's *key*
    instead carried it, and the view, down with the round that was newest at attach (the
    table stayed at round 110 while the node was at 133).

    Rows that did not change are not touched at all, so a once-a-second refresh of an idle
    federation neither flickers nor moves anything.
    """
    previous = getattr(table, "_chorus_rows", None)
    if previous == rows:
        return
    if follow_first and (table.row_count == 0 or table.cursor_row == 0):
        table.clear()
        for key, cells in rows:
            table.add_row(*cells, key=key)
        table._chorus_rows = rows  # type: ignore[attr-defined]
        table.move_cursor(row=0, animate=False)
        table.scroll_to(table.scroll_x, 0, animate=False)
        return
    selected = None
    if table.row_count:
        try:
            selected = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except Exception:  # the cursor points past the end: nothing was selected
            selected = None
    scroll_x, scroll_y = table.scroll_x, table.scroll_y
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    table._chorus_rows = rows  # type: ignore[attr-defined]
    keys = [key for key, _ in rows]
    if selected in keys:
        table.move_cursor(row=keys.index(selected), animate=False, scroll=False)
    table.scroll_to(scroll_x, scroll_y, animate=False)


class FederationView(Vertical):
    def compose(self) -> ComposeResult:
        yield Label("", id="federation-summary")
        table = DataTable(id="members", cursor_type="row", zebra_stripes=True)
        # Narrow first: at 80 columns everything but the address fits; the address is last
        # because it is the one to lose (the term is the same for all and is in the summary).
        table.add_column("name", key="name")
        table.add_column("node id", key="id", width=8)
        table.add_column("role", key="role", width=11)
        table.add_column("seen", key="seen", width=6)
        table.add_column("rounds", key="rounds", width=6)
        table.add_column("status", key="status", width=8)
        table.add_column("address", key="address")
        yield table

    def render_state(self, state: FederationState) -> None:
        status = state.status
        quorum = status.get("quorum")
        quiet = state.quiet_for()
        if state.stale:
            health = (f"NO ANSWER {quiet:.0f}s", "bold red")
        else:
            health = ("quorum" if quorum else "NO QUORUM", "green" if quorum else "bold red")
        summary = Text.assemble(
            ("federation ", "dim"), (str(status.get("federation", "-")), "bold"),
            ("  term ", "dim"), (str(status.get("term", "-")), "bold"),
            ("  coordinator ", "dim"), (short(status.get("coordinator"), 8), "bold"),
            ("  ", ""), health,
            (f"  {status.get('voting_members', len(state.members))} voters", "dim"))
        self.query_one("#federation-summary", Label).update(summary)
        # While the node is quiet its ages are frozen: add the silence so they keep growing.
        extra = quiet if state.stale and quiet is not None else 0.0
        rows: list[Row] = []
        for m in state.members:
            role = m.get("role") or "-"
            address = ",".join(m.get("addresses") or []) or "-"
            seen_age = m.get("last_seen_age_s")
            seen = "self" if m["node_id"] == status.get("node_id") else age(
                None if seen_age is None else seen_age + extra)
            member_status = m.get("status") or "-"
            rows.append((m["node_id"], (
                m.get("name") or "-", short(m["node_id"], 8), Text(role, ROLE_STYLE.get(role, "")),
                seen, str(m.get("rounds_contributed", 0)),
                Text(member_status, STATUS_STYLE.get(member_status, "")), address)))
        refill(self.query_one("#members", DataTable), rows)


class RoundView(Vertical):
    def compose(self) -> ComposeResult:
        yield Label("", id="round-summary")
        with Horizontal(id="round-progress-row"):
            yield Label("updates ", id="round-progress-label")
            yield ProgressBar(id="round-progress", show_eta=False)
        yield Label("", id="round-deadline")
        table = DataTable(id="participants", cursor_type="row", zebra_stripes=True)
        table.add_columns("node", "submitted", "training", "loss")
        yield table

    def render_state(self, state: FederationState) -> None:
        current = state.current_round
        bar = self.query_one("#round-progress", ProgressBar)
        if current is None:
            paused = state.status.get("paused")
            latest = (state.status.get("latest_committed") or {}).get("round", "-")
            self.query_one("#round-summary", Label).update(
                f"no round collecting{' (paused)' if paused else ''}; last committed: {latest}")
            bar.update(total=1, progress=0)
            self.query_one("#round-deadline", Label).update("")
        else:
            self.query_one("#round-summary", Label).update(Text.assemble(
                ("round ", "dim"), (str(current["round"]), "bold"), ("  ", ""),
                (current["state"], "bold cyan"), ("   trained from round ", "dim"),
                (str(current["trained_from"]), ""), ("   expected ", "dim"),
                (str(current.get("expected", "-")), "")))
            bar.update(total=max(1, current["min_updates"]), progress=min(current["updates"],
                                                                         current["min_updates"]))
            left = (current.get("deadline_at") or 0) - state.clock()
            self.query_one("#round-deadline", Label).update(
                f"{current['updates']} / {current['min_updates']} updates needed   deadline in "
                f"{max(0, int(left)) // 60}m{max(0, int(left)) % 60:02d}s")
        rows: list[Row] = []
        submitted = state.submitted()
        excluded = {u["node_id"]: u.get("reason") or "excluded"
                    for u in (state.current_detail or {}).get("updates", [])
                    if u.get("status") == "excluded"}
        names = {m["node_id"]: m.get("name") or short(m["node_id"]) for m in state.members}
        nodes = list(dict.fromkeys([*names, *submitted, *state.training]))
        number = current["round"] if current else None
        for node in nodes:
            progress = state.training.get(node)
            training = "-"
            loss = "-"
            if progress is not None and progress.round == number:
                training = "done" if progress.finished else f"step {progress.step}/{progress.steps}"
                loss = f"{progress.loss:.3f}" if progress.loss is not None else "-"
            if node in excluded:
                verdict = Text(f"excluded: {excluded[node]}"[:40], "red")
            else:
                verdict = Text("yes", "green") if node in submitted else Text("no", "dim")
            rows.append((node, (f"{short(node, 8)} {names.get(node, '')}".strip(), verdict,
                                training, loss)))
        refill(self.query_one("#participants", DataTable), rows)


def node_eval_loss(row: dict[str, Any]) -> float | None:
    """The mean over nodes of what each measured of this round's global model on its own
    held-out data (``up --eval-data``); None when no node evaluated it."""
    losses = [m["loss"] for m in (row.get("evaluations") or {}).values() if "loss" in m]
    return sum(losses) / len(losses) if losses else None


class HistoryView(Vertical):
    def compose(self) -> ComposeResult:
        table = DataTable(id="history", cursor_type="row", zebra_stripes=True)
        table.add_columns("round", "strategy", "updates", "agg ms", "|D|/|M|", "eval loss",
                          "held-out", "committed")
        yield table
        with Horizontal(id="plots"):
            yield PlotextPlot(id="plot-loss")
            yield PlotextPlot(id="plot-energy")

    def render_state(self, state: FederationState) -> None:
        rows = state.committed_rounds()
        table_rows: list[Row] = []
        for r in reversed(rows):
            m: dict[str, Any] = r.get("metrics") or {}
            energy, loss = m.get("residual_energy"), m.get("mean_eval_loss")
            held_out = node_eval_loss(r)
            table_rows.append((str(r["round"]), (
                str(r["round"]), r.get("strategy") or "-", str(m.get("updates", "-")),
                f"{m.get('aggregation_ms', 0):.1f}", "-" if energy is None else f"{energy:.4f}",
                "-" if loss is None else f"{loss:.3f}",
                "-" if held_out is None else f"{held_out:.3f}", clock(r.get("committed_at")))))
        refill(self.query_one("#history", DataTable), table_rows, follow_first=True)
        self._plot("#plot-loss", "mean eval loss", [(r["round"], (r.get("metrics") or {}).get(
            "mean_eval_loss")) for r in rows])
        self._plot("#plot-energy", "residual energy ||D||/||M||", [(r["round"], (r.get(
            "metrics") or {}).get("residual_energy")) for r in rows])

    def _plot(self, selector: str, title: str, points: list[tuple[int, float | None]]) -> None:
        widget = self.query_one(selector, PlotextPlot)
        plt = widget.plt
        plt.clear_data()
        plt.title(title)
        xs = [x for x, y in points if y is not None]
        ys = [y for _, y in points if y is not None]
        if xs:
            plt.plot(xs, ys, marker="braille")
            plt.xticks(xs)
        widget.refresh()


class EventLog(Vertical):
    """The event log appends only new events: the scroll position stays where the user put it,
    and it follows new events only while the user is at the bottom (as `tail -f` in less)."""

    def __init__(self) -> None:
        super().__init__()
        self._shown_seq = 0
        self._filters: tuple[str, str] | None = None

    def compose(self) -> ComposeResult:
        yield Static("events: all  (f: severity, /: text)", id="event-filter")
        # Wrapped to the log's own width (RichLog's default min_width, 78, is wider than the
        # log at 80 columns): an event's detail (step, loss) is never cut at the edge.
        yield RichLog(id="event-log", wrap=True, markup=False, max_lines=EVENT_LIMIT,
                      min_width=20)

    def render_state(self, state: FederationState, severity: str, text: str = "") -> None:
        log = self.query_one("#event-log", RichLog)
        new = state.event_seq - self._shown_seq
        if (severity, text) != self._filters or new > len(state.events):
            matching = f", containing {text!r}" if text else ""
            self.query_one("#event-filter", Static).update(
                f"events: {severity}{matching}  (f: severity, /: text)")
            log.clear()
            fresh = list(state.events)
            self._filters = (severity, text)
        elif new <= 0:
            return
        else:
            fresh = list(state.events)[-new:]
        self._shown_seq = state.event_seq
        # "At the bottom" allows a line or two: a horizontal scrollbar that appears when a long
        # line arrives takes a row and moves the end by one.
        follow = log.scroll_y >= log.max_scroll_y - 2
        needle = text.lower()
        for event in fresh:
            if severity != "all" and event.get("level", "info") != severity:
                continue
            line = format_event(event)
            if needle and needle not in line.plain.lower():
                continue
            log.write(line, scroll_end=follow)


# What a reader looks for first in an event's detail; the rest follows in the event's order.
FIRST_FIELDS = ("step", "steps", "loss", "train_loss", "eval_loss", "error", "message")
HEX_ID = re.compile(r"^[0-9a-f]{16,}$")


def _value(key: str, value: Any) -> str:
    """Node ids and hashes shortened as the tables show them; times as clock times; floats
    to 4 digits."""
    if key.endswith("_at") and isinstance(value, (int, float)):
        return clock(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return short(text, 8) if HEX_ID.match(text) else text


def format_event(event: dict[str, Any]) -> Text:
    data = event.get("data") or {}
    shown = {k: v for k, v in data.items()
             if k not in ("nodes", "members") and not isinstance(v, (dict, list))}
    order = [k for k in FIRST_FIELDS if k in shown] + [k for k in shown if k not in FIRST_FIELDS]
    detail = " ".join(f"{k}={_value(k, shown[k])}" for k in order)
    where = f"round {event['round']} " if event.get("round") is not None else ""
    level = event.get("level", "info")
    return Text.assemble((clock(event.get("ts")) + " ", "dim"),
                         (f"{event.get('kind', '?'):<20} ", LEVEL_STYLE.get(level, "")),
                         (where, "bold"), (detail[:240], ""))
