"""Export a merged model: base + R + global adapter, as a plain Hugging Face folder.

``AutoModelForCausalLM.from_pretrained(DIR)`` loads it with no PEFT and no chorus-p2p. Weights
are float32 by default, the federation's exact model; ``dtype`` bfloat16/float16 writes a copy
half the size for serving, merged in float32 first and rounded once (it is no longer exact, and
R does not survive a round trip through it: never feed it back as a federation's base).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from chorus_p2p.atomic import atomic_output_dir
from chorus_p2p.errors import UsageError
from chorus_p2p.lora.fold import ResidualInput
from chorus_p2p.train.trainer import load_global_model


EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def export_merged(model_path: str | Path, adapter_dir: str | Path,
                  residual: ResidualInput | None, out: str | Path, *, force: bool = False,
                  task_type: str = "CAUSAL_LM", dtype: str = "float32",
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Three steps, reported to ``progress``: load (base + R + adapter), merge, save."""
    import torch

    if dtype not in EXPORT_DTYPES:
        raise UsageError(f"--dtype {dtype}: one of {', '.join(EXPORT_DTYPES)}")
    report = progress or (lambda done, total: None)
    report(0, 3)
    model, tokenizer = load_global_model(model_path, adapter_dir, residual, task_type=task_type)
    report(1, 3)
    merged = model.merge_and_unload()  # W0 + R + s B A, summed in float32
    if dtype != "float32":
        merged = merged.to(getattr(torch, dtype))  # rounded once, after the exact sum
    report(2, 3)
    with atomic_output_dir(out, force=force) as scratch:
        merged.save_pretrained(scratch, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(scratch)
    report(3, 3)
    return Path(out)
