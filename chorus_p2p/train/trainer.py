"""One round of local LoRA training, from the federation's global state.

The model a client trains is exactly the global model: the base weights with the cumulative
residual ``R`` folded into the targeted weights (float32), plus the global adapter, loaded
trainable through PEFT. That is what makes the federation's mean exact: every client starts from
``W0 + R_t + s B_t A_t``, and the aggregate of their adapters plus the new residual reproduces
the mean of their merged weights.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from chorus_p2p.errors import AdapterError
from chorus_p2p.lora.fold import OriginalWeights, ResidualInput, fold_into_model
from chorus_p2p.train.data import Dataset, token_blocks
from chorus_p2p.train.dp_sgd import DPSGDRelease

log = logging.getLogger("chorus_p2p.train")


@dataclass
class TrainConfig:
    steps: int = 30
    lr: float = 1e-3
    batch_size: int = 8
    seq_len: int | None = None  # tokens per sequence; None: the model's (see sequence_length)
    seed: int = 0
    eval_batches: int = 8
    device: str = "auto"  # "auto": CUDA if available, then Apple MPS, else CPU
    # The frozen base's compute copy: "auto" is bfloat16 on a CUDA device that supports it,
    # float32 elsewhere. The adapter always trains (and is saved) in float32.
    compute_dtype: str = "auto"
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step
    gradient_checkpointing: bool = False  # recompute activations: less memory, ~30% slower
    # "4bit" (QLoRA's NF4) or "8bit": the frozen base quantized by bitsandbytes (W0 + R,
    # quantized once); None keeps it in compute_dtype.
    quantize: str | None = None
    # Record-level DP-SGD (dp_sgd.py): each record's gradient clipped to this L2 norm, noise
    # N(0, (dp_sgd_noise * clip)^2) on every step, Poisson-sampled batches. None: plain SGD.
    dp_sgd_clip: float | None = None
    dp_sgd_noise: float = 1.0


COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        try:
            return COMPUTE_DTYPES[name]
        except KeyError:
            raise ValueError(f"compute dtype {name!r}: one of auto, "
                             f"{', '.join(COMPUTE_DTYPES)}") from None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


MAX_DEFAULT_SEQ_LEN = 1024  # a default, not a limit: give --max-seq-len for longer


def sequence_length(given: int | None, model_config) -> int:
    """Tokens per training sequence: the one given, else the model's own. A model built by
    ``make-tiny-model`` says 64 (``chorus_seq_len`` in its config); a real one gets its
    context length (``max_position_embeddings``) capped at 1024. A fixed 64 was a silent
    quality trap for a real LLM."""
    if given:
        return int(given)
    own = getattr(model_config, "chorus_seq_len", None)
    if own:
        return int(own)
    context = (getattr(model_config, "max_position_embeddings", None)
               or getattr(model_config, "n_positions", None) or MAX_DEFAULT_SEQ_LEN)
    return int(min(context, MAX_DEFAULT_SEQ_LEN))


@dataclass
class TrainResult:
    examples: int
    train_loss: float
    eval_loss: float
    seconds: float
    adapter_dir: Path
    dp_release: "DPSGDRelease | None" = None  # what a DP-SGD round spent (privacy.py prices it)


def resolve_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# One model load at a time in a process. transformers' from_pretrained (no_tie_weights,
# no_init_weights) and accelerate's init_empty_weights replace class attributes for the load
# and put back what they found: two loads in two threads (a node's training and its
# evaluation, or three in-process nodes) interleave, and the second puts back the first's
# stand-in, leaving tie_weights and the init functions disabled for the rest of the process
# (a later model with tied embeddings came out untied). Loading is short beside training.
MODEL_LOADING = threading.Lock()


def load_base(model_path: str | Path, residual: ResidualInput | None = None,
              device: str = "cpu", task_type: str = "CAUSAL_LM",
              compute_dtype: torch.dtype = torch.float32, quantize: str | None = None):
    """Base model with ``R`` folded in, on ``device``.

    ``residual`` is a residual or state file, or a node's state reader (one module at a time).
    The fold happens on the CPU in float32, module by module, before the move, so the result is
    the same bits on every device. In float32 that is the exact ``W0 + R``; in a lower
    ``compute_dtype`` (training only) the model loads in that dtype (one copy of the model in
    memory) and each targeted weight becomes ``W0 + R`` (formed in float32 from the stored
    ``W0``) rounded once. With ``quantize`` ("4bit"/"8bit", training only) bitsandbytes loads
    the model quantized straight onto ``device``, and each targeted weight is replaced by
    ``W0 + R`` quantized once.
    """
    from chorus_p2p.exactness import auto_class

    target = resolve_device(device)
    if quantize is None:
        with MODEL_LOADING:
            model = auto_class(task_type).from_pretrained(model_path, dtype=compute_dtype)
    else:
        from chorus_p2p.train.quantize import quantization_config

        with MODEL_LOADING:
            model = auto_class(task_type).from_pretrained(
                model_path, dtype=compute_dtype, device_map={"": str(target)},
                quantization_config=quantization_config(quantize, compute_dtype))
        if quantize == "4bit" and target.type == "cpu":
            from chorus_p2p.train.quantize import check_cpu_widths

            check_cpu_widths(model)
    tokenizer = _tokenizer(model_path)
    if residual is not None:
        original = None
        if compute_dtype != torch.float32 or quantize is not None:
            original = _original_weights(model_path)
        fold_into_model(model, residual, original)
    return (model if quantize is not None else model.to(target)), tokenizer


def _original_weights(model_path: str | Path) -> OriginalWeights | None:
    """The stored float32 ``W0`` when we can read it (safetensors); else None, and the fold adds
    ``R`` to the weights as loaded (a .bin-only model still trains, rounded twice, not once)."""
    folder = _local_folder(model_path)
    if folder is None:
        return None
    try:
        return OriginalWeights(folder)
    except AdapterError as exc:
        log.info("folding into the loaded weights: %s", exc)
        return None


def _local_folder(model_path: str | Path) -> Path | None:
    """Where the model's weight files are: the folder itself, or its hub cache snapshot."""
    if Path(model_path).is_dir():
        return Path(model_path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model_path), local_files_only=True))
    except Exception:  # not cached as safetensors: fold_into_model warns and uses the copy
        return None


