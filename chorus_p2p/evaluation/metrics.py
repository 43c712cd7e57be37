"""Task metrics: accuracy and macro-F1 by label log-likelihood, exact match by greedy decoding.

Written here rather than taken from a library: ``evaluate`` fetches its metric scripts from the
hub at run time (offline it fails), and scikit-learn would add scipy and ~100 MB to compute two
formulas that fit in a screen and are tested against hand-computed values
(``tests/test_evaluation.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def accuracy(predicted: Sequence[str], gold: Sequence[str]) -> float:
    if not gold:
        return math.nan
    return sum(p == g for p, g in zip(predicted, gold)) / len(gold)


def macro_f1(predicted: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> float:
    """The mean over ``labels`` of each label's F1 (a label never predicted nor present counts
    0, as scikit-learn's ``zero_division=0``)."""
    scores = []
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(predicted, gold))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else math.nan


@torch.no_grad()
def choice_logprobs(model, tokenizer, prompts: Sequence[str], choices: Sequence[str],
                    batch_size: int = 64) -> torch.Tensor:
    """``[len(prompts), len(choices)]``: log p(" " + choice | prompt), summed over the choice's
    tokens (teacher forcing, right padding, one forward per batch of pairs)."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs = []
    for prompt in prompts:
        head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for choice in choices:
            tail = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            pairs.append((head, tail))
    scores = torch.empty(len(pairs), dtype=torch.float64)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        width = max(len(h) + len(t) for h, t in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        for row, (head, tail) in enumerate(chunk):
            ids[row, :len(head) + len(tail)] = torch.tensor(head + tail)
        logits = model(input_ids=ids.to(device)).logits.float().log_softmax(-1).cpu()
        for row, (head, tail) in enumerate(chunk):
            positions = torch.arange(len(head) - 1, len(head) + len(tail) - 1)
            scores[start + row] = float(logits[row, positions, torch.tensor(tail)].sum())
    return scores.view(len(prompts), len(choices))


def classify(model, tokenizer, prompts: Sequence[str], choices: Sequence[str]) -> list[str]:
    best = choice_logprobs(model, tokenizer, prompts, choices).argmax(dim=1)
    return [choices[int(i)] for i in best]


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 6
                   ) -> list[str]:
    """Each prompt's greedy continuation up to the first EOS (or newline), stripped. One
    prompt at a time: no padding to get wrong, and the tasks are small."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        generated: list[int] = []
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + generated], device=device)).logits
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
        out.append(tokenizer.decode(generated).split("\n")[0].strip())
    return out


def exact_match(predicted: Sequence[str], gold: Sequence[str]) -> float:
    return accuracy([p.strip() for p in predicted], [g.strip() for g in gold])
