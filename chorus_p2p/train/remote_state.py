"""``R`` for a trainer outside any node (``chorus-node train --node URL``).

The trainer keeps its own dense state like a node does and follows the log: each round it fetches
only that round's factored ``D`` (small) and adds it in place. When it is new or has fallen
behind the node's retention window, it fetches the node's latest checkpoint once and continues
from there. The dense ``R`` never crosses the network round after round.
"""

from __future__ import annotations

from pathlib import Path

from chorus_p2p.client import NodeClient, NotFoundError, PrunedError
from chorus_p2p.errors import ChorusError
from chorus_p2p.state.store import StateStore


def sync_from_node(node: NodeClient, store: StateStore, target: int, scratch: Path) -> None:
    """Bring ``store`` to ``R`` after round ``target`` using the node's residuals/checkpoint."""
    if store.round > target:
        raise ChorusError(f"the local state is at round {store.round}, past round {target}")
    while store.round < target:
        number = store.round + 1
        residual = scratch / f"D-{number}.safetensors"
        try:
            node.download("residual", number, residual, force=True)
        except PrunedError:
            _install_checkpoint(node, store, target, scratch)
            continue
        except NotFoundError as exc:
            if exc.code != "no_residual":
                raise
            residual = None  # a round without a residual (fedavg): R is unchanged
        store.apply(number, residual)
        if residual is not None:
            residual.unlink(missing_ok=True)


def _install_checkpoint(node: NodeClient, store: StateStore, target: int, scratch: Path) -> None:
    incoming = scratch / "checkpoint.safetensors"
    number, sha = node.download_checkpoint(incoming, force=True)
    if number > target or number <= store.round:
        incoming.unlink(missing_ok=True)
        raise ChorusError(f"the node's checkpoint is of round {number}; round {target}'s state "
                          "cannot be rebuilt from it")
    store.install_checkpoint(incoming, number, sha)
