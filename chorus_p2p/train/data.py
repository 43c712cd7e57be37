"""A node's local dataset, split deterministically into train and held-out eval, and cut into
token blocks. Sources, the way lab users have them:

- JSONL, or a JSON file holding a list of records;
- CSV (a header row names the fields);
- a folder of ``.txt`` files (one text per file);
- with the ``datasets`` extra: Parquet, a folder written by ``Dataset.save_to_disk`` (or a
  ``DatasetDict``: ``split`` picks one), or a hub id such as ``tatsu-lab/alpaca`` when the
  network allows (``config`` and ``split`` as in ``datasets.load_dataset``).

A record becomes a text through ``text_field`` when given, else its ``text`` field, else the
instruction template below.

Instruction records are formatted with this template (the Alpaca layout most instruction data
already uses)::

    ### Instruction:
    {instruction}

    ### Input:
    {input}            <- this block is left out when input is empty

    ### Response:
    {output}
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from chorus_p2p.errors import UsageError

INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n{output}"


def format_record(record: dict, where: str, text_field: str | None = None) -> str:
    if text_field is not None:
        value = record.get(text_field)
        if not isinstance(value, str):
            raise UsageError(f"{where}: no text field {text_field!r} in this record "
                             f"(fields: {', '.join(map(str, record)) or 'none'})")
        return value
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        extra = record.get("input") or ""
        input_block = f"### Input:\n{extra}\n\n" if extra else ""
        return INSTRUCTION_TEMPLATE.format(instruction=record["instruction"],
                                           input_block=input_block, output=record["output"])
    raise UsageError(f"{where}: a record needs 'text', or 'instruction' and 'output' (or name "
                     "the field with --text-field)")


@dataclass(frozen=True)
class DatasetOptions:
    """How to read a dataset source (``--text-field``, ``--split``, ``--dataset-config``)."""

    text_field: str | None = None
    split: str = "train"
    config: str | None = None


def load_texts(path: str | Path, options: DatasetOptions = DatasetOptions()) -> list[str]:
    texts = [t for t in _texts(str(path), options) if t.strip()]
    if not texts:
        raise UsageError(f"{path}: the dataset is empty")
    return texts


def _texts(source: str, options: DatasetOptions) -> list[str]:
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() \
                or (path / "state.json").is_file():
            return _hf_records(source, options, saved=True)
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UsageError(f"{path}: no .txt files in this folder (and not a folder written "
                             "by datasets' save_to_disk)")
        return [f.read_text(encoding="utf-8") for f in files]
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return _csv_texts(path, options)
        if suffix == ".parquet":
            return _hf_records(source, options, saved=False, builder="parquet")
        if suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):
            return _json_array_texts(path, options)
        return _jsonl_texts(path, options)
    if _looks_like_hub_id(source, path):
        return _hf_records(source, options, saved=False)  # a hub id: org/name
    raise UsageError(f"{path}: no such dataset file or folder")


def _looks_like_hub_id(source: str, path: Path) -> bool:
    """``org/name`` and no such path here. A typo in a local path (``data/shard0``, its folder
    present) is reported as a missing file, not sent to the hub as a dataset id."""
    return (source.count("/") == 1 and not source.startswith((".", "/", "~"))
            and not path.suffix and not path.parent.exists())


def _jsonl_texts(path: Path, options: DatasetOptions) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise UsageError(f"{path}:{number}: not JSON ({exc})") from exc
            if not isinstance(record, dict):
                raise UsageError(f"{path}:{number}: a record must be a JSON object")
            texts.append(format_record(record, f"{path}:{number}", options.text_field))
    return texts


def _json_array_texts(path: Path, options: DatasetOptions) -> list[str]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UsageError(f"{path}: not JSON ({exc})") from exc
    if not all(isinstance(r, dict) for r in records):
        raise UsageError(f"{path}: a JSON dataset is a list of objects")
    return [format_record(r, f"{path}[{i}]", options.text_field) for i, r in enumerate(records)]


def _csv_texts(path: Path, options: DatasetOptions) -> list[str]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        return [format_record(dict(row), f"{path}:{number}", options.text_field)
                for number, row in enumerate(reader, 2)]


def _hf_records(source: str, options: DatasetOptions, *, saved: bool,
                builder: str | None = None) -> list[str]:
    """Through the ``datasets`` library (the ``datasets`` extra): Parquet, save_to_disk
    folders, hub ids."""
    try:
        import datasets
    except ImportError:
        raise UsageError(f"{source}: reading this needs the 'datasets' extra "
                         "(pip install 'chorus-p2p[datasets]'); JSONL, JSON, CSV and .txt "
                         "folders need nothing") from None
    try:
        if saved:
            loaded = datasets.load_from_disk(source)
            if isinstance(loaded, datasets.DatasetDict):
                if options.split not in loaded:
                    raise UsageError(f"{source}: no split {options.split!r} (splits: "
                                     f"{', '.join(loaded)}); choose one with --split")
                loaded = loaded[options.split]
        elif builder is not None:
            loaded = datasets.load_dataset(builder, data_files=source, split="train")
        else:
            loaded = datasets.load_dataset(source, options.config, split=options.split)
    except UsageError:
        raise
    except Exception as exc:  # offline, unknown id, bad files: one line, not a traceback
        raise UsageError(f"{source}: cannot load it with datasets "
                         f"({exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0][:200]})") from exc
    return [format_record(dict(r), f"{source}[{i}]", options.text_field)
            for i, r in enumerate(loaded)]


@dataclass(frozen=True)
class Dataset:
    name: str
    train: list[str]
    eval: list[str]

    @classmethod
    def load(cls, path: str | Path, eval_fraction: float = 0.1,
             options: DatasetOptions = DatasetOptions()) -> "Dataset":
        """Held-out split by a hash of each text, so it never changes between runs or rounds."""
        texts = load_texts(path, options)
        def held_out(text: str) -> bool:
            digest = hashlib.sha256(text.encode()).digest()
            return digest[0] / 256 < eval_fraction
        train = [t for t in texts if not held_out(t)]
        evals = [t for t in texts if held_out(t)] or train[-max(1, len(train) // 10):]
        return cls(Path(path).stem, train, evals)


def token_blocks(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate texts (each ending with EOS) and cut into ``seq_len`` blocks: no padding."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    usable = (len(ids) // seq_len) * seq_len
    if usable == 0:
        ids = (ids * (seq_len // max(1, len(ids)) + 1))[:seq_len]
        usable = seq_len
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, seq_len)
