"""Export a merged model: base + R + global adapter, as a plain Hugging Face folder.

``AutoModelForCausalLM.from_pretrained(DIR)`` loads it with no PEFT and no chorus-p2p. Weights
are float32 by default, the federation's exact model; ``dtype`` bfloat16/float16 writes a copy
half the size for serving, merged in float32 first and rounded once (it is no longer exact, and
R does not survive a round trip through it: never feed it back as a federation's base).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from chorus_p2p.atomic import atomic_output_dir
from chorus_p2p.errors import UsageError
from chorus_p2p.lora.fold import ResidualInput
from chorus_p2p.train.trainer import load_global_model


EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def export_merged(model_path: str | Path, adapter_dir: str | Path,
                  residual: ResidualInput | None, out: str | Path, *, force: bool = False,
                  task_type: str = "CAUSAL_LM", dtype: str = "float32",
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Three steps, reported to ``progress``: load (base + R + adapter), merge, save."""
    import torch

    if dtype not in EXPORT_DTYPES:
        raise UsageError(f"--dtype {dtype}: one of {', '.join(EXPORT_DTYPES)}")
    report = progress or (lambda done, total: None)
    report(0, 3)
    model, tokenizer = load_global_model(model_path, adapter_dir, residual, task_type=task_type)
    report(1, 3)
    merged = model.merge_and_unload()  # W0 + R + s B A, summed in float32
    if dtype != "float32":
        merged = merged.to(getattr(torch, dtype))  # rounded once, after the exact sum
    report(2, 3)
    with atomic_output_dir(out, force=force) as scratch:
        merged.save_pretrained(scratch, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(scratch)
    report(3, 3)
    return Path(out)


LOWER_IS_BETTER = ("loss", "perplexity")


def best_round(ledger, metric: str) -> int:
    """The committed round whose global model the evaluations rate best (``up --eval-data``:
    the mean of every member's figure this node holds, its own and those shared with it), among
    the rounds whose files it still holds."""
    if metric not in LOWER_IS_BETTER:
        raise UsageError(f"--best {metric}: one of {', '.join(LOWER_IS_BETTER)}")
    scored = []
    for number, by_node in ledger.evaluations().items():
        row = ledger.round(number)
        if row is None or row["state"] != "committed" or row.get("pruned_at") is not None:
            continue
        values = [m[metric] for m in by_node.values() if metric in m]
        if values:
            scored.append((sum(values) / len(values), number))
    if not scored:
        raise UsageError("no evaluated round to choose from: run the node with --eval-data PATH "
                         "(rounds whose files were pruned do not count)")
    return min(scored)[1]


def export_from_data_dir(data_dir: str | Path, out: str | Path, *, round_no: int | None = None,
                         model_path: str | None = None, force: bool = False,
                         dtype: str = "float32",
                         progress: Callable[[int, int], None] | None = None,
                         best: str | None = None) -> tuple[Path, int]:
    """Export a committed round (default: the latest) from a node's data dir.

    Reads only immutable files (the state's checkpoint and the residuals after it), so it is
    safe while the node runs."""
    import json

    from chorus_p2p.node.blobs import BlobStore
    from chorus_p2p.node.ledger import COMMITTED, Ledger
    from chorus_p2p.node.service import BLOB_DIR, LEDGER_FILE, STATE_DIR
    from chorus_p2p.node.spec import FederationSpec
    from chorus_p2p.node.state_keeper import StateReader
    from chorus_p2p.state.store import StateError, StateStore
    from chorus_p2p.train.participant import materialize_adapter

    data_dir = Path(data_dir)
    if not (data_dir / LEDGER_FILE).exists():
        raise UsageError(f"{data_dir}: no ledger here (is this a node's --data-dir?)")
    ledger = Ledger(data_dir / LEDGER_FILE)
    blobs = BlobStore(data_dir / BLOB_DIR)
    try:
        if best is not None:
            round_no = best_round(ledger, best)
        elif round_no is None:
            round_no = ledger.latest_committed()["round"]
        row = ledger.round(round_no)
        if row is None or row["state"] != COMMITTED:
            raise UsageError(f"round {round_no} is not committed in {data_dir}")
        if row.get("pruned_at") is not None:
            raise UsageError(f"round {round_no}'s files were pruned from {data_dir} (it keeps the "
                             "last --keep-rounds rounds)")
        spec = FederationSpec.from_json(json.loads(ledger.get_meta("spec") or "{}"))
        model = model_path or spec.model
        store = StateStore(data_dir / STATE_DIR, spec.modules, read_only=True,
                           transposed=spec.transposed)
        reader = StateReader.of(store, ledger, blobs, round_no)
        if reader is None:
            raise UsageError(f"a residual between the state's checkpoint and round {round_no} is "
                             f"missing from {data_dir} (pruned: a node keeps the files of its "
                             "last --keep-rounds rounds); R after that round cannot be rebuilt "
                             "here")
        with tempfile.TemporaryDirectory(prefix="chorus-export-") as tmp:
            adapter_dir = materialize_adapter(row, blobs, Path(tmp))
            try:
                export_merged(model, adapter_dir, reader, out,
                              force=force, task_type=spec.task_type, dtype=dtype,
                              progress=progress)
            except StateError as exc:
                raise UsageError(f"R after round {round_no}: {exc}") from exc
    finally:
        ledger.close()
    return Path(out), round_no
