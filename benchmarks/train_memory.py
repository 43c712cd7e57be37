"""Training memory: one round in float32 vs bfloat16 (and 4/8-bit) on the same model and batch.

A lab GPU has 16-24 GB; a 7-8B model's float32 weights alone are 32 GB. The federation's state
stays exact in float32 whatever a client computes with, so clients may train on a bf16 copy of
``W0 + R``. This measures what that saves, on a ~1.1B-parameter Llama built from a config
(TinyLlama-1.1B's shape, random weights, nothing downloaded), with the demo's tokenizer and text:

- each dtype runs ``train_round`` (load W0 + R, load the global adapter, train, evaluate, save
  the adapter) in a child process of its own, so its peaks are that round's alone: the working
  set during the training steps (see ``_Peak`` for why that, and not the load's peak, is the
  figure to compare), the peak of anonymous memory, and the load's peak (VmHWM);
- on a GPU (``--device cuda``) it also reports ``torch.cuda.max_memory_allocated``;
- with bitsandbytes installed, ``--options float32,bfloat16,4bit,8bit`` adds QLoRA rows (a
  bf16-computing base quantized to NF4 or int8; bitsandbytes' CPU kernels are slow, so on the
  CPU their steps/s says little about a GPU's);
- steps/s counts the optimizer steps only (from the first step's end to the last's).

Target: bf16 peak <= 0.6x the float32 peak on the same round. It ends with a planning table
(parameters -> memory per option) extrapolated from the measured bytes per parameter.

Usage::

    python benchmarks/train_memory.py                   # CPU, ~1.1B, a few minutes on 2 cores
    python benchmarks/train_memory.py --layers 4        # a smaller model, quicker
    python benchmarks/train_memory.py --device cuda --steps 10
    python benchmarks/train_memory.py --options float32,bfloat16,4bit
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD = ROOT / "examples" / "data" / "kitchen.jsonl"


def build_model(folder: Path, layers: int, hidden: int, intermediate: int) -> int:
    """A TinyLlama-shaped Llama in float32 on disk, with the demo's tokenizer. Returns params."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from chorus_p2p.train.data import load_texts
    from chorus_p2p.train.tiny_lm import train_tokenizer

    tokenizer = train_tokenizer(load_texts(SHARD), 4096)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return params


OPTIONS = {"float32": ("float32", None), "bfloat16": ("bfloat16", None),
           "4bit": ("bfloat16", "4bit"), "8bit": ("bfloat16", "8bit")}


