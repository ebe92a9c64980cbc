"""MeG's hyper-parameters: one EasyEdit-style YAML (``alg_name: MEG``) with a section per stage.

    alg_name: MEG
    model_name: smollm2-135m
    layer: 12                      # the FFN that gets the dynamic neuron
    encoder:     {name, tuning: infonce|mse|frozen, pairs, pairs_format, max_pairs, lr, epochs, tau,
                  batch_size}
    familiarity: {enabled, threshold, hidden, n_blocks, num_classes, lr, max_epochs, loss_tol, negatives,
                  negative_weight}
    collect:     CollectHParams fields (layer comes from the top level)
    generator:   GeneratorConfig fields or a preset (DiT-B, DiT-S, DiT-T, DiT-CPU, MLP)
    diffusion:   DiffusionConfig fields (ddim_steps: the sampling steps)
    train:       TrainConfig fields
    augment:     {enabled, n, source, source_format}   (A.3: pseudo-irrelevant prompts -> zero weights)

Ablation switches (paper tables): ``familiarity.enabled: false`` (5-6), ``generator.preset: MLP``
(7), ``encoder.tuning`` (4), ``augment.enabled`` (15), ``familiarity.threshold`` (16),
``diffusion.ddim_steps`` (8).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from meg_harness.data.sources import DATASETS
from meg_harness.errors import HarnessError
from meg_harness.meg.collect import CollectHParams
from meg_harness.meg.diffusion import DiffusionConfig
from meg_harness.meg.train_generator import TrainConfig
from meg_harness.settings import (
    NON_NEGATIVE,
    POSITIVE,
    Rule,
    Settings,
    at_least,
    check_alg_name,
    checked_value,
    one_of,
    read_hparams_file,
    settings_from_mapping,
    with_base,
)

SECTIONS = ("encoder", "familiarity", "collect", "generator", "diffusion", "train", "augment")
TOP_LEVEL = ("alg_name", "model_name", "layer", "seed", "base", *SECTIONS)


@dataclass(frozen=True)
class EncoderSettings(Settings):
    """Stage 1 (4.1a). ``pairs``: a data file of pseudo-knowledge (original, paraphrase) pairs disjoint
    from the edits, read as ``pairs_format`` (counterfact | zsre | mquake); required unless frozen."""

    name: str = "minilm"
    tuning: str = "infonce"
    pairs: str | None = None
    pairs_format: str = "counterfact"
    max_pairs: int | None = 20000
    lr: float = 2e-5
    epochs: int = 1
    tau: float = 0.05
    batch_size: int = 64

    CHECKS: ClassVar[Mapping[str, Rule]] = {
        "tuning": one_of("infonce", "mse", "frozen"),
        "pairs_format": one_of(*DATASETS),
        "max_pairs": POSITIVE,
        "lr": POSITIVE,
        "epochs": POSITIVE,
        "tau": POSITIVE,
        "batch_size": POSITIVE,
    }


@dataclass(frozen=True)
class FamiliaritySettings(Settings):
    """Stage 2 (4.1b). ``enabled: false`` routes every query to the generator (the no-FN ablation).

    ``negatives`` (this project's addition; 0 = the paper): that many prompts absent from the edits, drawn as
    A.3's pseudo-irrelevant prompts (from ``augment.source``, default ``encoder.pairs``), are trained toward
    the uniform distribution with weight ``negative_weight`` (see ``meg_harness.meg.familiarity``)."""

    enabled: bool = True
    threshold: float = 0.1
    hidden: int = 1024
    n_blocks: int = 5
    num_classes: int = 10
    lr: float = 1e-3
    max_epochs: int = 1000
    loss_tol: float = 1e-4  # training stops at 100% train accuracy and a mean loss below this (0: never)
    negatives: int = 0
    negative_weight: float = 1.0

    CHECKS: ClassVar[Mapping[str, Rule]] = {
        "threshold": NON_NEGATIVE,
        "hidden": POSITIVE,
        "n_blocks": POSITIVE,
        "num_classes": at_least(2),
        "lr": POSITIVE,
        "max_epochs": POSITIVE,
        "loss_tol": NON_NEGATIVE,
        "negatives": NON_NEGATIVE,
        "negative_weight": NON_NEGATIVE,
    }


@dataclass(frozen=True)
class AugmentSettings(Settings):
    """A.3 data augmentation: ``n`` prompts from ``source`` (a data file disjoint from the edits; default the
    encoder's pairs file) are trained to generate the all-zero neuron. ``source`` also supplies the
    familiarity network's ``negatives``."""

    enabled: bool = False
    n: int = 256
    source: str | None = None
    source_format: str | None = None

    CHECKS: ClassVar[Mapping[str, Rule]] = {
        "n": POSITIVE,
        "source_format": one_of(*DATASETS),
    }


def _section(cls, mapping: Mapping[str, Any] | None, name: str):
    return settings_from_mapping(cls, mapping, f"{name} setting", f"{name}.")


@dataclass(frozen=True)
class MEGHyperParams(Settings):
    """Validated MeG hyper-parameters (see the module docstring for the YAML layout)."""

    layer: int
    alg_name: str = "MEG"
    model_name: str = ""
    seed: int = 0
    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    familiarity: FamiliaritySettings = field(default_factory=FamiliaritySettings)
    collect: CollectHParams = field(default_factory=CollectHParams)
    generator: dict[str, Any] = field(default_factory=lambda: {"preset": "DiT-CPU"})
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentSettings = field(default_factory=AugmentSettings)

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any], source: str | os.PathLike | None = None) -> MEGHyperParams:
        """From a mapping (a YAML's contents). ``base: PATH`` loads that YAML first, the rest on top
        (how a run config states an ablation); errors name ``source`` and the field."""
        try:
            values = with_base(mapping)
            unknown = sorted(set(values) - set(TOP_LEVEL))
            if unknown:
                raise HarnessError(
                    f"unknown MeG hparam(s) {unknown}; known: {list(TOP_LEVEL)}", field=unknown[0]
                )
            check_alg_name(values, "MEG")
            layer = checked_value(values.get("layer"), int, None, "layer")
            seed = checked_value(values.get("seed", 0), int, None, "seed")
            for name in SECTIONS:
                if not isinstance(values.get(name) or {}, Mapping):
                    raise HarnessError(f"must be a mapping of settings, got {values[name]!r}", field=name)
            collect = {**dict(values.get("collect") or {}), "layer": layer}
            collect.setdefault("seed", seed)
            train = {"seed": seed, **dict(values.get("train") or {})}
            generator = dict(values.get("generator") or {"preset": "DiT-CPU"})
            from meg_harness.meg.generator import GeneratorConfig

            GeneratorConfig.from_mapping(generator, vector_dim=1, cond_dim=1)  # validate now, dims come later
            return cls(
                layer=layer,
                alg_name="MEG",
                model_name=str(values.get("model_name", "")),
                seed=seed,
                encoder=_section(EncoderSettings, values.get("encoder"), "encoder"),
                familiarity=_section(FamiliaritySettings, values.get("familiarity"), "familiarity"),
                collect=_section(CollectHParams, collect, "collect"),
                generator=generator,
                diffusion=DiffusionConfig.from_mapping(values.get("diffusion")),
                train=TrainConfig.from_mapping(train),
                augment=_section(AugmentSettings, values.get("augment"), "augment"),
            )
        except HarnessError as error:
            raise HarnessError(error.reason, file=error.file or source, field=error.field) from None

    @classmethod
    def from_hparams(cls, path: str | os.PathLike) -> MEGHyperParams:
        """EasyEdit's constructor name: read ``hparams/MEG/<model>.yaml``."""
        return cls.from_dict(read_hparams_file(path), source=path)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["collect"] = self.collect.to_dict()
        return out
