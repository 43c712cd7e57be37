"""Record-level DP-SGD for one round of LoRA training: per-record clipping and Gaussian noise on
every step, with Poisson sampling, so that one record of a node's data is what is protected.

Local DP (``privacy.privatize``) protects a node's *whole dataset* with one noised release per
round; with a handful of clients that noise drowns the signal (README's table). DP-SGD protects
less, one record, and pays far less for it: each step's gradient is a sum of per-record
gradients, each clipped to L2 norm ``clip``, plus ``N(0, (noise * clip)^2)``, and each record
joins a step's batch with probability ``q`` (Poisson sampling), which amplifies the privacy.
The accountant (``privacy.epsilon_of_releases``) composes ``steps`` Poisson-subsampled Gaussian
mechanisms per round with Google's ``dp-accounting`` RDP accountant, the same analysis as
Opacus's.

*A record* is one text of the training data (one JSONL record, CSV row or file line), trained as
one example: truncated to the sequence length, padded, never split or packed with others, so no
record reaches more than one example. Per-record gradients come from Opacus's ``GradSampleModule``
(hooks on the LoRA ``Linear``/``Conv`` layers: one backward pass per step); clipping, the noise
(the OS's CSPRNG, as for local DP: the noise is the privacy) and the sampling are ours. A LoRA
layer Opacus cannot see (an ``Embedding``'s ``lora_embedding_A``) is refused, never trained
unclipped.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from chorus_p2p.errors import UsageError
from chorus_p2p.federation.dp_policy import DP_SGD

log = logging.getLogger("chorus_p2p.train")


@dataclass(frozen=True)
class DPSGDRelease:
    """What one round of DP-SGD spends: ``steps`` Poisson-sampled Gaussian mechanisms at sampling
    rate ``sampling_rate``, noise multiplier ``noise``, per-record clip ``clip``."""

    noise: float
    clip: float
    sampling_rate: float
    steps: int

    def to_json(self) -> dict[str, Any]:
        return {"mechanism": DP_SGD, "noise": self.noise, "clip": self.clip,
                "sampling_rate": self.sampling_rate, "steps": self.steps}


def plan_release(records: int, batch_size: int, steps: int, noise: float, clip: float
                 ) -> DPSGDRelease:
    """The release a round will make on ``records`` records: each joins a step's batch with
    probability ``batch_size / records`` (capped at 1), so a batch holds ``batch_size`` records
    on average."""
    if records < 1:
        raise UsageError("DP-SGD needs at least one training record")
    return DPSGDRelease(noise, clip, min(1.0, batch_size / records), steps)


def require_opacus() -> None:
    """Fail at start-up, not at the first round, when the ``dp-sgd`` extra is missing."""
    try:
        import opacus  # noqa: F401
    except ImportError as exc:
        raise UsageError("--dp-mechanism dp-sgd computes per-record gradients with Opacus: "
                         "pip install 'chorus-p2p[dp-sgd]'") from exc


def check_targets(kinds: dict[str, str]) -> None:
    """Refuse, before any training, LoRA targets whose per-record gradients Opacus cannot see
    (``kinds``: a federation spec's module kinds; an Embedding's LoRA factors are parameters of
    no hooked layer)."""
    embeddings = sorted(prefix for prefix, kind in kinds.items() if kind == "embedding")
    if embeddings:
        raise UsageError(f"--dp-mechanism dp-sgd cannot clip per record the LoRA of the "
                         f"embedding {embeddings[0]}"
                         f"{f' (and {len(embeddings) - 1} more)' if len(embeddings) > 1 else ''}"
                         ": leave it out of target_modules, or use --dp-mechanism gaussian-local")


def record_examples(tokenizer, texts: list[str], seq_len: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One example per text: token ids ``[N, L]`` and a mask of the real tokens, ``L`` the
    longest text up to ``seq_len``. Texts are truncated (a record never spans two examples, or
    it would be protected only as a group) and texts of fewer than 2 tokens, which predict
    nothing, are dropped."""
    full = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    encoded = [ids[:seq_len] for ids in full if len(ids) >= 2]
    if not encoded:
        raise UsageError("DP-SGD: no training text has two tokens or more")
    truncated = sum(len(ids) > seq_len for ids in full)
    if truncated:
        log.info("DP-SGD: %d of %d texts cut at %d tokens (one record, one example)",
                 truncated, len(texts), seq_len)
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id or 0)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return ids, mask


