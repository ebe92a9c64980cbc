"""MeG's dynamic neuron: one extra FFN unit per batch row, added by a forward hook (paper 4.1 d, eq. 12).

For batch row ``b`` the FFN of layer L outputs ``mlp(x) + act(x . k_b + bias_b) * v_b`` at every position,
where ``x`` is the FFN's input and ``act`` its activation (no gate for gated FFNs, as in the official code).
Rows without a neuron (routed away) are left untouched: bit-identical to the unhooked model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from meg_harness.editing.base import Edited
from meg_harness.errors import HarnessError
from meg_harness.models.adapters import ArchitectureAdapter, get_adapter
from meg_harness.models.nethook import Trace

NeuronTuple = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]  # (key [H], bias [] or None, value [H])


@dataclass
class NeuronBatch:
    """``B`` neurons: ``key [B, H]``, ``bias [B]`` (None when the FFN has no bias), ``value [B, H]``."""

    key: torch.Tensor
    bias: torch.Tensor | None
    value: torch.Tensor

    def __post_init__(self) -> None:
        if self.key.ndim != 2 or self.key.shape != self.value.shape:
            raise ValueError(
                f"key {tuple(self.key.shape)} and value {tuple(self.value.shape)} must be [B, H]"
            )
        if self.bias is not None and tuple(self.bias.shape) != (self.key.shape[0],):
            raise ValueError(f"bias {tuple(self.bias.shape)} must be [B] = [{self.key.shape[0]}]")

    def __len__(self) -> int:
        return int(self.key.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.key.shape[1])

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    def flatten(self) -> torch.Tensor:
        """``[B, 2H(+1)]`` in the order key, bias, value (Phi-2: 5121 values, GPT-J 8193, Llama-3 8192)."""
        parts = [self.key] + ([self.bias.unsqueeze(1)] if self.bias is not None else []) + [self.value]
        return torch.cat(parts, dim=1)

    @classmethod
    def unflatten(cls, vectors: torch.Tensor, hidden: int, has_bias: bool) -> NeuronBatch:
        """Inverse of :meth:`flatten` for ``vectors [B, 2*hidden(+1)]``."""
        width = 2 * hidden + int(has_bias)
        if vectors.ndim != 2 or vectors.shape[1] != width:
            raise ValueError(f"expected [B, {width}] neuron vectors, got {tuple(vectors.shape)}")
        key, value = vectors[:, :hidden], vectors[:, hidden + int(has_bias) :]
        return cls(key, vectors[:, hidden] if has_bias else None, value)

    @classmethod
    def zeros(
        cls,
        n: int,
        hidden: int,
        has_bias: bool,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> NeuronBatch:
        key = torch.zeros(n, hidden, dtype=dtype, device=device)
        bias = torch.zeros(n, dtype=dtype, device=device) if has_bias else None
        return cls(key, bias, key.clone())

    @classmethod
    def cat(cls, batches: Sequence[NeuronBatch]) -> NeuronBatch:
        """Concatenate along the batch dimension."""
        bias = None if batches[0].bias is None else torch.cat([b.bias for b in batches])  # type: ignore[misc]
        return cls(torch.cat([b.key for b in batches]), bias, torch.cat([b.value for b in batches]))

    @classmethod
    def stack(cls, neurons: Sequence[NeuronTuple]) -> NeuronBatch:
        """A batch from per-row ``(key, bias, value)`` tuples (bias None for bias-free FFNs)."""
        bias = None if neurons[0][1] is None else torch.stack([n[1] for n in neurons])  # type: ignore[misc]
        return cls(torch.stack([n[0] for n in neurons]), bias, torch.stack([n[2] for n in neurons]))

    def select(self, index: torch.Tensor | Sequence[int]) -> NeuronBatch:
        index = torch.as_tensor(index, dtype=torch.long, device=self.key.device)
        bias = None if self.bias is None else self.bias.index_select(0, index)
        return NeuronBatch(self.key.index_select(0, index), bias, self.value.index_select(0, index))

    def row(self, b: int) -> NeuronTuple:
        return self.key[b], None if self.bias is None else self.bias[b], self.value[b]

    def to(self, *args, **kwargs) -> NeuronBatch:
        bias = None if self.bias is None else self.bias.to(*args, **kwargs)
        return NeuronBatch(self.key.to(*args, **kwargs), bias, self.value.to(*args, **kwargs))

    def detach(self) -> NeuronBatch:
        bias = None if self.bias is None else self.bias.detach()
        return NeuronBatch(self.key.detach(), bias, self.value.detach())


def ffn_has_bias(model: nn.Module, layer: int, adapter: ArchitectureAdapter | None = None) -> bool:
    """Whether a neuron at ``layer`` has a bias (the FFN's input projection has one)."""
    adapter = adapter or get_adapter(model)
    return adapter.neuron_key_bias(model, layer) is not None


class DynamicNeuron:
    """Per-row neurons on the FFN of ``layer``: :meth:`attach` registers ONE forward hook for a batch.

    The FFN module is resolved once, here, so the hook stays valid while the decoder's layer list is
    temporarily truncated (layer-cached collection).
    """

    def __init__(self, model: nn.Module, layer: int, adapter: ArchitectureAdapter | None = None) -> None:
        self.adapter = adapter or get_adapter(model)
        self.layer = layer
        self.module = self.adapter.mlp(model, layer)
        self.act = self.adapter.activation(model, layer)
        self.hidden = self.adapter.hidden_size(model)
        self.has_bias = ffn_has_bias(model, layer, self.adapter)

    @property
    def module_device(self) -> torch.device:
        return next(self.module.parameters()).device

    def contribution(self, x: torch.Tensor, neurons: NeuronBatch) -> torch.Tensor:
        """``act(x_b . k_b + bias_b) * v_b`` for FFN inputs ``x [B, ..., H]``, in the neurons' dtype."""
        x = x.to(neurons.key.dtype)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, H]
        pre = torch.bmm(flat, neurons.key.unsqueeze(-1)).squeeze(-1)  # [B, T]
        if neurons.bias is not None:
            pre = pre + neurons.bias.unsqueeze(1)
        out = self.act(pre).unsqueeze(-1) * neurons.value.unsqueeze(1)  # [B, T, H]
        return out.reshape(x.shape[:-1] + (neurons.value.shape[-1],))

    def _check(self, neurons: NeuronBatch, active: torch.Tensor | None) -> None:
        if neurons.hidden != self.hidden or neurons.has_bias != self.has_bias:
            raise HarnessError(
                f"neurons of width {neurons.hidden} (bias: {neurons.has_bias}) do not fit layer {self.layer} "
                f"(hidden {self.hidden}, bias: {self.has_bias})",
                field="neurons",
            )
        if active is not None and tuple(active.shape) != (len(neurons),):
            raise HarnessError(f"active mask {tuple(active.shape)} must be [{len(neurons)}]", field="active")

    @contextlib.contextmanager
    def attach(self, neurons: NeuronBatch, active: torch.Tensor | None = None) -> Iterator[None]:
        """Add row ``b``'s neuron to row ``b`` of every forward through the FFN; rows with
        ``active[b] == False`` get nothing (they are skipped, not multiplied by zero)."""
        self._check(neurons, active)
        index: torch.Tensor | None = None
        if active is not None and not bool(active.all()):
            index = active.to(torch.bool).nonzero().squeeze(1).to(neurons.key.device)
            neurons = neurons.select(index)

        def add(_name: str, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            if index is not None and index.numel() == 0:
                return output
            expected = len(neurons) if index is None else len(active)  # type: ignore[arg-type]
            if x.shape[0] != expected:
                raise HarnessError(
                    f"batch of {x.shape[0]} rows but {expected} neurons attached", field="neurons"
                )
            if index is None:
                return output + self.contribution(x, neurons).to(output.dtype)
            rows = index.to(x.device)
            added = self.contribution(x.index_select(0, rows), neurons).to(output.dtype)
            return output.index_add(0, rows, added)

        trace = Trace(self.module, edit_output=add)
        try:
            yield
        finally:
            trace.close()


def _to(neuron: NeuronTuple, device: torch.device) -> NeuronTuple:
    key, bias, value = neuron
    return key.to(device), None if bias is None else bias.to(device), value.to(device)


class NeuronEdited(Edited):
    """A model whose batch rows get the neuron stored for their question (missing = routed away, zero).

    ``neurons`` maps a question to ``(key [H], bias [] or None, value [H])``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        neurons: Mapping[str, NeuronTuple],
        layer: int,
        adapter: ArchitectureAdapter | None = None,
    ) -> None:
        super().__init__(model, tokenizer)
        self.neuron = DynamicNeuron(model, layer, adapter)
        self.neurons = dict(neurons)

    def batch_for(self, questions: Sequence[str]) -> tuple[NeuronBatch, torch.Tensor]:
        """The rows' neurons (zeros where missing) and the mask of rows that have one."""
        device = self.neuron.module_device
        active = torch.tensor([q in self.neurons for q in questions], dtype=torch.bool)
        known = next(iter(self.neurons.values()), None)
        dtype = known[0].dtype if known is not None else torch.float32
        hidden, has_bias = self.neuron.hidden, self.neuron.has_bias
        zero = NeuronBatch.zeros(1, hidden, has_bias, dtype=dtype, device=device).row(0)
        rows = [self.neurons.get(q, zero) for q in questions]
        return NeuronBatch.stack([_to(row, device) for row in rows]), active

    @contextlib.contextmanager
    def rows(self, questions: Sequence[str]) -> Iterator[None]:
        batch, active = self.batch_for(questions)
        with self.neuron.attach(batch, active):
            yield

    def routed(self, questions: Sequence[str]) -> list[bool]:
        return [q in self.neurons for q in questions]
