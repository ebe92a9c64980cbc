"""MeG's weight generators (paper 4.1 c.2, A.3; Table 7): a DiT over 1-D weight vectors, and an MLP.

Both map ``(noisy weight vector x_t [B, D], timestep t [B], condition c [B, C])`` to the model output of the
same shape (a velocity, under v-prediction). The condition is the text encoder's [CLS] embedding of the
query.

The DiT follows Peebles & Xie (2023) with the paper's changes: the raw (normalised) weight vector,
zero-padded to a multiple of ``patch_size`` (100), is cut into non-overlapping patches, one token each;
fixed 1-D sin-cos position embeddings; conditioning on ``timestep embedding + projected [CLS]``
through adaLN-Zero.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from meg_harness.errors import HarnessError
from meg_harness.settings import POSITIVE, Rule, Settings, one_of, settings_from_mapping

GENERATOR_KINDS = ("dit", "mlp")

# Named sizes: DiT-B is the paper's (A.3: "the default DiT-B/2 configuration"); the smaller ones are for CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "DiT-B": {"kind": "dit", "hidden": 768, "depth": 12, "heads": 12},
    "DiT-S": {"kind": "dit", "hidden": 384, "depth": 12, "heads": 6},
    "DiT-T": {"kind": "dit", "hidden": 256, "depth": 6, "heads": 4},
    "DiT-CPU": {"kind": "dit", "hidden": 128, "depth": 4, "heads": 4},
    "MLP": {"kind": "mlp", "hidden": 2048, "depth": 3},
}


@dataclass(frozen=True)
class GeneratorConfig(Settings):
    """Shape of a weight generator. ``vector_dim``: neuron vector length (2H, +1 with an FFN bias);
    ``cond_dim``: the encoder's embedding width. ``depth`` counts DiT blocks, or MLP residual blocks."""

    vector_dim: int
    cond_dim: int
    kind: str = "dit"
    patch_size: int = 100
    hidden: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0

    CHECKS: ClassVar[Mapping[str, Rule]] = {
        "vector_dim": POSITIVE,
        "cond_dim": POSITIVE,
        "kind": one_of(*GENERATOR_KINDS),
        "patch_size": POSITIVE,
        "hidden": POSITIVE,
        "depth": POSITIVE,
        "heads": POSITIVE,
        "mlp_ratio": POSITIVE,
    }

    def check(self) -> None:
        if self.kind == "dit" and self.hidden % self.heads:
            raise HarnessError(f"hidden {self.hidden} is not divisible by heads {self.heads}", field="heads")

    @property
    def num_patches(self) -> int:
        return math.ceil(self.vector_dim / self.patch_size)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], **dims: int) -> GeneratorConfig:
        """From a hparams mapping; ``preset`` (a :data:`PRESETS` name) fills defaults that keys override."""
        values = dict(mapping)
        preset = values.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise HarnessError(
                    f"unknown generator preset {preset!r}; known: {sorted(PRESETS)}",
                    field="generator.preset",
                )
            values = {**PRESETS[preset], **values}
        fixed = set(dims) & set(values)
        if fixed:
            raise HarnessError(
                f"{sorted(fixed)} come from the model and encoder, not hparams", field="generator"
            )
        return settings_from_mapping(cls, {**values, **dims}, "generator setting", "generator.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embeddings ``[B, dim]`` of (possibly fractional) timesteps ``t [B]`` (as in DiT / ADM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(embedding, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency embedding of ``t`` followed by a two-layer MLP."""

    def __init__(self, hidden: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # t: (B,) -> (B, frequency_dim) sinusoids -> (B, D)
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """Self-attention and MLP, each wrapped in adaLN-Zero (shift, scale, gate from the condition)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, N, D) patch tokens, c: (B, D) condition; shifts, scales and gates: (B, D) each
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_a, scale_a)  # (B, N, D)
        x = x + gate_a.unsqueeze(1) * self.attn(h, h, h, need_weights=False)[0]  # (B, N, D)
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))  # (B, N, D)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from each token back to its patch."""

    def __init__(self, hidden: int, patch_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, N, D) patch tokens, c: (B, D) condition
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, P)


def sincos_positions(n: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sin-cos position embeddings ``[n, dim]``."""
    return timestep_embedding(torch.arange(n, dtype=torch.float32), dim)


class WeightDiT(nn.Module):
    """Diffusion transformer over one weight vector; adaLN-Zero conditioning on timestep + encoder [CLS]."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        hidden, p = config.hidden, config.patch_size
        self.patch_embed = nn.Linear(p, hidden)
        self.register_buffer("pos_embed", sincos_positions(config.num_patches, hidden), persistent=False)
        self.t_embedder = TimestepEmbedder(hidden)
        self.c_embedder = nn.Sequential(
            nn.Linear(config.cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.blocks = nn.ModuleList(
            DiTBlock(hidden, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(hidden, p)
        self._initialize()

    def _initialize(self) -> None:
        """DiT's init: Xavier linears, zeroed adaLN and output layers (blocks start as identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x: (B, V) noisy weight vectors (V = vector_dim), t: (B,) timesteps, cond: (B, C) [CLS] embeddings;
        # D = hidden
        batch, dim = x.shape
        p, n = self.config.patch_size, self.config.num_patches  # P values per patch, N = ceil(V / P) patches
        tokens = nn.functional.pad(x, (0, n * p - dim)).reshape(batch, n, p)  # (B, N, P) zero-padded patches
        h = self.patch_embed(tokens) + self.pos_embed.to(tokens.dtype)  # (B, N, D)
        c = self.t_embedder(t) + self.c_embedder(cond.to(h.dtype))  # (B, D)
        for block in self.blocks:
            h = block(h, c)  # (B, N, D)
        return self.final_layer(h, c).reshape(batch, n * p)[:, :dim]  # (B, N, P) -> (B, V)


class MLPGenerator(nn.Module):
    """Table 7's MLP variant: ``[x_t, embed(t), embed(c)]`` through residual MLP blocks to the output."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden
        self.t_embedder = TimestepEmbedder(hidden)
        self.c_embedder = nn.Linear(config.cond_dim, hidden)
        self.input = nn.Linear(config.vector_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
            )
            for _ in range(config.depth)
        )
        self.output = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, config.vector_dim))
        nn.init.zeros_(self.output[-1].weight)
        nn.init.zeros_(self.output[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x: (B, V) noisy weight vectors, t: (B,) timesteps, cond: (B, C) [CLS] embeddings; D = hidden
        h = self.input(x) + self.t_embedder(t) + self.c_embedder(cond.to(x.dtype))  # (B, D)
        for block in self.blocks:
            h = h + block(h)  # (B, D)
        return self.output(h)  # (B, V)


def build_generator(config: GeneratorConfig, seed: int = 0) -> nn.Module:
    """The generator for ``config``, its weights initialised from ``seed`` (the global RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WeightDiT(config) if config.kind == "dit" else MLPGenerator(config)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
