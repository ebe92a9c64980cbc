"""MEMIT (Meng et al., 2023): ``delta W = R K^T (lambda C0 + K K^T)^-1`` at each edited layer, the residual
spread evenly over the remaining layers (``R / (L - i)``)."""

from __future__ import annotations

import torch

from meg_harness.baselines.locate import LocateThenEdit, c0_or_identity
from meg_harness.baselines.stats import SecondMoment
from meg_harness.editing.registry import register_method


def memit_update(keys: torch.Tensor, resid: torch.Tensor, c0: torch.Tensor, weight: float) -> torch.Tensor:
    """The ``delta W [d_out, d_in]`` solving ``delta W (weight C0 + K K^T) = R K^T`` (float64).

    ``keys``: ``K [d_in, n]``; ``resid``: ``R [d_out, n]``; ``c0``: ``[d_in, d_in]``.
    """
    keys, resid = keys.double(), resid.double()
    a = weight * c0.double() + keys @ keys.T
    return torch.linalg.solve(a, keys @ resid.T).T  # a is symmetric: (R K^T a^-1)^T = a^-1 K R^T


@register_method
class MEMIT(LocateThenEdit):
    name = "memit"

    def solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor, stats: SecondMoment | None):
        c0 = c0_or_identity(stats, keys.shape[0], keys.device)
        return memit_update(keys, resid, c0, self.hp.mom2_update_weight)
