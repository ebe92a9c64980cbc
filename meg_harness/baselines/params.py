"""Hyper-parameters of the baselines (EasyEdit/MEMIT key names), validated from an hparams YAML's mapping.

Architecture facts (module names, transposed weights) come from the adapters, so the originals'
``*_module_tmp`` keys are not needed; they and ``alg_name`` / ``model_name`` / ``v_loss_layer`` are accepted
and ignored so that EasyEdit-style files load. Any other unknown key is an error (typos fail early).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from meg_harness.errors import HarnessError

IGNORED_KEYS = frozenset(
    {
        "alg_name",
        "model_name",
        "device",
        "v_loss_layer",  # the loss is always taken on the model's own logits (= the last layer)
        "layer_selection",
        "rewrite_module_tmp",
        "rewrite_module_tmps",
        "layer_module_tmp",
        "mlp_module_tmp",
        "attn_module_tmp",
        "ln_f_module",
        "lm_head_module",
    }
)

T = TypeVar("T")


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | T | None, method: str) -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise a HarnessError naming the key."""
    if isinstance(mapping, cls):
        return mapping
    values = {k: v for k, v in dict(mapping or {}).items() if k not in IGNORED_KEYS}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise HarnessError(
            f"unknown {method} hparam(s) {unknown}; known: {sorted(known)}", field=f"hparams.{unknown[0]}"
        )
    if "layers" in values:
        layers = values["layers"]
        if isinstance(layers, int):
            layers = [layers]
        if not layers or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
            raise HarnessError("layers must be a non-empty list of integers", field="hparams.layers")
        values["layers"] = tuple(layers)
    return cls(**values)


@dataclass(frozen=True)
class StatsHParams:
    """Where and how the second moments of a layer's keys are computed (see :mod:`stats`).

    ``mom2_dataset``: ``default`` (the text the package ships), a local ``.txt`` (one sample per non-empty
    line) or ``.jsonl`` (``text`` field) file, or ``hf:<dataset>[:<config>[:<split>[:<field>]]]`` streamed
    with the ``datasets`` package (e.g. ``hf:wikitext:wikitext-103-raw-v1:train``).
    """

    mom2_dataset: str = "default"
    mom2_n_samples: int = 100000
    mom2_dtype: str = "float32"
    mom2_max_length: int = 256
    mom2_batch_size: int = 16


@dataclass(frozen=True)
class LocateHParams(StatsHParams):
    """Shared locate-then-edit hyper-parameters (defaults: MEMIT's GPT-J file)."""

    layers: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    kl_prompt: str = "{} is a"
    v_loss_stop: float = 5e-2  # an edit's z stops once its loss is below this (MEMIT's constant)
    z_batch_size: int = 16  # edits whose z vectors are optimised in one batch
    key_batch_size: int = 32  # prompts per forward when reading keys
    context_prefixes: int = 5  # MEMIT: 5 model-generated prefixes (+ the bare prompt)
    context_prefix_length: int = 10
    mom2_adjustment: bool = True  # False: C0 = identity (no statistics)
    mom2_update_weight: float = 15000.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fact_token != "subject_last":
            raise HarnessError(
                f"fact_token {self.fact_token!r} is not supported; use subject_last",
                field="hparams.fact_token",
            )
        if "{}" not in self.kl_prompt:
            raise HarnessError("kl_prompt must contain '{}' for the subject", field="hparams.kl_prompt")
        for name in (
            "v_num_grad_steps",
            "z_batch_size",
            "key_batch_size",
            "mom2_n_samples",
            "mom2_batch_size",
        ):
            if getattr(self, name) <= 0:
                raise HarnessError(f"{name} must be positive", field=f"hparams.{name}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        return data
