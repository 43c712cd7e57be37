"""Exact FedEx-LoRA aggregation inside Flower (the optional ``flower`` extra).

For federations beyond one LAN (several institutions, an operator, hundreds of clients), where
Flower's deployment engine runs the network: :class:`ExactLoRA` is the server strategy and
:class:`ExactLoRAClient` the ClientApp helper. ``examples/flower`` is a complete app.
"""

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("chorus_p2p.flower needs Flower: pip install 'chorus-p2p[flower]'") from exc

from chorus_p2p.flower.client import ExactLoRAClient, StateGap
from chorus_p2p.flower.strategy import ExactLoRA

__all__ = ["ExactLoRA", "ExactLoRAClient", "StateGap"]
