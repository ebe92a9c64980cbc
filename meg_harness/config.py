"""The run config (YAML): what `meg-harness run` reads, validated before anything is computed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from meg_harness.errors import HarnessError
from meg_harness.settings import read_hparams_file, with_base

DATASETS = ("zsre", "counterfact", "mquake", "unke")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class RunConfig:
    """One experiment. Keys keep their meaning once landed; see DESIGN.md (CLI contract)."""

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

    def scales(self) -> list[RunConfig]:
        """One config per edit scale (itself when ``n_edits`` is not a list)."""
        if not isinstance(self.n_edits, list):
            return [self]
        return [replace(self, n_edits=n, seeds=list(self.seeds)) for n in self.n_edits]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["range"] = list(self.range) if self.range is not None else None
        return data


_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "dataset": (str,),
    "data_path": (str, type(None)),
    "n_edits": (int, list, type(None)),
    "range": (list, type(None)),
    "seeds": (list, int),
    "methods": (list, str),
    "hparams": (dict, type(None)),
    "device": (str,),
    "dtype": (str,),
    "template": (str, type(None)),
    "batch_size": (int,),
    "zsre_target": (str,),
    "filter_known": (bool,),
    "one_per_subject": (bool,),
    "cache_dir": (str, type(None)),
}


def parse_config(data: Any, source: str = "<config>") -> RunConfig:
    """Validate a mapping into a RunConfig; every problem names the file and the key."""
    if not isinstance(data, dict):
        raise HarnessError("a run config must be a YAML mapping of keys to values", file=source)
    known = {f.name for f in fields(RunConfig)}
    for key in data:
        if key not in known:
            raise HarnessError(
                f"unknown config key; known keys: {', '.join(sorted(known))}", file=source, field=key
            )
    for key, value in data.items():
        allowed = _TYPES[key]
        if isinstance(value, bool) and bool not in allowed:
            allowed_ok = False
        else:
            allowed_ok = isinstance(value, allowed)
        if not allowed_ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise HarnessError(
                f"expected {names}, got {type(value).__name__} {value!r}", file=source, field=key
            )
    values = dict(data)
    if isinstance(values.get("seeds"), int):
        values["seeds"] = [values["seeds"]]
    if isinstance(values.get("methods"), str):
        values["methods"] = [values["methods"]]
    values["hparams"] = values.get("hparams") or {}
    config = RunConfig(**values)
    _check_values(config, source)
    return config


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_values(config: RunConfig, source: str) -> None:
    if config.dataset not in DATASETS:
        raise HarnessError(
            f"unknown dataset {config.dataset!r}; use one of {', '.join(DATASETS)}",
            file=source,
            field="dataset",
        )
    if config.dtype not in DTYPES:
        raise HarnessError(
            f"unknown dtype {config.dtype!r}; use one of {', '.join(DTYPES)}", file=source, field="dtype"
        )
    scales = config.n_edits if isinstance(config.n_edits, list) else [config.n_edits]
    if (
        not scales
        or not all(n is None or _positive_int(n) for n in scales)
        or len(set(scales)) != len(scales)
    ):
        raise HarnessError(
            "n_edits must be a positive integer, null, or a list of distinct positive integers",
            file=source,
            field="n_edits",
        )
    if config.range is not None:
        if len(config.range) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in config.range
        ):
            raise HarnessError("range must be [start, end) with two integers", file=source, field="range")
        start, end = config.range
        if not 0 <= start < end:
            raise HarnessError(f"range [{start}, {end}) is empty or negative", file=source, field="range")
        config.range = (start, end)
    if not config.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in config.seeds):
        raise HarnessError("seeds must be a non-empty list of integers", file=source, field="seeds")
    if len(set(config.seeds)) != len(config.seeds):
        raise HarnessError("seeds must be distinct", file=source, field="seeds")
    if not config.methods or not all(isinstance(m, str) for m in config.methods):
        raise HarnessError("methods must be a non-empty list of method names", file=source, field="methods")
    if len(set(config.methods)) != len(config.methods):
        raise HarnessError("methods must be distinct", file=source, field="methods")
    if config.zsre_target not in ("answers", "alt"):
        raise HarnessError("zsre_target must be 'answers' or 'alt'", file=source, field="zsre_target")
    if config.batch_size <= 0:
        raise HarnessError("batch_size must be positive", file=source, field="batch_size")
    for method in config.hparams:
        if method not in config.methods:
            raise HarnessError(
                f"hparams given for {method!r}, which is not in methods", file=source, field="hparams"
            )


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run config YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise HarnessError(f"cannot read the run config: {error.strerror or error}", file=path) from None
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
        raise HarnessError(error.reason, file=error.file or source, field=f"hparams.{method}") from None
