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
        return state

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
        self.events.append(event)
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
