"""The training commands as a user runs them: train (SDK loop), export, simulate."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nodeutil import node_in_thread
from nodeutil import run_cli as cli

SHARD = Path(__file__).resolve().parents[1] / "examples" / "data" / "kitchen.jsonl"


def test_train_then_export_from_the_command_line(tmp_path, tiny_lm_dir):
    with node_in_thread(tmp_path / "node", tiny_lm_dir, min_updates=1,
                        target_modules=("q_proj", "v_proj")) as node:
        done = cli("train", "--node", node.url, "--join", node.identity.join_token(),
                   "--client-id", "laptop", "--model", str(tiny_lm_dir), "--dataset", str(SHARD),
                   "--rounds", "2", "--steps", "2")
        assert done.returncode == 0, done.stderr[-2000:]
        assert "round 1: trained 2 steps" in done.stdout and "round 2: trained" in done.stdout
        for number in (1, 2):
            update = node.ledger.update(number, "laptop")
            assert update is not None and 0 < update["eval_loss"] < 20  # a real, finite loss
            assert update["trained_from"] == number - 1
    # The node is stopped; export works from its data dir alone.
    done = cli("export", "--data-dir", str(tmp_path / "node"), "--out", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    # --dtype bfloat16: half the size, each weight the float32 merge rounded once, and it says so
    done = cli("export", "--data-dir", str(tmp_path / "node"), "--out", str(tmp_path / "bf16"),
               "--dtype", "bfloat16", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["dtype"] == "bfloat16", done.stderr
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    exact = dict(model.state_dict())
    for name, weight in half.state_dict().items():
        assert weight.dtype == torch.bfloat16
        assert torch.equal(weight, exact[name].to(torch.bfloat16)), name


def test_train_goes_on_when_the_federation_closes_its_round_first(tmp_path, tiny_lm_dir):
    """Issue 22 #3: `train` gave up with exit 3 (round_closed) when the nodes committed its
    round before its update arrived; it now trains the next round."""
    from chorus_p2p.client import NodeClient
    from chorus_p2p.tiny import write_random_update

    with node_in_thread(tmp_path / "node", tiny_lm_dir, min_updates=1,
                        target_modules=("q_proj", "v_proj")) as node:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chorus_p2p.cli.main", "train", "--node", node.url,
             "--join", node.identity.join_token(), "--client-id", "laptop", "--model",
             str(tiny_lm_dir), "--dataset", str(SHARD), "--rounds", "1", "--steps", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"})
        # Once `train` has asked for the current round (round 1), another client closes it
        # (min_updates 1), long before `train` has trained.
        deadline = time.monotonic() + 120
        while "laptop" not in node.rate_limiter._buckets and time.monotonic() < deadline:
            time.sleep(0.05)
        with NodeClient(node.url, secret=node.identity.secret, client_id="fast") as c:
            c.submit(write_random_update(tmp_path / "fast.safetensors", node.spec, 1),
                     round=1, examples=1, trained_from=0)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert "round 1 closed before this update arrived" in err
        assert "round 2: trained 2 steps" in out
        assert node.ledger.update(2, "laptop")["trained_from"] == 1


def test_simulate_command(tmp_path, tiny_lm_dir):
    done = cli("simulate", "--clients", "4", "--rounds", "1", "--steps", "2", "--model",
               str(tiny_lm_dir), "--compare", "--plot", str(tmp_path / "sim.png"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "simulating 4 clients x 1 rounds with fedex-svd" in done.stdout
    assert "simulating 4 clients x 1 rounds with fedavg" in done.stdout
    assert (tmp_path / "sim.png").stat().st_size > 1000


def test_quantized_training_flags(tmp_path, tiny_lm_dir):
    """--load-in-8bit trains (bitsandbytes on the CPU); --load-in-4bit on a toy width that the
    CPU kernels cannot pack stops with a one-line reason, not a reshape traceback mid-round."""
    import pytest

    pytest.importorskip("bitsandbytes")
    done = cli("simulate", "--clients", "2", "--rounds", "1", "--steps", "1", "--model",
               str(tiny_lm_dir), "--load-in-8bit")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "round 1" in done.stdout
    done = cli("simulate", "--clients", "2", "--rounds", "1", "--steps", "1", "--model",
               str(tiny_lm_dir), "--load-in-4bit")
    assert done.returncode == 2 and "multiples of 64" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    done = cli("train", "--load-in-4bit", "--load-in-8bit", "--node", "http://127.0.0.1:9",
               "--model", str(tiny_lm_dir), "--dataset", str(SHARD))
    assert done.returncode == 2 and "not allowed with" in done.stderr


def test_up_train_max_rounds_stops_with_exit_0_and_counts_across_restarts(tmp_path,
                                                                         tiny_lm_dir):
    """Issue 22 #9: `up --train` ran forever. With --max-rounds N it leaves once N committed
    rounds count its update, exit 0; the same command again finds the work done (a restart
    carries on from where it was, it does not start over)."""
    from chorus_p2p.trust.identity import init_data_dir
    from chorus_p2p.node.ledger import Ledger

    from nodeutil import NodeProcess

    init_data_dir(tmp_path / "node", "solo")
    args = ["--train", "--dataset", str(SHARD), "--steps", "2", "--min-updates", "1",
            "--max-rounds", "2"]
    node = NodeProcess(tmp_path / "node", tiny_lm_dir, extra=args)
    node.start()
    assert node.proc.wait(timeout=240) == 0, node.proc.stderr.read()[-2000:]
    assert node.events("node_finished")
    ledger = Ledger(tmp_path / "node" / "ledger.sqlite")
    try:
        (me,) = {u["node_id"] for number in (1, 2) for u in ledger.updates(number)}
        assert ledger.rounds_contributed(me) == 2 and ledger.latest_committed()["round"] == 2
    finally:
        ledger.close()
    again = NodeProcess(tmp_path / "node", tiny_lm_dir, extra=args)
    again.start()
    assert again.proc.wait(timeout=120) == 0
    ledger = Ledger(tmp_path / "node" / "ledger.sqlite")
    try:
        assert ledger.latest_committed()["round"] == 2  # it trained no third round
    finally:
        ledger.close()


async def test_a_node_evaluates_each_committed_model_and_export_picks_the_best(tmp_path,
                                                                              tiny_lm_dir):
    """Issue 21 #5: `up --train --eval-data PATH`: after each commit the node measures the
    global model (W0 + R + adapter) on its own held-out text, records it per round (the round's
    record and `rounds --json` show it), and `export --best loss` picks the round it rated
    best."""
    import asyncio

    from chorus_p2p.trust.identity import init_data_dir

    from nodeutil import start_node, wait_for

    init_data_dir(tmp_path / "node", "evaluating")
    held_out = Path(__file__).resolve().parents[1] / "examples" / "data" / "weather.jsonl"
    node = await start_node(tmp_path / "node", tiny_lm_dir, min_updates=1, train=True,
                            dataset=str(SHARD), steps=3, target_modules=("q_proj", "v_proj"),
                            eval_data=str(held_out), eval_every=1)
    try:
        await wait_for(lambda: len(node.ledger.evaluations()) >= 3, timeout=180)
        evaluations = node.ledger.evaluations()
        # the newest committed round each time: a round that commits while the last one is
        # measured is skipped (under load the first measured may be round 2, not 1)
        for number, by_node in evaluations.items():
            metrics = by_node[node.node_id]
            assert 0 < metrics["loss"] < 20 and metrics["perplexity"] > 1
            assert node.ledger.round(number)["state"] == "committed"
        shown = await asyncio.to_thread(cli, "rounds", "--node", node.url, "--join",
                                        node.identity.join_token(), "--json")
        assert shown.returncode == 0, shown.stderr
        listed = {r["round"]: r for r in json.loads(shown.stdout)}
        assert all(listed[n]["evaluations"][node.node_id] == evaluations[n][node.node_id]
                   for n in evaluations if n in listed)
    finally:
        await node.stop()
    from chorus_p2p.node.ledger import Ledger

    ledger = Ledger(tmp_path / "node" / "ledger.sqlite")  # every evaluation made before stop
    try:
        best = min((m[node.node_id]["loss"], n) for n, m in ledger.evaluations().items()
                   if node.node_id in m)[1]
    finally:
        ledger.close()
    done = await asyncio.to_thread(cli, "export", "--data-dir", str(tmp_path / "node"),
                                   "--out", str(tmp_path / "best"), "--best", "loss", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["round"] == best


def test_patience_leaves_after_evaluations_without_a_new_best(tmp_path):
    """`--patience 2`: two evaluations in a row after the best, none better: the node leaves."""
    from types import SimpleNamespace

    from chorus_p2p.node.ledger import Ledger
    from chorus_p2p.node.evaluator import NodeEvaluator

    ledger = Ledger(tmp_path / "ledger.sqlite")
    finished: list[str] = []
    node = SimpleNamespace(ledger=ledger, node_id="me", finish=finished.append)
    evaluator = NodeEvaluator.__new__(NodeEvaluator)
    evaluator.node, evaluator.patience = node, 2
    try:
        for number, loss in enumerate((2.0, 1.5, 1.6), start=1):
            ledger.record_evaluation(number, "me", {"loss": loss})
            ledger.record_evaluation(number, "someone-else", {"loss": 0.1})  # not ours
            evaluator._maybe_stop()
        assert finished == []  # one evaluation since the best
        ledger.record_evaluation(4, "me", {"loss": 1.55})
        evaluator._maybe_stop()
        assert len(finished) == 1 and "best 1.5000 at round 2" in finished[0]
    finally:
        ledger.close()


def test_evaluate_scores_a_nodes_round_as_the_exported_model_does(tmp_path, tiny_lm_dir):
    """Issue 21 #5: `chorus-node evaluate` on a node's round (pulled with its R), on the same
    round's adapter folder and R given apart, and plain transformers on the model `export`
    merged from it: one figure. Round 0 scores otherwise."""
    from chorus_p2p.client import NodeClient
    from chorus_p2p.train.data import load_texts, token_blocks
    from chorus_p2p.train.trainer import evaluate

    from nodeutil import write_update

    with node_in_thread(tmp_path / "node", tiny_lm_dir, min_updates=2,
                        target_modules=("q_proj", "v_proj")) as node:
        token = node.identity.join_token()
        for i, name in enumerate(("alice", "bob")):
            with NodeClient.from_join_token(node.url, token, client_id=name) as client:
                client.submit(write_update(tmp_path / f"{name}.safetensors", node.spec, i,
                                           scale=0.2), examples=10 + i)
        deadline = time.monotonic() + 60
        while (node.ledger.round(1) or {}).get("state") != "committed":
            assert time.monotonic() < deadline, "round 1 did not commit"
            time.sleep(0.1)
        remote = ["--node", node.url, "--join", token]
        done = cli("evaluate", "--model", str(tiny_lm_dir), *remote, "--data", str(SHARD),
                   "--json")
        assert done.returncode == 0, done.stderr[-2000:]
        latest = json.loads(done.stdout)
        first = json.loads(cli("evaluate", "--model", str(tiny_lm_dir), *remote, "--round",
                               "0", "--data", str(SHARD), "--json").stdout)
        assert cli("pull", *remote, "--out", str(tmp_path / "g"), "--round", "1",
                   "--cumulative").returncode == 0
        both = cli("evaluate", *remote, "--model", str(tiny_lm_dir), "--adapter", "x",
                   "--data", str(SHARD))
        assert both.returncode == 2 and "not both" in both.stderr
    apart = json.loads(cli("evaluate", "--model", str(tiny_lm_dir), "--adapter",
                           str(tmp_path / "g"), "--residual",
                           str(tmp_path / "g" / "cumulative.safetensors"), "--data",
                           str(SHARD), "--json").stdout)
    assert latest["round"] == 1 and first["round"] == 0 and latest["texts"] > 100
    assert apart["loss"] == latest["loss"] and first["loss"] != latest["loss"]
    assert latest["perplexity"] == pytest.approx(math.exp(latest["loss"]))
    done = cli("export", "--data-dir", str(tmp_path / "node"), "--round", "1", "--out",
               str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr[-2000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    blocks = token_blocks(AutoTokenizer.from_pretrained(tmp_path / "merged"),
                          load_texts(str(SHARD)), 64)
    plain = evaluate(merged, blocks, batch_size=8, max_batches=1 << 30)
    assert abs(plain - latest["loss"]) < 1e-4, (plain, latest["loss"])
