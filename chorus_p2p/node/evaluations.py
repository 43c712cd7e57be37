"""Every node's evaluations on every node: what each member measured of the committed models
(``up --eval-data``), shared so that ``rounds --json``, ``GET /v1/rounds`` and the TUI's history
show the whole federation's figures from any node, not only the attached node's own.

Evaluations are advisory metrics, not part of the replicated log: a node that measured a round
sends its most recent evaluations (``RECENT``, its own only) to every live member in a signed
peer call; the next evaluation sends them again, so a member that was away catches up then.
A member can only speak for itself (the sender field must be the signing node), and what
arrives is shape-checked: a hostile peer cannot inflate the table or plant NaN.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Any

from chorus_p2p.federation.refusals import UpdateRejected

if TYPE_CHECKING:
    from chorus_p2p.node.service import Node

log = logging.getLogger("chorus_p2p.node")

RECENT = 20  # of a node's own evaluations, sent each time (the catch-up window)
MAX_METRICS = 16  # names per evaluation
MAX_NAME = 40


def clean_entries(entries: Any) -> list[tuple[int, dict[str, float]]]:
    """``[{"round": N, "metrics": {name: number}}]`` as sent, checked; raises ``bad_request``."""
    if not isinstance(entries, list) or len(entries) > RECENT:
        raise UpdateRejected("bad_request", f"peer evaluation: at most {RECENT} evaluations")
    out = []
    for entry in entries:
        number = entry.get("round") if isinstance(entry, dict) else None
        metrics = entry.get("metrics") if isinstance(entry, dict) else None
        if not isinstance(number, int) or isinstance(number, bool) or number < 1 \
                or not isinstance(metrics, dict) or not 0 < len(metrics) <= MAX_METRICS:
            raise UpdateRejected("bad_request", "peer evaluation: each entry needs a round "
                                 f">= 1 and 1-{MAX_METRICS} metrics")
        clean = {}
        for name, value in metrics.items():
            if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or \
                    isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value):
                raise UpdateRejected("bad_request", "peer evaluation: metric names are short "
                                     "strings and values finite numbers")
            clean[name] = float(value)
        out.append((number, clean))
    return out


def record_shared(node: "Node", sender: str, entries: Any) -> int:
    """Store a member's evaluations (signed by it); returns how many were new or changed."""
    changed = 0
    known = node.ledger.evaluations([n for n, _ in clean_entries(entries)])
    for number, metrics in clean_entries(entries):
        if known.get(number, {}).get(sender) == metrics:
            continue
        node.ledger.record_evaluation(number, sender, metrics)
        node.bus.publish("round_evaluated", number, {"node_id": sender, **metrics})
        changed += 1
    return changed


def own_recent(node: "Node") -> list[dict[str, Any]]:
    mine = [(n, by_node[node.node_id]) for n, by_node in sorted(node.ledger.evaluations().items())
            if node.node_id in by_node]
    return [{"round": n, "metrics": m} for n, m in mine[-RECENT:]]


async def share(node: "Node") -> None:
    """Send this node's recent evaluations to every live member (failures only logged: the
    next evaluation sends them again)."""
    from chorus_p2p.node.peers import PeerError

    body = {"node_id": node.node_id, "evaluations": own_recent(node)}
    if not body["evaluations"]:
        return
    live = [p for p in node.cluster.peers.values()
            if p.status == "live" and p.url and p.node_id != node.node_id]

    async def send(peer) -> None:
        try:
            await node.cluster.client.call(peer.url, "POST", "/v1/peer/evaluation", body,
                                           timeout=5.0, expect_node=peer.node_id)
        except (PeerError, OSError, asyncio.TimeoutError) as exc:
            log.info("evaluation not shared with %s yet: %s", peer.node_id[:12], exc)
    await asyncio.gather(*(send(p) for p in live))
