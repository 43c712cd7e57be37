"""Node settings: command-line flags, then ``CHORUS_*`` environment variables, then
``DATA_DIR/config.toml``, then defaults. The first one that sets a value wins.

``config.toml`` uses the flag names with underscores (``min_updates = 3``); the environment uses
them upper-cased with a ``CHORUS_`` prefix (``CHORUS_MIN_UPDATES=3``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from chorus_p2p.errors import UsageError
from chorus_p2p.lora.names import DEFAULT_STRATEGY, STRATEGIES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_FILE = "config.toml"
DEFAULT_DATA_DIR = "./chorus_data"


COMPUTE_DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class NodeSettings:
    model: str | None = None
    data_dir: str = DEFAULT_DATA_DIR
    host: str = "127.0.0.1"
    port: int = 8470
    strategy: str = DEFAULT_STRATEGY
    rank: int = 16
    alpha: float = 32.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    task_type: str = "CAUSAL_LM"  # PEFT task type: CAUSAL_LM, or SEQ_CLS for a classifier
    modules_to_save: tuple[str, ...] = ()  # trained in full (a classifier head, lm_head)
    min_updates: int = 2
    round_deadline: float = 600.0
    headless: bool = False
    peers: tuple[str, ...] = ()  # static peers HOST:PORT, for networks where multicast is blocked
    interfaces: tuple[str, ...] = ()  # IPs for mDNS; empty = all interfaces
    mdns: bool = True
    election_timeout: float = 1.0  # seconds; randomised in [t, 2t]
    approve_joins: bool = False  # new members wait for an admin's approval
    remote_admin: bool = True  # as coordinator, run admin actions forwarded by members' nodes
    member_timeout: float = 3600.0  # a member unseen this long stops counting (0: never)
    bootstrap: bool = False  # may create the federation's first history (as `init` does)
    rate_limit: float = 100.0  # requests per second per caller (0: off)
    header_timeout: float = 10.0  # seconds a connection may stay without a request in progress
    max_connections: int = 512  # open connections; the longest idle go first beyond it
    tls: bool = False  # TLS between peers, pinned by node id
    max_update_norm: float | None = None  # robust filter: bound on ||s B A|| per update
    outlier_mad: float | None = None  # robust filter: MADs from the median norm
    max_update_ratio: float | None = 100.0  # leave out updates this many times the usual norm
    dp_epsilon: float | None = None  # differential privacy budget for this node's updates
    dp_delta: float = 1e-5
    dp_clip: float | None = None
    dp_noise: float = 1.0
    dp_mechanism: str = "gaussian-local"  # or "dp-sgd": record-level (train/dp_sgd.py)
    train: bool = False  # train on --dataset every round and submit
    dataset: str | None = None
    steps: int = 30
    lr: float = 2e-4  # a usual LoRA rate for real models; the tiny demo model uses 1e-3
    batch_size: int = 8
    device: str = "auto"  # training device: auto (CUDA, then MPS, else CPU), cpu, cuda, cuda:1
    compute_dtype: str = "auto"  # the frozen base's training copy: auto, float32, bfloat16, float16
    grad_accum: int = 1  # micro-batches per optimizer step
    max_seq_len: int | None = None  # tokens per sequence; None: the model's (at most 1024)
    max_rounds: int | None = None  # with --train: stop (exit 0) after this many committed rounds
    eval_data: str | None = None  # held-out text: evaluate each committed global model on it
    eval_every: int = 1  # ... every N committed rounds
    patience: int | None = None  # with eval_data: leave after N evaluations without a new best
    gradient_checkpointing: bool = False  # recompute activations: less GPU memory
    quantize: str | None = None  # "4bit"/"8bit": a bitsandbytes-quantized base (QLoRA)
    text_field: str | None = None  # the dataset field holding the text (default: text/instruction)
    dataset_split: str = "train"  # for save_to_disk DatasetDicts and hub datasets
    dataset_config: str | None = None  # a hub dataset's configuration name
    keep_rounds: int | None = 10  # rounds whose blobs are kept (None: all, for audit)
    checkpoint_every: int = 10  # rounds between checkpoints of the state R
    sources: dict[str, str] = field(default_factory=dict)  # setting -> where it came from


def parse_keep_rounds(text: str | int | None) -> int | None:
    """``all`` (or None) keeps every round's blobs; otherwise a count of at least 1."""
    if text is None or str(text).strip().lower() == "all":
        return None
    value = int(text)
    if value < 1:
        raise ValueError("--keep-rounds must be at least 1, or 'all'")
    return value


