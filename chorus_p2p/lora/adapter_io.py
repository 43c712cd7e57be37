"""Read and write PEFT LoRA adapters, one module at a time.

A client adapter is opened once (header only) and its factors are pulled per module with
``safetensors.safe_open``, so aggregating dozens of clients never holds more than one module of
each in memory. Every problem is raised as an :class:`AdapterError` naming the file and module.

What an adapter file may hold, as PEFT writes it:

- LoRA factors of ``Linear`` and GPT-2 ``Conv1D`` layers: ``P.lora_A.weight`` (r x d_in) and
  ``P.lora_B.weight`` (d_out x r), ``delta = s B A`` (a ``Conv1D`` stores its weight transposed,
  ``d_in x d_out``, which ``fan_in_fan_out`` in the config says; the factors are the same);
- embedding LoRA: ``P.lora_embedding_A`` (r x num_embeddings), ``P.lora_embedding_B``
  (dim x r); the embedding's change is ``(s B A)^T``;
- full tensors: ``modules_to_save`` (a classifier head, ``lm_head``, ``embed_tokens`` trained in
  full) and base layers PEFT saves beside embedding LoRA, under their plain parameter names
  (``base_model.model.score.weight``). They average exactly as they are.

Refused, with the option named: DoRA (``use_dora``), LoRA biases (``lora_bias``).
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chorus_p2p.errors import AdapterError
from chorus_p2p.lora.config import LoraSettings, module_name_from_prefix
from chorus_p2p.lora.files import resolve_adapter_files
from chorus_p2p.lora.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS


_FACTOR_KEY = re.compile(r"^(?P<prefix>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<prefix>.+)\.lora_embedding_(?P<which>[AB])(?:\.[A-Za-z0-9_\-]+)?$")
LINEAR, EMBEDDING = "linear", "embedding"
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


@dataclass(frozen=True)
class LoraFactors:
    """One client's factors for one module: ``delta W = scale * B @ A``."""

    A: torch.Tensor  # r x d_in
    B: torch.Tensor  # d_out x r
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class ModuleShape:
    """``d_out x d_in`` is the shape of ``B @ A``: for an embedding, dim x num_embeddings."""

    d_out: int
    d_in: int
    rank: int
    kind: str = LINEAR


def _read_settings(config_path: Path | None, default_rank: int) -> LoraSettings:
    if config_path is None:
        return LoraSettings.unit_scale(default_rank)
    try:
        data = json.loads(config_path.read_text())
        if not isinstance(data, dict):
            raise ValueError("top level is not a JSON object")
        return LoraSettings.from_json(data)
    except (OSError, ValueError) as exc:
        raise AdapterError(f"bad adapter config: {exc}", source=str(config_path)) from exc


