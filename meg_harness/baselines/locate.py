"""The locate-then-edit layer loop shared by MEMIT, PMET and AlphaEdit.

1. statistics of every edited layer's keys on the unedited model (:mod:`stats`);
2. value targets at the last edited layer (:mod:`values`), batched over edits;
3. for each edited layer in order: keys of the edits (rewrite-module input at the subject's last token,
   averaged over contexts), the residual still missing at the last layer (recomputed after the previous
   layers' updates), the method's solve, and the update applied to the rewrite module's weight.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from meg_harness.baselines.delta import DeltaEdited, WeightDelta, load_delta_artifact, save_delta_artifact
from meg_harness.baselines.keys import edit_keys, edit_outputs
from meg_harness.baselines.params import LocateHParams, from_mapping
from meg_harness.baselines.plan import EditPlan, build_plans
from meg_harness.baselines.prefixes import cached_prefixes
from meg_harness.baselines.stats import SecondMoment, layer_second_moments
from meg_harness.baselines.values import ValueResult, optimise_values
from meg_harness.cache import content_hash, default_cache_dir
from meg_harness.data.edit_case import EditCase
from meg_harness.editing.base import Edited, Editor, reused_work
from meg_harness.errors import HarnessError
from meg_harness.models.adapters import ArchitectureAdapter, get_adapter
from meg_harness.models.loading import model_fingerprint
from meg_harness.models.nethook import frozen
from meg_harness.prompts import QueryTemplate

log = logging.getLogger(__name__)

# Hyper-parameters the value targets depend on besides the sites (the cache key of
# :meth:`LocateThenEdit.values`); the sites name the last edited layer.
Z_FIELDS = (
    "v_num_grad_steps",
    "v_lr",
    "v_weight_decay",
    "clamp_norm_factor",
    "kl_factor",
    "v_loss_stop",
    "z_batch_size",
    "nll_loss_factor",
)


def _z_key(plan: EditPlan) -> dict[str, Any]:
    """A plan's part of the z cache key: z depends on its rows and target, not on how keys are averaged."""
    fields = dataclasses.asdict(plan)
    fields.pop("context_types")
    return fields


def resolve_layers(adapter: ArchitectureAdapter, model: nn.Module, layers: Sequence[int]) -> list[int]:
    """Layer indices made non-negative and checked against the model's depth (order kept)."""
    n = adapter.num_layers(model)
    out = []
    for layer in layers:
        if not -n <= layer < n:
            raise HarnessError(
                f"layer {layer} out of range: the model has {n} layers", field="hparams.layers"
            )
        out.append(layer % n)
    if len(set(out)) != len(out):
        raise HarnessError("layers must be distinct", field="hparams.layers")
    return out


def check_value_layer(layers: Sequence[int], n: int) -> None:
    """The z vector acts on later positions only through later layers: the last edited one must not be
    the model's last layer."""
    if layers[-1] >= n - 1:
        raise HarnessError(
            f"the last edited layer ({layers[-1]}) must be below the model's last layer ({n - 1})",
            field="hparams.layers",
        )


