"""Aggregate client adapter files into a global adapter and a factored residual.

This is the one entry point the CLI, the node and the benchmarks share. It streams module by
module from the clients' safetensors files, validates everything before writing, and writes the
output folder atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from chorus_p2p.atomic import atomic_output_dir
from chorus_p2p.errors import AdapterError, UsageError
from chorus_p2p.lora.adapter_io import (
    AdapterSource,
    LoraFactors,
    factor_keys,
    open_adapters,
    write_adapter,
)
from chorus_p2p.lora.canonical import canonical_factors
from chorus_p2p.lora.config import LoraSettings, lora_scale, module_name_from_prefix
from chorus_p2p.lora.residual import LEFT_SUFFIX, RESIDUAL_FILE, RESIDUAL_METADATA, RIGHT_SUFFIX
from chorus_p2p.lora.safetensors_stream import StreamingSafetensorsWriter
from chorus_p2p.lora.strategies import (DEFAULT_STRATEGY, STRATEGIES, ModuleAggregate,
                                        aggregate_module)

REPORT_FILE = "aggregation.json"


@dataclass
class ModuleReport:
    module: str
    rank: int
    residual_rank: int
    target_norm: float
    residual_norm: float


@dataclass
class AggregationReport:
    """What happened, for logs, the ledger and the TUI."""

    strategy: str
    clients: list[str]
    weights: list[float]
    seconds: float
    modules: list[ModuleReport] = field(default_factory=list)
    residual_sha256: str | None = None  # residual.safetensors' (asked for by hash_residual)

    @property
    def residual_energy(self) -> float:
        """``||D|| / ||M||`` over all modules: how much of the exact mean the adapter could not hold."""
        target = math.sqrt(sum(m.target_norm ** 2 for m in self.modules))
        residual = math.sqrt(sum((m.residual_norm if math.isfinite(m.residual_norm) else 0.0) ** 2
                                 for m in self.modules))
        return residual / target if target > 0 else 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        data["residual_energy"] = self.residual_energy
        return data


def normalise_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Turn example counts into weights summing to one; refuse anything that cannot be a count."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise UsageError(f"got {len(weights)} weights for {count} adapters; give one per adapter")
    for w in weights:
        if not math.isfinite(w) or w <= 0:
            raise UsageError(f"weight {w} is not a positive finite number")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _check_same_modules(sources: Sequence[AdapterSource]) -> list[str]:
    reference = sources[0]
    for source in sources[1:]:
        missing = [p for p in reference.modules if p not in source.shapes]
        extra = [p for p in source.modules if p not in reference.shapes]
        if missing:
            raise AdapterError(f"lacks target module present in {reference.label}",
                               source=source.label, module=module_name_from_prefix(missing[0]))
        if extra:
            raise AdapterError(f"has target module absent from {reference.label}",
                               source=source.label, module=module_name_from_prefix(extra[0]))
        for prefix in reference.modules:
            a, b = reference.shapes[prefix], source.shapes[prefix]
            if (a.d_out, a.d_in, a.kind) != (b.d_out, b.d_in, b.kind):
                raise AdapterError(
                    f"is a {b.kind} {b.d_out}x{b.d_in} but {reference.label}'s is a {a.kind} "
                    f"{a.d_out}x{a.d_in}", source=source.label,
                    module=module_name_from_prefix(prefix))
        if source.full != reference.full:
            differ = sorted(set(source.full.items()) ^ set(reference.full.items()))
            raise AdapterError(f"its full tensors (modules_to_save) differ from "
                               f"{reference.label}'s at {differ[0][0]!r}", source=source.label)
        if source.fan_in_fan_out != reference.fan_in_fan_out:
            raise AdapterError(f"fan_in_fan_out differs from {reference.label}'s (one was made "
                               "for Conv1D layers, the other not)", source=source.label)
    return reference.modules


@dataclass(frozen=True)
class OutputPlan:
    """Rank and scale of each output module, and the PEFT config that encodes them."""

    ranks: dict[str, int]
    settings: LoraSettings
    config: dict

    def scale(self, prefix: str) -> float:
        return lora_scale(self.settings.lora_alpha, self.ranks[prefix], self.settings.use_rslora)


def plan_output(sources: Sequence[AdapterSource], modules: Sequence[str], strategy: str,
                rank: int | None) -> OutputPlan:
    """Pick output ranks: ``--rank`` for fedex-svd, else the largest client rank per module.

    FedAvg and FedEx average the factors themselves, so they cannot change rank (lower client
    ranks are zero-padded); only the SVD route can truncate or widen.
    """
    if rank is not None and rank <= 0:
        raise UsageError(f"--rank must be positive, got {rank}")
    ranks: dict[str, int] = {}
    for prefix in modules:
        widest = max(s.shapes[prefix].rank for s in sources)
        if rank is not None and strategy != "fedex-svd" and rank != widest:
            raise UsageError(f"--rank {rank} needs --strategy fedex-svd: {strategy} averages the "
                             f"factors and keeps rank {widest}")
        ranks[prefix] = rank if rank is not None else widest
    first = sources[0].settings
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(module_name_from_prefix(p)): r for p, r in ranks.items()
                    if r != default_rank}
    config = dict(first.raw)
    config.update({"peft_type": "LORA", "r": default_rank, "lora_alpha": first.lora_alpha,
                   "use_rslora": first.use_rslora, "rank_pattern": rank_pattern,
                   "alpha_pattern": {}, "inference_mode": True})
    config.setdefault("target_modules", sorted({module_name_from_prefix(p).rsplit(".", 1)[-1]
                                                for p in modules}))
    settings = LoraSettings(r=default_rank, lora_alpha=first.lora_alpha,
                            use_rslora=first.use_rslora, rank_pattern=rank_pattern, raw=config)
    return OutputPlan(ranks=ranks, settings=settings, config=config)


def _saved_base_layer(key: str, modules: Sequence[str]) -> bool:
    """PEFT saves a copy of the frozen base weight beside embedding LoRA (``P.base_layer.weight``).
    It is the base, not something trained: it is not carried into the global adapter, where it
    would overwrite the folded base (``W0 + R``) when PEFT loads it."""
    return any(key.startswith(prefix + ".base_layer.") for prefix in modules)


def _check_same_base_layer(sources: Sequence[AdapterSource], key: str) -> None:
    reference = sources[0].full_tensor(key)
    for source in sources[1:]:
        if not torch.equal(source.full_tensor(key), reference):
            raise AdapterError(f"its saved base layer {key!r} differs from {sources[0].label}'s "
                               "(a resized vocabulary?); every client must start from the same "
                               "base model", source=source.label)


def residual_orientation(source: AdapterSource, modules: Sequence[str]) -> dict[str, str]:
    """Residual-file metadata that says how each module's ``D`` (``d_out x d_in``, like
    ``B @ A``) lies in the base weight: embeddings and ``Conv1D`` layers store it transposed.
    ``fold`` needs it when a weight is square and its shape cannot tell."""
    return {"fan_in_fan_out": "true" if source.fan_in_fan_out else "false",
            "embedding_modules": json.dumps(sorted(p for p in modules
                                                   if source.shapes[p].kind == "embedding"))}


def _cast(factors: LoraFactors, dtype: torch.dtype) -> LoraFactors:
    return LoraFactors(A=factors.A.to(dtype), B=factors.B.to(dtype), scale=factors.scale)


# A client's factors are "in gauge" when A's row scale is within this factor of the clients'
# median and its factors cancel no more than honest training does (sqrt(rank) times A's
# conditioning is typical; 1e3 leaves room and keeps float32 arithmetic exact to ~1e-4 of it).
GAUGE_SPREAD = 100.0
GAUGE_CANCELLATION = 1e3


def in_common_gauge(raw: Sequence[LoraFactors], dtype: torch.dtype) -> list[LoraFactors]:
    """Each client's factors for one module as a node aggregates them (see canonical.py).

    Honest clients' factors share a gauge (they trained from the same global adapter): those
    are aggregated as trained, and only an update out of that gauge (A's row scale more than
    100x off the clients' median, or factors that cancel more than 1e3 x) is replaced by its
    canonical form, whose product is the same. The check costs two r x r Gram matrices per
    client; rounding can only make factors look more cancelling than they are, so an error in
    it canonicalizes an honest update (harmless: its product is kept), never passes a hostile
    one."""
    grams = [_gauge(f) for f in raw]
    scale = statistics.median(g[0] for g in grams)
    out = []
    for factors, (own, cancels) in zip(raw, grams):
        in_gauge = scale > 0 and scale / GAUGE_SPREAD <= own <= scale * GAUGE_SPREAD and \
            cancels <= GAUGE_CANCELLATION
        if not in_gauge:
            exact = LoraFactors(A=factors.A.double(), B=factors.B.double(), scale=factors.scale)
            factors = _cast(canonical_factors(exact, scale)[0], dtype)
        out.append(factors)
    return out


def _gauge(factors: LoraFactors) -> tuple[float, float]:
    """(A's RMS row norm, ||sB|| ||A|| / ||sBA||) from the two r x r Gram matrices."""
    left = factors.B * factors.scale
    gram_b, gram_a = left.T @ left, factors.A @ factors.A.T
    size = float(torch.trace(gram_b)) * float(torch.trace(gram_a))
    product = float((gram_b * gram_a).sum())
    rows = math.sqrt(max(float(torch.trace(gram_a)), 0.0) / max(factors.rank, 1))
    if size == 0.0:
        return rows, 0.0
    return rows, math.sqrt(size / product) if product > 0 else math.inf


def qr_workers() -> int:
    """Threads that aggregate modules side by side. A module's cost is its two thin QRs, and
    one QR of a tall, narrow matrix keeps one core busy however many threads MKL or OpenBLAS are
    given (8.2 ms on one thread, 7.9 ms on two, for 3072 x 160), so modules in parallel, one
    thread each, is what uses the cores; ``CHORUS_AGGREGATION_THREADS`` overrides (1: no
    pool)."""
    configured = os.environ.get("CHORUS_AGGREGATION_THREADS")
    if configured:
        return max(1, int(configured))
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1, 8))


