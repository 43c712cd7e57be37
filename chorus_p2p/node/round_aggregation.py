"""One round's aggregation on the coordinator, from the uploads in the blob store to the
results in it: blocking work for a worker thread, with no ledger and no event loop.

Apart from :class:`~chorus_p2p.node.rounds.RoundManager` so that what a node adds to the
aggregation the CLI runs (re-hashing every upload, the state's fingerprint, the blob moves) can
be run and timed on its own (``benchmarks/aggregate.py``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from chorus_p2p.errors import AdapterError
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.lora.aggregate import aggregate_adapters
from chorus_p2p.lora.residual import RESIDUAL_FILE
from chorus_p2p.node.blobs import BlobError, BlobStore
from chorus_p2p.state import sketch as sketches

# Uploads are re-hashed before use (bit rot or tampering is caught, not aggregated); hashlib
# lets go of the GIL on large buffers, so two threads hash at twice the speed.
HASH_THREADS = 2


def canonical_json(data: Any) -> bytes:
    return (json.dumps(data, sort_keys=True, indent=2) + "\n").encode()


def verified_upload_paths(blobs: BlobStore, updates: list[dict[str, Any]]) -> list[str]:
    """Each update's file, re-hashed; a damaged one is named by its sender."""
    def verified(update: dict[str, Any]) -> str:
        try:
            return str(blobs.verified_path(update["blob_sha"]))
        except BlobError as exc:  # this update's bytes are gone or damaged
            raise AdapterError(str(exc), source=update["node_id"]) from exc
    with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="chorus-hash") as pool:
        return list(pool.map(verified, updates))  # in order; the first failure is raised


def aggregate_round(blobs: BlobStore, spec: FederationSpec, strategy: str,
                    probes: sketches.Probes, updates: list[dict[str, Any]],
                    previous: dict[str, Any]) -> dict[str, Any]:
    """Aggregate ``updates`` (ledger rows) and put the results in ``blobs``; returns their hashes,
    the state's new fingerprint and the round's metrics. ``previous`` is the last committed
    round's record (its fingerprint)."""
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(dir=blobs.tmp))
    try:
        paths = verified_upload_paths(blobs, updates)
        # The state's fingerprint moves by the residual's alone (it is linear in R): the
        # coordinator never needs R itself to aggregate, nor to read D back from its file.
        moved: dict[str, Any] = {}

        def fingerprint(prefix: str, left: Any, right: Any) -> None:
            moved[prefix] = probes.of_factors(prefix, left, right)
        report = aggregate_adapters(
            paths, scratch / "out", strategy=strategy,
            weights=[u["examples"] for u in updates], rank=spec.rank,
            settings=spec.settings, labels=[u["node_id"] for u in updates], canonical=True,
            on_residual=fingerprint, hash_residual=True)
        # Results are moved into the blob store, not copied (scratch is on the same disk).
        adapter_sha = blobs.put_file(scratch / "out" / "adapter_model.safetensors", move=True)
        config_sha = blobs.put_bytes(canonical_json(spec.adapter_config()))
        sketch = previous.get("state_sketch")  # fedavg leaves R unchanged
        residual_sha = None
        residual_file = scratch / "out" / RESIDUAL_FILE
        if residual_file.exists():
            if sketch is not None:
                sketch = sketches.encode(sketches.add(sketches.decode(sketch, spec.modules),
                                                      moved))
            # hashed as it was written, so taken in without a second read
            residual_sha = report.residual_sha256
            blobs.adopt(residual_file, residual_sha)
        reported = [u["eval_loss"] for u in updates if u.get("eval_loss") is not None]
        # What the round cost the network, per client: its upload, and what every member
        # fetches afterwards (the global adapter and, for the exact strategies, D; never R).
        down = sum(blobs.path(sha).stat().st_size
                   for sha in (adapter_sha, residual_sha) if sha is not None)
        traffic = {"up_per_client": round(sum(int(u["size"] or 0) for u in updates)
                                          / len(updates)),
                   "down_per_client": down}
        metrics = {"updates": len(updates), "examples": sum(u["examples"] for u in updates),
                   "mean_eval_loss": sum(reported) / len(reported) if reported else None,
                   "strategy": strategy,
                   "aggregation_ms": round(report.seconds * 1000, 3),
                   "total_ms": round((time.perf_counter() - started) * 1000, 3),
                   "residual_energy": None if strategy == "fedavg" else report.residual_energy,
                   "nodes": [u["node_id"] for u in updates], "bytes": traffic}
        return {"adapter_sha": adapter_sha, "adapter_config_sha": config_sha,
                "residual_sha": residual_sha, "state_sketch": sketch, "metrics": metrics}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
