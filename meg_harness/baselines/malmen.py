"""MALMEN (Tan et al., ICLR 2024, "Massive Editing for Large Language Models via Meta Learning").

A hypernetwork (:mod:`malmen_net`) turns each edit token's (key, value gradient) at the FFN output linear
of every edited layer into a value shift; all shifts of all edits are aggregated by ONE least-squares solve
per layer into a weight update. The hypernetwork is meta-trained (:mod:`malmen_train`) on training facts
disjoint from the evaluated edits (``train_dataset`` / ``train_path``), cached under the cache folder by a
content hash of (model, hparams, template, training facts), checkpointed and resumed.

``fit`` = load-or-train the hypernetwork, then edit all cases in one shot: the LM reads ``batch_size``
edits at a time, the hypernetwork ``editor_batch_size`` tokens at a time, and every layer gets one solve
over the shifts of all edits. The artifact is the usual safetensors weight delta.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from meg_harness.baselines.delta import DeltaEdited, WeightDelta, load_delta_artifact, save_delta_artifact
from meg_harness.baselines.locate import resolve_layers
from meg_harness.baselines.malmen_net import MalmenHypernet, ridge_update
from meg_harness.baselines.malmen_train import (
    MalmenHParams,
    TrainResult,
    compute_deltas,
    meta_train,
)
from meg_harness.baselines.params import from_mapping
from meg_harness.cache import default_cache_dir
from meg_harness.data import load_cases
from meg_harness.data.edit_case import EditCase
from meg_harness.editing.base import Edited, Editor, reused_work
from meg_harness.editing.registry import register_method
from meg_harness.errors import HarnessError
from meg_harness.models.adapters import get_adapter
from meg_harness.models.loading import model_fingerprint
from meg_harness.prompts import QueryTemplate
from meg_harness.provenance import peak_rss_mb

log = logging.getLogger(__name__)

__all__ = ["MALMEN", "MalmenHParams", "MalmenHypernet", "ridge_update"]


def _norm_prompt(text: str) -> str:
    return " ".join(text.lower().split())


@register_method
class MALMEN(Editor):
    name = "malmen"
    progress: bool = True

    def __init__(self, hparams: dict[str, Any] | None = None) -> None:
        super().__init__(hparams)
        self.hp = from_mapping(MalmenHParams, self.hparams, self.name)
        self.train_cases: Sequence[EditCase] | None = None  # overrides train_dataset / train_path
        self.trained: TrainResult | None = None
        self._fingerprint: str | None = None

    def preflight(self, model: nn.Module) -> None:
        """The layers against the model; the training facts read (a bad file fails before any result)."""
        self.modules(model)
        try:
            self.training_cases()
        except HarnessError as error:  # the training file's own errors name it; "data_path" is train_path
            field = "train_path" if error.field == "data_path" else error.field
            raise HarnessError(error.reason, file=error.file, record=error.record, field=field) from None

    # -- pieces ------------------------------------------------------------------------------------------
    def modules(self, model: nn.Module) -> tuple[list[str], bool]:
        """The edited modules (the adapter's FFN output linear of each layer) and whether they are Conv1D."""
        adapter = get_adapter(model)
        layers = resolve_layers(adapter, model, self.hp.layers)
        return [adapter.rewrite_module_tmp.format(layer) for layer in layers], adapter.rewrite_is_conv1d

    def training_cases(self) -> list[EditCase]:
        """The meta-training facts (``train_cases`` when set, else ``train_dataset`` at ``train_path``)."""
        if self.train_cases is not None:
            cases = list(self.train_cases)
        else:
            if not self.hp.train_path:
                raise HarnessError(
                    "MALMEN needs training facts disjoint from the evaluated edits: set train_path (e.g. "
                    "../shared/data/zsre/zsre_mend_train-1k.json with train_dataset: zsre)",
                    field="hparams.train_path",
                )
            cases = load_cases(self.hp.train_dataset, self.hp.train_path, zsre_target=self.hp.zsre_target)
        if self.hp.train_range is not None:
            cases = cases[self.hp.train_range[0] : self.hp.train_range[1]]
        if not cases:
            raise HarnessError("no MALMEN training facts", field="hparams.train_path")
        return cases

    def hypernet(
        self,
        model: nn.Module,
        tokenizer,
        template: QueryTemplate,
        train_cases: Sequence[EditCase] | None = None,
        fingerprint: str | None = None,
    ) -> TrainResult:
        """Load the cached hypernetwork, meta-training (or resuming) it first when needed.

        Edits always use the hypernetwork of all its steps: a call stopped by ``max_minutes`` (a wall-clock
        limit, not a budget) raises :class:`~meg_harness.budget.TrainingStopped` and the next call resumes."""
        modules, conv1d = self.modules(model)
        root = Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()
        result = meta_train(
            model,
            tokenizer,
            template,
            self.hp,
            self.training_cases() if train_cases is None else train_cases,
            modules,
            conv1d,
            root,
            progress=self.progress,
            fingerprint=fingerprint,
        )
        if self.progress:
            tqdm.write(
                f"MALMEN meta-training: {result.state['step']} of {result.state['total_steps']} steps, "
                f"{result.state.get('elapsed_s', 0.0):.0f} s of training in all; "
                f"peak memory of this process {peak_rss_mb():.0f} MiB"
            )
        if not result.state.get("done"):
            log.warning(
                "MALMEN edits with a partly trained hypernetwork (step %d of %d)",
                result.state["step"],
                result.state["total_steps"],
            )
        self.trained = result
        return result

    # -- Editor ------------------------------------------------------------------------------------------
    def fit(
        self, model: nn.Module, tokenizer, cases: Sequence[EditCase], template: QueryTemplate
    ) -> DeltaEdited:
        if not cases:
            raise HarnessError("no edit cases given", field="cases")
        self._fingerprint = model_fingerprint(model)
        modules, conv1d = self.modules(model)
        train_cases = self.training_cases()
        seen = {_norm_prompt(c.prompt) for c in train_cases}
        overlap = sum(_norm_prompt(c.prompt) in seen for c in cases)
        if overlap:
            log.warning("%d of the %d edited prompts are also MALMEN training facts", overlap, len(cases))
        trained = self.hypernet(model, tokenizer, template, train_cases, self._fingerprint)
        net = trained.net
        clock = time.perf_counter()
        deltas, nll_before = compute_deltas(model, tokenizer, template, net, modules, cases, self.hp)
        deltas_s = time.perf_counter() - clock
        for name, dw in zip(modules, deltas):  # checked before anything is applied
            if not bool(dw.isfinite().all()):
                raise HarnessError(f"MALMEN produced a non-finite update for {name}", field="hparams")
        delta = WeightDelta()
        for name, dw in zip(modules, deltas):
            delta.add(model, f"{name}.weight", dw if conv1d else dw.T)
        history = trained.state.get("history", [])
        info = {
            "n_edits": len(cases),
            "edit_nll_before": nll_before,
            "train_facts": len(train_cases),
            "train_overlap": overlap,
            "meta_steps": trained.state["step"],
            "meta_total_steps": trained.state["total_steps"],
            "meta_done": bool(trained.state.get("done")),
            "meta_train_s": trained.state.get("elapsed_s"),
            "deltas_s": deltas_s,  # the edits' keys and gradients, and the hypernetwork's solve
            "reused": [
                reused_work(
                    "meta-training steps", trained.resumed_steps, trained.state["step"], trained.resumed_s
                )
            ],
            "meta_last": history[-1] if history else None,
            "hypernet_key": trained.state.get("key"),
            "lambda": [math.exp(net.log_lambda(i).item()) for i in range(len(modules))],
            "step_size": [net.step_size(i).item() for i in range(len(modules))],
            "update_norms": {name: float(dw.norm()) for name, dw in zip(modules, deltas)},
        }
        return DeltaEdited(model, tokenizer, delta, info)

    def save(self, edited: Edited, directory: Path) -> None:
        if not isinstance(edited, DeltaEdited):
            raise HarnessError("malmen can only save what its fit returned")
        save_delta_artifact(edited, directory, self.name, self._fingerprint)

    @classmethod
    def load(cls, directory: Path, model: nn.Module, tokenizer) -> DeltaEdited:
        return load_delta_artifact(directory, model, tokenizer)
