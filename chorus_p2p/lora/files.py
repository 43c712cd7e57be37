"""Find the files of a PEFT adapter folder without importing torch (the client needs this)."""

from __future__ import annotations

import os
from pathlib import Path

from chorus_p2p.errors import AdapterError
from chorus_p2p.lora.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def resolve_adapter_files(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """Map what a user passed (folder or file) to (weights file, config file or None)."""
    p = Path(path)
    if p.is_dir():
        weights = p / ADAPTER_WEIGHTS
        if not weights.is_file():
            if (p / "adapter_model.bin").is_file():
                raise AdapterError("holds adapter_model.bin (pickle); only safetensors adapters are "
                                   "accepted, re-save with safe_serialization=True", source=str(p))
            raise AdapterError(f"no {ADAPTER_WEIGHTS} in this folder", source=str(p))
        config = p / ADAPTER_CONFIG
        return weights, config if config.is_file() else None
    if p.is_file():
        sibling = p.parent / ADAPTER_CONFIG
        return p, sibling if sibling.is_file() else None
    raise AdapterError("no such file or folder", source=str(p))
