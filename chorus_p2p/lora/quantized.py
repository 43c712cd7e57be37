"""Folding into a bitsandbytes-quantized layer: read its weight back, write a new one.

A 4-bit or 8-bit weight is packed, so the fold cannot add ``R`` in place: it forms ``W0 + R`` in
float32 and quantizes that once, with the layer's own settings (see chorus_p2p.train.quantize for
why the training copy must be of ``W0 + R``). bitsandbytes is imported only when such a layer is
met.
"""

from __future__ import annotations

import torch


FOUR_BIT, EIGHT_BIT = "Params4bit", "Int8Params"  # bitsandbytes' weight classes, by name


def _kind(module: torch.nn.Module) -> str:
    return type(getattr(module, "weight", None)).__name__


def is_quantized(module: torch.nn.Module) -> bool:
    return _kind(module) in (FOUR_BIT, EIGHT_BIT)


def logical_shape(module: torch.nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a quantized Linear: its weight tensor is packed, so its shape is not."""
    return module.out_features, module.in_features


def dequantized(module: torch.nn.Module) -> torch.Tensor:
    """The weight a quantized layer computes with, in float32 (the fallback ``W0`` when the
    stored weights cannot be read: ``R`` is then added to an already rounded base)."""
    from peft.utils.integrations import dequantize_bnb_weight

    weight = module.weight
    if _kind(module) == FOUR_BIT:
        return dequantize_bnb_weight(weight, state=weight.quant_state).to(torch.float32)
    if module.state.SCB is None:  # moved to the layer's state by its first forward, or not
        module.state.SCB = weight.SCB
    return dequantize_bnb_weight(weight, state=module.state).to(torch.float32)


@torch.no_grad()
def requantize(module: torch.nn.Module, value: torch.Tensor) -> None:
    """Replace a quantized layer's weight with ``value`` (float32, ``out x in``), quantized with
    the layer's own settings on the layer's device, from the dtype transformers quantized the
    stored weight from (so the result is what loading a folded checkpoint would give)."""
    import bitsandbytes as bnb

    weight = module.weight
    if _kind(module) == FOUR_BIT:
        module.weight = bnb.nn.Params4bit(
            value.to("cpu", weight.quant_state.dtype), requires_grad=False,
            blocksize=weight.blocksize, compress_statistics=weight.compress_statistics,
            quant_type=weight.quant_type, quant_storage=weight.quant_storage,
            module=module).to(weight.device)
        return
    module.weight = bnb.nn.Int8Params(value.to("cpu", torch.float16), requires_grad=False,
                                      has_fp16_weights=weight.has_fp16_weights).to(weight.device)
    module.state.CB = module.state.SCB = None  # the next forward takes the new weight's
