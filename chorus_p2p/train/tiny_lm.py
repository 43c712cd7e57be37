"""Build a tiny Llama-style language model and its tokenizer offline, as a normal HF folder.

    chorus-node make-tiny-model --out ./tiny-llama            # uses examples/data/*.jsonl

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on the given text; the
model is a small ``LlamaForCausalLM`` built from a config and briefly pretrained on the same
text, so that federated LoRA fine-tuning starts from a model that knows some English, like a real
base model would. ``--model ./tiny-llama`` then works exactly like a Hugging Face model id.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from chorus_p2p.train.data import load_texts, token_blocks

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(texts: Sequence[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def build_tiny_lm(out: str | Path, data: Sequence[str | Path], *, vocab_size: int = 512,
                  hidden: int = 96, layers: int = 2, pretrain_steps: int = 150, seed: int = 0,
                  log: Callable[[str], None] = print,
                  progress: Callable[[int, int], None] | None = None,
                  vocabulary_only: Sequence[str] = ()) -> Path:
    """``data`` trains the tokenizer and pretrains the model; ``vocabulary_only`` texts only
    shape the tokenizer (an evaluation task's words become tokens, but the base never sees the
    task itself: what LoRA learns is then the federation's doing, not pretraining's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    texts = [t for path in data for t in load_texts(path)]
    tokenizer = train_tokenizer([*texts, *vocabulary_only], vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id,
                         chorus_seq_len=64)  # what it trains on (trainer.sequence_length)
    model = LlamaForCausalLM(config).to(torch.float32)
    if pretrain_steps:
        started = time.perf_counter()
        blocks = token_blocks(tokenizer, texts, 64)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for step in range(pretrain_steps):
            batch = blocks[torch.randint(0, len(blocks), (16,), generator=gen)]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if progress is not None:
                progress(step + 1, pretrain_steps)
        model.eval()
        log(f"pretrained {pretrain_steps} steps in {time.perf_counter() - started:.1f}s, "
            f"loss {loss.item():.3f} (uniform: {math.log(len(tokenizer)):.3f})")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