class LocateThenEdit(Editor):
    """Base of MEMIT-style editors: subclasses choose the value sites, the residual and the solve."""

    hparams_class: ClassVar[type[LocateHParams]] = LocateHParams
    progress: bool = True

    def __init__(self, hparams: dict[str, Any] | None = None) -> None:
        super().__init__(hparams)
        self.hp = from_mapping(self.hparams_class, self.hparams, self.name)
        self._fingerprint: str | None = None

    def preflight(self, model: nn.Module) -> None:
        adapter = get_adapter(model)
        check_value_layer(resolve_layers(adapter, model, self.hp.layers), adapter.num_layers(model))

    # -- method-specific ------------------------------------------------------------------------------
    def value_sites(self, adapter: ArchitectureAdapter, z_layer: int) -> list[str]:
        """Modules (at the last edited layer) whose outputs get an optimised delta; the first: the target."""
        return [adapter.layer_module_tmp.format(z_layer)]

    def residual(
        self, model, tokenizer, adapter, plans, values: ValueResult, z_layer: int, i: int, n_layers: int
    ) -> torch.Tensor:
        """``[n_edits, d_out]``: what layer ``i`` of ``n_layers`` must still add (MEMIT: spread evenly)."""
        site = self.value_sites(adapter, z_layer)[0]
        current = edit_outputs(model, tokenizer, plans, site, self.hp.key_batch_size)
        return (values.targets[site].to(current.device) - current) / (n_layers - i)

    @abstractmethod
    def solve(
        self, layer: int, keys: torch.Tensor, resid: torch.Tensor, stats: SecondMoment | None
    ) -> torch.Tensor:
        """``delta W [d_out, d_in]`` (float64) from keys ``K [d_in, n]`` and residuals ``R [d_out, n]``."""

    def value_options(self) -> dict[str, Any]:
        return {}

    def uses_stats(self) -> bool:
        return self.hp.mom2_adjustment

    # -- Editor ---------------------------------------------------------------------------------------
    def context_prefixes(self, model: nn.Module, tokenizer) -> list[str]:
        """MEMIT's generated context prefixes (seeded; cached on disk by model and settings)."""
        return cached_prefixes(
            model,
            tokenizer,
            self.hp.context_prefixes,
            self.hp.context_prefix_length,
            self.hp.seed,
            fingerprint=self.fingerprint(model),
            cache_dir=self.cache_dir,
        )

    def fingerprint(self, model: nn.Module) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(model)
        return self._fingerprint

    def statistics(self, model: nn.Module, tokenizer, layers: Sequence[int]) -> dict[int, SecondMoment]:
        return layer_second_moments(
            model,
            tokenizer,
            layers,
            self.hp,
            cache_dir=self.cache_dir,
            fingerprint=self.fingerprint(model),
            progress=self.progress,
        )

    def values(
        self, model: nn.Module, tokenizer, plans: list[EditPlan], sites: list[str], z_layer: int
    ) -> ValueResult:
        """Value targets, cached on disk per chunk of ``z_batch_size`` edits, by content (model, the chunk's
        edit tokens, sites, z hyper-parameters): a second fit with other update settings (lambda, layers
        below the last), or another method with the same z settings, reuses them, and an interrupted
        optimisation resumes from its finished chunks."""
        options = self.value_options()
        z_fields = [k for k in Z_FIELDS if hasattr(self.hp, k)]
        folder = Path(self.cache_dir or default_cache_dir()) / "baseline_z"
        fingerprint = self.fingerprint(model)

        def cache(chunk: Sequence[EditPlan]) -> Path:
            key = content_hash(
                "baseline-z/v2",
                fingerprint,
                [_z_key(p) for p in chunk],
                sites,
                {k: getattr(self.hp, k) for k in z_fields},
                options,
            )
            return folder / f"{key[:32]}.safetensors"

        return optimise_values(
            model,
            tokenizer,
            plans,
            sites,
            self.hp,
            layer=z_layer,
            cache=cache,
            progress=self.progress,
            **options,
        )

    def fit(
        self, model: nn.Module, tokenizer, cases: Sequence[EditCase], template: QueryTemplate
    ) -> DeltaEdited:
        adapter = get_adapter(model)
        layers = resolve_layers(adapter, model, self.hp.layers)
        check_value_layer(layers, adapter.num_layers(model))
        self._fingerprint = None  # the model given now, unedited
        with frozen(model):
            prefixes = self.context_prefixes(model, tokenizer)
            plans = build_plans(
                tokenizer, cases, template, prefixes, self.hp.kl_prompt, terminator=self.hp.terminator
            )
            z_layer = layers[-1]
            clock = time.perf_counter()
            # z before the statistics: its chunks are cached as they finish, so a run stopped part-way keeps
            # its most expensive work
            values = self.values(model, tokenizer, plans, self.value_sites(adapter, z_layer), z_layer)
            z_s = time.perf_counter() - clock
            started = time.perf_counter()
            stats = self.statistics(model, tokenizer, layers) if self.uses_stats() else {}
            stats_s = time.perf_counter() - started
            clock = time.perf_counter()
            delta = WeightDelta()
            try:
                norms = self._update_layers(model, tokenizer, adapter, plans, values, layers, stats, delta)
            except BaseException:
                delta.restore(model)
                raise
            update_s = time.perf_counter() - clock
        info = {
            "n_edits": len(plans),
            "layers": layers,
            "update_norms": norms,
            "z_nll": values.nll,
            "z_steps": values.steps,
            "statistics": statistics_info(self.hp, stats, stats_s),
            "context_prefixes": prefixes,
            "z_s": z_s,  # value optimisation (read back from the cache when its chunks are there)
            "update_s": update_s,  # keys and the per-layer solves
            "reused": [reused_work("z chunks", values.chunks_read, values.chunks)],
        }
        return DeltaEdited(model, tokenizer, delta, info)

    def _update_layers(
        self,
        model: nn.Module,
        tokenizer,
        adapter: ArchitectureAdapter,
        plans: list[EditPlan],
        values: ValueResult,
        layers: list[int],
        stats: dict[int, SecondMoment],
        delta: WeightDelta,
    ) -> dict[int, float]:
        norms = {}
        z_layer = layers[-1]
        for i, layer in enumerate(layers):
            module = adapter.rewrite_module_tmp.format(layer)
            keys = edit_keys(model, tokenizer, plans, module, self.hp.key_batch_size)
            resid = self.residual(model, tokenizer, adapter, plans, values, z_layer, i, len(layers))
            update = self.solve(layer, keys.double().T, resid.double().T, stats.get(layer))
            weight = f"{module}.weight"
            delta.add(model, weight, update.T if adapter.rewrite_is_conv1d else update)
            norms[layer] = float(update.norm())
            log.info("%s layer %d: update norm %.4g", self.name, layer, norms[layer])
        return norms

    def save(self, edited: Edited, directory: Path) -> None:
        if not isinstance(edited, DeltaEdited):
            raise HarnessError(f"{self.name} can only save what its fit returned")
        info_fp = self._fingerprint
        save_delta_artifact(edited, directory, self.name, info_fp)

    @classmethod
    def load(cls, directory: Path, model: nn.Module, tokenizer) -> DeltaEdited:
        return load_delta_artifact(directory, model, tokenizer)


def statistics_info(hp: LocateHParams, stats: dict[int, SecondMoment], seconds: float) -> dict[str, Any]:
    """What the layer statistics saw: corpus spec, samples and tokens (every layer sees the same tokens),
    and the seconds spent computing or loading them; ``corpus: None`` when they are switched off."""
    if not stats:
        return {"corpus": None, "samples": 0, "tokens": 0, "seconds": seconds}
    first = next(iter(stats.values()))
    return {"corpus": hp.mom2_dataset, "samples": first.samples, "tokens": first.count, "seconds": seconds}


def c0_or_identity(stats: SecondMoment | None, dim: int, device: torch.device) -> torch.Tensor:
    """``E[k k^T]`` in float64 on ``device``, or the identity when statistics are switched off."""
    if stats is None:
        return torch.eye(dim, dtype=torch.float64, device=device)
    return stats.moment().to(device, torch.float64)
