"""The run config (YAML): what `meg-harness run` reads, validated before anything is computed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import yaml

from meg_harness.errors import HarnessError
from meg_harness.settings import (
    POSITIVE,
    Rule,
    Settings,
    one_of,
    read_hparams_file,
    settings_from_mapping,
    with_base,
)

DATASETS = ("zsre", "counterfact", "mquake", "unke")
DTYPES = ("float32", "float16", "bfloat16")


def _scales_ok(n_edits: Any) -> bool:
    scales = n_edits if isinstance(n_edits, list) else [n_edits]
    return bool(scales) and len(set(scales)) == len(scales) and all(n is None or n > 0 for n in scales)


def _distinct(values: list) -> bool:
    return bool(values) and len(set(values)) == len(values)


@dataclass
class RunConfig(Settings):
    """One experiment. Keys keep their meaning once landed; see README.md ("Run config")."""

    model: str = "smollm2-135m"
    dataset: str = "counterfact"
    data_path: str | None = None
    n_edits: int | list[int] | None = 256  # a list: one sub-run per scale, under OUT/n<N>/
    range: tuple[int, int] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: ["none"])
    hparams: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    template: str | None = None  # None = the model family's default short-answer template
    batch_size: int = 16
    zsre_target: str = "answers"  # answers (MeG protocol) | alt (EasyEdit)
    filter_known: bool = False  # paper A.9: keep only facts the unedited model answers wrongly
    one_per_subject: bool = True
    cache_dir: str | None = None

    CHECKS: ClassVar[Mapping[str, Rule]] = {
        "dataset": one_of(*DATASETS),
        "n_edits": Rule("a positive integer, null, or a list of distinct positive integers", _scales_ok),
        "range": Rule("[start, end) with 0 <= start < end", lambda r: 0 <= r[0] < r[1]),
        "seeds": Rule("a non-empty list of distinct integers", _distinct),
        "methods": Rule("a non-empty list of distinct method names", _distinct),
        "dtype": one_of(*DTYPES),
        "batch_size": POSITIVE,
        "zsre_target": one_of("answers", "alt"),
    }

    def check(self) -> None:
        for method in self.hparams:
            if method not in self.methods:
                raise HarnessError(f"hparams given for {method!r}, which is not in methods", field="hparams")

    def scales(self) -> list[RunConfig]:
        """One config per edit scale (itself when ``n_edits`` is not a list)."""
        if not isinstance(self.n_edits, list):
            return [self]
        return [replace(self, n_edits=n, seeds=list(self.seeds)) for n in self.n_edits]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["range"] = list(self.range) if self.range is not None else None
        return data


def parse_config(data: Any, source: str = "<config>") -> RunConfig:
    """Validate a mapping into a RunConfig; every problem names the file and the key. A single seed or
    method may be given without a list; ``hparams: null`` is no hparams."""
    if not isinstance(data, dict):
        raise HarnessError("a run config must be a YAML mapping of keys to values", file=source)
    values = dict(data)
    for key, wrap in (("seeds", int), ("methods", str)):
        if isinstance(values.get(key), wrap) and not isinstance(values[key], bool):
            values[key] = [values[key]]
    if "hparams" in values and values["hparams"] is None:
        values["hparams"] = {}
    try:
        return settings_from_mapping(RunConfig, values, "config key")
    except HarnessError as error:
        raise HarnessError(error.reason, file=source, field=error.field) from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run config YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise HarnessError(f"cannot read the run config: {error.strerror or error}", file=path) from None
    except UnicodeDecodeError:
        raise HarnessError("cannot read the run config: not a UTF-8 text file", file=path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise HarnessError(f"not valid YAML{where}", file=path) from None
    return parse_config(data, str(path))


def load_hparams(value: Any, method: str, source: str) -> dict[str, Any]:
    """A method's hyper-parameters: an inline mapping or the path of an EasyEdit-style YAML; either may
    name a ``base:`` hparams file it extends (``memit@x: {base: hparams/MEMIT/m.yaml, v_lr: 1.0}``)."""
    if value is None:
        return {}
    if not isinstance(value, (dict, str)):
        raise HarnessError("expected a YAML path or a mapping", file=source, field=f"hparams.{method}")
    try:
        return with_base(value) if isinstance(value, dict) else read_hparams_file(value)
    except HarnessError as error:
        # an hparams file's own key keeps its name (``base``); otherwise the run config's entry is named
        field = error.field if error.file and error.field else f"hparams.{method}"
        raise HarnessError(error.reason, file=error.file or source, field=field) from None
