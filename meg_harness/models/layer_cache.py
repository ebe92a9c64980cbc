"""The frozen LM run from one layer upward on cached hidden states: the layers below an edited layer are
frozen and their input never changes, so an optimisation loop computes their output once and runs only the
rest of the model each step (MeG's knowledge-weight collection, FT). Where the edit enters at one position
per row (the baselines' z optimisation), the positions before it are frozen in every layer too: their keys
and values are computed once and each step runs only the rows' suffixes (:class:`SplitRows`)."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from meg_harness.models.adapters import ArchitectureAdapter, get_adapter
from meg_harness.models.nethook import Trace

log = logging.getLogger(__name__)

VERIFY_RTOL = 1e-4  # layer-cached vs full logits, relative to the largest logit


@dataclass
class SplitRows:
    """Rows split at per-row positions ``split``: the positions before ``split[r]`` (no edit reaches them)
    kept as the keys and values of ``layers[L:]``, right-aligned in width ``P = max(split)``; the states
    entering layer L from ``split[r]`` on, left-aligned in width ``S``. Attention over ``[past | suffix]``
    with the padding masked is the full row's causal attention (the left-padded batches of generation)."""

    past: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer index -> keys, values (R, heads, P, d)
    states: torch.Tensor  # (R, S, H)
    split: torch.Tensor  # (R,) where each row's suffix starts
    suffix_len: torch.Tensor  # (R,)


