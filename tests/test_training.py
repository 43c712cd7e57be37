"""Real LoRA training: exactness through training, falling loss, datasets, export, resume, demo."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chorus_p2p.exactness import check_exactness, merged_state, weighted_mean_state
from chorus_p2p.lora.aggregate import aggregate_adapters
from chorus_p2p.lora.fold import fold_base
from chorus_p2p.lora.residual import RESIDUAL_FILE
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.train.data import Dataset, load_texts
from chorus_p2p.train.export import export_merged
from chorus_p2p.train.simulate import initial_state, simulate
from chorus_p2p.train.tiny_lm import build_tiny_lm
from chorus_p2p.train.trainer import TrainConfig, evaluate, load_global_model, train_round

from nodeutil import start_node, wait_for

ROOT = Path(__file__).resolve().parents[1]
SHARDS = [ROOT / "examples" / "data" / f"{n}.jsonl" for n in ("kitchen", "weather", "workshop")]
TARGETS = ("q_proj", "v_proj", "up_proj")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny-llama", SHARDS,
                         pretrain_steps=30, log=lambda m: None)


def round_error(before, clients, weights, after, global_dir) -> float:
    """The identity through PEFT's loader: the federation's model after a round (``after``, the
    base with the round's residual folded in, plus the global adapter) against the float64
    weighted mean of the clients' models on ``before``; worst relative error over the weights
    the round changed."""
    return check_exactness(before, clients, weights, after, global_dir).max_relative_error


@pytest.fixture(scope="module")
def shards():
    return [Dataset.load(p) for p in SHARDS]


@pytest.mark.parametrize("strategy", ["fedex-svd", "fedex"])
def test_one_trained_round_is_the_exact_mean_of_the_clients(tmp_path, tiny_lm, shards, strategy):
    spec = FederationSpec.build(str(tiny_lm), 4, 8.0, TARGETS)
    start = initial_state(spec, "t", tmp_path / "round-0")
    clients, examples = [], []
    for i, data in enumerate(shards):
        result = train_round(tiny_lm, start, None, data, TrainConfig(steps=4, seed=i),
                             tmp_path / f"client-{i}")
        clients.append(result.adapter_dir)
        examples.append(result.examples)
        assert result.examples == len(data.train) and result.train_loss > 0
    out = tmp_path / "global"
    aggregate_adapters([str(c) for c in clients], out, strategy=strategy, weights=examples,
                       rank=4 if strategy == "fedex-svd" else None)
    fold_base(tiny_lm, out / RESIDUAL_FILE, tmp_path / "base+R")
    assert round_error(tiny_lm, clients, examples, tmp_path / "base+R", out) <= 1e-5


def test_fedavg_after_training_is_not_exact(tmp_path, tiny_lm, shards):
    spec = FederationSpec.build(str(tiny_lm), 4, 8.0, TARGETS)
    start = initial_state(spec, "t", tmp_path / "round-0")
    clients = [train_round(tiny_lm, start, None, d, TrainConfig(steps=4, seed=i),
                           tmp_path / f"c{i}").adapter_dir for i, d in enumerate(shards)]
    aggregate_adapters([str(c) for c in clients], tmp_path / "g", strategy="fedavg")
    got = merged_state(tiny_lm, tmp_path / "g")
    mean = weighted_mean_state([merged_state(tiny_lm, c) for c in clients], [1, 1, 1])
    delta = {k: mean[k] - merged_state(tiny_lm, start)[k].double() for k in mean}
    errors = [float((got[k].double() - mean[k]).norm() / delta[k].norm())
              for k in mean if "up_proj" in k]
    print(f"fedavg: error relative to the mean update: {max(errors):.3f}")
    assert max(errors) > 1e-3


def test_multi_round_training_lowers_held_out_loss(tmp_path, tiny_lm, shards):
    from chorus_p2p.train.simulate import DEMO_TARGETS

    spec = FederationSpec.build(str(tiny_lm), 8, 16.0, DEMO_TARGETS)
    start = initial_state(spec, "simulation", tmp_path / "r0")
    model, tokenizer = load_global_model(tiny_lm, start)
    from chorus_p2p.train.data import token_blocks

    before = sum(evaluate(model, token_blocks(tokenizer, d.eval, 64)) for d in shards) / 3
    history = simulate(tiny_lm, shards, shards, 3, "fedex-svd", tmp_path / "sim", rank=8,
                       alpha=16.0, targets=DEMO_TARGETS, config=TrainConfig(steps=30, lr=5e-3))
    losses = [h.mean_eval_loss for h in history]
    assert losses[-1] < before - 0.02 and losses[-1] < losses[0], (before, losses)
    assert all(h.residual_energy is not None and 0 <= h.residual_energy < 1 for h in history)


def test_dataset_formats_and_split(tmp_path):
    texts = load_texts(ROOT / "examples" / "data" / "instructions.jsonl")
    assert texts[0].startswith("### Instruction:\nGive the shipping forecast")
    assert "### Input:\n" in texts[0] and "\n\n### Response:\n" in texts[0]
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "a.txt").write_text("first document")
    (folder / "b.txt").write_text("second document")
    assert load_texts(folder) == ["first document", "second document"]
    a, b = Dataset.load(SHARDS[0]), Dataset.load(SHARDS[0])
    assert a.eval == b.eval and set(a.eval).isdisjoint(a.train) and len(a.eval) > 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    from chorus_p2p.errors import UsageError

    with pytest.raises(UsageError, match="bad.jsonl:1"):
        load_texts(bad)


def test_export_round_trips_through_transformers(tmp_path, tiny_lm, shards):
    from transformers import AutoModelForCausalLM

    spec = FederationSpec.build(str(tiny_lm), 4, 8.0, TARGETS)
    start = initial_state(spec, "t", tmp_path / "r0")
    clients = [train_round(tiny_lm, start, None, d, TrainConfig(steps=3, seed=i),
                           tmp_path / f"c{i}").adapter_dir for i, d in enumerate(shards[:2])]
    aggregate_adapters([str(c) for c in clients], tmp_path / "g", rank=2)
    export_merged(tiny_lm, tmp_path / "g", tmp_path / "g" / RESIDUAL_FILE, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    unmerged, _ = load_global_model(tiny_lm, tmp_path / "g", tmp_path / "g" / RESIDUAL_FILE)
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = exported(tokens).logits, unmerged(tokens).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "export" / "tokenizer.json").exists()


async def test_training_node_resumes_from_identical_state(tmp_path, tiny_lm):
    data = tmp_path / "node"
    kwargs = dict(min_updates=1, train=True, dataset=str(SHARDS[1]), steps=3,
                  target_modules=TARGETS)
    node = await start_node(data, tiny_lm, **kwargs)
    await wait_for(lambda: (node.ledger.round(2) or {}).get("state") == "committed", timeout=90)
    node.rounds.decide_pause(True)
    await wait_for(lambda: node.ledger.latest_round()["state"] == "committed", timeout=60)
    before = [(r["round"], r["adapter_sha"], r["log_hash"])
              for r in node.ledger.list_rounds(limit=100) if r["state"] == "committed"]
    outbox = sorted(p.name for p in (data / "outbox").glob("*.json"))
    await node.stop()

    node = await start_node(data, tiny_lm, **kwargs)
    try:
        after = [(r["round"], r["adapter_sha"], r["log_hash"])
                 for r in node.ledger.list_rounds(limit=100) if r["state"] == "committed"]
        assert after == before  # nothing recomputed or lost across the restart
        assert sorted(p.name for p in (data / "outbox").glob("*.json")) == outbox
        last = before[0][0]
        node.rounds.decide_pause(False)
        await wait_for(lambda: (node.ledger.round(last + 1) or {}).get("state") == "committed",
                       timeout=90)
        row = node.ledger.round(last + 1)
        assert row["trained_from"] == last
        update = node.ledger.updates(last + 1)[0]
        assert update["node_id"] == node.node_id and update["trained_from"] == last
        meta = json.loads((data / "outbox" / f"round-{last + 1}.json").read_text())
        assert meta["trained_from"] == last and meta["examples"] == update["examples"]
    finally:
        await node.stop()


def test_demo_command_runs_a_federation_offline(tmp_path):
    done = subprocess.run([sys.executable, "-m", "chorus_p2p.cli.main", "demo", "--rounds", "2",
                           "--steps", "5", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "round 1  eval loss: kitchen" in done.stdout and "round 2  eval loss:" in done.stdout
    assert ("all 3 nodes hold the same 3 committed rounds and an R that matches their "
            "fingerprint: yes") in done.stdout


def test_demo_serve_keeps_the_federation_up_until_interrupted(tmp_path):
    import os
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "chorus_p2p.cli.main", "demo", "--rounds", "1",
                             "--steps", "2", "--serve", "--workdir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline, lines = time.monotonic() + 240, []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "chorus-node tui --node" in line or not line:
                break
        assert any("chorus-node tui --node http://127.0.0.1:" in line for line in lines), lines
        # Keep draining its output: a child blocked on a full pipe would never exit.
        import threading

        drain = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        drain.start()
        # still serving: the node the printed command names answers `status`
        command = next(line for line in lines if "chorus-node tui --node" in line).split()
        node = command[command.index("--node") + 1]
        data_dir = command[command.index("--data-dir") + 1]
        for _ in range(2):
            status = subprocess.run([sys.executable, "-m", "chorus_p2p.cli.main", "status",
                                     "--node", node, "--data-dir", data_dir, "--json"],
                                    capture_output=True, text=True, timeout=60)
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["role"] in ("coordinator", "follower")
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        # Ctrl-C ends it as the command line promises: the interrupted code (130), or 0
        assert proc.wait(timeout=90) in (0, 130), lines[-20:]
        drain.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_device_choice(tmp_path, tiny_lm, shards):
    from chorus_p2p.train.trainer import resolve_device

    auto = resolve_device("auto")
    mps = getattr(torch.backends, "mps", None)
    assert auto.type == ("cuda" if torch.cuda.is_available() else
                         "mps" if mps is not None and mps.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"
    spec = FederationSpec.build(str(tiny_lm), 4, 8.0, TARGETS)
    start = initial_state(spec, "t", tmp_path / "r0")
    cpu = train_round(tiny_lm, start, None, shards[0], TrainConfig(steps=2, device="cpu"),
                      tmp_path / "cpu")
    assert (cpu.adapter_dir / "adapter_model.safetensors").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_matches_the_exactness_identity(tmp_path, tiny_lm, shards):
    spec = FederationSpec.build(str(tiny_lm), 4, 8.0, TARGETS)
    start = initial_state(spec, "t", tmp_path / "r0")
    clients = [train_round(tiny_lm, start, None, d, TrainConfig(steps=3, seed=i, device="cuda"),
                           tmp_path / f"c{i}").adapter_dir for i, d in enumerate(shards)]
    aggregate_adapters([str(c) for c in clients], tmp_path / "g", rank=4)
    fold_base(tiny_lm, tmp_path / "g" / RESIDUAL_FILE, tmp_path / "base+R")
    assert round_error(tiny_lm, clients, [1, 1, 1], tmp_path / "base+R", tmp_path / "g") <= 1e-5


def test_bf16_training_keeps_the_federation_exact(tmp_path, tiny_lm, shards):
    """Clients train on a bfloat16 compute copy of W0 + R (gradient accumulation and
    checkpointing on); their float32 adapters still aggregate to the exact mean, through PEFT,
    in a round that starts from a non-zero R."""
    from chorus_p2p.lora.fold import OriginalWeights, iter_deltas
    from chorus_p2p.train.trainer import load_base

    spec = FederationSpec.build(str(tiny_lm), 4, 8.0, TARGETS)
    start = initial_state(spec, "t", tmp_path / "round-0")
    bf16 = dict(compute_dtype="bfloat16", grad_accum=2, gradient_checkpointing=True, steps=3)

    def train_clients(adapter, residual, tag):
        dirs = [train_round(tiny_lm, adapter, residual, d,
                            TrainConfig(seed=i, batch_size=4, **bf16), tmp_path / f"{tag}-{i}")
                .adapter_dir for i, d in enumerate(shards)]
        for d in dirs:  # the update itself is float32
            from safetensors.torch import load_file
            assert {t.dtype for t in load_file(str(d / "adapter_model.safetensors")).values()} \
                == {torch.float32}
        return dirs
    first = train_clients(start, None, "r1")
    aggregate_adapters([str(c) for c in first], tmp_path / "g1", rank=4, weights=[3, 2, 1])
    residual = tmp_path / "g1" / RESIDUAL_FILE
    # the compute copy is W0 + R rounded once to bf16, from the stored float32 W0
    model, _ = load_base(tiny_lm, residual, compute_dtype=torch.bfloat16)
    original = OriginalWeights(tiny_lm)
    for prefix, delta in iter_deltas(residual):
        name = prefix.removeprefix("base_model.model.") + ".weight"
        expected = (original(name) + delta).to(torch.bfloat16)
        assert torch.equal(model.get_parameter(name), expected), name
    del model
    # A model stored only as pickled .bin (older checkpoints) still loads: R is added to the
    # weights as loaded (rounded twice rather than once, so close, not bit-equal)
    import shutil

    from safetensors.torch import load_file
    shutil.copytree(tiny_lm, tmp_path / "bin-only", ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save(load_file(str(Path(tiny_lm) / "model.safetensors")),
               tmp_path / "bin-only" / "pytorch_model.bin")
    model, _ = load_base(tmp_path / "bin-only", residual, compute_dtype=torch.bfloat16)
    for prefix, delta in iter_deltas(residual):
        name = prefix.removeprefix("base_model.model.") + ".weight"
        expected = (original(name) + delta).to(torch.bfloat16).float()
        assert torch.allclose(model.get_parameter(name).float(), expected, rtol=2e-2, atol=1e-3)
    del model
    second = train_clients(tmp_path / "g1", residual, "r2")
    aggregate_adapters([str(c) for c in second], tmp_path / "g2", rank=4, weights=[1, 2, 3])
    fold_base(tiny_lm, residual, tmp_path / "base+R1")
    fold_base(tmp_path / "base+R1", tmp_path / "g2" / RESIDUAL_FILE, tmp_path / "base+R2")
    assert round_error(tmp_path / "base+R1", second, [1, 2, 3], tmp_path / "base+R2",
                       tmp_path / "g2") <= 1e-5


@pytest.fixture(scope="module")
def tiny_lm_64(tmp_path_factory):
    """Widths that are multiples of 64, as in real models: bitsandbytes quantizes in blocks of
    64, and its CPU kernels refuse other widths."""
    return build_tiny_lm(tmp_path_factory.mktemp("lm64") / "tiny-llama", SHARDS, hidden=128,
                         pretrain_steps=5, log=lambda m: None)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_qlora_training_keeps_the_federation_exact(tmp_path, tiny_lm_64, shards, kind, device):
    """--load-in-4bit/8bit (bitsandbytes; on the CPU here, on CUDA where there is one): the
    quantized training copy is W0 + R quantized once, bit for bit what transformers makes of a
    checkpoint with R folded in, and the clients' float32 adapters still aggregate to the exact
    mean through PEFT."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from chorus_p2p.lora.fold import iter_deltas
    from chorus_p2p.lora.quantized import dequantized
    from chorus_p2p.tiny import make_client_adapter
    from chorus_p2p.train.quantize import quantization_config
    from chorus_p2p.train.trainer import load_base

    # a first round with updates large enough to move quantized weights (2 trained steps would
    # not: R would round away, and the check below would prove nothing)
    movers = [make_client_adapter(tiny_lm_64, tmp_path / f"m{i}", seed=i, rank=4, alpha=8.0,
                                  target_modules=TARGETS, spread=0.2) for i in range(3)]
    aggregate_adapters([str(m) for m in movers], tmp_path / "g1", rank=4)
    residual = tmp_path / "g1" / RESIDUAL_FILE
    fold_base(tiny_lm_64, residual, tmp_path / "base+R1")

    def quantized_load(folder):
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, device_map={"": device},
            quantization_config=quantization_config(kind, torch.float32))
    ours, _ = load_base(tiny_lm_64, residual, device=device, quantize=kind)
    folded, bare = quantized_load(tmp_path / "base+R1"), quantized_load(tiny_lm_64)
    moved = 0
    for prefix, _delta in iter_deltas(residual):
        name = prefix.removeprefix("base_model.model.")
        got = dequantized(ours.get_submodule(name))
        assert torch.equal(got, dequantized(folded.get_submodule(name))), name
        moved += not torch.equal(got, dequantized(bare.get_submodule(name)))
    assert moved == len(TARGETS) * 2  # every targeted layer of both blocks carries R
    del ours, folded, bare

    config = dict(quantize=kind, steps=2, batch_size=4, grad_accum=2, device=device)
    second = [train_round(tiny_lm_64, tmp_path / "g1", residual, d,
                          TrainConfig(seed=i, **config), tmp_path / f"c{i}").adapter_dir
              for i, d in enumerate(shards)]
    for d in second:  # the update is a plain float32 PEFT adapter
        assert {t.dtype for t in load_file(str(d / "adapter_model.safetensors")).values()} \
            == {torch.float32}
    aggregate_adapters([str(c) for c in second], tmp_path / "g2", rank=4, weights=[1, 2, 3])
    fold_base(tmp_path / "base+R1", tmp_path / "g2" / RESIDUAL_FILE, tmp_path / "base+R2")
    assert round_error(tmp_path / "base+R1", second, [1, 2, 3], tmp_path / "base+R2",
                       tmp_path / "g2") <= 1e-5


