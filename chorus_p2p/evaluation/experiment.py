"""Experiment files: one TOML table of settings; any setting given as a list is swept.

    [experiment]
    name = "topics-skew"
    task = "topics"                 # built-in: topics, lookup; or "lm" with data = [files]
    model = "tiny"                  # "tiny": built offline from a config; or an HF id / folder
    clients = [3, 10]               # a list: swept (the runs are the Cartesian product)
    partition = ["iid", "dirichlet"]
    dirichlet_alpha = 0.1
    rounds = 5
    local_steps = 60
    strategies = ["local", "centralized", "fedavg", "fedex", "fedex-svd"]
    seeds = [0, 1, 2, 3, 4]

TOML like the node's ``config.toml``: comments, no indentation traps, and ``tomllib`` is in
the standard library from 3.11 (YAML would add a dependency, and its implicit typing: ``no``
is false).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chorus_p2p.errors import UsageError
from chorus_p2p.evaluation.partition import PARTITIONS
from chorus_p2p.evaluation.tasks import BUILT_IN
from chorus_p2p.lora.names import STRATEGIES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (the dependency pyproject.toml pins there)
    import tomli as tomllib

BOUNDS = ("local", "centralized")  # each client alone; all data pooled, the same total steps
ALL_STRATEGIES = (*BOUNDS, *STRATEGIES)
TASKS = (*BUILT_IN, "lm")

DEFAULTS: dict[str, Any] = {
    "task": "topics", "data": [], "model": "tiny", "clients": 3, "partition": "iid",
    "dirichlet_alpha": 0.1, "rounds": 5, "local_steps": 60, "lr": 5e-3, "batch_size": 8,
    "rank": 8, "alpha": 16.0, "max_seq_len": 0, "dp_noise": 0.0, "dp_clip": 1.0,
    "dp_delta": 1e-5, "dp_mechanism": "gaussian-local", "eval_examples": 240, "compute_dtype": "auto", "quantize": "",
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"],
    "strategies": ["local", "centralized", "fedavg", "fedex", "fedex-svd"], "seeds": [0, 1, 2],
}
# Settings added after results were recorded, with the value every earlier run had: left out of
# the run id at that value, so a rerun of an old experiment skips its finished runs.
ADDED_SINCE_RESULTS = {"dp_mechanism": "gaussian-local"}
# Settings a list sweeps (the others are lists by nature: data files, target modules).
SWEEPABLE = ("task", "model", "clients", "partition", "dirichlet_alpha", "rounds", "local_steps",
             "lr", "batch_size", "rank", "alpha", "max_seq_len", "compute_dtype", "quantize",
             "dp_noise", "dp_clip", "dp_delta", "dp_mechanism", "eval_examples")
TYPES = {"task": str, "model": str, "clients": int, "partition": str, "dirichlet_alpha": float,
         "rounds": int, "local_steps": int, "lr": float, "batch_size": int, "rank": int,
         "alpha": float, "max_seq_len": int, "compute_dtype": str, "quantize": str,
         "dp_noise": float, "dp_clip": float, "dp_delta": float, "dp_mechanism": str,
         "eval_examples": int}


@dataclass(frozen=True)
class Run:
    """One training run: every setting a scalar, plus its strategy and seed."""

    settings: dict[str, Any]
    strategy: str
    seed: int

    @property
    def setting_key(self) -> str:
        """What the runs compared against each other share (all but strategy and seed)."""
        return json.dumps(self.settings, sort_keys=True)

    @property
    def run_id(self) -> str:
        settings = dict(self.settings)
        for key, before in ADDED_SINCE_RESULTS.items():  # results made before it still resume
            if settings.get(key) == before:
                settings.pop(key)
        body = json.dumps({**settings, "strategy": self.strategy, "seed": self.seed},
                          sort_keys=True)
        digest = hashlib.sha256(body.encode()).hexdigest()[:10]
        return f"{self.settings['task']}-{self.strategy}-s{self.seed}-{digest}"

    def to_json(self) -> dict[str, Any]:
        return {**self.settings, "strategy": self.strategy, "seed": self.seed}


@dataclass
class Experiment:
    name: str
    values: dict[str, Any]
    source: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> "Experiment":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"{path}: no such experiment file") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path}: not valid TOML ({exc})") from None
        table = data.get("experiment")
        if not isinstance(table, dict):
            raise UsageError(f"{path}: put the settings under an [experiment] table")
        return cls.from_table(table, path)

    @classmethod
    def from_table(cls, table: dict[str, Any], source: Path | None = None) -> "Experiment":
        unknown = sorted(set(table) - set(DEFAULTS) - {"name"})
        if unknown:
            raise UsageError(f"unknown setting {unknown[0]!r} in the experiment; known: "
                             f"{', '.join(sorted([*DEFAULTS, 'name']))}")
        values = {**DEFAULTS, **{k: v for k, v in table.items() if k != "name"}}
        for key, kind in TYPES.items():
            items = values[key] if isinstance(values[key], list) else [values[key]]
            try:
                values[key] = [kind(v) for v in items] if isinstance(values[key], list) \
                    else kind(values[key])
            except (TypeError, ValueError):
                raise UsageError(f"setting {key}: {values[key]!r} is not a {kind.__name__}"
                                 ) from None
        if source is not None:  # data files are relative to the experiment file
            values["data"] = [str((source.parent / d).resolve()) for d in values["data"]]
        name = str(table.get("name") or (source.stem if source else "experiment"))
        experiment = cls(name, values, source)
        experiment.validate()
        return experiment

    def _each(self, key: str) -> list[Any]:
        value = self.values[key]
        return value if isinstance(value, list) else [value]

    def validate(self) -> None:
        """Every value of every axis is one we can run; what a run would trip on is said now."""
        problems = []
        for task in self._each("task"):
            if task not in TASKS:
                problems.append(f"task {task!r}: one of {', '.join(TASKS)}")
            if task == "lm" and not self.values["data"]:
                problems.append("task lm needs data = [files]")
        for partition in self._each("partition"):
            if partition not in PARTITIONS:
                problems.append(f"partition {partition!r}: one of {', '.join(PARTITIONS)}")
        for strategy in self.values["strategies"]:
            if strategy not in ALL_STRATEGIES:
                problems.append(f"strategy {strategy!r}: one of {', '.join(ALL_STRATEGIES)}")
        problems += [f"max_seq_len {v} must be >= 1 (or 0: the model's)"
                     for v in self._each("max_seq_len") if v < 0]
        for key in ("clients", "rounds", "local_steps", "batch_size", "rank", "eval_examples"):
            problems += [f"{key} {v} must be >= 1" for v in self._each(key) if v < 1]
        problems += [f"dp_noise {v} must be >= 0 (0: no DP)" for v in self._each("dp_noise")
                     if v < 0]
        for key in ("lr", "alpha", "dirichlet_alpha", "dp_clip"):
            problems += [f"{key} {v} must be > 0" for v in self._each(key) if not v > 0]
        problems += [f"dp_mechanism {v!r}: 'gaussian-local' (each round's change, the unit a "
                     "client's whole dataset) or 'dp-sgd' (per record)"
                     for v in self._each("dp_mechanism") if v not in ("gaussian-local", "dp-sgd")]
        for quantize in self._each("quantize"):
            if quantize not in ("", "4bit", "8bit"):
                problems.append(f"quantize {quantize!r}: '', '4bit' or '8bit'")
        for path in self.values["data"]:
            if not Path(path).exists():
                problems.append(f"data file {path} does not exist")
        if not self.values["seeds"]:
            problems.append("seeds is empty")
        if problems:
            raise UsageError("experiment " + self.name + ": " + "; ".join(problems))

    def runs(self) -> list[Run]:
        """The Cartesian product of every swept axis, strategies and seeds."""
        axes = [[(key, v) for v in self._each(key)] for key in SWEEPABLE]
        fixed = {"data": list(self.values["data"]),
                 "target_modules": list(self.values["target_modules"])}
        out = []
        for combo in itertools.product(*axes):
            settings = {**dict(combo), **fixed}
            for seed in self.values["seeds"]:
                for strategy in self.values["strategies"]:
                    out.append(Run(settings, strategy, int(seed)))
        return out
