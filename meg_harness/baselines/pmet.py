"""PMET (Li et al., AAAI 2024): the attention and FFN outputs of the last edited layer are optimised jointly
(one delta each), and only the FFN's is used: each edited layer's FFN output projection is updated with
MEMIT's solve toward the FFN target, the residual spread as ``R / sqrt(L - i)``. The attention weights are
not changed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from meg_harness.baselines.keys import edit_outputs
from meg_harness.baselines.locate import LocateThenEdit, c0_or_identity
from meg_harness.baselines.memit import memit_update
from meg_harness.baselines.params import LocateHParams
from meg_harness.baselines.stats import SecondMoment
from meg_harness.editing.registry import register_method


@dataclass(frozen=True)
class PMETHParams(LocateHParams):
    """PMET's defaults (its GPT-J file): more steps, smaller lr, KL weight 1, lambda 6000."""

    v_num_grad_steps: int = 30
    v_lr: float = 0.2
    kl_factor: float = 1.0
    mom2_update_weight: float = 6000.0
    nll_loss_factor: float = 1.0


@register_method
class PMET(LocateThenEdit):
    name = "pmet"
    hparams_class = PMETHParams

    def value_sites(self, adapter, z_layer: int) -> list[str]:
        return [adapter.mlp_module_tmp.format(z_layer), adapter.attn_module_tmp.format(z_layer)]

    def value_options(self) -> dict:
        return {"nll_factor": self.hp.nll_loss_factor, "relax_on_argmax": True}

    def residual(self, model, tokenizer, adapter, plans, values, z_layer, i, n_layers) -> torch.Tensor:
        site = adapter.mlp_module_tmp.format(z_layer)
        current = edit_outputs(model, tokenizer, plans, site, self.hp.key_batch_size)
        return (values.targets[site].to(current.device) - current) / math.sqrt(n_layers - i)

    def solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor, stats: SecondMoment | None):
        c0 = c0_or_identity(stats, keys.shape[0], keys.device)
        return memit_update(keys, resid, c0, self.hp.mom2_update_weight)
