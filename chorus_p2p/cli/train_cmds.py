"""Sub-commands for training: ``make-tiny-model``, ``train`` (SDK loop), ``simulate``, ``export``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from chorus_p2p.cli.output import human_output, print_json, print_json_line
from chorus_p2p.cli.progress import progress_bar
from chorus_p2p.cli.types import (add_dataset_options, add_dp_options, add_precision_options,
                                  non_negative_int, positive_int, round_or_latest)
from chorus_p2p.lora.names import DEFAULT_STRATEGY, STRATEGIES


def _train_config(args: argparse.Namespace):
    from chorus_p2p.train.trainer import TrainConfig

    if args.quantize:
        from chorus_p2p.train.quantize import require_bitsandbytes

        require_bitsandbytes(args.quantize)  # before any model loads
    return TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                       device=args.device, compute_dtype=args.compute_dtype,
                       grad_accum=args.grad_accum, seq_len=args.max_seq_len,
                       gradient_checkpointing=args.gradient_checkpointing,
                       quantize=args.quantize)


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from chorus_p2p.demos.federation import shard_paths
    from chorus_p2p.tiny import quiet_transformers
    from chorus_p2p.train.tiny_lm import build_tiny_lm

    quiet_transformers()
    data = args.data or [str(p) for p in shard_paths()]
    with human_output(args.json), progress_bar("pretraining", "steps") as bar:
        out = build_tiny_lm(args.out, data, vocab_size=args.vocab_size, hidden=args.hidden,
                            layers=args.layers, pretrain_steps=args.pretrain_steps,
                            progress=bar)
    if args.json:
        print_json({"out": str(out), "vocab_size": args.vocab_size, "hidden": args.hidden,
                    "layers": args.layers, "pretrain_steps": args.pretrain_steps})
    else:
        print(f"tiny Llama + tokenizer -> {out}  (use it as --model {out})")
    return 0


# What README's examples call their clients' adapters: (folder, rank, seed).
EXAMPLE_ADAPTERS = (("alice-adapter", 16, 1), ("bob-adapter", 16, 2), ("carol", 8, 3))


def _cmd_make_example_adapters(args: argparse.Namespace) -> int:
    """README's inputs, made rather than assumed: PEFT adapters as if three clients had trained
    on ``--model`` (both factors random: a zero B, PEFT's start, would hide every aggregation
    mistake). Existing folders are left alone unless ``--force``."""
    from chorus_p2p.errors import UsageError
    from chorus_p2p.tiny import make_client_adapter, quiet_transformers

    quiet_transformers()
    out = Path(args.out)
    targets = tuple(t for t in args.target_modules.split(",") if t)
    made = []
    for name, rank, seed in EXAMPLE_ADAPTERS:
        folder = out / name
        if folder.exists() and not args.force:
            raise UsageError(f"{folder} exists; pass --force to replace it")
        make_client_adapter(args.model, folder, seed=seed + 100 * args.seed, rank=rank,
                            alpha=2.0 * rank,
                            target_modules=targets)
        made.append({"folder": str(folder), "rank": rank})
    if args.json:
        print_json({"adapters": made, "model": args.model, "target_modules": list(targets)})
    else:
        for item in made:
            print(f"{item['folder']}/  rank {item['rank']}, {', '.join(targets)}")
    return 0


MAX_MISSED_ROUNDS = 10  # rounds in a row the federation may close before our update arrives


def _cmd_train(args: argparse.Namespace) -> int:
    """The participant loop from outside a node: pull, train, submit, wait, repeat. A round
    the federation closes before our update arrives is not an error: train the next one."""
    from chorus_p2p.cli.node_cmds import _client
    from chorus_p2p.client import ConflictError
    from chorus_p2p.federation.spec import FederationSpec
    from chorus_p2p.state.store import StateStore
    from chorus_p2p.train.data import Dataset, DatasetOptions
    from chorus_p2p.train.remote_state import sync_from_node
    from chorus_p2p.train.privacy import BudgetExhausted
    from chorus_p2p.train.trainer import train_round

    dataset = Dataset.load(args.dataset, options=DatasetOptions(
        args.text_field, args.dataset_split, args.dataset_config))
    config = _train_config(args)
    with _client(args) as node, tempfile.TemporaryDirectory(prefix="chorus-train-") as tmp:
        work = Path(tmp)
        info = node.federation()
        spec = FederationSpec.from_json(info["spec"])
        budget = _privacy_budget(args, info)
        if budget is not None:
            from dataclasses import replace

            from chorus_p2p.train.privacy import dp_sgd_settings

            if budget.config.mechanism == "dp-sgd":
                from chorus_p2p.train.dp_sgd import check_targets

                check_targets(spec.kinds)

            config = replace(config, **dp_sgd_settings(budget.config))
        state = StateStore(work / "state", spec.modules, checkpoint_every=1 << 30,
                           transposed=spec.transposed)
        done = missed = last = 0
        while done < args.rounds:
            deadline = time.monotonic() + args.wait
            # a round still collecting, after the last one tried (a round that closed without
            # our update shows as aggregating or proposed for a moment: not that one again)
            while (current := node.status()["current_round"]) is None or \
                    current["round"] <= last or current["state"] not in ("open", "collecting"):
                if time.monotonic() > deadline:
                    print(f"chorus-node: error: no round opened within --wait {args.wait:g}s",
                          file=sys.stderr, flush=True)
                    return 3
                time.sleep(1.0)
            number, base = current["round"], current["trained_from"]
            last = number
            adapter = node.pull(work / f"global-{base}", round=base, force=True)
            sync_from_node(node, state, base, work)
            with human_output(args.json), progress_bar(f"round {number}", "steps") as bar:
                try:
                    result = train_round(
                        args.model, adapter, state.read(base), dataset, config,
                        work / f"client-{number}", progress=None if bar is None
                        else lambda step, loss: bar(step, config.steps),
                        before_release=None if budget is None
                        else lambda plan: budget.check(plan.to_json()))
                except BudgetExhausted as exc:
                    print(f"chorus-node: {exc}", file=sys.stderr, flush=True)
                    return 3
            losses = {"eval_loss": result.eval_loss, "train_loss": result.train_loss}
            sent: Path = result.adapter_dir
            if budget is not None:  # what leaves is private; losses stay here
                from chorus_p2p.train.privacy import release_update

                sent = work / f"update-{number}.safetensors"
                try:
                    _, spent = release_update(budget, adapter / "adapter_model.safetensors",
                                              result.adapter_dir / "adapter_model.safetensors",
                                              sent, result.dp_release, number)
                except BudgetExhausted as exc:
                    print(f"chorus-node: {exc}", file=sys.stderr, flush=True)
                    return 3
                losses = {"eval_loss": None, "train_loss": None}
                print(f"round {number}: {budget.config.mechanism} epsilon spent {spent:.3f} of "
                      f"{budget.config.epsilon:g} (delta {budget.config.delta:g}; unit: "
                      f"{budget.config.unit}, this account's data sent to this federation)",
                      file=sys.stderr, flush=True)
            try:
                accepted = node.submit(sent, round=number, examples=result.examples,
                                       trained_from=base, **losses)
            except ConflictError as exc:
                # The nodes committed the round first (min_updates met without us): routine in
                # a federation that does not wait for everyone. Train the next one instead.
                if exc.code not in ("round_closed", "stale_base") or missed >= MAX_MISSED_ROUNDS:
                    raise
                missed += 1
                print(f"round {number} closed before this update arrived ({exc.code}); "
                      "training the next round", file=sys.stderr, flush=True)
                continue
            missed = 0
            done += 1
            if args.json:
                print_json_line({"round": number, "trained_from": base, "steps": config.steps,
                                 "examples": result.examples, "train_loss": result.train_loss,
                                 "eval_loss": result.eval_loss, "sha256": accepted["sha256"]})
            else:
                print(f"round {number}: trained {config.steps} steps on {result.examples} "
                      f"examples, train loss {result.train_loss:.3f}, eval loss "
                      f"{result.eval_loss:.3f}; submitted"
                      f"{_privacy_label(budget)}", flush=True)
            if done < args.rounds:
                while node.round(number)["state"] != "committed":
                    time.sleep(0.5)
    return 0


def _privacy_label(budget) -> str:
    if budget is None:
        return ""
    return (" (noised: local DP)" if budget.config.mechanism == "gaussian-local"
            else " (private: record-level DP-SGD)")


def _privacy_budget(args: argparse.Namespace, info: dict):
    """The local-DP budget ``train`` spends from, or None. A federation whose policy requires
    DP gets no raw update from here; a budget file that recorded releases before, used now
    without DP, gets a loud warning (its earlier guarantee says nothing of raw updates)."""
    from chorus_p2p.errors import UsageError
    from chorus_p2p.federation.dp_policy import DPPolicy
    from chorus_p2p.node.settings import check_dp_mechanism
    from chorus_p2p.train.privacy import (BudgetFile, DPConfig, PrivacyBudget,
                                          default_budget_file)

    policy = DPPolicy.from_json(info.get("dp_policy"))
    path = Path(args.dp_budget_file) if args.dp_budget_file else \
        default_budget_file(info["federation"])
    if args.dp_epsilon is None:
        if policy is not None:
            raise UsageError(f"this federation requires {policy.kind} ({policy.describe()}): "
                             "give --dp-epsilon, --dp-clip and --dp-noise"
                             f"{'' if policy.mechanism == 'gaussian-local' else ' with --dp-mechanism ' + policy.mechanism}")
        released = json.loads(BudgetFile(path).get_meta("dp_releases", "[]") or "[]")
        if released:
            print(f"chorus-node: WARNING: {path} records {len(released)} differentially "
                  "private release(s) to this federation, and this run sends RAW updates (no "
                  "--dp-epsilon): they carry no privacy guarantee", file=sys.stderr, flush=True)
        return None
    if args.dp_clip is None:
        raise UsageError("--dp-epsilon needs --dp-clip (the L2 bound on each round's change, "
                         "or with --dp-mechanism dp-sgd on each record's gradient)")
    check_dp_mechanism(args.dp_mechanism, args.grad_accum, args.gradient_checkpointing, True)
    try:
        config = DPConfig(args.dp_epsilon, args.dp_delta, args.dp_clip, args.dp_noise,
                          args.dp_mechanism)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if policy is not None:
        policy.check_settings(config.noise_multiplier, config.delta, config.epsilon,
                              "this run's --dp-* setting", config.mechanism)
    budget = PrivacyBudget(BudgetFile(path), config)
    budget.validate()
    return budget


def _cmd_simulate(args: argparse.Namespace) -> int:
    from chorus_p2p.demos.federation import SHARDS, ensure_tiny_model, shard_paths
    from chorus_p2p.tiny import quiet_transformers
    from chorus_p2p.train.data import Dataset
    from chorus_p2p.train.simulate import format_round, plot_history, simulate

    quiet_transformers()
    shards = [Dataset.load(p) for p in shard_paths()]
    clients = []
    for i in range(args.clients):  # non-IID: each client gets a slice of one shard
        shard = shards[i % len(shards)]
        share = max(1, args.clients // len(shards) + (1 if i % len(shards) < args.clients % len(shards) else 0))
        part = (i // len(shards)) % share
        clients.append(Dataset(f"{shard.name}-{part}", shard.train[part::share], shard.eval))
    strategies = [args.strategy, "fedavg"] if args.compare and args.strategy != "fedavg" \
        else [args.strategy]
    with tempfile.TemporaryDirectory(prefix="chorus-sim-") as tmp, human_output(args.json):
        root = Path(args.workdir or tmp)
        model = Path(args.model) if args.model else ensure_tiny_model(root)
        histories = {}
        for strategy in strategies:
            print(f"simulating {args.clients} clients x {args.rounds} rounds with {strategy} "
                  f"(shards: {', '.join(SHARDS)})")
            histories[strategy] = simulate(model, clients, shards, args.rounds, strategy,
                                           root / f"sim-{strategy}", config=_train_config(args),
                                           on_round=lambda s: print(f"  {format_round(s)}"))
        if args.compare:
            out = args.plot or "simulate-loss.png"
            if plot_history(histories, out, f"simulate: {args.clients} clients"):
                print(f"plot: {out}")
    if args.json:
        print_json({strategy: [{**dataclasses.asdict(r), "mean_eval_loss": r.mean_eval_loss}
                               for r in rounds] for strategy, rounds in histories.items()})
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from chorus_p2p.cli.node_cmds import _data_dir
    from chorus_p2p.node.export import export_from_data_dir

    from chorus_p2p.errors import UsageError

    if args.best and args.round not in (None, "latest"):
        raise UsageError("give --round or --best, not both")
    round_no = None if args.round in (None, "latest") else int(args.round)
    with human_output(args.json), progress_bar("load, merge, save", "steps") as bar:
        out, number = export_from_data_dir(_data_dir(args), args.out, round_no=round_no,
                                           model_path=args.model, force=args.force,
                                           dtype=args.dtype, progress=bar, best=args.best)
    if args.json:
        print_json({"out": str(out), "round": number, "dtype": args.dtype})
    else:
        print(f"merged model of round {number} (base + R + adapter, {args.dtype}) -> {out}")
        if args.dtype != "float32":
            print(f"note: {args.dtype} rounds the exact float32 weights once; for serving, "
                  "not as a federation's base", file=sys.stderr)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """One model, one data set: ``W0 + R + adapter`` from a folder or from a node's round, its
    held-out loss and perplexity on every text of ``--data`` (all of it held out)."""
    import math

    from chorus_p2p.errors import UsageError
    from chorus_p2p.tiny import quiet_transformers
    from chorus_p2p.train.data import Dataset, DatasetOptions, load_texts
    from chorus_p2p.train.trainer import TrainConfig, eval_global

    if bool(args.adapter) == bool(args.node or args.round is not None):
        raise UsageError("give --adapter DIR, or --node URL [--round N] (a node's round), "
                         "not both")
    quiet_transformers()
    texts = load_texts(args.data, DatasetOptions(args.text_field, args.dataset_split,
                                                 args.dataset_config))
    data = Dataset("data", texts, texts)
    config = TrainConfig(batch_size=args.batch_size, seq_len=args.max_seq_len,
                         eval_batches=args.max_batches or 1 << 30, device=args.device)
    with tempfile.TemporaryDirectory(prefix="chorus-evaluate-") as tmp:
        number = None
        if args.adapter:
            adapter, residual = Path(args.adapter), args.residual
        else:
            adapter, residual, number = _pull_round(args, Path(tmp))
        with human_output(args.json):
            loss = eval_global(args.model, adapter, residual, [data], config)["data"]
    result = {"round": number, "adapter": None if number is not None else str(adapter),
              "data": args.data, "texts": len(texts), "loss": loss,
              "perplexity": math.exp(min(loss, 50.0))}
    if args.json:
        print_json(result)
    else:
        what = f"round {number}" if number is not None else str(adapter)
        print(f"{what} on {args.data} ({len(texts)} texts): held-out loss {loss:.4f}, "
              f"perplexity {result['perplexity']:.3f}")
    return 0


def _pull_round(args: argparse.Namespace, into: Path) -> tuple[Path, Path | None, int]:
    """A node's committed round as a PEFT folder and its dense ``R`` (none at round 0)."""
    from chorus_p2p.cli.node_cmds import _client
    from chorus_p2p.client import PROVENANCE_FILE

    with _client(args) as node:
        wanted = "latest" if args.round is None else args.round
        folder = node.pull(into / "global", round=wanted, force=True)
        number = json.loads((folder / PROVENANCE_FILE).read_text())["round"]
        if number == 0:
            return folder, None, 0
        folder = node.pull(into / "global", round=number, force=True, cumulative=True)
    return folder, folder / "cumulative.safetensors", number