def secure_uniform(count: int) -> torch.Tensor:
    """``count`` uniforms in [0, 1) from the OS's CSPRNG: who is in a batch is part of the
    mechanism, so it must not be guessable either."""
    if count == 0:
        return torch.zeros(0, dtype=torch.float64)
    words = torch.frombuffer(bytearray(os.urandom(8 * count)), dtype=torch.int64)
    return (words & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)


def poisson_batch(records: int, rate: float) -> torch.Tensor:
    """Indices of the records in this step's batch: each independently with probability
    ``rate`` (the batch size varies, and may be 0: the accountant assumes exactly this)."""
    return torch.nonzero(secure_uniform(records) < rate).flatten()


def per_record_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each record's mean next-token loss over its own real tokens, ``[B]``."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none",
        ignore_index=-100).view(ids.size(0), -1)
    return losses.sum(1) / mask[:, 1:].sum(1).clamp(min=1)


def _wide(device: torch.device) -> torch.dtype:
    """Clipping and noise in float64 (MPS has none: float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


class PrivateGradients:
    """Opacus's per-record gradient hooks on a PEFT model, and the clipped, noised step.

    Used as a context manager: the hooks come off on exit, so the model saves and evaluates as
    a plain PEFT model."""

    def __init__(self, model, release: DPSGDRelease, records: int,
                 noise: Callable[[torch.Size], torch.Tensor]):
        from opacus.grad_sample import GradSampleModule

        self.model, self.release, self.noise = model, release, noise
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # The noise is scaled to the expected batch, not the drawn one (whose size is private).
        self.expected_batch = release.sampling_rate * records
        try:  # strict: a trainable layer with buffers (batch norm) would mix records
            self.wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum",
                                            strict=True)
        except NotImplementedError as exc:
            raise UsageError(f"DP-SGD cannot train this model's trainable layers: {exc}") \
                from exc

    def __enter__(self) -> "PrivateGradients":
        return self

    def __exit__(self, *exc) -> None:
        self.wrapped._close()
        for _, p in self.params:
            p.grad_sample = None

    def backward(self, ids: torch.Tensor, mask: torch.Tensor) -> float:
        """Set every trainable parameter's ``.grad`` to the private gradient of this batch;
        returns the batch's mean loss (kept on the node, never sent)."""
        clipped = {n: torch.zeros_like(p, dtype=_wide(p.device)) for n, p in self.params}
        loss_value = math.nan
        if len(ids):
            losses = per_record_loss(self.wrapped, ids, mask)
            losses.sum().backward()
            loss_value = float(losses.detach().mean())
            samples = {}
            for name, p in self.params:
                sample = getattr(p, "grad_sample", None)
                if sample is None:
                    raise UsageError(f"DP-SGD cannot compute per-record gradients of {name} "
                                     "(Opacus supports LoRA on Linear and Conv layers, not on "
                                     "Embedding): leave that module out of target_modules, or "
                                     "use --dp-mechanism gaussian-local")
                samples[name] = sample.to(_wide(p.device)).reshape(len(ids), -1)
                p.grad_sample, p.grad = None, None
            norms = torch.sqrt(sum((s * s).sum(1) for s in samples.values()))
            if not bool(torch.isfinite(norms).all()):
                from chorus_p2p.train.privacy import NonFiniteUpdate

                raise NonFiniteUpdate("a per-record gradient holds NaN or Inf; it cannot be "
                                      "clipped, so this round is not released")
            factors = (self.release.clip / (norms + 1e-12)).clamp(max=1.0)
            for name, p in self.params:
                clipped[name] = (factors @ samples[name]).reshape(p.shape)
        sigma = self.release.noise * self.release.clip
        for name, p in self.params:
            noise = self.noise(p.shape).to(device=p.device, dtype=clipped[name].dtype)
            private = (clipped[name] + noise * sigma) / self.expected_batch
            p.grad = private.to(p.dtype)
        return loss_value