def test_quantized_training_without_bitsandbytes_says_how_to_get_it(tmp_path, tiny_lm,
                                                                     monkeypatch):
    import importlib.util

    from chorus_p2p.errors import UsageError
    from chorus_p2p.train.quantize import require_bitsandbytes

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UsageError, match=r"chorus-p2p\[qlora\]"):
        require_bitsandbytes("4bit")
    out = subprocess.run([sys.executable, "-m", "chorus_p2p.cli.main", "train", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert "--load-in-4bit" in out.stdout and "--load-in-8bit" in out.stdout


def test_datasets_as_lab_users_have_them(tmp_path, monkeypatch):
    """JSON, CSV, a custom text field, Parquet and save_to_disk folders (built here, offline)."""
    import csv

    import datasets

    from chorus_p2p.errors import UsageError
    from chorus_p2p.train.data import DatasetOptions, load_texts

    rows = [{"body": f"note {i}: the kettle is descaled", "instruction": f"step {i}",
             "output": "done"} for i in range(30)]
    (tmp_path / "notes.json").write_text(json.dumps(rows))
    with open(tmp_path / "notes.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "notes.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "test": table.select(range(3))}).save_to_disk(
        str(tmp_path / "saved-dict"))
    body = DatasetOptions(text_field="body")
    for source in ("notes.json", "notes.csv", "notes.parquet", "saved", "saved-dict"):
        texts = load_texts(tmp_path / source, body)
        assert texts == [r["body"] for r in rows], source
        # without a text field: the instruction template
        assert load_texts(tmp_path / source)[0].startswith("### Instruction:\nstep 0"), source
    assert len(load_texts(tmp_path / "saved-dict", DatasetOptions("body", split="test"))) == 3
    with pytest.raises(UsageError, match="no split 'validation'"):
        load_texts(tmp_path / "saved-dict", DatasetOptions(split="validation"))
    with pytest.raises(UsageError, match="no text field 'missing'"):
        load_texts(tmp_path / "notes.csv", DatasetOptions(text_field="missing"))
    # a hub id while offline: one clear line, not a traceback
    with pytest.raises(UsageError, match="cannot load it with datasets"):
        load_texts("no-such-org/no-such-dataset")
    # a typo in a relative local path whose folder exists is a missing file, not a hub id
    (tmp_path / "shards").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="no such dataset file or folder"):
        load_texts("shards/shard0")


