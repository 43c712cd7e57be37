"""Fold a factored residual into base weights.

``W0 + R`` is computed in float32 and stored in float32: a bf16 or fp16 base cannot hold a
residual that is small next to the weight, and the exactness claim is only as good as the
storage. Untargeted tensors keep their dtype.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, MutableMapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chorus_p2p.atomic import atomic_output_dir, atomic_output_file
from chorus_p2p.errors import AdapterError
from chorus_p2p.lora.config import module_name_from_prefix
from chorus_p2p.lora.residual import FactoredResidual, iter_residual_file

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"


def weight_key(prefix: str) -> str:
    """PEFT prefix -> the base model's state-dict key (``model.layers.0.q_proj.weight``)."""
    return module_name_from_prefix(prefix) + ".weight"


def _folded(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, *, source: str,
            prefix: str) -> torch.Tensor:
    if tuple(weight.shape) != (left.shape[0], right.shape[1]):
        raise AdapterError(f"residual is {left.shape[0]}x{right.shape[1]} but the base weight is "
                           f"{'x'.join(map(str, weight.shape))}", source=source,
                           module=module_name_from_prefix(prefix))
    return weight.to(torch.float32) + left.to(torch.float32) @ right.to(torch.float32)


def _as_triples(residual: FactoredResidual | Iterable[tuple[str, torch.Tensor, torch.Tensor]]):
    if isinstance(residual, FactoredResidual):
        return [(p, left, right) for p, (left, right) in residual.factors.items()]
    return residual


def fold_into_state_dict(state: MutableMapping[str, torch.Tensor],
                         residual: FactoredResidual | Iterable[tuple[str, torch.Tensor, torch.Tensor]],
                         *, source: str = "state dict") -> list[str]:
    """Add each module's ``left @ right`` to its weight in ``state`` (now float32); return keys."""
    changed = []
    for prefix, left, right in _as_triples(residual):
        key = weight_key(prefix)
        if key not in state:
            raise AdapterError(f"base has no weight {key!r}", source=source,
                               module=module_name_from_prefix(prefix))
        state[key] = _folded(state[key], left, right, source=source, prefix=prefix)
        changed.append(key)
    return changed


@torch.no_grad()
def fold_into_model(model: torch.nn.Module,
                    residual: FactoredResidual | Iterable[tuple[str, torch.Tensor, torch.Tensor]]
                    ) -> list[str]:
    """Fold into a loaded ``transformers`` model in place.

    The sum is formed in float32; a model loaded in bf16/fp16 keeps its dtype and loses the
    residual's low bits, so we warn: load the base in float32 to keep the identity exact.
    """
    changed = []
    for prefix, left, right in _as_triples(residual):
        name = module_name_from_prefix(prefix)
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise AdapterError("model has no such module", source="model", module=name) from exc
        weight = module.weight
        if weight.dtype != torch.float32:
            log.warning("folding into %s weight of %s loses precision; load the base in float32",
                        weight.dtype, name)
        weight.copy_(_folded(weight.data, left, right, source="model", prefix=prefix).to(weight.dtype))
        changed.append(name)
    return changed


def _weight_files(base: Path) -> list[Path]:
    if base.is_file():
        return [base]
    if not base.is_dir():
        raise AdapterError("no such model folder or file", source=str(base))
    index = base / SAFE_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return sorted({base / name for name in weight_map.values()})
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise AdapterError("holds no *.safetensors weights (pickled .bin checkpoints are not read)",
                           source=str(base))
    return files


def _key_locations(files: list[Path]) -> dict[str, tuple[Path, list[int]]]:
    where: dict[str, tuple[Path, list[int]]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    where[key] = (path, list(handle.get_slice(key).get_shape()))
        except Exception as exc:
            raise AdapterError(f"not a valid safetensors file ({exc})", source=str(path)) from exc
    return where


def fold_base(base: str | os.PathLike, residual_path: str | os.PathLike, out: str | os.PathLike,
              *, force: bool = False) -> list[str]:
    """Write ``out``: a copy of ``base`` (model folder or one safetensors file) with the residual
    folded into the targeted weights. Validates every module before writing anything."""
    base = Path(base)
    files = _weight_files(base)
    where = _key_locations(files)
    residual = list(iter_residual_file(residual_path))
    per_file: dict[Path, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    for prefix, left, right in residual:
        key = weight_key(prefix)
        if key not in where:
            raise AdapterError(f"base has no weight {key!r}", source=str(base),
                               module=module_name_from_prefix(prefix))
        path, shape = where[key]
        if shape != [left.shape[0], right.shape[1]]:
            raise AdapterError(f"residual is {left.shape[0]}x{right.shape[1]} but the base weight "
                               f"is {'x'.join(map(str, shape))}", source=str(residual_path),
                               module=module_name_from_prefix(prefix))
        per_file.setdefault(path, []).append((prefix, left, right))

    changed: list[str] = []
    if base.is_file():
        with atomic_output_file(out, force=force) as scratch:
            changed += _fold_file(base, scratch, per_file.get(base, []))
        return changed
    with atomic_output_dir(out, force=force) as scratch:
        for item in base.iterdir():
            if item.suffix != ".safetensors":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, scratch / item.name)
        for path in files:
            changed += _fold_file(path, scratch / path.name, per_file.get(path, []))
        _refresh_index_size(scratch)
    return changed


def _fold_file(path: Path, target: Path,
               triples: list[tuple[str, torch.Tensor, torch.Tensor]]) -> list[str]:
    """Fold into one weights file (one shard at a time in memory, as transformers loads them)."""
    if not triples:
        shutil.copy2(path, target)
        return []
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
    state = load_file(str(path))
    changed = fold_into_state_dict(state, triples, source=str(path))
    save_file(state, str(target), metadata=metadata)
    return changed


def _refresh_index_size(folder: Path) -> None:
    """Upcasting targeted weights to float32 changes the byte total the shard index records."""
    index = folder / SAFE_INDEX
    if not index.is_file():
        return
    data = json.loads(index.read_text())
    total = 0
    for name in set(data.get("weight_map", {}).values()):
        with safe_open(str(folder / name), framework="pt") as handle:
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                numel = 1
                for dim in tensor_slice.get_shape():
                    numel *= dim
                total += numel * _DTYPE_BYTES.get(tensor_slice.get_dtype(), 4)
    data.setdefault("metadata", {})["total_size"] = total
    index.write_text(json.dumps(data, indent=2) + "\n")


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1}
