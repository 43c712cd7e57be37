"""Examples at the end of every ``--help``, the way ``gh`` and ``kubectl`` show them.

They are data, one entry per sub-command, so a test can check that every command has them
and that each one parses with the real parser (an example that no longer runs fails CI).
"""

from __future__ import annotations

import argparse

EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "init": [("create a federation on the first machine",
              "chorus-node init --federation lab --data-dir ~/chorus"),
             ("join one from another machine (token from `chorus-node join-token`)",
              "chorus-node init --join-file token.txt --data-dir ~/chorus")],
    "up": [("run a node that coordinates on a lab LAN",
            "chorus-node up --model meta-llama/Llama-3.2-1B --data-dir ~/chorus --host 0.0.0.0"),
           ("join with a token and train every round on local data",
            "chorus-node up --join-file token.txt --model ./llama --train --dataset notes.jsonl"),
           ("scripted: JSON log lines, static peers, no mDNS",
            "chorus-node up --headless --no-mdns --peer 10.0.0.5:8470 --model ./llama")],
    "status": [("the local node", "chorus-node status"),
               ("another node, as JSON", "chorus-node status --node 10.0.0.5:8470 --json")],
    "members": [("who is in the federation, their role and when they were last heard from",
                 "chorus-node members"),
                ("the coordinator's id, from a script",
                 "chorus-node members --json | jq -r '.[] | select(.role==\"coordinator\")"
                 " | .node_id'")],
    "rounds": [("the last 20 rounds", "chorus-node rounds"),
               ("the whole history as JSON", "chorus-node rounds --all --json")],
    "submit": [("submit a PEFT adapter folder to the current round, weighted by 1200 examples",
                "chorus-node submit ./my-adapter --examples 1200")],
    "pull": [("the latest global adapter as a PEFT folder",
              "chorus-node pull --out ./global"),
             ("round 7 with its residual and the cumulative R (all or nothing)",
              "chorus-node pull --round 7 --residual --cumulative --out ./round7 --force")],
    "approve": [("admit a node started with --approve-joins (an id prefix will do)",
                 "chorus-node approve 3f9a2c")],
    "reject": [("turn a pending node away for good", "chorus-node reject 3f9a2c")],
    "join-token": [("hand the token to a new machine by file",
                    "chorus-node join-token > token.txt && scp token.txt gpu-7:")],
    "tui": [("watch the local node's federation", "chorus-node tui"),
            ("watch from a laptop with a join token", "chorus-node tui --node 10.0.0.5:8470 "
             "--join-file token.txt")],
    "remove": [("drop a member whose machine is gone for good", "chorus-node remove 3f9a2c")],
    "exclude": [("leave a suspicious update out of the current round",
                 "chorus-node exclude alice --reason 'norm 40x the others'")],
    "doctor": [("check a data dir", "chorus-node doctor --data-dir ~/chorus"),
               ("repair it (node stopped)", "chorus-node doctor --data-dir ~/chorus --repair")],
    "resolve": [("adopt the coordinator's history after a divergence", "chorus-node resolve")],
    "close-round": [("aggregate the current round now with what it has",
                     "chorus-node close-round")],
    "pause": [("stop opening new rounds (the current one finishes)", "chorus-node pause")],
    "resume": [("open rounds again", "chorus-node resume")],
    "gc": [("free disk now, through the running node", "chorus-node gc"),
           ("keep only the last 3 rounds' files (node stopped)",
            "chorus-node gc --data-dir ~/chorus --keep-rounds 3")],
    "aggregate": [("three client adapters, weighted by their example counts",
                   "chorus-node aggregate a/ b/ c/ --weights 120,80,200 --out global/"),
                  ("plain FedAvg for comparison",
                   "chorus-node aggregate a/ b/ c/ --strategy fedavg --out avg/")],
    "fold": [("fold an aggregation's residual into a copy of the base model",
              "chorus-node fold --base ./llama --residual global/residual.safetensors "
              "--out ./llama-folded")],
    "demo": [("the 3-node federation on the tiny model (about 30 s on 2 cores)",
              "chorus-node demo"),
             ("the exactness check through PEFT, as JSON", "chorus-node demo --exactness --json")],
    "make-tiny-model": [("a tiny Llama + tokenizer to try things with, offline",
                         "chorus-node make-tiny-model --out ./tiny-llama")],
    "evaluate": [("a node's latest round on your held-out text",
                  "chorus-node evaluate --model ./llama --node http://10.0.0.5:8470 "
                  "--data held-out.jsonl"),
                 ("an adapter folder with the R it was trained on",
                  "chorus-node evaluate --model ./llama --adapter global/ --residual "
                  "global/cumulative.safetensors --data held-out.jsonl --json")],
    "make-example-adapters": [("README's three client adapters for a model, offline",
                               "chorus-node make-example-adapters --model ./tiny-llama --out .")],
    "train": [("pull, train, submit for 3 rounds against the local node",
               "chorus-node train --model ./llama --dataset notes.jsonl --rounds 3")],
    "simulate": [("5 clients x 10 rounds in one process, compared with FedAvg",
                  "chorus-node simulate --clients 5 --rounds 10 --compare")],
    "eval": [("check an experiment file and its data without training",
              "chorus-node eval benchmarks/eval.toml --check"),
             ("run it (reruns skip finished runs), then re-render its reports",
              "chorus-node eval benchmarks/eval.toml --out ./eval-results && chorus-node eval "
              "benchmarks/eval.toml --out ./eval-results --report")],
    "export": [("the latest global model as one Hugging Face folder",
                "chorus-node export --data-dir ~/chorus --out ./merged"),
               ("half the size for serving (bfloat16, rounded once after the exact merge)",
                "chorus-node export --data-dir ~/chorus --out ./merged-bf16 --dtype bfloat16")],
}


class HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual but prints the examples epilog line for line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def epilog(command: str) -> str:
    lines = ["examples:"]
    for what, line in EXAMPLES[command]:
        lines += [f"  # {what}", f"  $ {line}"]
    return "\n".join(lines) + "\n"


def add_examples(commands: argparse._SubParsersAction) -> None:
    """Give every sub-command its examples and the formatter that keeps them as written."""
    for name, parser in commands.choices.items():
        parser.formatter_class = HelpFormatter
        parser.epilog = epilog(name)