def _single_thread_torch() -> None:
    # Each pool thread works on one core: several threads each asking for every core
    # would oversubscribe them (with OpenMP's spin-waits, 30x slower here).
    torch.set_num_threads(1)


def aggregate_adapters(paths: Sequence[str], out_dir: str | Path, *,
                       strategy: str = DEFAULT_STRATEGY, weights: Sequence[float] | None = None,
                       rank: int | None = None, force: bool = False,
                       dtype: torch.dtype = torch.float32, settings: LoraSettings | None = None,
                       labels: Sequence[str] | None = None,
                       progress: Callable[[int, int], None] | None = None,
                       canonical: bool = False,
                       on_residual: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
                       hash_residual: bool = False) -> AggregationReport:
    """Aggregate ``paths`` (PEFT folders or bare safetensors) into ``out_dir``.

    ``settings`` replaces every client's own adapter config (a node's stored uploads are bare
    safetensors trained under the federation's settings); ``labels`` names clients in errors.
    Writes ``adapter_config.json``, ``adapter_model.safetensors``, ``residual.safetensors`` (not
    for ``fedavg``) and ``aggregation.json``. Either all of them appear or none does.

    ``canonical``: aggregate each client's factors in the form its product decides
    (:mod:`chorus_p2p.lora.canonical`), as a node does with untrusted uploads. Products, and so
    every exact result, are the same; only factor averages (fedavg, fedex's adapter) see it.

    ``on_residual(prefix, left, right)`` sees each module's residual factors as they are
    written, on a pool thread (one call per module; a node updates its state's fingerprint
    from them without reading the file back);
    ``hash_residual`` puts the residual file's sha256 in the report, taken as it is written.
    """
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not paths:
        raise UsageError("give at least one adapter")
    norm_weights = normalise_weights(weights, len(paths))
    started = time.perf_counter()
    out_parent = Path(out_dir).absolute().parent
    residual = StreamingSafetensorsWriter(out_parent if out_parent.is_dir() else None)
    try:
        with open_adapters(list(paths), settings, list(labels) if labels else None) as sources:
            modules = _check_same_modules(sources)
            plan = plan_output(sources, modules, strategy, rank)
            adapter: dict[str, torch.Tensor] = {}
            reports: list[ModuleReport] = []
            kinds = {p: sources[0].shapes[p].kind for p in modules}

            def module_job(prefix: str, raw: list[LoraFactors]) -> ModuleAggregate:
                # a pool thread's part: everything but the files
                clients = in_common_gauge(raw, dtype) if canonical else raw
                result = aggregate_module(clients, norm_weights, strategy, plan.ranks[prefix],
                                          plan.scale(prefix))
                if result.residual_left is None:
                    return result
                result = dataclasses.replace(
                    result, residual_left=result.residual_left.to(torch.float32),
                    residual_right=result.residual_right.to(torch.float32))
                if on_residual is not None:
                    on_residual(prefix, result.residual_left, result.residual_right)
                return result

            workers = qr_workers()
            pool = ThreadPoolExecutor(workers, thread_name_prefix="chorus-aggregate",
                                      initializer=_single_thread_torch) if workers > 1 else None
            threads_here = torch.get_num_threads()
            if pool is not None:  # this thread's reads and gauges too: a core kept for a
                torch.set_num_threads(1)  # spinning team is one taken from the pool
            ahead: deque[tuple[str, Future | ModuleAggregate]] = deque()
            upcoming = iter(modules)

            def read_ahead() -> None:
                prefix = next(upcoming, None)
                if prefix is None:
                    return
                # read here only: one owner for the files' handles
                raw = [source.factors(prefix, dtype) for source in sources]
                ahead.append((prefix, module_job(prefix, raw) if pool is None
                              else pool.submit(module_job, prefix, raw)))
            try:
                for _ in range(workers + 1):  # the pool busy while this thread writes one
                    read_ahead()
                for done in range(len(modules)):
                    if progress is not None:
                        progress(done, len(modules))
                    prefix, job = ahead.popleft()
                    result = job.result() if isinstance(job, Future) else job
                    read_ahead()
                    key_a, key_b = factor_keys(prefix, kinds[prefix])
                    adapter[key_a] = result.A.to(torch.float32)
                    adapter[key_b] = result.B.to(torch.float32)
                    if result.residual_left is not None:
                        residual.add(prefix + LEFT_SUFFIX, result.residual_left)
                        residual.add(prefix + RIGHT_SUFFIX, result.residual_right)
                    reports.append(ModuleReport(module_name_from_prefix(prefix),
                                                plan.ranks[prefix], result.residual_rank,
                                                result.target_norm, result.residual_norm))
                    del result
            finally:
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
                    torch.set_num_threads(threads_here)
            if progress is not None:
                progress(len(modules), len(modules))
            # Full tensors (modules_to_save: heads, lm_head, embed_tokens): the weighted mean of
            # the clients' tensors is exactly the weighted mean model's, whatever the strategy.
            for key in sources[0].full:
                if _saved_base_layer(key, modules):
                    _check_same_base_layer(sources, key)
                    continue
                mean = sum(w * s.full_tensor(key, torch.float64)
                           for w, s in zip(norm_weights, sources))
                adapter[key] = mean.to(torch.float32)
            orientation = residual_orientation(sources[0], modules)
        report = AggregationReport(strategy=strategy, clients=list(labels or map(str, paths)),
                                   weights=norm_weights, seconds=0.0, modules=reports)
        with atomic_output_dir(out_dir, force=force) as scratch:
            write_adapter(scratch, plan.config, adapter)
            if strategy != "fedavg":
                residual.finish(scratch / RESIDUAL_FILE, {**RESIDUAL_METADATA, "strategy": strategy,
                                                          **orientation}, hash_it=hash_residual)
                report.residual_sha256 = residual.sha256
            report.seconds = time.perf_counter() - started
            (scratch / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    finally:
        residual.close()
    return report
