"""Fold a residual (a round's factored ``D`` or a node's dense ``R``) into base weights.

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
from typing import Iterable, Iterator, MutableMapping, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chorus_p2p.atomic import atomic_output_dir, atomic_output_file
from chorus_p2p.errors import AdapterError
from chorus_p2p.lora.config import module_name_from_prefix
from chorus_p2p.lora.residual import FactoredResidual, ResidualFile

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"


def weight_key(prefix: str) -> str:
    """PEFT prefix -> the base model's state-dict key (``model.layers.0.q_proj.weight``)."""
    return module_name_from_prefix(prefix) + ".weight"


Deltas = Iterable[tuple[str, torch.Tensor]]
ResidualInput = Union[str, os.PathLike, ResidualFile, FactoredResidual, Deltas]


def _check_shape(shape: Sequence[int], d_out: int, d_in: int, *, source: str, prefix: str) -> None:
    if list(shape) != [d_out, d_in]:
        raise AdapterError(f"residual is {d_out}x{d_in} but the base weight is "
                           f"{'x'.join(map(str, shape))}", source=source,
                           module=module_name_from_prefix(prefix))


def iter_deltas(residual: ResidualInput) -> Iterator[tuple[str, torch.Tensor]]:
    """``(prefix, dense float32 change)`` one module at a time, from any residual form: a file
    (factored ``D`` or dense ``R``), a :class:`FactoredResidual`, or pairs already made (a node's
    state reader)."""
    if isinstance(residual, (str, os.PathLike)):
        with ResidualFile(residual) as opened:
            yield from opened
    elif isinstance(residual, FactoredResidual):
        for prefix, (left, right) in residual.factors.items():
            yield prefix, left.to(torch.float32) @ right.to(torch.float32)
    else:
        yield from residual


def fold_into_state_dict(state: MutableMapping[str, torch.Tensor], residual: ResidualInput,
                         *, source: str = "state dict") -> list[str]:
    """Add each module's change to its weight in ``state`` (now float32); return the keys."""
    changed = []
    for prefix, delta in iter_deltas(residual):
        key = weight_key(prefix)
        if key not in state:
            raise AdapterError(f"base has no weight {key!r}", source=source,
                               module=module_name_from_prefix(prefix))
        _check_shape(state[key].shape, *delta.shape, source=source, prefix=prefix)
        state[key] = state[key].to(torch.float32) + delta
        changed.append(key)
    return changed


@torch.no_grad()
def fold_into_model(model: torch.nn.Module, residual: ResidualInput) -> list[str]:
    """Fold into a loaded ``transformers`` model in place, one module at a time.

    The sum is formed in float32; a model loaded in bf16/fp16 keeps its dtype and loses the
    residual's low bits, so we warn: load the base in float32 to keep the identity exact.
    """
    changed = []
    for prefix, delta in iter_deltas(residual):
        name = module_name_from_prefix(prefix)
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise AdapterError("model has no such module", source="model", module=name) from exc
        weight = module.weight
        _check_shape(weight.shape, *delta.shape, source="model", prefix=prefix)
        if weight.dtype != torch.float32:
            log.warning("folding into %s weight of %s loses precision; load the base in float32",
                        weight.dtype, name)
        weight.copy_((weight.data.to(torch.float32) + delta.to(weight.device)).to(weight.dtype))
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
    (a round's factored ``D`` or a node's dense ``R``) folded into the targeted weights.
    Validates every module's shape before writing anything; reads one module at a time."""
    base = Path(base)
    files = _weight_files(base)
    where = _key_locations(files)
    with ResidualFile(residual_path) as residual:
        per_file: dict[Path, list[str]] = {}
        for prefix, (d_out, d_in) in residual.modules.items():
            key = weight_key(prefix)
            if key not in where:
                raise AdapterError(f"base has no weight {key!r}", source=str(base),
                                   module=module_name_from_prefix(prefix))
            path, shape = where[key]
            _check_shape(shape, d_out, d_in, source=str(residual_path), prefix=prefix)
            per_file.setdefault(path, []).append(prefix)

        changed: list[str] = []
        if base.is_file():
            with atomic_output_file(out, force=force) as scratch:
                changed += _fold_file(base, scratch, residual, per_file.get(base, []))
            return changed
        with atomic_output_dir(out, force=force) as scratch:
            for item in base.iterdir():
                if item.suffix != ".safetensors":
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, scratch / item.name)
            for path in files:
                changed += _fold_file(path, scratch / path.name, residual, per_file.get(path, []))
            _refresh_index_size(scratch)
    return changed


def _fold_file(path: Path, target: Path, residual: ResidualFile, prefixes: list[str]) -> list[str]:
    """Fold into one weights file (one shard at a time in memory, as transformers loads them)."""
    if not prefixes:
        shutil.copy2(path, target)
        return []
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
    state = load_file(str(path))
    changed = fold_into_state_dict(state, ((p, residual.delta(p)) for p in prefixes),
                                   source=str(path))
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
