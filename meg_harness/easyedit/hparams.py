"""EasyEdit-style hyper-parameters for any registered method: :class:`HyperParams`, :func:`as_hparams`."""

from __future__ import annotations

import copy as copy_module
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meg_harness.editing.registry import get_editor_class, list_methods
from meg_harness.errors import HarnessError
from meg_harness.settings import with_base

# Keys of an hparams file that configure this API (model loading, template), not the method itself.
API_KEYS = frozenset({"device", "dtype", "fp16", "model_parallel", "template"})
_SCIENTIFIC = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+$")


def _floats_from_scientific(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string; EasyEdit turns such strings into floats; so do we (nested)."""
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    if isinstance(value, Mapping):
        return {k: _floats_from_scientific(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats_from_scientific(v) for v in value]
    return value


class HyperParams:
    """Hyper-parameters of any registered method, read from an EasyEdit-style YAML.

    Values are attributes (``hp.layers``, ``hasattr(hp, "batch_size")``) and items (``hp["lr"]``);
    ``alg_name`` (required) names the method: ``method`` is it lower-cased (``MEMIT`` -> ``memit``,
    ``AlphaEdit`` -> ``alphaedit``, ``MEG`` -> ``meg``). Values are validated by the method's own Editor when
    the object is built, so typos fail here with the file and field. ``device``, ``dtype``, ``fp16``,
    ``model_parallel`` and ``template`` configure loading/scoring and are not passed to the method.
    """

    def __init__(self, values: Mapping[str, Any], source: str | os.PathLike | None = None) -> None:
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "source", None if source is None else str(source))

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_hparams(cls, path: str | os.PathLike) -> HyperParams:
        """Read an EasyEdit-style ``.yaml``/``.yml``/``.json`` file (``.yaml`` is appended when the path has
        no suffix and does not exist); a file may name a ``base:`` file it extends."""
        import yaml

        path = Path(path)
        if not path.exists() and not path.suffix:
            path = path.with_suffix(".yaml")
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except OSError as error:
            raise HarnessError(f"cannot read hparams: {error.strerror}", file=path) from None
        except (ValueError, yaml.YAMLError):
            raise HarnessError("not valid YAML/JSON", file=path) from None
        if not isinstance(data, dict):
            raise HarnessError("an hparams file must be a mapping", file=path)
        try:
            data = with_base(data)
        except HarnessError as error:
            raise HarnessError(error.reason, file=error.file or path, field=error.field) from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any], source: str | os.PathLike | None = None) -> HyperParams:
        """From a mapping (a YAML's contents); checks ``alg_name`` and the method's own hparams."""
        hp = cls(_floats_from_scientific(dict(mapping)), source)
        hp.validate()
        return hp

    def validate(self) -> None:
        """A HarnessError naming the file and field for a missing/unknown ``alg_name`` or a bad value."""
        alg = self._values.get("alg_name")
        if not isinstance(alg, str) or not alg.strip():
            raise HarnessError("missing alg_name (e.g. MEMIT, FT, MEG)", file=self.source, field="alg_name")
        if self.method not in list_methods():
            raise HarnessError(
                f"unknown alg_name {alg!r}; known: {', '.join(list_methods())}",
                file=self.source,
                field="alg_name",
            )
        try:
            get_editor_class(self.method)(self.editor_hparams())  # every Editor validates at construction
        except HarnessError as error:
            raise HarnessError(error.reason, file=self.source, field=error.field) from None

    # -- access -------------------------------------------------------------------------------------------
    @property
    def alg_name(self) -> str:
        return str(self._values["alg_name"])

    @property
    def method(self) -> str:
        """The registry name: ``alg_name`` lower-cased."""
        return self.alg_name.strip().lower()

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"hparams have no {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        self._values[name] = value  # EasyEdit sets e.g. ``hparams.device`` at run time

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HyperParams) and self._values == other._values

    def __repr__(self) -> str:
        return f"HyperParams({self._values!r})"

    def to_dict(self) -> dict[str, Any]:
        return copy_module.deepcopy(self._values)

    def editor_hparams(self) -> dict[str, Any]:
        """What the method's Editor is built from (the API-level keys removed)."""
        return {k: v for k, v in self.to_dict().items() if k not in API_KEYS}


def as_hparams(hparams: Any) -> HyperParams:
    """A :class:`HyperParams` from a HyperParams, a ``MEGHyperParams``, a mapping or a YAML path."""
    if isinstance(hparams, HyperParams):
        return hparams
    if isinstance(hparams, (str, os.PathLike)):
        return HyperParams.from_hparams(hparams)
    if isinstance(hparams, Mapping):
        return HyperParams.from_dict(hparams)
    to_dict = getattr(hparams, "to_dict", None)
    if callable(to_dict) and getattr(hparams, "alg_name", None):  # MEGHyperParams and look-alikes
        return HyperParams.from_dict(to_dict())
    raise HarnessError(
        "expected hparams (a HyperParams, MEGHyperParams, mapping or YAML path), "
        f"got {type(hparams).__name__}",
        field="hparams",
    )
