"""A node's local dataset: JSONL (``text`` or ``instruction``/``input``/``output``) or a folder of
``.txt`` files, split deterministically into train and held-out eval, and cut into token blocks.

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

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from chorus_p2p.errors import UsageError

INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n{output}"


def format_record(record: dict, where: str) -> str:
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        extra = record.get("input") or ""
        input_block = f"### Input:\n{extra}\n\n" if extra else ""
        return INSTRUCTION_TEMPLATE.format(instruction=record["instruction"],
                                           input_block=input_block, output=record["output"])
    raise UsageError(f"{where}: a record needs 'text', or 'instruction' and 'output'")


def load_texts(path: str | Path) -> list[str]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UsageError(f"{path}: no .txt files in this folder")
        return [f.read_text(encoding="utf-8") for f in files if f.read_text(encoding="utf-8").strip()]
    if not path.is_file():
        raise UsageError(f"{path}: no such dataset file or folder")
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
            texts.append(format_record(record, f"{path}:{number}"))
    if not texts:
        raise UsageError(f"{path}: the dataset is empty")
    return texts


@dataclass(frozen=True)
class Dataset:
    name: str
    train: list[str]
    eval: list[str]

    @classmethod
    def load(cls, path: str | Path, eval_fraction: float = 0.1) -> "Dataset":
        """Held-out split by a hash of each text, so it never changes between runs or rounds."""
        texts = load_texts(path)
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
