"""Running an experiment: each run through the same training, aggregation and state code the
node uses (``simulate.run_rounds``), evaluated after every round, written as one JSON file.

A run's file is written whole (fsynced, renamed) when the run ends, so a kill -9 loses at most
the run in flight, and a rerun skips every run whose file exists.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from chorus_p2p.evaluation.experiment import Experiment, Run
from chorus_p2p.evaluation.partition import label_skew, split
from chorus_p2p.evaluation.tasks import BUILT_IN, Example, Task
from chorus_p2p.lora.residual import RESIDUAL_FILE

RUNS_DIR = "runs"
TINY_PRETRAIN_STEPS = 300  # on the demo shards only: the base never sees a task


def load_task(settings: dict[str, Any], seed: int) -> Task:
    """The run's task: a built-in generated for this seed, or ``lm`` over the data files (one
    group per file, the held-out split by a hash of each text, as ``Dataset.load`` does)."""
    held_out = int(settings.get("eval_examples", 240))
    if settings["task"] in BUILT_IN:
        return BUILT_IN[settings["task"]](seed, held_out=held_out)
    from chorus_p2p.train.data import Dataset

    train, held = [], []
    for path in settings["data"]:
        data = Dataset.load(path)
        train += [Example("", t, data.name, data.name) for t in data.train]
        held += [Example("", t, data.name, data.name) for t in data.eval]
    return Task("lm", "lm", train, held[:held_out])


def base_model(settings: dict[str, Any], cache: Path, log: Callable[[str], None]) -> str:
    """``tiny``: a tiny Llama built offline, its tokenizer knowing the task's words but its
    pretraining only the demo shards (built once per task, kept in ``cache``)."""
    if settings["model"] != "tiny":
        return settings["model"]
    task = load_task(settings, 0)
    words = [e.text for e in task.examples[:400]]
    key = hashlib.sha256(json.dumps([settings["task"], settings["data"]]).encode()
                         ).hexdigest()[:10]
    folder = cache / f"tiny-{settings['task']}-{key}"
    if not (folder / "config.json").exists():
        from chorus_p2p.demos.federation import shard_paths
        from chorus_p2p.train.tiny_lm import build_tiny_lm

        scratch = folder.with_name(folder.name + ".partial")
        shutil.rmtree(scratch, ignore_errors=True)
        build_tiny_lm(scratch, shard_paths(), pretrain_steps=TINY_PRETRAIN_STEPS,
                      vocabulary_only=words, log=log)
        scratch.rename(folder)
    return str(folder)


def _dataset(name: str, train: list[Example], held: list[Example]):
    from chorus_p2p.train.data import Dataset

    return Dataset(name, [e.text for e in train], [e.text for e in held] or
                   [e.text for e in train[-max(1, len(train) // 10):]])


class Scorer:
    """A model's metrics on a set of examples: held-out loss and perplexity always; accuracy
    and macro-F1 (classification) or exact match (short answer) by the task's kind."""

    def __init__(self, task: Task, config) -> None:
        self.task, self.config = task, config

    def __call__(self, model, tokenizer, examples: list[Example]) -> dict[str, float]:
        from chorus_p2p.evaluation import metrics
        from chorus_p2p.train.data import token_blocks
        from chorus_p2p.train.trainer import evaluate, sequence_length

        blocks = token_blocks(tokenizer, [e.text for e in examples],
                              sequence_length(self.config.seq_len, model.config))
        loss = evaluate(model, blocks, self.config.batch_size, max_batches=32)
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        gold = [e.answer for e in examples]
        if self.task.kind == "classification":
            predicted = metrics.classify(model, tokenizer, [e.prompt for e in examples],
                                         self.task.choices)
            out["accuracy"] = metrics.accuracy(predicted, gold)
            out["macro_f1"] = metrics.macro_f1(predicted, gold, self.task.choices)
        elif self.task.kind == "short_answer":
            predicted = metrics.greedy_answers(model, tokenizer, [e.prompt for e in examples])
            out["exact_match"] = metrics.exact_match(predicted, gold)
        return out


def primary_metric(task_kind: str) -> tuple[str, bool]:
    """The metric a report leads with, and whether higher is better."""
    return {"classification": ("accuracy", True), "short_answer": ("exact_match", True)
            }.get(task_kind, ("loss", False))


def _mean_worst(rows: list[dict[str, float]], task_kind: str) -> dict[str, dict[str, float]]:
    name, higher = primary_metric(task_kind)
    keys = rows[0].keys()
    worst = (min if higher else max)(rows, key=lambda r: r[name])
    return {"mean": {k: sum(r[k] for r in rows) / len(rows) for k in keys}, "worst": dict(worst)}