def test_the_sequence_length_comes_from_the_model_unless_given(tiny_lm_dir):
    """Issue 22 #8: a fixed 64 tokens was the tiny model's, and a silent trap for a real one."""
    from transformers import AutoConfig, GPT2Config, LlamaConfig

    from chorus_p2p.train.trainer import sequence_length

    assert sequence_length(None, AutoConfig.from_pretrained(tiny_lm_dir)) == 64
    assert sequence_length(None, LlamaConfig(max_position_embeddings=131072)) == 1024
    assert sequence_length(None, GPT2Config(n_positions=512)) == 512
    assert sequence_length(300, LlamaConfig(max_position_embeddings=131072)) == 300


def test_models_loaded_in_parallel_threads_leave_transformers_as_it_was(tmp_path, tiny_lm):
    """A node loads models in two threads at once (its training and its evaluation). Without
    one load at a time, transformers' from_pretrained put back another load's stand-ins for
    tie_weights and the init functions, and every later model in the process came out
    untied (a full CI run showed it: a tied lm_head test failed after an in-process
    federation of evaluating nodes)."""
    import threading

    from transformers import PreTrainedModel

    from chorus_p2p.train.trainer import load_base

    before = (PreTrainedModel.tie_weights, PreTrainedModel.init_weights, torch.nn.init.normal_)
    errors: list[BaseException] = []

    def load_many() -> None:
        try:
            for _ in range(4):
                load_base(tiny_lm)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
    threads = [threading.Thread(target=load_many) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert (PreTrainedModel.tie_weights, PreTrainedModel.init_weights,
            torch.nn.init.normal_) == before


async def test_a_stopping_worker_waits_for_its_threads_and_ends_long_ones():
    """The suite beside busy loops crashed (SIGSEGV) in sqlite: a node stopped while its
    participant's DP release still wrote to the ledger in a thread; cancelling the await had
    left the thread running, and stop closed the ledger under it. Now stop returns only after
    the step's threads, and a long one (training) ends at its next progress call."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from chorus_p2p.node.worker import StepLoop, Stopping

    entered, outcome = threading.Event(), []

    class Releasing(StepLoop):
        async def _step(self) -> None:
            await self._in_thread(self.release)

        def release(self) -> None:  # a write that must finish before the ledger closes
            entered.set()
            time.sleep(0.5)
            outcome.append("written")

    class Training(StepLoop):
        async def _step(self) -> None:
            await self._in_thread(self.train)

        def train(self) -> None:
            entered.set()
            try:
                for _ in range(10_000):  # far longer than any test: only Stopping ends it
                    self._check_stopping()
                    time.sleep(0.01)
            except Stopping:
                outcome.append("stopped")

    node = SimpleNamespace(bus=SimpleNamespace(publish=lambda *a, **k: None))
    for worker, expected in ((Releasing(node), "written"), (Training(node), "stopped")):
        entered.clear()
        outcome.clear()
        worker.start()
        await asyncio.to_thread(entered.wait, 30)
        await worker.stop()
        assert outcome == [expected]
