"""ClientApp: each SuperNode trains on its own shard (``partition-id``, or ``dataset=PATH``)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from chorus_p2p.demos.federation import shard_paths
from chorus_p2p.flower import ExactLoRAClient
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.train.data import Dataset
from chorus_p2p.train.trainer import TrainConfig

app = ClientApp()


def _setup(message: Message, context: Context) -> tuple[ExactLoRAClient, Dataset, TrainConfig]:
    """The server's settings, with this node's own on top (``flower-supernode --node-config
    "model=/data/llama dataset=/data/notes.jsonl workdir=/scratch/chorus"``)."""
    sent, node = message.content["config"], context.node_config
    model = str(node.get("model") or sent["model"])
    spec = FederationSpec.build(model, int(sent["rank"]), float(sent["alpha"]),
                                tuple(str(sent["target-modules"]).split(",")))
    dataset = node.get("dataset")
    if not dataset:
        shards = shard_paths()
        dataset = shards[int(node.get("partition-id", 0)) % len(shards)]
    workdir = Path(str(node.get("workdir") or Path(str(sent["workdir"])) / "clients"))
    config = TrainConfig(steps=int(sent["steps"]), lr=float(sent["lr"]),
                         batch_size=int(sent["batch-size"]),
                         seed=int(sent["server-round"]) * 1000 + int(node.get("partition-id", 0)))
    dp = None
    if float(sent.get("dp-epsilon", 0.0)) > 0:  # only a private update leaves this node
        from chorus_p2p.train.privacy import DPConfig

        dp = DPConfig(float(sent["dp-epsilon"]), clip=float(sent["dp-clip"]),
                      noise_multiplier=float(sent["dp-noise"]),
                      mechanism=str(sent.get("dp-mechanism", "gaussian-local")))
    return ExactLoRAClient(model, spec, workdir, dp=dp), Dataset.load(dataset), config


@app.train()
def train(message: Message, context: Context) -> Message:
    client, data, config = _setup(message, context)
    return client.train(message, context, data, config)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    client, data, config = _setup(message, context)
    return client.evaluate(message, context, data, config)