def _tokenizer(model_path: str | Path):
    """The model's tokenizer, or None for a folder that has none (a classifier built from a
    config for tests): merging and exporting need no tokenizer, training does."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError):
        return None


def load_global_model(model_path: str | Path, adapter_dir: str | Path,
                      residual: ResidualInput | None = None, trainable: bool = False,
                      device: str = "cpu", task_type: str = "CAUSAL_LM",
                      compute_dtype: torch.dtype = torch.float32, quantize: str | None = None):
    """``W0 + R + adapter`` as a PEFT model (trainable for a client, frozen for evaluation).

    The adapter is float32 whatever the base's compute dtype (PEFT's autocast of adapters)."""
    from peft import PeftModel

    model, tokenizer = load_base(model_path, residual, device, task_type, compute_dtype,
                                 quantize)
    if quantize is not None and trainable:
        from chorus_p2p.train.quantize import prepare_for_training

        model = prepare_for_training(model)
    with MODEL_LOADING:  # PEFT builds its layers under accelerate's init_empty_weights
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable,
                                               autocast_adapter_dtype=True)
    return peft_model, tokenizer


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int = 8, max_batches: int = 8) -> float:
    """Mean next-token loss over (up to ``max_batches``) held-out blocks."""
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for start in range(0, min(len(blocks), batch_size * max_batches), batch_size):
        batch = blocks[start:start + batch_size].to(device)
        losses.append(float(model(input_ids=batch, labels=batch).loss))
    return sum(losses) / len(losses)


def train_round(model_path: str | Path, adapter_dir: str | Path, residual: ResidualInput | None,
                dataset: Dataset, config: TrainConfig, out_dir: str | Path,
                progress: Callable[[int, float], None] | None = None,
                before_release: Callable[[DPSGDRelease], None] | None = None) -> TrainResult:
    """Train the global model's adapter on ``dataset`` and save the client adapter to ``out_dir``.

    Runs in the caller's thread: nodes call it through ``asyncio.to_thread``. Under DP-SGD
    (``config.dp_sgd_clip``), ``before_release`` sees what the round will spend before its first
    step, and may refuse it by raising (the privacy budget).
    """
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    dtype = resolve_compute_dtype(config.compute_dtype, resolve_device(config.device))
    model, tokenizer = load_global_model(model_path, adapter_dir, residual, trainable=True,
                                         device=config.device, compute_dtype=dtype,
                                         quantize=config.quantize)
    if config.gradient_checkpointing:
        inner = model.base_model.model
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.2x
            inner.activation_checkpointing_enable({"use_reentrant": False})
        else:
            inner.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        inner.enable_input_require_grads()
    seq_len = sequence_length(config.seq_len, model.config)
    eval_blocks = token_blocks(tokenizer, dataset.eval, seq_len)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    model.train()
    release = None
    if config.dp_sgd_clip is not None:
        recent, release = _dp_sgd_steps(model, tokenizer, dataset, config, seq_len, optimizer,
                                        progress, before_release)
    else:
        recent = _steps(model, token_blocks(tokenizer, dataset.train, seq_len), config,
                        optimizer, progress)
    finite = [loss for loss in recent if math.isfinite(loss)]
    train_loss = sum(finite[-5:]) / len(finite[-5:]) if finite else math.nan
    eval_loss = evaluate(model, eval_blocks, config.batch_size, config.eval_batches)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    return TrainResult(len(dataset.train), train_loss, eval_loss, time.perf_counter() - started,
                       out_dir, release)


def _steps(model, train_blocks: torch.Tensor, config: TrainConfig, optimizer,
           progress: Callable[[int, float], None] | None) -> list[float]:
    """Plain training: batches of ``batch_size`` blocks drawn with replacement."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(config.seed)
    recent: list[float] = []
    for step in range(config.steps):
        step_loss = 0.0
        for _ in range(config.grad_accum):
            batch = train_blocks[torch.randint(0, len(train_blocks), (config.batch_size,),
                                               generator=gen)].to(device)
            loss = model(input_ids=batch, labels=batch).loss / config.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(step_loss)
        if progress is not None:
            progress(step + 1, recent[-1])
    return recent


