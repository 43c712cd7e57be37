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
from typing import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chorus_p2p.atomic import atomic_output_dir, atomic_output_file
from chorus_p2p.errors import AdapterError
from chorus_p2p.lora import quantized
from chorus_p2p.lora.config import module_name_from_prefix
from chorus_p2p.lora.residual import FactoredResidual, ResidualFile

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"


def weight_key(prefix: str) -> str:
    """PEFT prefix -> the base model's state-dict key (``model.layers.0.q_proj.weight``)."""
    return module_name_from_prefix(prefix) + ".weight"


Deltas = Iterable[tuple[str, torch.Tensor]]
ResidualInput = Union[str, os.PathLike, ResidualFile, FactoredResidual, Deltas]


def placement(shape: Sequence[int], d_out: int, d_in: int, hint: bool | None, *, source: str,
              prefix: str) -> bool:
    """Whether a ``d_out x d_in`` change goes into this weight transposed.

    ``Linear`` weights are ``d_out x d_in``; GPT-2's ``Conv1D`` (PEFT's ``fan_in_fan_out``) and
    embeddings store theirs ``d_in x d_out``. The weight's shape decides where it can; a square
    weight cannot tell, so there the residual's own record (``hint``: from the adapter config,
    or the node's spec) decides, and without one we refuse rather than guess (adding ``D``
    untransposed into a square ``Conv1D`` is silently wrong)."""
    module = module_name_from_prefix(prefix)
    fits, fits_t = list(shape) == [d_out, d_in], list(shape) == [d_in, d_out]
    if fits and fits_t:
        if hint is None:
            raise AdapterError(
                f"the base weight is square ({d_out}x{d_in}), so its shape cannot tell whether it "
                "is a Linear weight (d_out x d_in) or a Conv1D/embedding one (stored transposed, "
                "fan_in_fan_out); this residual does not say which. Fold into the loaded model "
                "(its layer types decide), or re-aggregate with an adapter_config.json that sets "
                "fan_in_fan_out", source=source, module=module)
        return hint
    if fits or fits_t:
        return fits_t
    raise AdapterError(f"residual is {d_out}x{d_in} but the base weight is "
                       f"{'x'.join(map(str, shape))} (in neither orientation)", source=source,
                       module=module)


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


def _hints(residual: ResidualInput) -> Mapping[str, bool | None]:
    if isinstance(residual, ResidualFile):
        return residual.transposed
    if isinstance(residual, (str, os.PathLike)):
        with ResidualFile(residual) as opened:
            return opened.transposed
    return {}


def fold_into_state_dict(state: MutableMapping[str, torch.Tensor], residual: ResidualInput,
                         *, source: str = "state dict",
                         hints: Mapping[str, bool | None] | None = None) -> list[str]:
    """Add each module's change to its weight in ``state`` (now float32), in the weight's own
    orientation (see :func:`placement`); return the keys."""
    hints = _hints(residual) if hints is None else hints
    changed = []
    for prefix, delta in iter_deltas(residual):
        key = weight_key(prefix)
        if key not in state:
            raise AdapterError(f"base has no weight {key!r}", source=source,
                               module=module_name_from_prefix(prefix))
        if placement(state[key].shape, *delta.shape, hints.get(prefix), source=source,
                     prefix=prefix):
            delta = delta.T
        state[key] = state[key].to(torch.float32) + delta
        changed.append(key)
    return changed


def stored_transposed(module: torch.nn.Module) -> bool | None:
    """How a loaded layer stores its weight: ``Conv1D`` and embeddings transposed."""
    kind = type(module).__name__
    if kind == "Conv1D" or isinstance(module, torch.nn.Embedding):
        return True
    if isinstance(module, torch.nn.Linear):
        return False
    return None


def _tied(model: torch.nn.Module, module: torch.nn.Module) -> bool:
    """``lm_head`` sharing its weight with the input embeddings (``tie_word_embeddings``)."""
    try:
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return outputs is module and inputs is not None and inputs.weight is module.weight


class OriginalWeights:
    """The base model's weights as stored (one tensor at a time, from its safetensors files).

    A model loaded in bf16 for training holds ``W0`` already rounded; its compute copy should be
    ``W0 + R`` rounded *once*, so the sum is formed from the stored ``W0`` in float32.
    """

    def __init__(self, folder: str | os.PathLike):
        self.where = _key_locations(_weight_files(Path(folder)))

    def __call__(self, key: str) -> torch.Tensor | None:
        found = self.where.get(key)
        if found is None:
            return None
        with safe_open(str(found[0]), framework="pt") as handle:
            return handle.get_tensor(key).to(torch.float32)


