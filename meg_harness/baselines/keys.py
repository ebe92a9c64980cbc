"""Representations at the subject's last token: a module's input (keys) or output (current values)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from meg_harness.baselines.plan import EditPlan, Row, pad_id
from meg_harness.models.layer_cache import right_pad_ids
from meg_harness.models.nethook import Trace, model_device


@torch.no_grad()
def gather(
    model: nn.Module,
    tokenizer,
    rows: Sequence[Row],
    module: str,
    *,
    side: str = "input",
    batch_size: int = 32,
) -> torch.Tensor:
    """``[len(rows), d]`` float32: ``module``'s input (``side="input"``) or output at each row's index."""
    device = model_device(model)
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask = right_pad_ids([r.ids for r in chunk], pad_id(tokenizer), device)
        with Trace(
            model, module, retain_input=side == "input", retain_output=side == "output", stop=True
        ) as trace:
            model(input_ids=ids, attention_mask=mask)
        states = trace.input if side == "input" else trace.output
        where = torch.tensor([r.index for r in chunk], device=states.device)
        out.append(states[torch.arange(len(chunk), device=states.device), where].float())
    return torch.cat(out)


def edit_keys(
    model: nn.Module, tokenizer, plans: Sequence[EditPlan], module: str, batch_size: int = 32
) -> torch.Tensor:
    """``[n_edits, d_in]``: ``module``'s input at the subject's last token, averaged as MEMIT's compute_ks:
    first over the contexts of each type (the bare prompt; the generated prefixes), then over the types,
    so that the bare prompt weighs as much as all prefixes together."""
    rows = [row for plan in plans for row in plan.contexts]
    flat = gather(model, tokenizer, rows, module, side="input", batch_size=batch_size)
    per_edit = flat.reshape(len(plans), len(plans[0].contexts), -1)  # [n_edits, contexts, d_in]
    type_means = [group.mean(1) for group in per_edit.split(list(plans[0].context_types), dim=1)]
    return torch.stack(type_means, 1).mean(1)  # [n_edits, d_in]


def edit_outputs(
    model: nn.Module, tokenizer, plans: Sequence[EditPlan], module: str, batch_size: int = 32
) -> torch.Tensor:
    """``[n_edits, d]``: ``module``'s output at the subject's last token of each bare prompt."""
    rows = [plan.contexts[0] for plan in plans]
    return gather(model, tokenizer, rows, module, side="output", batch_size=batch_size)