def _dp_sgd_steps(model, tokenizer, dataset: Dataset, config: TrainConfig, seq_len: int,
                  optimizer, progress: Callable[[int, float], None] | None,
                  before_release: Callable[[DPSGDRelease], None] | None
                  ) -> tuple[list[float], DPSGDRelease]:
    """Record-level DP-SGD steps (dp_sgd.py): one text per example, Poisson batches, clipped
    per-record gradients plus CSPRNG noise. Step losses stay on this node."""
    from chorus_p2p.train.dp_sgd import PrivateGradients, plan_release, poisson_batch, \
        record_examples
    from chorus_p2p.train.privacy import secure_normal

    device = next(model.parameters()).device
    ids, mask = record_examples(tokenizer, dataset.train, seq_len)
    release = plan_release(len(ids), config.batch_size, config.steps, config.dp_sgd_noise,
                           config.dp_sgd_clip)
    if before_release is not None:
        before_release(release)
    recent: list[float] = []
    with PrivateGradients(model, release, len(ids), secure_normal) as private:
        for step in range(config.steps):
            chosen = poisson_batch(len(ids), release.sampling_rate)
            recent.append(private.backward(ids[chosen].to(device), mask[chosen].to(device)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if progress is not None:
                progress(step + 1, recent[-1])
    return recent, release


def eval_global(model_path: str | Path, adapter_dir: str | Path,
                residual: ResidualInput | None, datasets: list[Dataset],
                config: TrainConfig) -> dict[str, float]:
    """Held-out loss of the global model on each dataset (the demo's per-shard figure)."""
    model, tokenizer = load_global_model(model_path, adapter_dir, residual,
                                         device=config.device)
    seq_len = sequence_length(config.seq_len, model.config)
    return {d.name: evaluate(model, token_blocks(tokenizer, d.eval, seq_len),
                             config.batch_size, config.eval_batches) for d in datasets}
