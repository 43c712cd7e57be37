"""Export a merged model: base + R + global adapter, as a plain Hugging Face folder.

``AutoModelForCausalLM.from_pretrained(DIR)`` loads it with no PEFT and no chorus-p2p; weights
are float32 (R does not survive a bf16 round trip).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from chorus_p2p.atomic import atomic_output_dir
from chorus_p2p.errors import UsageError
from chorus_p2p.train.trainer import load_global_model


def export_merged(model_path: str | Path, adapter_dir: str | Path,
                  residual_path: str | Path | None, out: str | Path, *, force: bool = False
                  ) -> Path:
    model, tokenizer = load_global_model(model_path, adapter_dir, residual_path)
    merged = model.merge_and_unload()
    with atomic_output_dir(out, force=force) as scratch:
        merged.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
    return Path(out)


def export_from_data_dir(data_dir: str | Path, out: str | Path, *, round_no: int | None = None,
                         model_path: str | None = None, force: bool = False) -> tuple[Path, int]:
    """Export a committed round (default: the latest) from a node's data dir (node may be down)."""
    import json

    from chorus_p2p.node.blobs import BlobStore
    from chorus_p2p.node.ledger import Ledger
    from chorus_p2p.node.service import BLOB_DIR, LEDGER_FILE
    from chorus_p2p.train.participant import materialize_from

    data_dir = Path(data_dir)
    if not (data_dir / LEDGER_FILE).exists():
        raise UsageError(f"{data_dir}: no ledger here (is this a node's --data-dir?)")
    ledger = Ledger(data_dir / LEDGER_FILE)
    try:
        if round_no is None:
            round_no = ledger.latest_committed()["round"]
        spec = json.loads(ledger.get_meta("spec") or "{}")
        model = model_path or spec.get("model")
        if not model:
            raise UsageError("give --model: this data dir does not record the base model")
        with tempfile.TemporaryDirectory(prefix="chorus-export-") as tmp:
            try:
                adapter_dir, residual = materialize_from(ledger, BlobStore(data_dir / BLOB_DIR),
                                                         round_no, Path(tmp))
            except LookupError as exc:
                raise UsageError(str(exc)) from exc
            export_merged(model, adapter_dir, residual, out, force=force)
    finally:
        ledger.close()
    return Path(out), round_no
