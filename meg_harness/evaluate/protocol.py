"""Pure rules of the protocol: AG comparison, aggregation into the six metrics (answers are normalised
as :func:`meg_harness.prompts.normalize_answer` says)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

from meg_harness.prompts import normalize_answer

METRIC_KEYS = (
    "reliability_ag",
    "reliability_tf",
    "generality_ag",
    "generality_tf",
    "locality_ag",
    "locality_tf",
)
ALL_METRIC_KEYS = (*METRIC_KEYS, "score")


def ag_match(prediction: str, target: str) -> bool:
    """AG success: the normalised prediction equals the normalised target."""
    return normalize_answer(prediction) == normalize_answer(target)


def ag_prefix_match(prediction: str, target: str) -> bool:
    """Secondary, never mixed with AG: the normalised prediction starts with the target."""
    target = normalize_answer(target)
    return bool(target) and normalize_answer(prediction).startswith(target)


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (the Score of a method that fails one metric)."""
    values = list(values)
    if not values or any(v <= 0 for v in values):
        return 0.0
    return statistics.harmonic_mean(values)


def mean_percent(values: Sequence[float]) -> float:
    """Mean of per-item values in [0, 1], as a percentage (NaN when there are no items)."""
    return 100.0 * sum(values) / len(values) if values else math.nan


def summarize(items: Sequence[dict]) -> dict[str, float]:
    """The six metrics (percent) and Score from scored probes (``kind`` in edit/rephrase/locality)."""
    by_kind: dict[str, list[dict]] = {"edit": [], "rephrase": [], "locality": []}
    for item in items:
        by_kind[item["kind"]].append(item)
    metrics: dict[str, float] = {}
    for name, kind in (("reliability", "edit"), ("generality", "rephrase"), ("locality", "locality")):
        metrics[f"{name}_ag"] = mean_percent([float(i["ag"]) for i in by_kind[kind]])
        metrics[f"{name}_tf"] = mean_percent([i["tf"] for i in by_kind[kind]])
    present = [metrics[k] for k in METRIC_KEYS if not math.isnan(metrics[k])]
    metrics["score"] = harmonic_mean(present)
    return metrics
