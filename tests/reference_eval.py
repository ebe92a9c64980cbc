"""An independent, deliberately slow implementation of TF and AG (one sequence, one token at a time).

Used only by tests, to check the batched evaluator. It shares nothing with meg_harness.evaluate
except the answer-cut characters of the protocol (newline, backslash).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def reference_tf(model, query_ids: list[int], target_ids: list[int]) -> float:
    """Fraction of target tokens predicted by argmax, one forward per target-token prefix."""
    hits = 0
    for j, token in enumerate(target_ids):
        ids = torch.tensor([query_ids + target_ids[:j]])
        hits += int(model(input_ids=ids).logits[0, -1].argmax().item() == token)
    return hits / len(target_ids)


@torch.no_grad()
def reference_generate(model, tokenizer, query_ids: list[int], max_new_tokens: int = 20) -> str:
    """Greedy decoding without cache or padding, stopping at EOS or once the text has a cut."""
    ids = list(query_ids)
    generated: list[int] = []
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for _ in range(max_new_tokens):
        token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item())
        if token in eos:
            break
        generated.append(token)
        ids.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if "\n" in text or "\\" in text:
            break
    return tokenizer.decode(generated, skip_special_tokens=True)


@torch.no_grad()
def reference_greedy_tokens(model, query_ids: list[int], n: int) -> list[int]:
    """The first ``n`` greedy tokens, no stopping rule."""
    ids = list(query_ids)
    for _ in range(n):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()))
    return ids[len(query_ids) :]
