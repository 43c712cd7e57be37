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
from chorus_p2p.federation.refusals import UpdateRejected
from chorus_p2p.lora.adapter_io import EMBEDDING, AdapterSource, factor_keys
from chorus_p2p.lora.config import PEFT_PREFIX, LoraSettings, module_name_from_prefix
from chorus_p2p.lora.canonical import MAX_FACTOR_CANCELLATION, canonical_factors, cancellation

HEADER_SLACK = 1 << 20  # room for the safetensors JSON header
# No honest update changes a model's weights by more than this (Frobenius norm over all modules;
# the weights of a 70B model are about 1e3 in that norm). Beyond it, float32 aggregation
# overflows: such an update is refused at upload, whatever the federation's history.
MAX_PLAUSIBLE_NORM = 1e9


@dataclass(frozen=True)
class Discovered:
    modules: dict[str, tuple[int, int]]  # PEFT prefix -> (d_out, d_in) of B @ A
    kinds: dict[str, str]  # prefix -> linear | conv1d | embedding
    full: dict[str, tuple[int, ...]]  # modules_to_save parameters: adapter key -> shape


def _skeleton(model: str, task_type: str):
    from transformers import AutoConfig

    from chorus_p2p.exactness import auto_class

    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as exc:  # OSError for a missing path/id, ValueError for a bad config
        raise UsageError(f"--model {model}: cannot read a model config ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from exc
    with torch.device("meta"):
        return auto_class(task_type).from_config(config)


def discover_modules(model: str, target_modules: tuple[str, ...], task_type: str = "CAUSAL_LM",
                     modules_to_save: tuple[str, ...] = ()) -> Discovered:
    """Every targeted layer (``Linear``, GPT-2 ``Conv1D``, embedding) by the last part of its
    name, with the shape of ``B @ A``; and the parameters of ``modules_to_save``. The model is
    built on PyTorch's meta device: no weights, instant even for 70B."""
    skeleton = _skeleton(model, task_type)
    modules: dict[str, tuple[int, int]] = {}
    kinds: dict[str, str] = {}
    full: dict[str, tuple[int, ...]] = {}
    tied = getattr(getattr(skeleton, "config", None), "tie_word_embeddings", False)
    for name, module in skeleton.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in modules_to_save:
            for param, tensor in module.named_parameters(recurse=True):
                full[f"{PEFT_PREFIX}{name}.{param}"] = tuple(tensor.shape)
            continue
        if last not in target_modules:
            continue
        prefix = PEFT_PREFIX + name
        if isinstance(module, torch.nn.Linear):
            if tied and module is skeleton.get_output_embeddings():
                raise UsageError(f"--target-modules {last}: {name} shares its weight with the "
                                 "input embeddings (tie_word_embeddings); folding the residual "
                                 "into it would change the embeddings too. Untie them or do not "
                                 "target it")
            modules[prefix], kinds[prefix] = (module.out_features, module.in_features), "linear"
        elif type(module).__name__ == "Conv1D":  # GPT-2: weight is d_in x d_out
            modules[prefix], kinds[prefix] = (module.nf, module.weight.shape[0]), "conv1d"
        elif isinstance(module, torch.nn.Embedding):  # B @ A is dim x num_embeddings
            modules[prefix] = (module.embedding_dim, module.num_embeddings)
            kinds[prefix] = "embedding"
    if not modules:
        raise UsageError(f"--target-modules {','.join(target_modules)} match no Linear, Conv1D "
                         f"or embedding layer of {model}")
    missing = set(modules_to_save) - {k.split(".")[-2] for k in full}
    if missing:
        raise UsageError(f"--modules-to-save {','.join(sorted(missing))} match no module of "
                         f"{model}")
    return Discovered(modules, kinds, full)


@dataclass(frozen=True)
class FederationSpec:
    model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # absent: linear (specs from 0.1)
    task_type: str = "CAUSAL_LM"
    modules_to_save: tuple[str, ...] = ()
    full: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def build(cls, model: str, rank: int, alpha: float, target_modules: tuple[str, ...],
              task_type: str = "CAUSAL_LM", modules_to_save: tuple[str, ...] = ()
              ) -> "FederationSpec":
        if rank <= 0 or not math.isfinite(alpha) or alpha <= 0:
            raise UsageError(f"--rank {rank} / --alpha {alpha}: both must be positive")
        found = discover_modules(model, tuple(target_modules), task_type, tuple(modules_to_save))
        return cls(model, rank, alpha, tuple(target_modules), found.modules, found.kinds,
                   task_type, tuple(modules_to_save), found.full)

    @property
    def transposed(self) -> set[str]:
        """Modules whose base weight holds ``D`` transposed (``Conv1D``, embeddings)."""
        return {p for p, kind in self.kinds.items() if kind in ("conv1d", "embedding")}

    def kind(self, prefix: str) -> str:
        return self.kinds.get(prefix, "linear")

    def shape_json(self) -> dict[str, Any]:
        """What must agree between nodes: shapes and LoRA settings, not the local model path."""
        data = {"rank": self.rank, "alpha": self.alpha, "target_modules": list(self.target_modules),
                "modules": {k: list(v) for k, v in sorted(self.modules.items())}}
        if self.task_type != "CAUSAL_LM" or self.full or any(
                k != "linear" for k in self.kinds.values()):
            data.update({"task_type": self.task_type, "kinds": dict(sorted(self.kinds.items())),
                         "full": {k: list(v) for k, v in sorted(self.full.items())}})
        return data

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "rank": self.rank, "alpha": self.alpha,
                "target_modules": list(self.target_modules),
                "modules": {k: list(v) for k, v in self.modules.items()},
                "kinds": self.kinds, "task_type": self.task_type,
                "modules_to_save": list(self.modules_to_save),
                "full": {k: list(v) for k, v in self.full.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FederationSpec":
        return cls(data["model"], int(data["rank"]), float(data["alpha"]),
                   tuple(data["target_modules"]),
                   {k: (int(v[0]), int(v[1])) for k, v in data["modules"].items()},
                   dict(data.get("kinds") or {}), data.get("task_type") or "CAUSAL_LM",
                   tuple(data.get("modules_to_save") or ()),
                   {k: tuple(int(x) for x in v) for k, v in (data.get("full") or {}).items()})

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
        return {"peft_type": "LORA", "task_type": self.task_type, "base_model_name_or_path": None,
                "r": self.rank, "lora_alpha": self.alpha, "target_modules": list(self.target_modules),
                "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
                "fan_in_fan_out": "conv1d" in self.kinds.values(), "init_lora_weights": True,
                "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
                "modules_to_save": list(self.modules_to_save) or None}

    def max_update_bytes(self) -> int:
        """Largest honest upload: every factor and full tensor in float64 (PEFT can save them
        so), the base layers PEFT saves beside embedding LoRA, and the header."""
        floats = sum(self.rank * (d_out + d_in) for d_out, d_in in self.modules.values())
        floats += sum(math.prod(shape) for shape in self.full.values())
        floats += sum(d_out * d_in for p, (d_out, d_in) in self.modules.items()
                      if self.kind(p) == "embedding")
        return floats * 8 + HEADER_SLACK

    def initial_adapter(self, federation: str) -> dict[str, torch.Tensor]:
        """PEFT's default init (``B = 0``, ``A`` Kaiming-uniform), seeded by federation and module,
        so every node of a federation derives the same round-0 adapter without exchanging it."""
        tensors: dict[str, torch.Tensor] = {}
        for prefix, (d_out, d_in) in sorted(self.modules.items()):
            seed = int.from_bytes(hashlib.sha256(f"{federation}/{prefix}".encode()).digest()[:8], "big")
            gen = torch.Generator().manual_seed(seed % (2**63))
            if self.kind(prefix) == "embedding":  # PEFT's embedding init: A = 0, B normal
                key_a, key_b = factor_keys(prefix, EMBEDDING)
                tensors[key_a] = torch.zeros(self.rank, d_in)
                tensors[key_b] = torch.randn(d_out, self.rank, generator=gen)
                continue
            bound = 1.0 / math.sqrt(d_in)
            key_a, key_b = factor_keys(prefix)
            tensors[key_a] = (torch.rand(self.rank, d_in, generator=gen) * 2 - 1) * bound
            tensors[key_b] = torch.zeros(d_out, self.rank)
        # modules_to_save start as each client's own copy of the base module (PEFT's rule), so
        # round 0 carries none; from round 1 on the global adapter carries their mean.
        return tensors

    def _check_full(self, source: AdapterSource) -> None:
        problem = _full_problem(self, source)
        if problem:
            raise UpdateRejected("wrong_shape", problem)
        for key in source.full:
            try:
                source.full_tensor(key)
            except AdapterError as exc:
                raise UpdateRejected("non_finite" if "NaN" in exc.detail else "bad_adapter",
                                     exc.detail) from exc

    def validate_update(self, path: Path) -> float:
        """Check an uploaded safetensors adapter against this federation; return the norm of
        the weight change it applies, ``sqrt(sum over modules ||s B A||_F^2)`` (never dense).

        Raises :class:`UpdateRejected` with ``bad_adapter`` (unreadable), ``wrong_shape``,
        ``non_finite``, ``ill_conditioned`` (factors that cancel) or ``update_too_large``.
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
            self._check_full(source)
            total = 0.0
            for prefix, (d_out, d_in) in self.modules.items():
                shape = source.shapes[prefix]
                wanted = "embedding" if self.kind(prefix) == "embedding" else "linear"
                if shape.kind != wanted:
                    raise UpdateRejected("wrong_shape", (
                        f"module {module_name_from_prefix(prefix)}: holds {shape.kind} LoRA "
                        f"factors; this federation's layer there is a {self.kind(prefix)}"))
                if (shape.d_out, shape.d_in, shape.rank) != (d_out, d_in, self.rank):
                    raise UpdateRejected("wrong_shape", (
                        f"module {module_name_from_prefix(prefix)}: factors are rank {shape.rank}"
                        f" for {shape.d_out}x{shape.d_in}; this federation expects rank "
                        f"{self.rank} for {d_out}x{d_in}"))
                try:
                    factors = source.factors(prefix, torch.float64)
                except AdapterError as exc:
                    code = "non_finite" if "NaN" in exc.detail else "bad_adapter"
                    raise UpdateRejected(code, f"module {exc.module}: {exc.detail}") from exc
                # The norm of the product as the canonical form holds it, in float64: that form
                # is what the node aggregates, so factors that cancel (B A = 0 from factors of
                # 1e30) cannot pass a bound here and then break the arithmetic there.
                try:
                    if not bool(torch.isfinite(factors.B * factors.scale).all()):
                        raise ArithmeticError("s B overflows float64")
                    norm = canonical_factors(factors)[1]
                except (ArithmeticError, RuntimeError) as exc:  # LinAlgError is a RuntimeError
                    raise UpdateRejected("update_too_large", (
                        f"module {module_name_from_prefix(prefix)}: the factors are too large "
                        f"to measure in float64 ({exc}); no training step produces them"))
                ratio = cancellation(factors, norm)
                if not ratio <= MAX_FACTOR_CANCELLATION:
                    raise UpdateRejected("ill_conditioned", (
                        f"module {module_name_from_prefix(prefix)}: the factors are "
                        f"{ratio:.2g} times larger than their product (||s B|| ||A|| vs "
                        f"||s B A||; honest training stays near sqrt(rank)): they cancel, and "
                        "their product would be rounding noise"))
                total += norm ** 2
        norm = math.sqrt(total)
        if not norm < MAX_PLAUSIBLE_NORM:
            raise UpdateRejected("update_too_large", (
                f"the update changes the weights by ||s B A||_F = {norm:.3g}, beyond anything "
                f"a training step produces (limit {MAX_PLAUSIBLE_NORM:.0e}); its aggregation "
                "would overflow float32 arithmetic"))
        return norm


def _full_problem(spec: "FederationSpec", source: AdapterSource) -> str | None:
    for key, shape in source.full.items():
        saved_base = any(key.startswith(p + ".base_layer.") for p in spec.modules)
        if key not in spec.full and not saved_base:
            return (f"holds {key!r}, which is neither a LoRA factor nor one of this "
                    f"federation's modules_to_save ({', '.join(spec.modules_to_save) or 'none'})")
        if not saved_base and shape != spec.full[key]:
            return f"{key!r} is {list(shape)}; this federation's is {list(spec.full[key])}"
    missing = sorted(set(spec.full) - set(source.full))
    if missing:
        return f"lacks {missing[0]!r} (modules_to_save: {', '.join(spec.modules_to_save)})"
    return None