def execute(run: Run, out: Path, cache: Path, log: Callable[[str], None] = print
            ) -> dict[str, Any]:
    """One run, start to end; returns its record (``run_experiment`` writes it)."""
    from chorus_p2p.federation.spec import FederationSpec
    from chorus_p2p.train.simulate import run_rounds
    from chorus_p2p.train.trainer import TrainConfig, load_global_model

    s = run.settings
    model = base_model(s, cache, log)
    task = load_task(s, run.seed)
    labels = [e.label for e in task.examples]
    parts = split(task.examples, labels, [e.group for e in task.examples], s["clients"],
                  s["partition"], run.seed, s["dirichlet_alpha"],
                  known_labels=[e.label for e in task.held_out])
    held_parts = split(task.held_out, [e.label for e in task.held_out],
                       [e.group for e in task.held_out], s["clients"], s["partition"],
                       run.seed, s["dirichlet_alpha"], known_labels=labels)
    clients = [_dataset(f"client-{i}", p, h) for i, (p, h) in enumerate(zip(parts, held_parts))]
    config = TrainConfig(steps=s["local_steps"], lr=s["lr"], batch_size=s["batch_size"],
                         seq_len=s["max_seq_len"] or None, seed=run.seed, device="cpu",
                         compute_dtype=s["compute_dtype"], quantize=s["quantize"] or None)
    spec = FederationSpec.build(model, s["rank"], s["alpha"], tuple(s["target_modules"]))
    score = Scorer(task, config)
    work = out / "work" / run.run_id
    shutil.rmtree(work, ignore_errors=True)
    curve: list[dict[str, Any]] = []
    # (adapter, state, client index or -1, its metrics on the shared held-out set)
    finals: list[tuple[Path, Any, int, dict[str, float]]] = []
    sent: list[int] = []  # each client's upload, every round
    fetched: list[int] = []  # what each client downloads after a round
    timer = {"start": time.perf_counter(), "eval": 0.0}

    def evaluate(adapter: Path, residual, examples: list[Example]) -> dict[str, float]:
        started = time.perf_counter()
        net, tokenizer = load_global_model(model, adapter, residual)
        try:
            return score(net, tokenizer, examples)
        finally:
            timer["eval"] += time.perf_counter() - started

    def after(index: int):
        def record(done) -> None:
            metrics = evaluate(done.global_dir, done.state.read(done.number), task.held_out)
            if run.strategy not in ("local", "centralized"):
                sent.extend((r.adapter_dir / "adapter_model.safetensors").stat().st_size
                            for r in done.clients)
                # what every client fetches after the round, as from a node: the global
                # adapter and, for the exact strategies, D (never R)
                fetched.append(sum(path.stat().st_size for path in (
                    done.global_dir / "adapter_model.safetensors",
                    done.global_dir / RESIDUAL_FILE) if path.exists()))
            curve.append({"round": done.number, "client": index, **metrics})
            if done.number == s["rounds"]:
                finals.append((done.global_dir, done.state, index, metrics))
        return record

    release, dp = None, None
    if s["dp_noise"] > 0 and run.strategy not in ("local", "centralized"):
        # what leaves a client is private; the bounds send nothing
        release, dp = _client_dp(s, work)
        if s["dp_mechanism"] == "dp-sgd":
            config = replace(config, dp_sgd_clip=s["dp_clip"], dp_sgd_noise=s["dp_noise"])
    strategy = run.strategy
    if strategy == "local":  # each client alone: its own adapter, never aggregated with others
        for i, data in enumerate(clients):
            run_rounds(model, [data], s["rounds"], "fedex", work / f"alone-{i}", spec, config,
                       after_round=after(i))
    elif strategy == "centralized":  # all data pooled, the same total steps
        pooled = _dataset("pooled", [e for p in parts for e in p], task.held_out)
        run_rounds(model, [pooled], s["rounds"], "fedex", work / "pooled", spec, config,
                   client_steps=[s["local_steps"] * len(clients)], after_round=after(-1))
    else:
        run_rounds(model, clients, s["rounds"], strategy, work / "federation", spec, config,
                   after_round=after(-1), release=release)
    # Final: the global figure (the last round's, already measured) and each client's own
    # held-out split (personal): a local model on its own client's split only.
    personal = []
    global_rows = [metrics for *_, metrics in finals]
    for adapter, state, index, _ in finals:
        residual = state.read(s["rounds"])
        splits = [held_parts[index]] if index >= 0 else held_parts
        personal += [evaluate(adapter, residual, h) for h in splits]
    total = time.perf_counter() - timer["start"]
    rounds_curve = _average_curve(curve)
    record = {
        "id": run.run_id, "run": run.to_json(), "task_kind": task.kind,
        "versions": _versions(), "label_skew": label_skew([[e.label for e in p] for p in parts]),
        "examples_per_client": [len(p) for p in parts],
        "curve": rounds_curve,
        "final": {"global": _mean_worst(global_rows, task.kind),
                  "personal": _mean_worst(personal, task.kind)},
        "dp": dp() if dp else None,
        "cost": {"bytes_per_client_round": (sum(sent) / len(sent)) if sent else 0,
                 "bytes_down_per_client_round": (sum(fetched) / len(fetched)) if fetched else 0,
                 "seconds_per_round": round((total - timer["eval"]) / s["rounds"], 3),
                 "eval_seconds": round(timer["eval"], 3)},
    }
    shutil.rmtree(work, ignore_errors=True)
    return record