def _convert(name: str, value: Any, kind: Any) -> Any:
    try:
        if name in ("target_modules", "peers", "interfaces", "modules_to_save"):
            if name != "target_modules" and not value:
                return ()
            items = value.split(",") if isinstance(value, str) else list(value)
            modules = tuple(m.strip() for m in items if str(m).strip())
            if not modules:
                raise ValueError("empty")
            return modules
        if kind == "keep_rounds":
            return parse_keep_rounds(value)
        if kind is bool:
            if isinstance(value, bool):
                return value
            return str(value).strip().lower() in ("1", "true", "yes", "on")
        return kind(value)
    except (TypeError, ValueError):
        what = "count of rounds (>= 1) or 'all'" if kind == "keep_rounds" else kind.__name__
        raise UsageError(f"setting {name}={value!r} is not a valid {what}")


_KINDS = {"model": str, "data_dir": str, "host": str, "port": int, "strategy": str, "rank": int,
          "task_type": str, "modules_to_save": tuple,
          "alpha": float, "target_modules": tuple, "min_updates": int, "round_deadline": float,
          "headless": bool, "peers": tuple, "interfaces": tuple, "mdns": bool,
          "election_timeout": float, "approve_joins": bool, "remote_admin": bool, "bootstrap": bool,
          "member_timeout": float,
          "rate_limit": float, "tls": bool, "header_timeout": float, "max_connections": int,
          "max_update_norm": float,
          "outlier_mad": float, "max_update_ratio": float, "dp_epsilon": float, "dp_delta": float, "dp_clip": float,
          "dp_noise": float, "dp_mechanism": str, "train": bool, "dataset": str, "steps": int, "lr": float,
          "batch_size": int, "device": str, "keep_rounds": "keep_rounds",
          "compute_dtype": str, "grad_accum": int, "max_seq_len": int, "max_rounds": int,
          "eval_data": str, "eval_every": int, "patience": int,
          "gradient_checkpointing": bool, "quantize": str, "text_field": str, "dataset_split": str,
          "dataset_config": str,
          "checkpoint_every": int}


# config.toml keys are the flag names with underscores; these flags are spelled otherwise in
# the file, and their flag spelling is accepted too (no_mdns = true is mdns = false).
FLAG_SPELLINGS = {"no_mdns": "mdns", "peer": "peers", "interface": "interfaces",
                  "split": "dataset_split"}
INVERTED = {"no_mdns"}


def _flag_spellings(values: dict[str, Any], path: Path) -> dict[str, Any]:
    out = dict(values)
    for flag, key in FLAG_SPELLINGS.items():
        if flag not in out:
            continue
        if key in out:
            raise UsageError(f"{path}: both {flag} and {key} are set; keep one ({key})")
        value = out.pop(flag)
        if flag in INVERTED:
            value = not _convert(flag, value, bool)
        elif key in ("peers", "interfaces") and isinstance(value, str):
            value = [value]
        out[key] = value
    return out


def _with_hint(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, [*_KINDS, *FLAG_SPELLINGS], n=1)
    return f"{key} (did you mean {close[0]}?)" if close else key


def check_dp_mechanism(mechanism: str, grad_accum: int, gradient_checkpointing: bool,
                       dp_on: bool) -> None:
    """What DP-SGD cannot be combined with, said before any model loads."""
    from chorus_p2p.federation.dp_policy import DP_SGD, MECHANISMS

    if mechanism not in MECHANISMS:
        raise UsageError(f"--dp-mechanism {mechanism}: one of {', '.join(MECHANISMS)}")
    if mechanism != DP_SGD or not dp_on:
        return
    if grad_accum != 1 or gradient_checkpointing:
        raise UsageError("--dp-mechanism dp-sgd draws one Poisson batch per step: it does not "
                         "combine with --grad-accum or --gradient-checkpointing (lower "
                         "--batch-size to save memory)")
    from chorus_p2p.train.dp_sgd import require_opacus

    require_opacus()


