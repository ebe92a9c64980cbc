"""What each run cost: fit and evaluation hours, peak memory, and the work it read back from the cache.

Per method label and edit scale, from each seed folder's ``metrics.json``: ``timings`` (``fit_s``; every
other ``*_s`` is evaluation), ``resources.peak_rss_mb`` and the fit's ``reused`` list (z chunks, neurons,
generator or meta-training steps that an earlier process computed and this one read back, with their
seconds where they were recorded). The hours are one process's wall time, summed over seeds; the reference
runs use one torch thread per process, so they are CPU-hours.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meg_harness.report.markdown import file_part, pipe_table, section
from meg_harness.report.outputs import Built, Output, Skipped, markdown_output
from meg_harness.report.results import format_cell, mapping_or_empty, number_or_nan, read_result
from meg_harness.report.runs import RunResult, range_file_part, scale_series

COSTS = "Cost of each run by edit scale (fit and evaluation hours, peak memory)"
HOUR = 3600.0
NOTES = (
    "**Fit** and **evaluation** = hours of wall time of the run's process, summed over its seeds (1 torch "
    "thread per process in the reference runs: CPU-hours); **peak RSS** = the largest of its seeds. "
    "**Read back** = work an earlier process computed and this run read from the cache (z chunks of the "
    "locate-then-edit baselines, MeG's neurons and generator steps, MALMEN's meta-training steps), with "
    "the hours it took when it ran where that was recorded; **fit in all** = fit + those hours (≥ where "
    "some were not recorded).",
)


@dataclass(frozen=True)
class Reused:
    """Units of one stage read back from the cache, and the seconds they took (NaN: not recorded)."""

    stage: str
    read: int
    total: int
    seconds: float


@dataclass(frozen=True)
class SeedCost:
    """One seed folder's costs (seconds, MiB) and what its fit read back."""

    fit_s: float
    evaluation_s: float
    peak_rss_mb: float
    reused: tuple[Reused, ...] | None  # None: the result does not record what it read back (older runs)


def seed_cost(seed_folder: Path) -> SeedCost:
    """The costs recorded in one seed folder's ``metrics.json``."""
    data = read_result(seed_folder / "metrics.json")
    timings = mapping_or_empty(data.get("timings"))
    seconds = {k: number_or_nan(v) for k, v in timings.items() if k.endswith("_s")}
    fit = mapping_or_empty(data.get("fit"))
    recorded = fit.get("reused")  # absent in results from before it was recorded
    entries = [e for e in recorded if isinstance(e, Mapping)] if isinstance(recorded, list) else []
    read = tuple(_reused(e) for e in entries if _count(e.get("read")) > 0)
    return SeedCost(
        fit_s=seconds.pop("fit_s", math.nan),
        evaluation_s=math.fsum(seconds.values()) if seconds else math.nan,
        peak_rss_mb=number_or_nan(mapping_or_empty(data.get("resources")).get("peak_rss_mb")),
        reused=None if recorded is None else read,
    )


def _reused(entry: Mapping[str, Any]) -> Reused:
    stage, seconds = str(entry.get("stage", "?")), number_or_nan(entry.get("seconds"))
    return Reused(stage, _count(entry.get("read")), _count(entry.get("total")), seconds)


def _count(value: Any) -> int:
    number = number_or_nan(value)
    return 0 if math.isnan(number) else int(number)


def cost_tables(runs: Sequence[RunResult]) -> Built:
    """One file per (model, dataset, edits file and range): every method label's costs at each scale."""
    series = scale_series(runs, seed_cost, lambda seeds: any(not math.isnan(s.fit_s) for s in seeds))
    if not series:
        return [Skipped(COSTS, "no run results with timings (metrics.json timings.fit_s)")]
    return [_costs_file(rows) for rows in series]


def _hours(seconds: float) -> str:
    return format_cell(seconds / HOUR)


def _read_back(seeds: Sequence[SeedCost]) -> tuple[str, float]:
    """The read-back stages as text (``z chunks 6/29 (0.55 h)``) and their recorded seconds in all (NaN
    when one was not recorded)."""
    if any(seed.reused is None for seed in seeds):
        return "not recorded", math.nan
    parts, seconds = [], []
    for seed in seeds:
        for entry in seed.reused or ():
            hours = "" if math.isnan(entry.seconds) else f" ({_hours(entry.seconds)} h)"
            parts.append(f"{entry.stage} {entry.read}/{entry.total}{hours}")
            seconds.append(entry.seconds)
    return "; ".join(parts) or "nothing", math.fsum(seconds)


def _costs_file(measured: list[tuple[RunResult, list[SeedCost]]]) -> Output:
    body = []
    for run, seeds in measured:
        fit = math.fsum(s.fit_s for s in seeds)
        read_text, read_s = _read_back(seeds)
        in_all = _hours(fit + read_s) if not math.isnan(read_s) else f"≥ {_hours(fit)}"
        peak = max((s.peak_rss_mb for s in seeds if not math.isnan(s.peak_rss_mb)), default=math.nan)
        body.append(
            [
                str(run.n_edits),
                run.method,
                _hours(fit),
                _hours(math.fsum(s.evaluation_s for s in seeds)),
                format_cell(peak / 1024),
                in_all,
                read_text,
            ]
        )
    header = ["Edits", "Method", "Fit (h)", "Evaluation (h)", "Peak RSS (GB)", "Fit in all (h)", "Read back"]
    first = measured[0][0]
    title = " · ".join(part for part in (first.model, first.dataset, first.edits) if part)
    name = f"costs_{file_part(first.dataset)}_{file_part(first.model)}{range_file_part(first.edit_range)}.md"
    table = pipe_table(header, body, text_columns=2)
    return markdown_output(name, f"Costs by edit scale: {title}", section(title, NOTES, table))
