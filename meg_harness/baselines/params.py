"""Hyper-parameters of the baselines (EasyEdit/MEMIT key names), validated from an hparams YAML's mapping.

Architecture facts (module names, transposed weights) come from the adapters, so the originals'
``*_module_tmp`` keys are not needed; they and ``alg_name`` / ``model_name`` / ``v_loss_layer`` are accepted
and ignored so that EasyEdit-style files load. Any other unknown key is an error (typos fail early).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from meg_harness.errors import HarnessError
from meg_harness.settings import (
    NON_NEGATIVE,
    POSITIVE,
    Rule,
    Settings,
    check_alg_name,
    one_of,
    settings_from_mapping,
)

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
LAYERS = Rule("a non-empty list of distinct layer indices", lambda v: 0 < len(v) == len(set(v)))


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | T | None, method: str) -> T:
    """Build the settings dataclass ``cls`` from a mapping (see :class:`~meg_harness.settings.Settings`):
    unknown keys, bad values and an ``alg_name`` of another method raise a HarnessError naming the key."""
    if isinstance(mapping, Mapping):
        check_alg_name(mapping, method)
    return settings_from_mapping(cls, mapping, f"{method} hparam", ignored=IGNORED_KEYS)


@dataclass(frozen=True)
class StatsHParams(Settings):
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

    CHECKS: ClassVar[Mapping[str, Rule]] = {
        "mom2_n_samples": POSITIVE,
        "mom2_dtype": one_of("float32", "float64"),
        "mom2_max_length": POSITIVE,
        "mom2_batch_size": POSITIVE,
    }


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
    terminator: bool = False  # optimise z for target + the template's answer terminator (as MeG, MALMEN)
    mom2_adjustment: bool = True  # False: C0 = identity (no statistics)
    mom2_update_weight: float = 15000.0
    seed: int = 0

    CHECKS: ClassVar[Mapping[str, Rule]] = {
        **StatsHParams.CHECKS,
        "layers": LAYERS,
        "fact_token": one_of("subject_last"),
        "v_num_grad_steps": POSITIVE,
        "v_lr": POSITIVE,
        "v_weight_decay": NON_NEGATIVE,
        "clamp_norm_factor": POSITIVE,
        "kl_factor": NON_NEGATIVE,
        "v_loss_stop": NON_NEGATIVE,
        "z_batch_size": POSITIVE,
        "key_batch_size": POSITIVE,
        "context_prefixes": NON_NEGATIVE,
        "context_prefix_length": POSITIVE,
        "mom2_update_weight": NON_NEGATIVE,
    }

    def check(self) -> None:
        if "{}" not in self.kl_prompt:
            raise HarnessError("kl_prompt must contain '{}' for the subject", field="kl_prompt")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        return data