class _RecordingCache(DynamicCache):
    """A :class:`DynamicCache` that also keeps each layer's keys and values by layer index."""

    def __init__(self) -> None:
        super().__init__()
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.recorded[layer_idx] = (key_states, value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def _cache_kwarg(decoder: nn.Module) -> str:
    """The decoder's keyword for a KV cache (``cache`` from transformers 5.2x, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _gather_positions(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with ``dim`` re-indexed per row by ``index`` ``(R, K)`` (rows are ``x``'s first dimension)."""
    shape = [index.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = index.shape[1]
    expand = list(x.shape)
    expand[dim] = index.shape[1]
    return x.gather(dim, index.view(shape).expand(expand))


class LayerCachedLM:
    """The frozen LM run from layer ``layer`` upward, on the hidden states that enter that layer.

    :meth:`layer_inputs` computes those states once (a forward stopped at layer L); :meth:`logits` runs the
    decoder with its layer list temporarily truncated to ``layers[L:]`` and ``inputs_embeds`` = the states
    (absolute position embeddings, e.g. GPT-2's ``wpe``, return zeros meanwhile), then the LM head.
    """

    def __init__(self, model: nn.Module, layer: int, adapter: ArchitectureAdapter | None = None) -> None:
        self.model = model
        self.adapter = adapter or get_adapter(model)
        layers = self.adapter.layers(model)
        self.layer = self.adapter._layer_index(model, layer)
        self.layer_module = layers[self.layer]
        parent, _, self.layers_attr = self.adapter.layers_module.rpartition(".")
        self.decoder = model.get_submodule(parent)
        self.head = model.get_output_embeddings()

    @torch.no_grad()
    def layer_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden states entering layer L, ``[B, T, H]``."""
        with Trace(self.layer_module, retain_input=True, stop_before=True) as trace:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return trace.input

    def layer_inputs_per_row(
        self, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 32
    ) -> list[torch.Tensor]:
        """The hidden states entering layer L of each token sequence, ``[len(seq), H]`` each (right-padded
        batches of ``batch_size``; a causal LM's states at real positions do not depend on the padding)."""
        device = next(self.model.parameters()).device
        states: list[torch.Tensor] = []
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            ids, mask = right_pad_ids(chunk, pad_id, device)
            hidden = self.layer_inputs(ids, mask)
            states += [hidden[i, : len(s)] for i, s in enumerate(chunk)]
        return states

    @contextlib.contextmanager
    def truncated(self) -> Iterator[nn.Module]:
        """The decoder with only ``layers[L:]`` (and per-layer config lists cut to match); restored after."""
        layers = getattr(self.decoder, self.layers_attr)
        config = self.adapter.text_config(self.model)
        layer_types = getattr(config, "layer_types", None)
        zero = None  # absolute position embeddings (GPT-2's wpe) add nothing to the cached states
        if self.adapter.position_embedding_module:
            zero = Trace(
                self.model,
                self.adapter.position_embedding_module,
                edit_output=lambda _name, out, _input: torch.zeros_like(out),
            )
        setattr(self.decoder, self.layers_attr, nn.ModuleList(list(layers)[self.layer :]))
        if isinstance(layer_types, list):
            config.layer_types = layer_types[self.layer :]
        try:
            yield self.decoder
        finally:
            setattr(self.decoder, self.layers_attr, layers)
            if isinstance(layer_types, list):
                config.layer_types = layer_types
            if zero is not None:
                zero.close()

    def logits(
        self,
        layer_inputs: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LM logits from layer L upward: ``[B, T, V]``, or ``[N, V]`` at ``(rows, positions)`` only."""
        with self.truncated() as decoder:
            out = decoder(inputs_embeds=layer_inputs, attention_mask=attention_mask, use_cache=False)
        hidden = out[0]
        if rows is not None:
            hidden = hidden[rows, positions]
        return self.head(hidden)

    def full_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The whole model's logits (the reference the layer-cached run must match)."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits if rows is None else logits[rows, positions]

    @torch.no_grad()
    def agrees_with_full_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
        rtol: float = VERIFY_RTOL,
    ) -> bool:
        """Whether the layer-cached logits at ``(rows, positions)`` equal a full forward's (within ``rtol``
        of the largest logit), under whatever hooks are active. A family where this fails must not use the
        cache: callers fall back to full forwards and log it."""
        cached = self.logits(self.layer_inputs(input_ids, attention_mask), attention_mask, rows, positions)
        full = self.full_logits(input_ids, attention_mask, rows, positions)
        return self.agree(cached, full, "layer-cached", rtol)

    def agree(self, cached: torch.Tensor, full: torch.Tensor, what: str, rtol: float = VERIFY_RTOL) -> bool:
        """Whether ``cached`` logits equal the ``full`` forward's within ``rtol`` of the largest logit; a
        difference is logged (``what``: the cached forward's name), callers then use full forwards."""
        diff = (cached.float() - full.float()).abs().max().item()
        agrees = diff <= rtol * max(1.0, full.abs().max().item())
        if not agrees:
            log.warning(
                "%s forward of the %s model differs from the full forward by %.3g at layer %d; "
                "using full forwards instead",
                what,
                self.adapter.family,
                diff,
                self.layer,
            )
        return agrees

    @torch.no_grad()
    def split_rows(self, layer_inputs: torch.Tensor, lengths: torch.Tensor, split: torch.Tensor) -> SplitRows:
        """Split right-padded rows (states ``[R, W, H]`` entering layer L, real ``lengths``) at ``split``
        ``(R,)``: one forward of ``layers[L:]`` records the keys and values of every position."""
        width = layer_inputs.shape[1]
        mask = (torch.arange(width, device=lengths.device)[None] < lengths[:, None]).long()  # (R, W)
        recorder = _RecordingCache()
        with self.truncated() as decoder:
            decoder(
                inputs_embeds=layer_inputs,
                attention_mask=mask,
                use_cache=True,
                **{_cache_kwarg(decoder): recorder},
            )
        p = int(split.max())
        suffix_len = lengths - split  # (R,)
        s = int(suffix_len.max())
        past_at = (torch.arange(p, device=split.device)[None] - (p - split)[:, None]).clamp(min=0)  # (R, P)
        suffix_at = (split[:, None] + torch.arange(s, device=split.device)[None]).clamp(
            max=width - 1
        )  # (R, S)
        past = {
            i: (_gather_positions(k, past_at, 2), _gather_positions(v, past_at, 2))  # (R, heads, P, d) each
            for i, (k, v) in recorder.recorded.items()
        }
        return SplitRows(past, _gather_positions(layer_inputs, suffix_at, 1), split, suffix_len)

    def split_logits(
        self, rows_split: SplitRows, rows: torch.Tensor, read_rows: torch.Tensor, read_positions: torch.Tensor
    ) -> torch.Tensor:
        """LM logits ``[N, V]`` of the suffixes of the batch rows ``rows`` ``(R',)`` at ``(read_rows,
        read_positions)`` (indices into ``rows``; positions counted from each row's split), computed from
        layer L upward with the past's keys and values (the layers below L get placeholders of the past's
        length: they are not run)."""
        sr = rows_split
        split, suffix_len = sr.split[rows], sr.suffix_len[rows]  # (R',)
        p, s = int(split.max()), int(suffix_len.max())
        full_p = next(iter(sr.past.values()))[0].shape[2]  # the past's width over every row
        past_cols = torch.arange(p, device=rows.device)[None] >= (p - split)[:, None]  # (R', P)
        suffix_cols = torch.arange(s, device=rows.device)[None] < suffix_len[:, None]  # (R', S)
        mask = torch.cat([past_cols, suffix_cols], 1).long()  # (R', P + S)
        positions = split[:, None] + torch.arange(s, device=rows.device)[None]  # (R', S)
        cache = DynamicCache()
        placeholder = sr.states.new_zeros(len(rows), 1, p, 1)
        for i in range(max(sr.past) + 1):
            keys, values = sr.past.get(i, (placeholder, placeholder))
            if i in sr.past:
                keys, values = keys[rows, :, full_p - p :], values[rows, :, full_p - p :]
            cache.update(keys, values, i)
        with self.truncated() as decoder:
            out = decoder(
                inputs_embeds=sr.states[rows, :s],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{_cache_kwarg(decoder): cache},
            )
        return self.head(out[0][read_rows, read_positions])


def right_pad(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence ``[T_i, H]`` hidden states -> zero right-padded ``[B, T, H]`` and the attention mask."""
    width = max(len(s) for s in states)
    padded = states[0].new_zeros(len(states), width, states[0].shape[-1])
    mask = torch.zeros(len(states), width, dtype=torch.long, device=states[0].device)
    for i, s in enumerate(states):
        padded[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return padded, mask


def right_pad_ids(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (positions are unaffected by right padding)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def target_index(
    starts: Sequence[int],
    labels: Sequence[Sequence[int]],
    device: torch.device | str | None = None,
    rows: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(row, position, label)`` long tensors ``[N]`` a next-token loss reads, one entry per label:
    label ``j`` of sequence ``i`` is predicted at position ``starts[i] + j`` of batch row ``rows[i]``
    (default ``i``); sequences in order, then their labels."""
    row_ids: list[int] = []
    positions: list[int] = []
    label_ids: list[int] = []
    for i, (start, ids) in enumerate(zip(starts, labels, strict=True)):
        row_ids += [i if rows is None else rows[i]] * len(ids)
        positions += range(start, start + len(ids))
        label_ids += ids

    def as_long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return as_long(row_ids), as_long(positions), as_long(label_ids)
