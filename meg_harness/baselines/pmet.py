"""PMET (Li et al., AAAI 2024): the attention and FFN outputs of the last edited layer are optimised jointly
(one delta each), and only the FFN's is used: each edited layer's FFN output projection is updated with
MEMIT's solve toward the FFN target, the residual spread as ``R / sqrt(L - i)``. The attention weights are
not changed.

``ffn_target`` picks the FFN target. ``delta`` (PMET's): the FFN output before the edit plus the FFN delta.
PMET's models (GPT-J, GPT-NeoX) have parallel blocks, where the attention delta does not reach the FFN; in
a sequential block (Llama, SmolLM2) it shifts the FFN input, and ``observed`` takes the FFN output the
optimisation actually saw (same as ``delta`` in a parallel block). ``block`` adds the attention delta to
that, so the FFN alone reproduces the whole block's optimised output.

``residual_at`` picks where each edited layer's residual is measured. ``ffn`` (PMET's): at the last layer's
FFN output, spread as ``R / sqrt(L - i)``. ``layer``: at the last layer's output (the residual stream), whose
target is its output before the edit plus the FFN target's change, spread as MEMIT's ``R / (L - i)``; the
lower layers' updates move it directly, where PMET's FFN output moves only through the FFN's input."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from meg_harness.baselines.keys import edit_outputs
from meg_harness.baselines.locate import LocateThenEdit, c0_or_identity
from meg_harness.baselines.memit import memit_update
from meg_harness.baselines.params import LocateHParams
from meg_harness.baselines.stats import SecondMoment
from meg_harness.baselines.values import ValueResult
from meg_harness.editing.registry import register_method
from meg_harness.settings import NON_NEGATIVE, Rule, one_of

FFN_TARGETS = ("delta", "observed", "block")
RESIDUAL_SITES = ("ffn", "layer")


@dataclass(frozen=True)
class PMETHParams(LocateHParams):
    """PMET's defaults (its GPT-J file): more steps, smaller lr, KL weight 1, lambda 6000."""

    v_num_grad_steps: int = 30
    v_lr: float = 0.2
    kl_factor: float = 1.0
    mom2_update_weight: float = 6000.0
    nll_loss_factor: float = 1.0
    ffn_target: str = "delta"  # delta | observed | block (module docstring)
    residual_at: str = "ffn"  # ffn | layer (module docstring)

    CHECKS: ClassVar[Mapping[str, Rule]] = {
        **LocateHParams.CHECKS,
        "nll_loss_factor": NON_NEGATIVE,
        "ffn_target": one_of(*FFN_TARGETS),
        "residual_at": one_of(*RESIDUAL_SITES),
    }


@register_method
class PMET(LocateThenEdit):
    name = "pmet"
    hparams_class = PMETHParams

    def value_sites(self, adapter, z_layer: int) -> list[str]:
        return [adapter.mlp_module_tmp.format(z_layer), adapter.attn_module_tmp.format(z_layer)]

    def value_options(self) -> dict:
        options = {"nll_factor": self.hp.nll_loss_factor, "relax_on_argmax": True}
        if self.hp.ffn_target != "delta":
            options["record_observed"] = True
        return options

    def residual(self, model, tokenizer, adapter, plans, values, z_layer, i, n_layers) -> torch.Tensor:
        site = adapter.mlp_module_tmp.format(z_layer)
        target = ffn_target(values, site, adapter.attn_module_tmp.format(z_layer), self.hp.ffn_target)
        if self.hp.residual_at == "ffn":
            current = edit_outputs(model, tokenizer, plans, site, self.hp.key_batch_size)
            return (target.to(current.device) - current) / math.sqrt(n_layers - i)
        layer = adapter.layer_module_tmp.format(z_layer)
        layer_now = edit_outputs(model, tokenizer, plans, layer, self.hp.key_batch_size)
        if i == 0:  # nothing is updated yet: the FFN output is its value before the edit
            ffn_before = edit_outputs(model, tokenizer, plans, site, self.hp.key_batch_size)
            self._layer_target = layer_now + (target.to(ffn_before.device) - ffn_before)
        return (self._layer_target - layer_now) / (n_layers - i)

    def solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor, stats: SecondMoment | None):
        c0 = c0_or_identity(stats, keys.shape[0], keys.device)
        return memit_update(keys, resid, c0, self.hp.mom2_update_weight)


def ffn_target(values: ValueResult, ffn: str, attn: str, kind: str) -> torch.Tensor:
    """The FFN output the update aims at (``kind``: see the module docstring)."""
    if kind == "delta":
        return values.targets[ffn]
    if kind == "observed":
        return values.observed[ffn]
    return values.observed[ffn] + values.targets[attn] - values.init[attn]