@torch.no_grad()
def fold_into_model(model: torch.nn.Module, residual: ResidualInput,
                    original: Callable[[str], torch.Tensor | None] | None = None) -> list[str]:
    """Fold into a loaded ``transformers`` model in place, one module at a time.

    The sum is formed in float32. A model loaded in bf16/fp16 (a compute copy for training)
    keeps its dtype: with ``original`` (see :class:`OriginalWeights`) each weight becomes
    ``W0 + R`` rounded once; without it the rounded ``W0`` is used and we warn. The federation's
    exact state never lives in such a copy: evaluation and export load float32.
    """
    changed = []
    for prefix, delta in iter_deltas(residual):
        name = module_name_from_prefix(prefix)
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise AdapterError("model has no such module", source="model", module=name) from exc
        weight = module.weight
        if _tied(model, module):
            raise AdapterError("lm_head shares its weight with the input embeddings "
                               "(tie_word_embeddings): folding a residual into it would change "
                               "the embeddings too, which no client's model did. Untie them "
                               "(tie_word_embeddings=False) or do not target lm_head",
                               source="model", module=name)
        if quantized.is_quantized(module):
            _fold_quantized(module, name, delta, original)
            changed.append(name)
            continue
        if placement(weight.shape, *delta.shape, stored_transposed(module), source="model",
                     prefix=prefix):
            delta = delta.T
        source = weight.data.to(torch.float32)
        if weight.dtype != torch.float32:
            stored = original(name + ".weight") if original is not None else None
            if stored is not None and stored.shape == weight.shape:
                source = stored.to(weight.device)
            else:
                log.warning("folding into %s weight of %s loses precision; load the base in "
                            "float32", weight.dtype, name)
        weight.copy_((source + delta.to(weight.device)).to(weight.dtype))
        changed.append(name)
    return changed


def _fold_quantized(module: torch.nn.Module, name: str, delta: torch.Tensor,
                    original: Callable[[str], torch.Tensor | None] | None) -> None:
    """``W0 + R`` quantized once (a QLoRA training copy); bitsandbytes Linears only."""
    shape = quantized.logical_shape(module)
    placement(shape, *delta.shape, False, source="model", prefix=name)  # Linear: out x in
    stored = original(name + ".weight") if original is not None else None
    if stored is None or tuple(stored.shape) != shape:
        log.warning("folding into the quantized %s: the stored float weight is not readable, so "
                    "R is added to the dequantized one (rounded twice)", name)
        stored = quantized.dequantized(module).cpu()
    quantized.requantize(module, stored + delta.to(stored.device))


def layer_orientations(base: Path, prefixes: list[str]) -> dict[str, bool | None]:
    """``stored_transposed`` of each target layer, from the ``config.json`` of the base folder
    (or beside the weights file): the model is built on the meta device (no weights, instant).
    Empty when there is no config."""
    folder = base if base.is_dir() else base.parent  # a weights file beside its config counts
    if not (folder / "config.json").is_file():
        return {}
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except Exception:  # an unreadable config: fall back to the residual's own record
        return {}
    names = {p: module_name_from_prefix(p) for p in prefixes}
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification,
                 transformers.AutoModel):
        try:
            with torch.device("meta"):
                skeleton = auto.from_config(config)
            modules = {p: skeleton.get_submodule(n) for p, n in names.items()}
        except Exception:  # this head class does not fit the config, or names another layout
            continue
        return {p: stored_transposed(m) for p, m in modules.items()}
    return {}


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
              *, force: bool = False, progress: Callable[[int, int], None] | None = None
              ) -> list[str]:
    """Write ``out``: a copy of ``base`` (model folder or one safetensors file) with the residual
    (a round's factored ``D`` or a node's dense ``R``) folded into the targeted weights.
    Validates every module's shape before writing anything; reads one module at a time."""
    base = Path(base)
    files = _weight_files(base)
    where = _key_locations(files)
    with ResidualFile(residual_path) as residual:
        # The base model's own layer types are the surest word on orientation; the residual's
        # record is the fallback (a bare weights file has no config to build them from).
        hints = {**residual.transposed, **layer_orientations(base, list(residual.modules))}
        per_file: dict[Path, list[str]] = {}
        for prefix, (d_out, d_in) in residual.modules.items():
            key = weight_key(prefix)
            if key not in where:
                raise AdapterError(f"base has no weight {key!r}", source=str(base),
                                   module=module_name_from_prefix(prefix))
            path, shape = where[key]
            placement(shape, d_out, d_in, hints.get(prefix), source=str(residual_path),
                      prefix=prefix)  # refuse before any write
            per_file.setdefault(path, []).append(prefix)

        changed: list[str] = []
        total, done = len(residual.modules), [0]

        def tick() -> None:
            done[0] += 1
            if progress is not None:
                progress(done[0], total)
        if base.is_file():
            with atomic_output_file(out, force=force) as scratch:
                changed += _fold_file(base, scratch, residual, per_file.get(base, []), hints,
                                      tick)
            return changed
        with atomic_output_dir(out, force=force) as scratch:
            for item in base.iterdir():
                if item.suffix != ".safetensors":
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, scratch / item.name)
            for path in files:
                changed += _fold_file(path, scratch / path.name, residual, per_file.get(path, []),
                                      hints, tick)
            _refresh_index_size(scratch)
    return changed


def _fold_file(path: Path, target: Path, residual: ResidualFile, prefixes: list[str],
               hints: Mapping[str, bool | None], tick: Callable[[], None]) -> list[str]:
    """Fold into one weights file (one shard at a time in memory, as transformers loads them)."""
    if not prefixes:
        shutil.copy2(path, target)
        return []
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
    state = load_file(str(path))
    def deltas() -> Iterator[tuple[str, torch.Tensor]]:
        for prefix in prefixes:
            yield prefix, residual.delta(prefix)
            tick()
    changed = fold_into_state_dict(state, deltas(), source=str(path), hints=hints)
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
