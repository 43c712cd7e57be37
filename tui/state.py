"""What the TUI knows about the federation, built only from the node's public API.

Kept separate from the widgets so the views are pure functions of this state: the live app
fills it from HTTP and the WebSocket, and the snapshot tests fill it from a recorded fixture.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

EVENT_LIMIT = 500
SEVERITIES = ("all", "info", "warning")
STALE_AFTER_S = 3.0  # the TUI polls every second: three silent polls mean the node went quiet


@dataclass
class TrainingProgress:
    node_id: str
    round: int
    step: int = 0
    steps: int = 0
    loss: float | None = None
    finished: bool = False


@dataclass
class FederationState:
    connected: bool = False
    error: str | None = None
    status: dict[str, Any] = field(default_factory=dict)
    members: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # newest first
    current_detail: dict[str, Any] | None = None
    events: deque = field(default_factory=lambda: deque(maxlen=EVENT_LIMIT))
    training: dict[str, TrainingProgress] = field(default_factory=dict)
    updated_at: float = 0.0
    last_contact: float | None = None  # when the node last answered (clock time)
    event_seq: int = 0  # events applied so far (the log appends only what is new)
    last_event_id: int = -1  # highest recorded event id seen (replays may repeat some)
    clock: Callable[[], float] = time.time  # fixed in snapshot tests

    @classmethod
    def from_recording(cls, data: dict[str, Any]) -> "FederationState":
        """A state captured from a node's API (status, members, rounds, current round, events)."""
        state = cls(connected=True, status=data["status"], members=data["members"],
                    rounds=data["rounds"], current_detail=data.get("current_detail"))
        for event in data.get("events", []):
            state.apply_event(event)
        if "now" in data:
            state.clock = lambda: data["now"]
        state.last_contact = state.clock()
        return state

    def touch(self) -> None:
        """The node answered: it is alive now."""
        self.last_contact = self.clock()

    def quiet_for(self) -> float | None:
        """Seconds since the node last answered, or None if it never has."""
        return None if self.last_contact is None else max(0.0, self.clock() - self.last_contact)

    @property
    def stale(self) -> bool:
        quiet = self.quiet_for()
        return quiet is not None and quiet > STALE_AFTER_S

    # -- derived views ---------------------------------------------------------------------------
    @property
    def current_round(self) -> dict[str, Any] | None:
        return self.status.get("current_round")

    def committed_rounds(self) -> list[dict[str, Any]]:
        """Committed rounds after round 0, oldest first (the history table and plots)."""
        return sorted((r for r in self.rounds if r.get("state") == "committed" and r["round"] > 0),
                      key=lambda r: r["round"])

    def submitted(self) -> set[str]:
        detail = self.current_detail or {}
        return {u["node_id"] for u in detail.get("updates", [])}

    def apply_event(self, event: dict[str, Any]) -> None:
        event_id = event.get("id")
        if isinstance(event_id, int):
            if event_id <= self.last_event_id:
                return  # already shown (a replay overlapping the live stream)
            self.last_event_id = event_id
        self.events.append(event)
        self.event_seq += 1
        kind, data = event.get("kind"), event.get("data") or {}
        if kind in ("training_started", "training_progress", "training_finished"):
            node = data.get("node_id", "?")
            progress = self.training.get(node)
            if progress is None or progress.round != event.get("round"):
                progress = self.training[node] = TrainingProgress(node, event.get("round") or 0)
            progress.steps = int(data.get("steps", progress.steps) or progress.steps)
            progress.step = int(data.get("step", progress.step) or progress.step)
            if kind == "training_finished":
                progress.finished = True
                progress.step = progress.steps
                progress.loss = data.get("train_loss", progress.loss)
            elif data.get("loss") is not None:
                progress.loss = float(data["loss"])
        self.updated_at = self.clock()

    def events_at(self, severity: str) -> list[dict[str, Any]]:
        if severity == "all":
            return list(self.events)
        return [e for e in self.events if e.get("level", "info") == severity]
