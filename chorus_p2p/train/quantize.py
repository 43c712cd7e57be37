"""A 4- or 8-bit frozen base for training (QLoRA), through bitsandbytes.

Quantizing only changes the copy a client computes gradients with, as bf16 does: the client's
update is still its float32 adapter ``(B_i, A_i)``, and the federation aggregates those exactly
over the float32 state. What must hold is that the quantized copy is of ``W0 + R``, not of
``W0``: a client training against the bare base would learn a correction the federation already
made. So each targeted weight is formed in float32 from the stored ``W0`` plus ``R`` and quantized
once, layer by layer (peak host memory: the quantized model plus one float32 layer).

bitsandbytes is optional (the ``qlora`` extra). It quantizes on CUDA and, since 0.46, on the CPU,
so this path is tested here without a GPU.
"""

from __future__ import annotations

import importlib.util

import torch

from chorus_p2p.errors import UsageError

QUANTIZE_KINDS = ("4bit", "8bit")


def check_kind(kind: str) -> None:
    if kind not in QUANTIZE_KINDS:
        raise UsageError(f"quantize {kind!r}: one of {', '.join(QUANTIZE_KINDS)}")


def require_bitsandbytes(kind: str) -> None:
    """Refuse up front, with the fix, rather than fail inside transformers mid-load."""
    check_kind(kind)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"--load-in-{kind} needs bitsandbytes: pip install "
                         "'chorus-p2p[qlora]' (or train with --compute-dtype bfloat16)")


def quantization_config(kind: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for ``kind``: NF4 with double quantization for 4-bit
    (the QLoRA recipe), LLM.int8() for 8-bit; matmuls run in ``compute_dtype``."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes(kind)
    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def check_cpu_widths(model) -> None:
    """bitsandbytes' CPU 4-bit kernels pack weights in blocks of 64 input features, and a layer
    of another width fails mid-round with a reshape error (at evaluation). Every real model's
    widths are multiples of 64; a toy model's may not be, so say so before training."""
    from chorus_p2p.lora.quantized import is_quantized

    odd = sorted({m.in_features for m in model.modules()
                  if is_quantized(m) and m.in_features % 64})
    if odd:
        raise UsageError(f"--load-in-4bit on the CPU: bitsandbytes needs layer widths that are "
                         f"multiples of 64, and this model has {', '.join(map(str, odd))}; "
                         "use --load-in-8bit or --compute-dtype, or a GPU")


def prepare_for_training(model):
    """PEFT's k-bit preparation: norms and the untargeted float weights to float32 for stable
    training, input gradients on (needed with a frozen quantized stack). Gradient checkpointing
    stays the trainer's own flag."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