def one_round(model: str, dtype: str, device: str, steps: int, batch: int, seq_len: int,
              work: Path) -> dict:
    """In this (child) process: a round with a non-zero R, as a node trains it."""
    import torch

    from chorus_p2p.federation.spec import FederationSpec
    from chorus_p2p.tiny import write_random_update
    from chorus_p2p.lora.aggregate import aggregate_adapters
    from chorus_p2p.train.data import Dataset
    from chorus_p2p.train.simulate import initial_state
    from chorus_p2p.train.trainer import TrainConfig, train_round

    baseline = _proc_status_mb("RssAnon")  # torch and transformers imported, nothing loaded
    anon = _Peak(("RssAnon",))
    steps_sampler: list[_Peak] = []
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    spec = FederationSpec.build(model, 16, 32.0, targets)
    start = initial_state(spec, "bench", work / "round-0")
    clients = [write_random_update(work / f"u{i}.safetensors", spec, i) for i in range(2)]
    aggregate_adapters([str(c) for c in clients], work / "g1", rank=16, settings=spec.settings)
    residual = work / "g1" / "residual.safetensors"
    steps_at: list[float] = []
    config = TrainConfig(steps=steps, batch_size=batch, seq_len=seq_len, lr=2e-4,
                         device=device, compute_dtype=OPTIONS[dtype][0],
                         quantize=OPTIONS[dtype][1], eval_batches=1)
    started = time.perf_counter()
    during_steps: list[float] = []

    def progress(step: int, loss: float) -> None:
        steps_at.append(time.perf_counter())
        if step == 1:  # from here on: the training steps' working set, load behind us
            steps_sampler.append(_Peak(("RssAnon", "RssFile")))
        if step == steps:  # and up to here: evaluation is another pass (bitsandbytes' CPU
            during_steps.append(steps_sampler[0].stop())  # kernels repack weights for it)
    result = train_round(model, start, residual, Dataset.load(SHARD), config, work / "client",
                         progress=progress)
    wall = time.perf_counter() - started
    rate = (len(steps_at) - 1) / (steps_at[-1] - steps_at[0]) if len(steps_at) > 1 else None
    gpu = (torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else None
    return {"dtype": dtype, "peak_rss_mb": during_steps[0], "peak_anon_mb": anon.stop(),
            "peak_total_mb": _proc_status_mb("VmHWM"), "baseline_rss_mb": baseline,
            "gpu_peak_mb": gpu, "steps_per_s": rate, "round_s": wall,
            "train_loss": result.train_loss}


def _proc_status_mb(field: str) -> float:
    """A field of /proc/self/status in MiB. VmHWM (peak RSS) is this process's own: unlike
    ru_maxrss it does not carry the parent's peak across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _Peak:
    """The peak of the sum of /proc/self/status ``fields``, sampled every 10 ms.

    Why not simply VmHWM: a float32 model is used in place from the weight file safetensors
    memory-maps (its pages are RssFile, needed for every step), while a bf16 model is a copy made
    from those pages at load, after which they are no longer mapped (the kernel drops them when it
    needs the room). So the load's peak counts the float32 file in both cases; what a node must
    keep for training is the working set during the steps: anonymous plus still-mapped file
    pages, sampled from the first step's end on."""

    def __init__(self, fields: tuple[str, ...]) -> None:
        import threading

        self.fields = fields
        self.peak = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _now(self) -> float:
        return sum(_proc_status_mb(f) for f in self.fields)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._now())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._now())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=22, help="22: TinyLlama-1.1B's depth")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--options", default="float32,bfloat16",
                        help=f"comma-separated, from {', '.join(OPTIONS)} (default: float32,"
                             "bfloat16; the first is the ratio's reference)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from chorus_p2p.tiny import quiet_transformers

    quiet_transformers()
    if args.child:
        print(json.dumps(one_round(args.child[0], args.child[1], args.device, args.steps,
                                   args.batch, args.seq_len, Path(args.work))))
        return 0
    print(f"train_memory: {platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}, device {args.device}; batch {args.batch} x {args.seq_len} "
          f"tokens, {args.steps} steps, rank 16 on q,k,v,o, a non-zero R folded in")
    with tempfile.TemporaryDirectory(prefix="chorus-trainmem-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        params = build_model(root / "model", args.layers, args.hidden, args.intermediate)
        print(f"  model: {params / 1e9:.2f}B parameters ({args.layers} layers, hidden "
              f"{args.hidden}), built in {time.perf_counter() - started:.0f}s")
        results = {}
        for dtype in args.options.split(","):
            work = root / f"work-{dtype}"
            work.mkdir()
            done = subprocess.run([sys.executable, __file__, "--child", str(root / "model"),
                                   dtype, "--work", str(work), "--device", args.device,
                                   "--steps", str(args.steps), "--batch", str(args.batch),
                                   "--seq-len", str(args.seq_len)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            results[dtype] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {'option':<9} {'training':>10} {'(libs)':>8} {'anon':>9} {'load peak':>10} "
          f"{'GPU peak':>10} {'steps/s':>8} {'round':>6}  loss")
    for dtype, r in results.items():
        gpu = "-" if r["gpu_peak_mb"] is None else f"{r['gpu_peak_mb']:.0f} MB"
        rate = "-" if r["steps_per_s"] is None else f"{r['steps_per_s']:.3f}"
        print(f"  {dtype:<9} {r['peak_rss_mb']:>7.0f} MB {r['baseline_rss_mb']:>5.0f} MB "
              f"{r['peak_anon_mb']:>6.0f} MB {r['peak_total_mb']:>7.0f} MB {gpu:>10} {rate:>8} "
              f"{r['round_s']:>4.0f} s  {r['train_loss']:.3f}")
    print("  (training: peak working set during the steps, anonymous + mapped weight pages; "
          "anon: peak anonymous memory of the round; load peak: VmHWM, counting the float32 "
          "weight file mapped while a bf16 copy is made)")
    gpu = args.device.startswith("cuda")
    key = "gpu_peak_mb" if gpu else "peak_rss_mb"
    reference = next(iter(results))
    for option in list(results)[1:]:
        ratio = results[option][key] / results[reference][key]
        target = (f"   target <= 0.6x: {'met' if ratio <= 0.6 else 'NOT met'}"
                  if (reference, option) == ("float32", "bfloat16") else "")
        print(f"  {option} / {reference} peak ({'GPU' if gpu else 'training working set'}): "
              f"{ratio:.3f}x{target}")
    # What the model costs beyond the libraries (torch and transformers themselves do not grow
    # with the model): the planning table scales only that part.
    per_param = {d: (r[key] - (0 if gpu else r["baseline_rss_mb"])) * 2**20 / params
                 for d, r in results.items()}
    print("  planning (measured bytes per parameter beyond the libraries x parameters; same "
          "batch and sequence; " + ("GPU memory" if gpu else "host working set") + "):")
    print(f"  {'model':<10} " + " ".join(f"{d:>10}" for d in per_param))
    for billions in (1.1, 3.2, 8.0):
        print(f"  {billions:>4.1f}B      " + " ".join(
            f"{per_param[d] * billions * 1e9 / 2**30:>7.1f} GB" for d in per_param))
    return 0


if __name__ == "__main__":
    sys.exit(main())
