"""MALMEN's hypernetwork (Tan et al., ICLR 2024) and its least-squares aggregation of value shifts.

For each token of an edit (the positions whose outputs predict the answer), the edited linear layer sees a
key ``k`` (its input) and a value gradient ``g`` (d loss / d its output). A MEND-style shift network maps
the normalised ``[k, g]`` through ``n_blocks`` low-rank residual MLP blocks (each with a per-layer scale and
shift) to a pseudo key ``k~`` and pseudo gradient ``g~``; the token's value shift is
``d = -lr_l (k . k~) g~`` with a learnable step ``lr_l`` per layer. All shifts ``D [N, d_out]`` of all edits
are aggregated into ONE update per layer, the ridge solution

    delta W = argmin ||K delta W - D||^2 + e^lambda_l ||delta W||^2 = (K^T K + e^lambda_l I)^-1 K^T D,

``delta W [d_in, d_out]`` in key-major orientation (``y = x W`` as GPT-2's Conv1D stores it; an
``nn.Linear`` weight receives ``delta W^T``). Layers with the same ``(d_in, d_out)`` share one network
and are told apart by an embedding index (as in the reference code).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class RunningNorm(nn.Module):
    """Per-dimension running mean and standard deviation (float64 sums, Chan et al.'s parallel update)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(size, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x [n, size]`` to the statistics."""
        x = x.detach().to(self.mean.device, torch.float64)
        n = float(x.shape[0])
        if n == 0:
            return
        total = self.count + n
        batch_mean = x.mean(0)
        delta = batch_mean - self.mean
        self.m2 += ((x - batch_mean) ** 2).sum(0) + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.count.copy_(total)

    @property
    def empty(self) -> bool:
        return float(self.count) == 0.0

    def std(self) -> torch.Tensor:
        return (self.m2 / torch.clamp(self.count - 1, min=1.0)).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(torch.float32).eps
        return (x - self.mean.float()) / (self.std().float() + eps)


class ShiftBlock(nn.Module):
    """``y + scale_l * relu(y A B + b) + shift_l``: a low-rank residual MLP block (``B = 0`` at init, so
    the block starts as the identity)."""

    def __init__(self, size: int, rank: int, n_layers: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(size, rank))
        self.B = nn.Parameter(torch.zeros(rank, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Embedding(n_layers, size)
        self.shift = nn.Embedding(n_layers, size)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        x = torch.relu(y @ self.A @ self.B + self.bias)
        return y + self.scale(index) * x + self.shift(index)


class ShiftNet(nn.Module):
    """The shift network of all edited layers of one shape ``(d_in, d_out)``."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_blocks: int, n_layers: int, lr: float) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.norm = RunningNorm(d_in + d_out)
        self.blocks = nn.ModuleList(ShiftBlock(d_in + d_out, rank, n_layers) for _ in range(n_blocks))
        self.lr = nn.Embedding(n_layers, 1)
        self.log_lambda = nn.Embedding(n_layers, 1)
        nn.init.constant_(self.lr.weight, lr)
        nn.init.zeros_(self.log_lambda.weight)

    def pseudo(
        self, keys: torch.Tensor, grads: torch.Tensor, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo keys ``[n, d_in]`` and pseudo value gradients ``[n, d_out]`` (in normalised space)."""
        idx = torch.tensor([index], device=keys.device)
        h = self.norm(torch.cat([keys, grads], -1))
        for block in self.blocks:
            h = block(h, idx)
        return h[:, : self.d_in], h[:, self.d_in :]

    def shifts(self, keys: torch.Tensor, grads: torch.Tensor, index: int) -> torch.Tensor:
        """Value shifts ``D = -lr_l (k . k~) g~`` ``[n, d_out]``."""
        pk, pg = self.pseudo(keys, grads, index)
        return -self.lr.weight[index] * (keys * pk).sum(-1, keepdim=True) * pg


class MalmenHypernet(nn.Module):
    """One :class:`ShiftNet` per distinct edited shape; ``slot(i)`` = (net, layer index) of layer ``i``."""

    def __init__(self, shapes: Sequence[tuple[int, int]], rank: int, n_blocks: int, lr: float) -> None:
        super().__init__()
        counts: dict[str, int] = {}
        self._slots: list[tuple[str, int]] = []
        for d_in, d_out in shapes:
            key = f"{d_in}x{d_out}"
            self._slots.append((key, counts.get(key, 0)))
            counts[key] = counts.get(key, 0) + 1
        self.shapes = [tuple(s) for s in shapes]
        self.nets = nn.ModuleDict(
            {k: ShiftNet(*map(int, k.split("x")), rank, n_blocks, n, lr) for k, n in counts.items()}
        )

    def __len__(self) -> int:
        return len(self._slots)

    def slot(self, i: int) -> tuple[ShiftNet, int]:
        key, index = self._slots[i]
        return self.nets[key], index

    def log_lambda(self, i: int) -> torch.Tensor:
        net, index = self.slot(i)
        return net.log_lambda.weight[index, 0]

    def step_size(self, i: int) -> torch.Tensor:
        net, index = self.slot(i)
        return net.lr.weight[index, 0]

    def update_norm(self, i: int, keys: torch.Tensor, grads: torch.Tensor) -> None:
        net, _ = self.slot(i)
        net.norm.update(torch.cat([keys, grads], -1))

    def shifts(self, i: int, keys: torch.Tensor, grads: torch.Tensor, chunk: int) -> torch.Tensor:
        """Value shifts of layer ``i`` for all rows, computed ``chunk`` rows at a time (float32)."""
        net, index = self.slot(i)
        device = next(net.parameters()).device
        parts = [
            net.shifts(keys[s : s + chunk].to(device), grads[s : s + chunk].to(device), index)
            for s in range(0, keys.shape[0], chunk)
        ]
        return torch.cat(parts) if parts else keys.new_zeros((0, net.d_out))


def ridge_update(
    keys: torch.Tensor, shifts: torch.Tensor, log_lambda: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(K^T K + e^lambda I)^-1 K^T D`` ``[d_in, d_out]`` (float32 result; differentiable in ``shifts`` and
    ``log_lambda``).

    Solved in ``dtype`` in the primal form (``d_in x d_in``) when there are at least ``d_in`` rows, else in
    the equivalent dual form ``K^T (K K^T + e^lambda I)^-1 D`` (``N x N``).
    """
    k = keys.to(dtype)
    d = shifts.to(dtype)
    c = log_lambda.to(dtype).exp()
    n, d_in = k.shape
    if n >= d_in:
        a = k.T @ k + c * torch.eye(d_in, dtype=dtype, device=k.device)
        out = torch.linalg.solve(a, k.T @ d)
    else:
        b = k @ k.T + c * torch.eye(n, dtype=dtype, device=k.device)
        out = k.T @ torch.linalg.solve(b, d)
    return out.float()
