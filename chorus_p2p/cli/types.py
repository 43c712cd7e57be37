"""argparse types that refuse impossible values with a one-line usage error (exit 2)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= 1")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= 0")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r} must be a number >= 0")
    return value


def round_or_latest(text: str) -> int | str:
    return "latest" if text == "latest" else non_negative_int(text)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def add_precision_options(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """Training memory options, shared by ``up --train``, ``train`` and ``simulate``.

    ``defaults=False`` leaves them None so ``up`` can tell a flag from a config-file value."""
    def default(value):
        return value if defaults else None
    parser.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16", "float16"),
                        default=default("auto"),
                        help="dtype of the frozen base while training: auto (default) is "
                             "bfloat16 on a CUDA GPU that supports it, float32 elsewhere. The "
                             "adapter trains in float32 and the federation stays exact")
    quantize = parser.add_mutually_exclusive_group()
    for bits in ("4bit", "8bit"):
        quantize.add_argument(f"--load-in-{bits}", dest="quantize", action="store_const",
                              const=bits, default=None,
                              help=f"quantize the frozen base to {bits} with bitsandbytes "
                                   "(QLoRA; the 'qlora' extra): W0 + R is quantized once, the "
                                   "adapter trains in float32 and the federation stays exact")
    parser.add_argument("--grad-accum", type=positive_int, default=default(1), metavar="N",
                        help="micro-batches per optimizer step (default 1): the same effective "
                             "batch in less memory")
    parser.add_argument("--max-seq-len", type=positive_int, default=None, metavar="TOKENS",
                        help="tokens per training sequence (default: the model's context "
                             "length, at most 1024; 64 for the tiny model)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        default=default(False),
                        help="recompute activations in the backward pass: much less memory, "
                             "about a third slower")


def add_dataset_options(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """How to read ``--dataset``: shared by ``up --train`` and ``train``."""
    parser.add_argument("--text-field", metavar="FIELD",
                        help="the record field that holds the text (default: 'text', else "
                             "instruction/input/output through the Alpaca template)")
    parser.add_argument("--split", dest="dataset_split", default="train" if defaults else None,
                        help="split of a save_to_disk DatasetDict or a hub dataset "
                             "(default train)")
    parser.add_argument("--dataset-config", metavar="NAME",
                        help="configuration of a hub dataset (datasets.load_dataset's name)")


def add_dp_options(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """Local differential privacy, the same flags wherever an update is made (``up --train``,
    ``train``). ``defaults=False`` leaves unset flags None, for commands whose environment and
    config file fill them in."""
    parser.add_argument("--dp-epsilon", type=float, metavar="EPS",
                        help="local DP: the budget this data may spend, at --dp-delta (the unit:"
                             " the sender's whole local dataset, add/remove)")
    parser.add_argument("--dp-delta", type=float, metavar="DELTA",
                        default=1e-5 if defaults else None, help="DP delta (default 1e-5)")
    parser.add_argument("--dp-clip", type=float, metavar="C",
                        help="L2 bound on each round's change (required with --dp-epsilon)")
    parser.add_argument("--dp-noise", type=float, metavar="Z", default=1.0 if defaults else None,
                        help="Gaussian noise multiplier (default 1.0): noise std = Z * C")
    parser.add_argument("--dp-mechanism", choices=("gaussian-local", "dp-sgd"),
                        default="gaussian-local" if defaults else None,
                        help="gaussian-local (default): clip and noise each round's change, the "
                             "unit a node's whole dataset; dp-sgd: per-record clipping and noise "
                             "on every step (Opacus), the unit one record (text)")
