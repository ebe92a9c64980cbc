"""MEMIT's context prefixes: short model-generated texts put before the prompt so that keys and values
generalise over contexts (MEMIT's ``get_context_templates``: ``generate_fast`` from the starts "The",
"Therefore", "Because", "I", "You", top-k 5 sampling, ``max_out_len=10`` tokens in all, braces replaced by
spaces, ``". "`` appended). Sampled with a seeded generator (deterministic, no global RNG use) and cached
on disk by model, settings and seed, so that every method and run of one model uses the same prefixes."""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import torch
from torch import nn

from meg_harness.cache import atomic_write_text, content_hash, default_cache_dir
from meg_harness.models.nethook import model_device

STARTS = ("The", "Therefore", "Because", "I", "You")
CACHE_VERSION = "context-prefixes/v2"


@torch.no_grad()
def generate_prefixes(
    model: nn.Module, tokenizer, n: int, length: int = 10, seed: int = 0, top_k: int = 5
) -> list[str]:
    """``n`` prefixes of ``length`` tokens in all (the start word's tokens included, as MEMIT's
    ``max_out_len``; at least one sampled token), each ending in ``". "``; braces become spaces."""
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    prefixes = []
    for i in range(n):
        ids = list(tokenizer(STARTS[i % len(STARTS)])["input_ids"])
        for _ in range(max(1, length - len(ids))):
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
            top = torch.topk(logits, min(top_k, logits.numel()))
            choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
            ids.append(int(top.indices[choice]))
        text = unicodedata.normalize("NFKD", tokenizer.decode(ids, skip_special_tokens=True))
        # MEMIT replaces "\n\n" by a space; all whitespace is folded here so that a prefix never breaks
        # the template's lines
        text = " ".join(text.replace("{", " ").replace("}", " ").split())
        prefixes.append(text + ". ")
    return prefixes


def cached_prefixes(
    model: nn.Module,
    tokenizer,
    n: int,
    length: int,
    seed: int,
    *,
    fingerprint: str,
    cache_dir: str | os.PathLike | None = None,
) -> list[str]:
    """:func:`generate_prefixes`, read from ``<cache>/context_prefixes/`` when made before."""
    if n == 0:
        return []
    key = content_hash(CACHE_VERSION, fingerprint, n, length, seed)
    path = Path(cache_dir or default_cache_dir()) / "context_prefixes" / f"{key[:32]}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    prefixes = generate_prefixes(model, tokenizer, n, length, seed)
    atomic_write_text(path, json.dumps(prefixes, ensure_ascii=False, indent=1))
    return prefixes
