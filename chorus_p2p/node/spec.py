"""What a federation trains: the base model's target modules and the LoRA settings.

A node derives the exact set of ``(module, d_out, d_in)`` from the model's config (instantiated on
PyTorch's ``meta`` device: no weights are loaded, so this is instant even for a 70B model). Every
upload is checked against it, and the upload size limit follows from it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chorus_p2p.errors import AdapterError, UsageError
from chorus_p2p.lora.adapter_io import AdapterSource, factor_keys
from chorus_p2p.lora.config import PEFT_PREFIX, LoraSettings, module_name_from_prefix
from chorus_p2p.lora.lowrank import frobenius_norm_of_product

HEADER_SLACK = 1 << 20  # room for the safetensors JSON header
# No honest update changes a model's weights by more than this (Frobenius norm over all modules;
# the weights of a 70B model are about 1e3 in that norm). Beyond it, float32 aggregation
# overflows: such an update is refused at upload, whatever the federation's history.
MAX_PLAUSIBLE_NORM = 1e9


def discover_modules(model: str, target_modules: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """PEFT prefix -> (d_out, d_in) for every Linear whose last name part is targeted."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as exc:  # OSError for a missing path/id, ValueError for a bad config
        raise UsageError(f"--model {model}: cannot read a model config ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from exc
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    found: dict[str, tuple[int, int]] = {}
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            found[PEFT_PREFIX + name] = (module.out_features, module.in_features)
    if not found:
        raise UsageError(f"--target-modules {','.join(target_modules)} match no Linear layer of "
                         f"{model}")
    return found


class UpdateRejected(Exception):
    """An upload that is well-formed HTTP but not an acceptable update; ``code`` goes to the API,
    ``extra`` adds fields to the JSON error (e.g. where the coordinator is)."""

    def __init__(self, code: str, message: str, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra or {}


@dataclass(frozen=True)
class FederationSpec:
    model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def build(cls, model: str, rank: int, alpha: float, target_modules: tuple[str, ...]
              ) -> "FederationSpec":
        if rank <= 0 or not math.isfinite(alpha) or alpha <= 0:
            raise UsageError(f"--rank {rank} / --alpha {alpha}: both must be positive")
        return cls(model, rank, alpha, tuple(target_modules),
                   discover_modules(model, tuple(target_modules)))

    def shape_json(self) -> dict[str, Any]:
        """What must agree between nodes: shapes and LoRA settings, not the local model path."""
        return {"rank": self.rank, "alpha": self.alpha, "target_modules": list(self.target_modules),
                "modules": {k: list(v) for k, v in sorted(self.modules.items())}}

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "rank": self.rank, "alpha": self.alpha,
                "target_modules": list(self.target_modules),
                "modules": {k: list(v) for k, v in self.modules.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FederationSpec":
        return cls(data["model"], int(data["rank"]), float(data["alpha"]),
                   tuple(data["target_modules"]),
                   {k: (int(v[0]), int(v[1])) for k, v in data["modules"].items()})

    def fingerprint(self) -> str:
        """Same for every node of a federation; differing specs must not aggregate together."""
        return hashlib.sha256(json.dumps(self.shape_json(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def settings(self) -> LoraSettings:
        return LoraSettings(r=self.rank, lora_alpha=self.alpha, raw=self.adapter_config())

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapter_config(self) -> dict[str, Any]:
        """A PEFT ``adapter_config.json`` that ``PeftModel.from_pretrained`` accepts.

        It names no base model path: nodes may keep the model at different paths, and the config
        blob must hash the same on every node."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
                "r": self.rank, "lora_alpha": self.alpha, "target_modules": list(self.target_modules),
                "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
                "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
                "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}

    def max_update_bytes(self) -> int:
        """Largest honest upload: every factor in float64 (PEFT can save them so) plus the
        header."""
        floats = sum(self.rank * (d_out + d_in) for d_out, d_in in self.modules.values())
        return floats * 8 + HEADER_SLACK

    def initial_adapter(self, federation: str) -> dict[str, torch.Tensor]:
        """PEFT's default init (``B = 0``, ``A`` Kaiming-uniform), seeded by federation and module,
        so every node of a federation derives the same round-0 adapter without exchanging it."""
        tensors: dict[str, torch.Tensor] = {}
        for prefix, (d_out, d_in) in sorted(self.modules.items()):
            seed = int.from_bytes(hashlib.sha256(f"{federation}/{prefix}".encode()).digest()[:8], "big")
            gen = torch.Generator().manual_seed(seed % (2**63))
            bound = 1.0 / math.sqrt(d_in)
            key_a, key_b = factor_keys(prefix)
            tensors[key_a] = (torch.rand(self.rank, d_in, generator=gen) * 2 - 1) * bound
            tensors[key_b] = torch.zeros(d_out, self.rank)
        return tensors

    def validate_update(self, path: Path) -> float:
        """Check an uploaded safetensors adapter against this federation; return the norm of
        the weight change it applies, ``sqrt(sum over modules ||s B A||_F^2)`` (never dense).

        Raises :class:`UpdateRejected` with ``bad_adapter`` (unreadable), ``wrong_shape`` or
        ``non_finite``.
        """
        try:
            source = AdapterSource(path, label="update", settings=self.settings)
        except AdapterError as exc:
            code = "wrong_shape" if "ranks differ" in exc.detail else "bad_adapter"
            raise UpdateRejected(code, exc.detail if not exc.module else
                                 f"module {exc.module}: {exc.detail}") from exc
        with source:
            missing = sorted(set(self.modules) - set(source.modules))
            extra = sorted(set(source.modules) - set(self.modules))
            if missing or extra:
                which = missing or extra
                raise UpdateRejected("wrong_shape", (
                    f"{'lacks' if missing else 'has unexpected'} module "
                    f"{module_name_from_prefix(which[0])}"
                    f"{f' (and {len(which) - 1} more)' if len(which) > 1 else ''}; this "
                    f"federation trains {', '.join(self.target_modules)} of {self.model}"))
            total = 0.0
            for prefix, (d_out, d_in) in self.modules.items():
                shape = source.shapes[prefix]
                if (shape.d_out, shape.d_in, shape.rank) != (d_out, d_in, self.rank):
                    raise UpdateRejected("wrong_shape", (
                        f"module {module_name_from_prefix(prefix)}: factors are rank {shape.rank}"
                        f" for {shape.d_out}x{shape.d_in}; this federation expects rank "
                        f"{self.rank} for {d_out}x{d_in}"))
                try:
                    factors = source.factors(prefix)
                except AdapterError as exc:
                    code = "non_finite" if "NaN" in exc.detail else "bad_adapter"
                    raise UpdateRejected(code, f"module {exc.module}: {exc.detail}") from exc
                # float64: an update scaled by 1e30 has a finite float64 norm, where float32
                # would overflow to inf and slip past every bound.
                total += frobenius_norm_of_product(factors.B.double() * factors.scale,
                                                   factors.A.double()) ** 2
        norm = math.sqrt(total)
        if not norm < MAX_PLAUSIBLE_NORM:
            raise UpdateRejected("update_too_large", (
                f"the update changes the weights by ||s B A||_F = {norm:.3g}, beyond anything "
                f"a training step produces (limit {MAX_PLAUSIBLE_NORM:.0e}); its aggregation "
                "would overflow float32 arithmetic"))
        return norm


def write_spec_file(path: Path, spec: FederationSpec) -> None:
    path.write_text(json.dumps(spec.to_json(), indent=2, sort_keys=True) + "\n")
