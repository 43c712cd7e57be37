"""What crosses Flower's wire: PEFT adapters and factored ``D`` as records, and back as files.

Our aggregation core reads adapters and residuals from safetensors files one module at a time
(that is what keeps its memory flat), so each side turns records into files at the edge and
back. Keys are PEFT's own tensor names; the residual's metadata (format, strategy, which
modules are stored transposed) travels beside it in a ``ConfigRecord``, since a ``D`` without
its orientation hints cannot be folded into a Conv1D (GPT-2) weight correctly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chorus_p2p.lora.adapter_io import write_adapter

# RecordDict keys, one namespace so they never collide with an app's own records
DELTA_KEY = "chorus.delta.{round}"  # the factored D of one committed round (an ArrayRecord)
DELTA_META_KEY = "chorus.delta-meta.{round}"  # its safetensors metadata (a ConfigRecord)
STATE_KEY = "chorus.state"  # which rounds this message's deltas cover, and the spec's fingerprint
STATE_ROUND_METRIC = "chorus-state-round"  # a client's reply: the round its R has reached
DP_KEY = "chorus.dp"  # a client's reply under local DP: its declaration (dp_policy.MECHANISM, ...)


def adapter_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict({k: v.detach().to(torch.float32).contiguous()
                                              for k, v in tensors.items()})


def adapter_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def write_adapter_folder(record: ArrayRecord, folder: Path, config: Mapping[str, object]) -> Path:
    """A PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) from a record."""
    write_adapter(folder, config, adapter_tensors(record))
    return folder


def write_adapter_file(record: ArrayRecord, path: Path) -> Path:
    save_file(adapter_tensors(record), str(path))
    return path


def add_delta(content: RecordDict, number: int, residual_file: Path) -> None:
    with safe_open(str(residual_file), framework="pt") as handle:
        metadata = handle.metadata() or {}
    content[DELTA_KEY.format(round=number)] = adapter_record(load_file(str(residual_file)))
    content[DELTA_META_KEY.format(round=number)] = ConfigRecord(
        {"metadata": json.dumps(metadata, sort_keys=True)})


def write_delta(content: RecordDict, number: int, path: Path) -> Path | None:
    """Round ``number``'s ``D`` as a residual file, or None when the message carries none
    (a ``fedavg`` round leaves ``R`` unchanged)."""
    key = DELTA_KEY.format(round=number)
    if key not in content.array_records:
        return None
    metadata = json.loads(str(content.config_records[DELTA_META_KEY.format(round=number)]
                              ["metadata"]))
    save_file(adapter_tensors(content.array_records[key]), str(path), metadata=metadata)
    return path
