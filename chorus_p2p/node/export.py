"""Export a committed round from a node's data dir, safe while the node runs: it reads only
immutable files (the state's checkpoint and the residuals after it), rebuilds ``R`` after the
round, and merges through ``train/export.py``."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

from chorus_p2p.errors import UsageError
from chorus_p2p.federation.round_states import COMMITTED
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.node.blobs import BlobStore
from chorus_p2p.node.ledger import Ledger
from chorus_p2p.node.participant import materialize_adapter
from chorus_p2p.node.service import BLOB_DIR, LEDGER_FILE, STATE_DIR
from chorus_p2p.node.state_keeper import StateReader
from chorus_p2p.state.store import StateError, StateStore
from chorus_p2p.train.export import export_merged


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