def _client_dp(s: dict[str, Any], work: Path):
    """Each client's release made as a node makes it (``release_update``: local DP clips and
    noises the round's change; DP-SGD's training already did, per record. The OS's CSPRNG: DP
    noise is never seeded, so DP runs are not reproducible to the digit), and the epsilon the
    clients spent (the most any client spent: their data sizes differ under DP-SGD)."""
    from chorus_p2p.train.privacy import BudgetFile, DPConfig, PrivacyBudget, release_update

    config = DPConfig(epsilon=math.inf, delta=s["dp_delta"], clip=s["dp_clip"],
                      noise_multiplier=s["dp_noise"], mechanism=s["dp_mechanism"])
    budgets: dict[int, PrivacyBudget] = {}

    def release(client: int, global_dir: Path, result):
        budget = budgets.setdefault(client, PrivacyBudget(
            BudgetFile(work / f"dp-budget-{client}.json"), config))
        out = result.adapter_dir.with_name(result.adapter_dir.name + "-released")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.adapter_dir / "adapter_config.json", out / "adapter_config.json")
        release_update(budget, global_dir / "adapter_model.safetensors",
                       result.adapter_dir / "adapter_model.safetensors",
                       out / "adapter_model.safetensors", result.dp_release)
        return replace(result, adapter_dir=out)

    def spent() -> dict[str, Any]:
        return {"mechanism": s["dp_mechanism"], "noise_multiplier": s["dp_noise"],
                "clip": s["dp_clip"], "delta": s["dp_delta"],
                "epsilon": max(b.spent for b in budgets.values()) if budgets else 0.0}
    return release, spent


def _average_curve(curve: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round, the mean over clients' models (one model per round unless ``local``)."""
    out = []
    for number in sorted({c["round"] for c in curve}):
        rows = [c for c in curve if c["round"] == number]
        keys = [k for k in rows[0] if k not in ("round", "client")]
        out.append({"round": number, **{k: sum(r[k] for r in rows) / len(rows) for k in keys}})
    return out


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    from chorus_p2p import __version__

    return {"chorus_p2p": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def write_record(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(record, indent=1, sort_keys=True))
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def run_experiment(experiment: Experiment, out: Path, log: Callable[[str], None] = print
                   ) -> list[dict[str, Any]]:
    """Every run not yet done (rerun-safe); returns every run's record."""
    runs_dir = out / RUNS_DIR
    runs_dir.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(
        {"name": experiment.name, "values": experiment.values}, indent=1, sort_keys=True))
    records = []
    runs = experiment.runs()
    for n, run in enumerate(runs, 1):
        path = runs_dir / f"{run.run_id}.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
            log(f"[{n}/{len(runs)}] {run.run_id}: done before, skipped")
            continue
        started = time.perf_counter()
        record = execute(run, out, out / "models", log)
        write_record(path, record)
        records.append(record)
        name, _ = primary_metric(record["task_kind"])
        log(f"[{n}/{len(runs)}] {run.run_id}: {name} "
            f"{record['final']['global']['mean'][name]:.4f} "
            f"({time.perf_counter() - started:.1f} s)")
    return records


def load_records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / RUNS_DIR).glob("*.json"))]


def check(experiment: Experiment) -> list[str]:
    """What ``--check`` reports: each setting's runs, tasks and partitions built (no training),
    the label skew each partition gives, and where the model comes from."""
    lines = [f"experiment {experiment.name}: {len(experiment.runs())} runs"]
    seen = set()
    for run in experiment.runs():
        key = (run.setting_key, run.seed)
        if key in seen:
            continue
        seen.add(key)
        s = run.settings
        task = load_task(s, run.seed)
        parts = split(task.examples, [e.label for e in task.examples],
                      [e.group for e in task.examples], s["clients"], s["partition"], run.seed,
                      s["dirichlet_alpha"])
        if s["model"] != "tiny" and not _model_available(s["model"]):
            from chorus_p2p.errors import UsageError

            raise UsageError(f"model {s['model']!r}: no such folder (a local path needs "
                             "config.json)")
        lines.append(f"  task {s['task']} ({task.kind}, {len(task.examples)} train / "
                     f"{len(task.held_out)} held out), {s['clients']} clients, "
                     f"{s['partition']}: label skew {label_skew([[e.label for e in p] for p in parts]):.3f}, "
                     f"seed {run.seed}, model {s['model']}")
    return lines


def _model_available(model: str) -> bool:
    if Path(model).is_dir():
        return (Path(model) / "config.json").exists()
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(model, local_files_only=True)
        return True
    except Exception:
        return "/" in model  # a hub id not cached yet: a run downloads it (not checked here)


__all__ = ["execute", "run_experiment", "load_records", "check", "primary_metric"]
