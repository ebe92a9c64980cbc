"""WeightDelta: the additive updates of the changed tensors; applied in place, restored bit-exactly, and
saved/loaded as safetensors (the weight-editing methods' artifact).

An update ``d`` is stored in the parameter's dtype and applied as ``w.add_(d)``: applying a loaded delta to
the same original weights reproduces the fitted model bit for bit. Restoring copies back the originals of
only the changed tensors (kept on the CPU).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from meg_harness.cache import atomic_write_text
from meg_harness.editing.base import Edited
from meg_harness.errors import HarnessError
from meg_harness.models.loading import model_fingerprint
from meg_harness.tensorfile import save_tensors

log = logging.getLogger(__name__)

DELTA_FILE = "delta.safetensors"
INFO_FILE = "edit.json"
FORMAT = "meg-harness/weight-delta/v1"


class WeightDelta:
    """Updates of named parameters of one model, with the originals needed to undo them."""

    def __init__(self) -> None:
        self.updates: dict[str, torch.Tensor] = {}
        self._originals: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.updates)

    def add(self, model: nn.Module, name: str, update: torch.Tensor) -> None:
        """Apply ``update`` (cast to the parameter's dtype) to parameter ``name`` and record it."""
        param = model.get_parameter(name)
        if tuple(update.shape) != tuple(param.shape):
            raise HarnessError(
                f"update of {name} has shape {tuple(update.shape)}, expected {tuple(param.shape)}"
            )
        if name in self.updates:
            raise HarnessError(f"{name} is already updated by this delta")
        with torch.no_grad():
            self._originals[name] = param.detach().to("cpu", copy=True)
            d = update.detach().to(param.device, param.dtype)
            param.add_(d)
            self.updates[name] = d.cpu()

    def apply(self, model: nn.Module) -> None:
        """Apply every stored update to ``model`` (keeping its originals for :meth:`restore`)."""
        updates, self.updates = self.updates, {}
        for name, d in updates.items():
            self.add(model, name, d)

    def restore(self, model: nn.Module) -> None:
        """Put the original tensors back (bit-exact); the updates stay recorded."""
        with torch.no_grad():
            for name, original in self._originals.items():
                model.get_parameter(name).copy_(original)
        self._originals.clear()

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        """Write the updates atomically; equal updates and metadata give byte-identical files."""
        save_tensors(self.updates, path, {"format": FORMAT, **(metadata or {})})

    @classmethod
    def read(cls, path: Path) -> tuple[WeightDelta, dict[str, str]]:
        """The updates stored at ``path`` (not applied) and the file's metadata."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                delta = cls()
                delta.updates = {k: handle.get_tensor(k) for k in handle.keys()}
        except (OSError, ValueError, RuntimeError) as error:
            raise HarnessError(f"cannot read the weight delta: {error}", file=path) from None
        if metadata.get("format") != FORMAT:
            raise HarnessError(f"not a {FORMAT} file", file=path)
        return delta, metadata


class DeltaEdited(Edited):
    """A model edited in place by a :class:`WeightDelta`; :meth:`restore` undoes it bit-exactly."""

    def __init__(self, model: Any, tokenizer: Any, delta: WeightDelta, info: dict | None = None) -> None:
        super().__init__(model, tokenizer)
        self.delta = delta
        self.info = dict(info or {})

    def restore(self) -> None:
        self.delta.restore(self.model)


def without_timings(value: Any) -> Any:
    """``value`` without the wall-clock entries (keys ``seconds`` or ending in ``_s``), recursively."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not _is_timing(k)}
    if isinstance(value, (list, tuple)):
        return [without_timings(v) for v in value]
    return value


def _is_timing(key: Any) -> bool:
    return isinstance(key, str) and (key == "seconds" or key.endswith("_s"))


def save_delta_artifact(edited: DeltaEdited, directory: Path, method: str, fingerprint: str | None) -> None:
    """``directory/delta.safetensors`` + ``directory/edit.json`` (method, changed tensors, diagnostics).

    Both files depend on the computation only: equal edits give byte-identical artifacts, whether fitted
    fresh or from caches (timings are left out of ``edit.json``; they are in the run's metrics.json)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"method": method, "base_fingerprint": fingerprint or ""}
    edited.delta.save(directory / DELTA_FILE, meta)
    info = {**meta, "format": FORMAT, "tensors": sorted(edited.delta.updates), **without_timings(edited.info)}
    atomic_write_text(directory / INFO_FILE, json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")


def load_delta_artifact(directory: Path, model: nn.Module, tokenizer: Any) -> DeltaEdited:
    """Apply a saved delta to ``model``; a different base model is an error when its shapes differ and a
    warning when only its fingerprint does."""
    path = Path(directory) / DELTA_FILE
    if not path.is_file():
        raise HarnessError(f"no {DELTA_FILE} in the artifact folder", file=directory)
    delta, metadata = WeightDelta.read(path)
    names = dict(model.named_parameters())
    for name, d in delta.updates.items():
        if name not in names or tuple(names[name].shape) != tuple(d.shape):
            raise HarnessError(
                f"the delta's tensor {name} {tuple(d.shape)} does not fit this model", file=path
            )
    expected = metadata.get("base_fingerprint")
    if expected and expected != model_fingerprint(model):
        log.warning("%s was fitted on a different base model (fingerprint %s)", path, expected)
    delta.apply(model)
    info_path = Path(directory) / INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return DeltaEdited(model, tokenizer, delta, info)
