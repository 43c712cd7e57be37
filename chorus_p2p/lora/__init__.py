"""The math of exact federated LoRA: adapter I/O, strategies, residuals and folding.

Attributes load on first use (PEP 562) so that `import chorus_p2p.lora.names` from a
client command does not pull in torch through this package's `__init__`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdapterSource": "adapter_io", "LoraFactors": "adapter_io", "write_adapter": "adapter_io",
    "AggregationReport": "aggregate", "aggregate_adapters": "aggregate",
    "fold_base": "fold", "fold_into_model": "fold", "fold_into_state_dict": "fold",
    "FactoredResidual": "residual", "ResidualFile": "residual", "load_residual": "residual",
    "aggregate_module": "strategies",
    "DEFAULT_STRATEGY": "names", "STRATEGIES": "names",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
