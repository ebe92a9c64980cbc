"""The diffusion process of MeG's weight generator (paper eq. 7-8; 6.3 / Table 8), on diffusers' schedulers.

Training: ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` and the target velocity ``v = sqrt(a_t) eps -
sqrt(1 - a_t) x_0`` come from :class:`diffusers.DDPMScheduler` (``add_noise``, ``get_velocity``) with
``prediction_type="v_prediction"``; sampling uses :class:`diffusers.DDIMScheduler` built from the same config
(deterministic, ``eta = 0``) with a configurable number of steps. ``x_0`` is the per-dimension normalised
neuron vector (:class:`WeightNormalizer`), so no clipping (``clip_sample=False``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from meg_harness.errors import HarnessError
from meg_harness.settings import POSITIVE, Rule, Settings, one_of, settings_from_mapping

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class DiffusionConfig(Settings):
    """Noise schedule (DiT's defaults: 1000 steps, linear betas 1e-4..0.02) and DDIM sampling steps (the paper
    samples with 50, 6.3)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    ddim_steps: int = 50

    CHECKS: ClassVar[Mapping[str, Rule]] = {
        "num_train_timesteps": POSITIVE,
        "beta_schedule": one_of(*BETA_SCHEDULES),
        "beta_start": POSITIVE,
        "beta_end": POSITIVE,
        "ddim_steps": POSITIVE,
    }

    def check(self) -> None:
        if self.beta_start >= self.beta_end:
            raise HarnessError(f"beta_start must be below beta_end ({self.beta_end})", field="beta_start")
        if not 1 <= self.ddim_steps <= self.num_train_timesteps:
            raise HarnessError(
                f"ddim_steps must be in [1, {self.num_train_timesteps}], got {self.ddim_steps}",
                field="ddim_steps",
            )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> DiffusionConfig:
        return settings_from_mapping(cls, mapping, "diffusion setting", "diffusion.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def scheduler_kwargs(self) -> dict[str, Any]:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": "v_prediction",
            "clip_sample": False,
        }

    def train_scheduler(self):
        """The forward (noising) process: a v-prediction :class:`diffusers.DDPMScheduler`."""
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self.scheduler_kwargs())

    def sampler(self, steps: int | None = None):
        """A v-prediction :class:`diffusers.DDIMScheduler` set to ``steps`` (default ``ddim_steps``) steps."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler(
            **self.scheduler_kwargs(), set_alpha_to_one=True, timestep_spacing="trailing"
        )
        scheduler.set_timesteps(steps or self.ddim_steps)
        return scheduler


class WeightNormalizer(nn.Module):
    """Per-dimension standardisation of neuron vectors (mean and std over the training set).

    Dimensions with (near-)zero spread get std 1, so constant entries (e.g. an all-zero bias) stay finite.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @classmethod
    def fit(cls, vectors: torch.Tensor, min_std: float = 1e-6) -> WeightNormalizer:
        normalizer = cls(vectors.shape[1])
        vectors = vectors.double()
        std = vectors.std(dim=0, unbiased=False) if len(vectors) > 1 else torch.ones(vectors.shape[1])
        normalizer.mean.copy_(vectors.mean(dim=0).float())
        normalizer.std.copy_(torch.where(std > min_std, std, torch.ones_like(std)).float())
        return normalizer

    def normalize(self, vectors: torch.Tensor) -> torch.Tensor:
        return (vectors - self.mean.to(vectors)) / self.std.to(vectors)

    def denormalize(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors * self.std.to(vectors) + self.mean.to(vectors)


def v_prediction_loss(
    model: nn.Module,
    x0: torch.Tensor,
    cond: torch.Tensor,
    scheduler,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Eq. 8: ``E ||v_theta(x_t, t, c) - v_t||^2`` for a batch of normalised vectors ``x0 [B, D]``, with
    uniformly drawn timesteps and Gaussian noise from ``generator`` (drawn on the CPU for determinism)."""
    n_steps = scheduler.config.num_train_timesteps
    t = torch.randint(0, n_steps, (len(x0),), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    x_t = scheduler.add_noise(x0, noise, t)
    target = scheduler.get_velocity(x0, noise, t)
    return nn.functional.mse_loss(model(x_t, t, cond).float(), target.float())


@torch.no_grad()
def ddim_sample(
    model: nn.Module,
    cond: torch.Tensor,
    dim: int,
    config: DiffusionConfig,
    *,
    steps: int | None = None,
    seed: int = 0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate normalised vectors ``[B, dim]`` for conditions ``cond [B, C]`` by DDIM (eta 0) from the start
    ``noise`` (default: Gaussian noise drawn with ``seed`` on the CPU, so CPU and GPU start alike)."""
    scheduler = config.sampler(steps)
    parameter = next(model.parameters())
    if noise is None:
        noise = torch.randn((len(cond), dim), generator=torch.Generator().manual_seed(seed))
    sample = noise.to(parameter.device, parameter.dtype)
    cond = cond.to(parameter.device, parameter.dtype)
    for t in scheduler.timesteps:
        timestep = torch.full((len(cond),), int(t), device=parameter.device, dtype=torch.long)
        velocity = model(sample, timestep, cond)
        sample = scheduler.step(velocity, t, sample).prev_sample
    return sample.float()