def _training_options(parser: argparse.ArgumentParser, lr: float) -> None:
    parser.add_argument("--steps", type=positive_int, default=30, help="optimizer steps per round")
    parser.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr:g})")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="sequences per step (default 8)")
    parser.add_argument("--device", default="auto",
                        help="auto (default: CUDA, then MPS, else CPU), cpu, cuda, cuda:1, ...")
    add_precision_options(parser)


def register(commands: argparse._SubParsersAction) -> None:
    from chorus_p2p.cli.node_cmds import _client_options

    tiny = commands.add_parser("make-tiny-model",
                               help="build a tiny Llama + tokenizer offline (an HF folder)")
    tiny.add_argument("--out", required=True, help="the model folder to write")
    tiny.add_argument("--data", action="append", help="text for the tokenizer and pretraining "
                      "(repeatable; default examples/data/*.jsonl)")
    tiny.add_argument("--vocab-size", type=positive_int, default=512,
                      help="tokenizer vocabulary (default 512)")
    tiny.add_argument("--hidden", type=positive_int, default=96, help="hidden size (default 96)")
    tiny.add_argument("--layers", type=positive_int, default=2, help="decoder layers (default 2)")
    tiny.add_argument("--pretrain-steps", type=non_negative_int, default=30,
                      help="steps of pretraining on the text, so LoRA has something to adapt "
                           "(default 30)")
    tiny.add_argument("--json", action="store_true", help="machine-readable output")
    tiny.set_defaults(handler=_cmd_make_tiny_model)

    evaluate = commands.add_parser(
        "evaluate", help="held-out loss and perplexity of one model (an adapter folder, or a "
        "node's round) on a data set")
    _client_options(evaluate, json_flag=False)
    evaluate.add_argument("--model", required=True, help="base model: HF id or local folder")
    evaluate.add_argument("--adapter", metavar="DIR", help="a PEFT adapter folder to evaluate "
                          "(instead of a node's round)")
    evaluate.add_argument("--residual", metavar="PATH", help="with --adapter: the R to fold "
                          "into the base first (pull --cumulative's cumulative.safetensors, or "
                          "an aggregation's residual.safetensors)")
    evaluate.add_argument("--round", type=round_or_latest, help="a node's committed round "
                          "(default with --node: the latest)")
    evaluate.add_argument("--data", required=True, help="held-out data: every text of it is "
                          "scored (JSONL, JSON, CSV, .txt folder, or a hub dataset)")
    add_dataset_options(evaluate)
    evaluate.add_argument("--batch-size", type=positive_int, default=8,
                          help="sequences per batch (default 8)")
    evaluate.add_argument("--max-seq-len", type=positive_int, metavar="TOKENS",
                          help="tokens per sequence (default: the model's, capped at 1024)")
    evaluate.add_argument("--max-batches", type=positive_int, metavar="N",
                          help="score at most N batches (default: all of the data)")
    evaluate.add_argument("--device", default="cpu",
                          help="cpu (default), cuda, cuda:1, mps, or auto")
    evaluate.add_argument("--json", action="store_true", help="machine-readable output")
    evaluate.set_defaults(handler=_cmd_evaluate)

    examples = commands.add_parser(
        "make-example-adapters", help="three client adapters for a model, as README's examples "
        "use them (alice-adapter/, bob-adapter/, carol/), offline")
    examples.add_argument("--model", required=True, help="the base model folder (or hub id)")
    examples.add_argument("--out", default=".", help="where to put the three folders "
                          "(default: here)")
    examples.add_argument("--target-modules", default="q_proj,v_proj",
                          help="modules the adapters target (default q_proj,v_proj)")
    examples.add_argument("--seed", type=int, default=0,
                          help="another set of adapters, as if the clients trained again "
                          "(a federation counts the same bytes once)")
    examples.add_argument("--force", action="store_true", help="replace existing folders")
    examples.add_argument("--json", action="store_true", help="machine-readable output")
    examples.set_defaults(handler=_cmd_make_example_adapters)

    train = commands.add_parser("train", help="train against a node for N rounds (SDK loop)")
    _client_options(train, json_flag=False)
    train.add_argument("--model", required=True, help="base model: HF id or local folder")
    train.add_argument("--dataset", required=True, help="JSONL/JSON/CSV (text, or instruction/"
                       "input/output), a folder of .txt files; with the datasets extra also "
                       "Parquet, a save_to_disk folder or a hub id")
    add_dataset_options(train)
    train.add_argument("--rounds", type=positive_int, default=1, help="rounds to train (default 1)")
    train.add_argument("--json", action="store_true",
                       help="one JSON line per round (JSON Lines), for scripts")
    train.add_argument("--wait", type=float, default=600, help="seconds to wait for a round")
    add_dp_options(train)
    train.add_argument("--dp-budget-file", metavar="PATH",
                       help="where the spent budget is kept across runs (default "
                            "$XDG_STATE_HOME/chorus-p2p/dp-budget-FEDERATION.json)")
    _training_options(train, 2e-4)
    train.set_defaults(handler=_cmd_train)

    sim = commands.add_parser("simulate", help="in-process federated training, no sockets")
    sim.add_argument("--clients", type=positive_int, default=3, help="clients (default 3)")
    sim.add_argument("--rounds", type=positive_int, default=5, help="rounds (default 5)")
    sim.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY,
                     help=f"aggregation (default {DEFAULT_STRATEGY})")
    sim.add_argument("--compare", action="store_true", help="also run fedavg and plot both")
    sim.add_argument("--plot", metavar="PNG", help="where --compare writes its plot "
                     "(default simulate-loss.png; needs the 'plots' extra)")
    sim.add_argument("--model", help="base model (default: build the tiny Llama)")
    sim.add_argument("--workdir", help="keep the generated files here (default: a temp dir)")
    sim.add_argument("--json", action="store_true",
                     help="print each strategy's per-round history as one JSON document")
    _training_options(sim, 1e-3)  # the tiny default model learns at a higher rate
    sim.set_defaults(handler=_cmd_simulate)

    export = commands.add_parser("export", help="write base + R + adapter as one HF model folder")
    export.add_argument("--out", required=True, help="the Hugging Face model folder to write")
    export.add_argument("--round", type=round_or_latest, help="committed round (default: latest)")
    export.add_argument("--best", metavar="METRIC", choices=("loss", "perplexity"),
                        help="the round this node's evaluations rate best (up --eval-data): "
                             "loss or perplexity")
    export.add_argument("--data-dir", help="the node's data dir (default $CHORUS_DATA_DIR or "
                        "./chorus_data)")
    export.add_argument("--model", help="base model (default: the one the federation records)")
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
    export.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="weights to write (default float32, the exact model; bfloat16 and "
                        "float16 are half the size, rounded once after the float32 merge)")
    export.add_argument("--json", action="store_true", help="machine-readable output")
    export.set_defaults(handler=_cmd_export)
