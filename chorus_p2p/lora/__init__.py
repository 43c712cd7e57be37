"""The math of exact federated LoRA: adapter I/O, strategies, residuals and folding."""

from chorus_p2p.lora.adapter_io import AdapterSource, LoraFactors, write_adapter
from chorus_p2p.lora.aggregate import AggregationReport, aggregate_adapters
from chorus_p2p.lora.fold import fold_base, fold_into_model, fold_into_state_dict
from chorus_p2p.lora.residual import FactoredResidual, ResidualFile, load_residual
from chorus_p2p.lora.strategies import DEFAULT_STRATEGY, STRATEGIES, aggregate_module

__all__ = [
    "AdapterSource", "AggregationReport", "DEFAULT_STRATEGY", "FactoredResidual", "LoraFactors",
    "ResidualFile", "STRATEGIES", "aggregate_adapters", "aggregate_module", "fold_base", "fold_into_model",
    "fold_into_state_dict", "load_residual", "write_adapter",
]
