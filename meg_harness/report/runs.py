"""Run results (``meg-harness run`` output) found under a folder, aggregated over seeds per method label.

A method folder ``<run>/<label>/`` contributes its ``seed<k>/metrics.json`` files (mean and sample std over
seeds, as the runner averages them); a method folder with only the seed-averaged ``metrics.json`` (no seed
files) contributes that file and its ``<key>_std`` values. Hparams: those the editor resolved (kept in
``seed<k>/artifact/config.json`` by MeG) when present, else those metrics.json records.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from meg_harness.errors import HarnessError
from meg_harness.evaluate.protocol import ALL_METRIC_KEYS, metric_keys
from meg_harness.report.model_names import canonical_model
from meg_harness.report.results import (
    metric_values,
    number_or_nan,
    read_json,
    read_result,
    starts_with_rates,
)
from meg_harness.store import SEED_FOLDER

ARTIFACT_CONFIG = Path("artifact") / "config.json"


@dataclass(frozen=True, order=True)
class Setting:
    """What a result is comparable within: model, dataset, number of edits, and which edits (the data file
    and index range a run drew them from; dev and reserved ranges of one file are different settings)."""

    model: str
    dataset: str
    n_edits: int
    edits: str = ""  # e.g. "counterfact-edit.json [8000, 10000)"; "" when the run names no file and range
    edit_range: tuple[int, int] | None = None

    @property
    def title(self) -> str:
        return setting_title(self.model, self.dataset, self.n_edits, self.edits)

    @property
    def file_part(self) -> str:
        """``n256`` or ``n256_r8000-10000``: the part of an output file name that names the setting."""
        return f"n{self.n_edits}{range_file_part(self.edit_range)}"


def setting_title(model: str, dataset: str, n_edits: int | str, edits: str) -> str:
    """``model · dataset · N edits`` and, where known, where the edits come from."""
    title = f"{model} · {dataset} · {n_edits} edits"
    return f"{title} · {edits}" if edits else title


def range_file_part(edit_range: tuple[int, int] | None) -> str:
    """``_r8000-10000`` for an index range, ``""`` for none."""
    return "" if edit_range is None else f"_r{edit_range[0]}-{edit_range[1]}"


def edit_selection(config: Mapping[str, Any]) -> tuple[str, tuple[int, int] | None]:
    """The edits a run config drew from: a label (data file name and index range) and the range."""
    data_path, selected = config.get("data_path"), config.get("range")
    edit_range = None
    if (
        isinstance(selected, (list, tuple))
        and len(selected) == 2
        and all(isinstance(v, int) for v in selected)
    ):
        edit_range = (int(selected[0]), int(selected[1]))
    name = Path(data_path).name if isinstance(data_path, str) and data_path else ""
    where = f"[{edit_range[0]}, {edit_range[1]})" if edit_range else ""
    return " ".join(part for part in (name, where) if part), edit_range


@dataclass(frozen=True)
class RunResult:
    """One method label of one run folder: metrics (percentages) averaged over its seeds."""

    setting: Setting
    method: str
    values: dict[str, float]
    stds: dict[str, float]
    seeds: tuple[int, ...]
    run: str  # the run folder, relative to the scanned folder (POSIX)
    hparams: Mapping[str, Any] = field(default_factory=dict, compare=False)
    starts_with: Mapping[str, float] = field(default_factory=dict, compare=False)  # per probe kind
    seed_folders: tuple[Path, ...] = field(default=(), compare=False)  # () for a seed-averaged file

    @property
    def model(self) -> str:
        return self.setting.model

    @property
    def dataset(self) -> str:
        return self.setting.dataset

    @property
    def n_edits(self) -> int:
        return self.setting.n_edits

    @property
    def edits(self) -> str:
        return self.setting.edits

    @property
    def edit_range(self) -> tuple[int, int] | None:
        return self.setting.edit_range

    @property
    def base_method(self) -> str:
        """``meg`` for ``meg@no-fn``."""
        return self.method.partition("@")[0]

    @property
    def is_variant(self) -> bool:
        return "@" in self.method


T = TypeVar("T")


def scale_series(
    runs: Sequence[RunResult], measure: Callable[[Path], T], keep: Callable[[list[T]], bool]
) -> list[list[tuple[RunResult, list[T]]]]:
    """Runs comparable across scales (one model, dataset, and edits file with its index range), a list per
    such series sorted by number of edits, each with ``measure`` of its seed folders; a run is left out
    when it has no seed folders or ``keep`` rejects its measurements."""

    measured = []
    for run in sorted((r for r in runs if r.seed_folders), key=lambda r: (series_key(r), r.n_edits)):
        seeds = [measure(folder) for folder in run.seed_folders]
        if keep(seeds):
            measured.append((run, seeds))
    return [list(rows) for _, rows in itertools.groupby(measured, lambda m: series_key(m[0]))]


def series_key(run: RunResult) -> tuple[str, str, str]:
    """What runs comparable across edit scales share: model, dataset, and edits (file and index range)."""
    return run.model, run.dataset, run.edits


def visible_files(directory: Path, name: str, skip: Sequence[Path] = ()) -> list[Path]:
    """Files matching ``name`` under ``directory`` (sorted), outside hidden folders and ``skip`` folders."""
    skip = [Path(s).resolve() for s in skip]
    found = []
    for path in sorted(directory.rglob(name)):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if any(path.resolve().is_relative_to(s) for s in skip):
            continue
        found.append(path)
    return found


def collect_runs(directory: Path, skip: Sequence[Path] = ()) -> list[RunResult]:
    """Every method label of every run under ``directory``, sorted by setting, then as the leaderboard."""
    per_method: dict[Path, list[tuple[Path, dict]]] = {}
    averaged: dict[Path, tuple[Path, dict]] = {}
    for path in visible_files(directory, "metrics.json", skip):
        data = read_result(path)
        if "method" not in data or "config" not in data:
            continue  # not a result of ours
        if own_metrics(data):
            continue  # MQuAKE / UnKE: their own metrics, in Tables 17-18 (eval_tables)
        if SEED_FOLDER.match(path.parent.name):
            per_method.setdefault(path.parent.parent, []).append((path, data))
        else:
            averaged[path.parent] = (path, data)
    results = [_from_seeds(directory, folder, files) for folder, files in per_method.items()]
    results += [
        _from_average(directory, folder, *averaged[folder]) for folder in averaged if folder not in per_method
    ]
    return sorted(results, key=_order)


def own_metrics(data: Mapping[str, Any]) -> bool:
    """Whether a metrics.json holds a dataset's own metrics (MQuAKE, UnKE) instead of the protocol's six."""
    config = data.get("config")
    return isinstance(config, dict) and tuple(metric_keys(config.get("dataset"))) != tuple(ALL_METRIC_KEYS)


def _order(result: RunResult) -> tuple:
    return (result.setting, result.method != "none", -result.values["score"], result.method, result.run)


def _setting(data: Mapping[str, Any], path: Path) -> Setting:
    config = data["config"]
    if not isinstance(config, dict):
        raise HarnessError("'config' is not a mapping", file=path, field="config")
    for key in ("model", "dataset"):
        if not isinstance(config.get(key), str):
            raise HarnessError("result file lacks the run setting", file=path, field=f"config.{key}")
    counts = data.get("counts") if isinstance(data.get("counts"), dict) else {}
    n_edits = counts.get("cases", config.get("n_edits"))
    if isinstance(n_edits, bool) or not isinstance(n_edits, int):
        raise HarnessError("result file lacks the number of edits", file=path, field="counts.cases")
    return Setting(canonical_model(config["model"]), config["dataset"], n_edits, *edit_selection(config))


def _run_name(directory: Path, method_folder: Path) -> str:
    return method_folder.parent.relative_to(directory).as_posix()


def _from_seeds(directory: Path, folder: Path, files: list[tuple[Path, dict]]) -> RunResult:
    settings = {_setting(data, path) for path, data in files}
    if len(settings) > 1:
        raise HarnessError("seeds of one method were run in different settings", file=folder, field="config")
    per_seed = [metric_values(data, path) for path, data in files]
    values, stds = {}, {}
    for key in ALL_METRIC_KEYS:
        column = [m[key] for m in per_seed]
        values[key] = math.fsum(column) / len(column)
        stds[key] = statistics.stdev(column) if len(column) > 1 else math.nan
    first_path, first = files[0]
    seeds = tuple(int(SEED_FOLDER.match(path.parent.name).group(1)) for path, _ in files)
    hparams = _resolved_hparams(first_path.parent) or first.get("hparams")
    return RunResult(
        settings.pop(),
        str(first["method"]),
        values,
        stds,
        tuple(sorted(seeds)),
        _run_name(directory, folder),
        hparams if isinstance(hparams, dict) else {},
        starts_with_rates([data for _, data in files]),
        tuple(path.parent for path, _ in files),
    )


def _resolved_hparams(seed_folder: Path) -> dict | None:
    """The hparams as the editor resolved them (``artifact/config.json``; MeG), when the artifact is kept.

    metrics.json records hparams as configured, which may be ``{base: FILE, <overrides>}``."""
    config = seed_folder / ARTIFACT_CONFIG
    if not config.is_file():
        return None
    data = read_json(config)
    hparams = data.get("hparams") if isinstance(data, dict) else None
    return hparams if isinstance(hparams, dict) else None


def _from_average(directory: Path, folder: Path, path: Path, data: dict) -> RunResult:
    stds = {k: number_or_nan(data.get(f"{k}_std")) for k in ALL_METRIC_KEYS}
    seeds = tuple(int(s) for s in data.get("seeds", [0]))
    hparams = data.get("hparams") if isinstance(data.get("hparams"), dict) else {}
    return RunResult(
        _setting(data, path),
        str(data["method"]),
        metric_values(data, path),
        stds,
        seeds,
        _run_name(directory, folder),
        hparams,
        starts_with_rates([data]),
    )
