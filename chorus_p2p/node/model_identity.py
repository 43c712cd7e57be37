"""Is this the same base model? Judged by content, not by the path string.

A lab moves a model folder, mounts it elsewhere, or passes ``./llama`` one day and
``/data/models/llama`` the next; refusing those as "a different model" helps nobody. Refusing
a *different* model at the same path matters more: a federation's residual R only makes sense
on the exact base it was computed for.

The fingerprint hashes the model's ``config.json`` (without the fields that name where it was
loaded from) and, for a local folder, each weight file's name, size and first and last MiB,
so it is instant even for a 70B model and still tells two fine-tunes of the same architecture
apart. A hub id that is not a local folder is identified by its config alone (its weights may
not be downloaded yet); when either side of a comparison is one, only configs are compared.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

PROBE_BYTES = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin")
IGNORED_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash")


def is_local_model(model: str) -> bool:
    return (Path(model) / "config.json").is_file()


def _config_dict(model: str, normalised: bool = False) -> dict | None:
    path = Path(model)
    if not normalised and path.is_dir() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model).to_dict()
    except Exception:  # not resolvable here (offline, no cache): no fingerprint
        return None


def model_fingerprint(model: str, weights: bool = True) -> str | None:
    """A short content hash of ``model`` (folder or hub id), or None if it cannot be read.

    ``weights=False`` hashes the configuration alone, as ``transformers`` parses it, so a hub id
    and a local download of it compare equal: what can be compared when one side's weights are
    not on this disk."""
    config = _config_dict(model, normalised=not weights)
    if config is None:
        return None
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in config.items() if k not in IGNORED_CONFIG_KEYS},
                             sort_keys=True, default=str).encode())
    path = Path(model)
    if weights and path.is_dir():
        for weights in sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES):
            size = weights.stat().st_size
            digest.update(f"{weights.name}:{size}".encode())
            with open(weights, "rb") as fh:
                digest.update(fh.read(PROBE_BYTES))
                if size > PROBE_BYTES:
                    fh.seek(max(PROBE_BYTES, size - PROBE_BYTES), os.SEEK_SET)
                    digest.update(fh.read(PROBE_BYTES))
    return digest.hexdigest()[:24]
