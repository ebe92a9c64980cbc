"""FT (paper A.12): fine-tune the FFN of the MeG layer on all edits at once, everything else frozen.

Each edit is one example: the templated prompt followed by ``" " + target_new`` (+ the template's answer
terminator with ``terminator: true``); the loss is the mean NLL of
the target tokens (per example, averaged over the batch). Examples are shuffled each epoch with a seeded
generator. The frozen layers below the lowest trained layer run once per example (their output is
cached); every step runs the model from that layer upward. ``norm_constraint`` (optional, ROME's FT-L)
clamps every weight to within that distance of its original value after each step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from meg_harness.baselines.delta import DeltaEdited, WeightDelta, load_delta_artifact, save_delta_artifact
from meg_harness.baselines.locate import resolve_layers
from meg_harness.baselines.params import LAYERS, from_mapping
from meg_harness.baselines.plan import pad_id
from meg_harness.data.edit_case import EditCase
from meg_harness.editing.base import Edited, Editor
from meg_harness.editing.registry import register_method
from meg_harness.errors import HarnessError
from meg_harness.models.adapters import get_adapter
from meg_harness.models.layer_cache import LayerCachedLM, right_pad, right_pad_ids, target_index
from meg_harness.models.loading import model_fingerprint
from meg_harness.models.nethook import frozen, model_device
from meg_harness.prompts import QueryTemplate, encode_answer, encode_query
from meg_harness.settings import NON_NEGATIVE, POSITIVE, Rule, Settings, one_of

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass(frozen=True)
class FTHParams(Settings):
    """Defaults: paper A.12 for GPT-J (layer 9, SGD lr 0.3, 80 epochs, batch 32)."""

    layers: tuple[int, ...] = (9,)
    params: str = "ffn"  # "ffn": every weight and bias of the layer's FFN; "ffn_out": its output projection
    optimizer: str = "sgd"
    lr: float = 0.3
    epochs: int = 80
    batch_size: int = 32
    weight_decay: float = 0.0
    norm_constraint: float | None = None
    terminator: bool = False  # train on target + the template's answer terminator (as MeG, MALMEN)
    seed: int = 0

    CHECKS: ClassVar[Mapping[str, Rule]] = {
        "layers": LAYERS,
        "params": one_of("ffn", "ffn_out"),
        "optimizer": one_of(*OPTIMIZERS),
        "lr": POSITIVE,
        "epochs": POSITIVE,
        "batch_size": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "norm_constraint": NON_NEGATIVE,
    }

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}


def _examples(
    tokenizer, cases: Sequence[EditCase], template: QueryTemplate, terminator: bool
) -> list[tuple[tuple, int]]:
    """(query + answer ids, query length) per case; the answer ends in the template's terminator when
    ``terminator``."""
    out = []
    for case in cases:
        query = tuple(encode_query(tokenizer, template, case.prompt))
        answer = encode_answer(tokenizer, template, case.target_new, terminator=terminator, where=case.source)
        out.append((query + answer, len(query)))
    return out


def target_nll(model: nn.Module, tokenizer, examples: Sequence[tuple[tuple, int]]) -> torch.Tensor:
    """Mean NLL of the target tokens of each example ``[n]`` (differentiable)."""
    device = model_device(model)
    ids, mask = right_pad_ids([e[0] for e in examples], pad_id(tokenizer), device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    losses = []
    for row, (seq, q) in enumerate(examples):
        logp = torch.log_softmax(logits[row, q - 1 : len(seq) - 1].float(), -1)
        target = torch.tensor(seq[q:], device=device)
        losses.append(-logp.gather(1, target[:, None]).mean())
    return torch.stack(losses)


def _target_index(examples: Sequence[tuple[tuple, int]], device) -> tuple[torch.Tensor, ...]:
    """(row, position, token id) of every target token of the examples (the row is the example)."""
    return target_index([q - 1 for _, q in examples], [seq[q:] for seq, q in examples], device)


def _layer_cache_agrees(lm: LayerCachedLM, tokenizer, examples: Sequence[tuple[tuple, int]]) -> bool:
    ids, mask = right_pad_ids([seq for seq, _ in examples], pad_id(tokenizer), model_device(lm.model))
    rows, positions, _ = _target_index(examples, ids.device)
    return lm.agrees_with_full_forward(ids, mask, rows, positions)


def cached_target_nll(
    lm: LayerCachedLM, states: Sequence[torch.Tensor], examples: Sequence[tuple[tuple, int]]
) -> torch.Tensor:
    """:func:`target_nll` from the cached states entering the lowest trained layer (the layers below are
    frozen and their output never changes); the LM head is applied at the target positions only."""
    hidden, mask = right_pad(list(states))
    rows, positions, targets = _target_index(examples, hidden.device)
    logp = torch.log_softmax(lm.logits(hidden, mask, rows, positions).float(), -1)
    token_nll = -logp.gather(1, targets[:, None]).squeeze(1)
    total = torch.zeros(len(examples), device=hidden.device).index_add(0, rows, token_nll)
    count = torch.zeros(len(examples), device=hidden.device).index_add(0, rows, torch.ones_like(token_nll))
    return total / count


@register_method
class FT(Editor):
    name = "ft"
    progress: bool = True

    def __init__(self, hparams: dict[str, Any] | None = None) -> None:
        super().__init__(hparams)
        self.hp = from_mapping(FTHParams, self.hparams, self.name)
        self._fingerprint: str | None = None

    def preflight(self, model: nn.Module) -> None:
        resolve_layers(get_adapter(model), model, self.hp.layers)

    def trained_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        adapter = get_adapter(model)
        names = {}
        for layer in resolve_layers(adapter, model, self.hp.layers):
            prefix = adapter.rewrite_module_tmp if self.hp.params == "ffn_out" else adapter.mlp_module_tmp
            module = prefix.format(layer)
            for name, param in model.get_submodule(module).named_parameters():
                names[f"{module}.{name}"] = param
        return names

    def fit(
        self, model: nn.Module, tokenizer, cases: Sequence[EditCase], template: QueryTemplate
    ) -> DeltaEdited:
        if not cases:
            raise HarnessError("no edit cases given", field="cases")
        self._fingerprint = model_fingerprint(model)
        examples = _examples(tokenizer, cases, template, self.hp.terminator)
        params = self.trained_parameters(model)
        originals = {k: p.detach().clone() for k, p in params.items()}
        # fp32 master weights: the optimiser steps these, never half-precision tensors (Adam's eps underflows
        # in float16, small steps vanish in bfloat16); the model's parameters get their cast after each step
        masters = {k: p.detach().float().clone().requires_grad_(True) for k, p in params.items()}
        bounds = {k: o.float() for k, o in originals.items()}
        generator = torch.Generator().manual_seed(self.hp.seed)
        losses = []
        lm = LayerCachedLM(model, min(resolve_layers(get_adapter(model), model, self.hp.layers)))
        states = (
            lm.layer_inputs_per_row([seq for seq, _ in examples], pad_id(tokenizer), self.hp.batch_size)
            if _layer_cache_agrees(lm, tokenizer, examples[: self.hp.batch_size])
            else None
        )
        with frozen(model):
            for p in params.values():
                p.requires_grad_(True)
            opt = OPTIMIZERS[self.hp.optimizer](
                list(masters.values()), lr=self.hp.lr, weight_decay=self.hp.weight_decay
            )
            try:
                for _ in tqdm(
                    range(self.hp.epochs), desc="FT epochs", disable=not self.progress, leave=False
                ):
                    order = torch.randperm(len(examples), generator=generator).tolist()
                    total = 0.0
                    for start in range(0, len(order), self.hp.batch_size):
                        batch = order[start : start + self.hp.batch_size]
                        opt.zero_grad()
                        chosen = [examples[i] for i in batch]
                        if states is None:
                            loss = target_nll(model, tokenizer, chosen).mean()
                        else:
                            loss = cached_target_nll(lm, [states[i] for i in batch], chosen).mean()
                        loss.backward()
                        for k, p in params.items():
                            masters[k].grad, p.grad = None if p.grad is None else p.grad.float(), None
                        opt.step()
                        total += float(loss.detach()) * len(batch)
                        self._constrain(masters, bounds)
                        with torch.no_grad():
                            for k, p in params.items():
                                p.copy_(masters[k])
                    losses.append(total / len(examples))
            finally:
                trained = {k: m.detach().clone() for k, m in masters.items()}
                with torch.no_grad():
                    for k, p in params.items():
                        p.copy_(originals[k])
        delta = WeightDelta()
        for name, new in trained.items():
            delta.add(model, name, new - bounds[name])
        return DeltaEdited(model, tokenizer, delta, {"n_edits": len(cases), "epoch_losses": losses})

    def _constrain(self, params: dict[str, torch.Tensor], originals: dict[str, torch.Tensor]) -> None:
        eps = self.hp.norm_constraint
        if eps is None:
            return
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(torch.clamp(p, originals[k] - eps, originals[k] + eps))

    def save(self, edited: Edited, directory: Path) -> None:
        if not isinstance(edited, DeltaEdited):
            raise HarnessError("ft can only save what its fit returned")
        save_delta_artifact(edited, directory, self.name, self._fingerprint)

    @classmethod
    def load(cls, directory: Path, model: nn.Module, tokenizer) -> DeltaEdited:
        return load_delta_artifact(directory, model, tokenizer)