class AdapterSource:
    """An opened adapter file whose factors are read lazily, one module at a time."""

    def __init__(self, path: str | os.PathLike, label: str | None = None,
                 settings: LoraSettings | None = None):
        """``settings`` overrides any config file: a node knows its federation's LoRA settings and
        stores client uploads as bare safetensors blobs."""
        self.weights_path, config_path = resolve_adapter_files(path)
        self.label = label or str(path)
        try:
            self._handle = safe_open(str(self.weights_path), framework="pt", device="cpu")
            keys = list(self._handle.keys())
        except Exception as exc:  # safetensors raises its own error types and OSError
            raise AdapterError(f"not a valid safetensors file ({exc})", source=self.label) from exc
        self._keys: dict[str, dict[str, str]] = {}
        self._kinds: dict[str, str] = {}
        self.full: dict[str, tuple[int, ...]] = {}  # full tensors (modules_to_save): key -> shape
        for key in keys:
            unsupported = self._explain_unsupported(key)
            if unsupported:
                raise AdapterError(unsupported, source=self.label)
            match = _FACTOR_KEY.match(key) or _EMBEDDING_KEY.match(key)
            if match is None:
                self.full[key] = self._full_shape(key)
                continue
            kind = EMBEDDING if "lora_embedding_" in key else LINEAR
            self._keys.setdefault(match["prefix"], {})[match["which"]] = key
            if self._kinds.setdefault(match["prefix"], kind) != kind:
                raise AdapterError("mixes embedding and linear LoRA factors", source=self.label,
                                   module=module_name_from_prefix(match["prefix"]))
        if not self._keys:
            raise AdapterError("contains no LoRA factors", source=self.label)
        self.shapes: dict[str, ModuleShape] = {p: self._shape(p) for p in self._keys}
        default_rank = max(s.rank for s in self.shapes.values())
        self.settings = settings or _read_settings(config_path, default_rank)

    @staticmethod
    def _explain_unsupported(key: str) -> str | None:
        if "lora_magnitude_vector" in key:
            return (f"key {key!r} is a DoRA magnitude (use_dora=True): DoRA's merged weight "
                    "rescales each column by a norm of W + s B A, which does not average "
                    "linearly; train with use_dora=False")
        if re.search(r"\.lora_[AB](\.[A-Za-z0-9_\-]+)?\.bias$", key):
            return (f"key {key!r} is a LoRA bias (lora_bias=True); not supported, train with "
                    "lora_bias=False")
        if ".lora_" in key and not (_FACTOR_KEY.match(key) or _EMBEDDING_KEY.match(key)):
            return f"key {key!r} is a LoRA tensor of a kind that is not supported"
        return None

    def _full_shape(self, key: str) -> tuple[int, ...]:
        tslice = self._handle.get_slice(key)
        if tslice.get_dtype() not in _FLOAT_DTYPES:
            raise AdapterError(f"tensor {key!r} has dtype {tslice.get_dtype()}; expected a float "
                               "type", source=self.label)
        return tuple(tslice.get_shape())

    def full_tensor(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A full tensor (``modules_to_save``), checked finite."""
        try:
            tensor = self._handle.get_tensor(key).to(dtype)
        except Exception as exc:
            raise AdapterError(f"cannot read {key!r} ({exc})", source=self.label) from exc
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{key!r} contains NaN or Inf", source=self.label)
        return tensor

    @property
    def fan_in_fan_out(self) -> bool:
        """PEFT's flag for GPT-2 style ``Conv1D`` targets, whose weight is ``d_in x d_out``."""
        return bool(self.settings.raw.get("fan_in_fan_out", False))

    def _shape(self, prefix: str) -> ModuleShape:
        pair = self._keys[prefix]
        module = module_name_from_prefix(prefix)
        missing = {"A", "B"} - pair.keys()
        if missing:
            raise AdapterError(f"lora_{missing.pop()} is missing (unpaired factors)",
                               source=self.label, module=module)
        shapes = {}
        for which, key in pair.items():
            tslice = self._handle.get_slice(key)
            dtype = tslice.get_dtype()
            if dtype not in _FLOAT_DTYPES:
                raise AdapterError(f"lora_{which} has dtype {dtype}; expected a float type",
                                   source=self.label, module=module)
            shape = list(tslice.get_shape())
            if len(shape) != 2 or 0 in shape:
                raise AdapterError(f"lora_{which} has shape {shape}; expected a non-empty matrix",
                                   source=self.label, module=module)
            shapes[which] = shape
        (r_a, d_in), (d_out, r_b) = shapes["A"], shapes["B"]
        if r_a != r_b:
            raise AdapterError(f"lora_A is {r_a}x{d_in} but lora_B is {d_out}x{r_b}: ranks differ",
                               source=self.label, module=module)
        return ModuleShape(d_out=d_out, d_in=d_in, rank=r_a, kind=self._kinds[prefix])

    @property
    def modules(self) -> list[str]:
        """PEFT key prefixes of every target module, in file order."""
        return list(self._keys)

    def factors(self, prefix: str, dtype: torch.dtype = torch.float32) -> LoraFactors:
        """Load one module's factors, checking they are finite."""
        module = module_name_from_prefix(prefix)
        tensors = {}
        for which in ("A", "B"):
            try:
                tensor = self._handle.get_tensor(self._keys[prefix][which])
            except Exception as exc:
                raise AdapterError(f"cannot read lora_{which} ({exc})", source=self.label,
                                   module=module) from exc
            tensor = tensor.to(dtype)
            if not all_finite(tensor):
                raise AdapterError(f"lora_{which} contains NaN or Inf", source=self.label,
                                   module=module)
            tensors[which] = tensor
        shape = self.shapes[prefix]
        scale = self.settings.scale_for(module, shape.rank)
        if not math.isfinite(scale) or scale == 0:
            raise AdapterError(f"scale {scale} is not usable", source=self.label, module=module)
        return LoraFactors(A=tensors["A"], B=tensors["B"], scale=scale)

    def close(self) -> None:
        # safe_open handles are closed by dropping the reference (they mmap the file).
        self._handle = None

    def __enter__(self) -> "AdapterSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf, at the cost of one sum: any non-finite element makes the sum NaN or Inf,
    so a finite sum settles it (a sum that overflowed is checked element by element).
    ``isfinite().all()`` writes a mask the size of the tensor; over a 3B model's 2,240 factors
    that was 0.36 s of a 4 s aggregation."""
    if math.isfinite(float(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


@contextmanager
def open_adapters(paths: list[str], settings: LoraSettings | None = None,
                  labels: list[str] | None = None) -> Iterator[list[AdapterSource]]:
    """Open several adapters and close them all, whatever happens."""
    with ExitStack() as stack:
        yield [stack.enter_context(AdapterSource(p, label=labels[i] if labels else None,
                                                 settings=settings))
               for i, p in enumerate(paths)]


def factor_keys(prefix: str, kind: str = LINEAR) -> tuple[str, str]:
    """PEFT's saved key names for a module's A and B factors."""
    if kind == EMBEDDING:
        return f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B"
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


def write_adapter(out_dir: Path, config: Mapping[str, object],
                  tensors: Mapping[str, torch.Tensor]) -> None:
    """Write a PEFT adapter folder that ``PeftModel.from_pretrained`` loads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
