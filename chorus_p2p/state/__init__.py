"""A node's folded-base state ``R``: dense float32, updated in place, checkpointed, verifiable.

See :mod:`chorus_p2p.state.store` for the design and :mod:`chorus_p2p.state.sketch` for how nodes
check that they hold the same state.
"""

from chorus_p2p.state.store import Checkpoint, Plan, StateError, StateStore

__all__ = ["Checkpoint", "Plan", "StateError", "StateStore"]
