"""MEMIT's context prefixes: short model-generated texts put before the prompt so that keys and values
generalise over contexts. Sampled top-k with a seeded generator (deterministic, no global RNG use)."""

from __future__ import annotations

import torch
from torch import nn

from meg_harness.baselines.nethook import model_device

STARTS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_prefixes(
    model: nn.Module, tokenizer, n: int, length: int = 10, seed: int = 0, top_k: int = 5
) -> list[str]:
    """``n`` prefixes of ``length`` sampled tokens, each ending in ``". "``; braces become spaces."""
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    prefixes = []
    for i in range(n):
        ids = list(tokenizer(STARTS[i % len(STARTS)])["input_ids"])
        for _ in range(length):
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
            top = torch.topk(logits, min(top_k, logits.numel()))
            choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
            ids.append(int(top.indices[choice]))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        text = " ".join(text.replace("{", " ").replace("}", " ").split())
        prefixes.append(text + ". ")
    return prefixes
