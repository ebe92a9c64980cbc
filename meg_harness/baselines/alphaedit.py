"""AlphaEdit (Fang et al., ICLR 2025), one batch: the update is projected onto the null space of the
preserved keys' second moment, ``delta W^T = (P K K^T + alpha I)^-1 P K R^T`` with ``P = U0 U0^T``
spanning the eigenvectors of ``C0 = E[k0 k0^T]`` whose eigenvalues are below ``nullspace_threshold``, and
``alpha`` = ``L2``. Then ``delta W = Y^T P`` for some ``Y``, so ``delta W k0 ~ 0`` for preserved keys.

A projector belongs to one model, layer and statistics: it is cached on the editor instance under those
(no process-wide state), and :class:`NullSpace` carries its own key.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from meg_harness.baselines.locate import LocateThenEdit
from meg_harness.baselines.params import LocateHParams
from meg_harness.baselines.stats import SecondMoment
from meg_harness.editing.registry import register_method
from meg_harness.errors import HarnessError
from meg_harness.settings import NON_NEGATIVE, POSITIVE, Rule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlphaEditHParams(LocateHParams):
    """AlphaEdit's defaults (its GPT-J file): MEMIT's values plus the threshold and the L2 weight."""

    nullspace_threshold: float = 2e-2
    L2: float = 10.0

    CHECKS: ClassVar[Mapping[str, Rule]] = {
        **LocateHParams.CHECKS,
        "nullspace_threshold": POSITIVE,
        "L2": NON_NEGATIVE,
    }


@dataclass(frozen=True)
class NullSpace:
    """``P [d, d]`` (float32) for one (model fingerprint, layer, statistics, threshold)."""

    key: tuple
    projector: torch.Tensor
    rank: int  # dimension of the null space kept


def null_space(c0: torch.Tensor, threshold: float, key: tuple = ()) -> NullSpace:
    """Projector onto the eigenvectors of the symmetric PSD ``c0`` with eigenvalue below ``threshold``."""
    eigenvalues, vectors = torch.linalg.eigh(c0.double())
    small = vectors[:, eigenvalues < threshold]
    return NullSpace(key, (small @ small.T).float(), int(small.shape[1]))


def alphaedit_update(
    keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor, l2: float
) -> torch.Tensor:
    """``delta W [d_out, d_in]`` with ``delta W^T = (P K K^T + l2 I)^-1 P K R^T`` (float64)."""
    keys, resid, p = keys.double(), resid.double(), projector.double().to(keys.device)
    eye = torch.eye(keys.shape[0], dtype=torch.float64, device=keys.device)
    return torch.linalg.solve(p @ keys @ keys.T + l2 * eye, p @ keys @ resid.T).T


@register_method
class AlphaEdit(LocateThenEdit):
    name = "alphaedit"
    hparams_class = AlphaEditHParams

    def __init__(self, hparams=None) -> None:
        super().__init__(hparams)
        if not self.hp.mom2_adjustment:
            raise HarnessError("AlphaEdit needs the statistics (mom2_adjustment: true)", field="hparams")
        self._projectors: dict[tuple, NullSpace] = {}

    def projector(self, layer: int, stats: SecondMoment) -> NullSpace:
        hp = self.hp
        key = (
            self._fingerprint,
            layer,
            hp.mom2_dataset,
            hp.mom2_n_samples,
            hp.mom2_max_length,
            hp.mom2_dtype,
        )
        key += (stats.count, hp.nullspace_threshold)
        if key not in self._projectors:
            # keep only the current model's projectors (each is d x d)
            self._projectors = {k: v for k, v in self._projectors.items() if k[0] == self._fingerprint}
            space = null_space(stats.moment(), hp.nullspace_threshold, key)
            log.info("AlphaEdit layer %d: null space of dimension %d", layer, space.rank)
            if space.rank == 0:
                log.warning(
                    "AlphaEdit layer %d: no eigenvalue of C0 below nullspace_threshold=%g: zero update",
                    layer,
                    hp.nullspace_threshold,
                )
            self._projectors[key] = space
        return self._projectors[key]

    def solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor, stats: SecondMoment | None):
        space = self.projector(layer, stats)
        return alphaedit_update(keys, resid, space.projector, self.hp.L2)