def resolve_settings(flags: Mapping[str, Any], env: Mapping[str, str] | None = None
                     ) -> NodeSettings:
    env = os.environ if env is None else env
    data_dir = flags.get("data_dir") or env.get("CHORUS_DATA_DIR") or DEFAULT_DATA_DIR
    file_values: dict[str, Any] = {}
    config_path = Path(data_dir) / CONFIG_FILE
    if config_path.is_file():
        try:
            file_values = tomllib.loads(config_path.read_text())
        except (tomllib.TOMLDecodeError, OSError) as exc:
            raise UsageError(f"{config_path}: {exc}") from exc
        file_values = _flag_spellings(file_values, config_path)
        unknown = sorted(set(file_values) - set(_KINDS))
        if unknown:
            raise UsageError(f"{config_path}: unknown setting(s) "
                             f"{', '.join(_with_hint(k) for k in unknown)}")
    settings = NodeSettings(data_dir=data_dir)
    for f in fields(NodeSettings):
        if f.name in ("sources", "data_dir"):
            continue
        env_name = "CHORUS_" + f.name.upper()
        if flags.get(f.name) is not None:
            value, source = flags[f.name], "flag"
        elif env.get(env_name):
            value, source = env[env_name], env_name
        elif f.name in file_values:
            value, source = file_values[f.name], str(config_path)
        else:
            continue
        setattr(settings, f.name, _convert(f.name, value, _KINDS[f.name]))
        settings.sources[f.name] = source
    if settings.strategy not in STRATEGIES:
        raise UsageError(f"strategy {settings.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if settings.task_type not in ("CAUSAL_LM", "SEQ_CLS"):
        raise UsageError(f"task_type {settings.task_type!r}: CAUSAL_LM or SEQ_CLS")
    if settings.compute_dtype not in COMPUTE_DTYPE_NAMES:
        raise UsageError(f"compute_dtype {settings.compute_dtype!r}: one of "
                         f"{', '.join(COMPUTE_DTYPE_NAMES)}")
    if settings.quantize is not None:
        from chorus_p2p.train.quantize import check_kind, require_bitsandbytes

        (require_bitsandbytes if settings.train else check_kind)(settings.quantize)
    if settings.max_rounds is not None and not settings.train:
        raise UsageError("--max-rounds counts this node's own training rounds: add --train")
    if settings.patience is not None and not settings.eval_data:
        raise UsageError("--patience counts evaluations: add --eval-data PATH")
    for name in ("grad_accum", "max_seq_len", "max_rounds", "eval_every", "patience"):
        if getattr(settings, name) is not None and getattr(settings, name) < 1:
            raise UsageError(f"{name} must be at least 1")
    if settings.min_updates < 1:
        raise UsageError("min_updates must be at least 1")
    if settings.round_deadline <= 0:
        raise UsageError("round_deadline must be positive (seconds)")
    for name in ("max_update_norm", "outlier_mad"):
        value = getattr(settings, name)
        if value is not None and not value > 0:
            raise UsageError(f"{name} must be positive")
    if settings.max_update_ratio is not None:
        if settings.max_update_ratio < 0:
            raise UsageError("max_update_ratio must be positive (or 0 to turn the bound off)")
        if settings.max_update_ratio == 0:
            settings.max_update_ratio = None
    if settings.dp_epsilon is not None:
        if settings.dp_clip is None:
            raise UsageError("--dp-epsilon needs --dp-clip (the L2 bound on each round's update)")
        if not settings.train:
            raise UsageError("--dp-epsilon applies to this node's own training: add --train")
        if not (settings.dp_epsilon > 0 and 0 < settings.dp_delta < 1 and settings.dp_clip > 0
                and settings.dp_noise > 0):
            raise UsageError("DP needs --dp-epsilon > 0, 0 < --dp-delta < 1, --dp-clip > 0, "
                             "--dp-noise > 0")
    check_dp_mechanism(settings.dp_mechanism, settings.grad_accum,
                       settings.gradient_checkpointing,
                       settings.dp_epsilon is not None)
    if settings.train and not settings.dataset:
        raise UsageError("--train needs --dataset PATH (JSONL or a folder of .txt files)")
    if settings.steps < 1 or settings.batch_size < 1 or settings.lr <= 0:
        raise UsageError("steps and batch_size must be >= 1 and lr > 0")
    if settings.header_timeout <= 0 or settings.max_connections < 8:
        raise UsageError("header_timeout must be positive and max_connections at least 8")
    if settings.member_timeout < 0:
        raise UsageError("member_timeout must be >= 0 seconds (0: members never go dormant)")
    if settings.checkpoint_every < 1:
        raise UsageError("checkpoint_every must be at least 1 (rounds)")
    if settings.election_timeout <= 0:
        raise UsageError("election_timeout must be positive (seconds)")
    if not 0 <= settings.port <= 65535:
        raise UsageError(f"port {settings.port} is out of range")
    return settings
