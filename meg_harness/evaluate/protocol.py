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


# -- MQuAKE and UnKEBench ----------------------------------------------------------------------------------
# MQuAKE (Zhong et al., 2023; paper Table 18), percent: edit-wise = rewrite questions answered with their new
# target; instance-wise = cases whose rewrites are all answered; multi-hop = cases with a multi-hop question
# answered with the new answer (or an alias).
MQUAKE_KEYS = ("edit_wise", "instance_wise", "multi_hop")
# UnKEBench (Deng et al., 2025; paper Table 17), percent, for the question (reliability) and its paraphrase
# (generality): UnKE's "Bert Score" (cosine of all-MiniLM-L6-v2 sentence embeddings, the measure of Table
# 17) and its ROUGE-L (recall of the target's longest common subsequence).
UNKE_MEASURES = ("bert_score", "rougeL")
UNKE_KEYS = tuple(f"{kind}_{m}" for kind in ("reliability", "generality") for m in UNKE_MEASURES)


def metric_keys(dataset: str | None) -> tuple[str, ...]:
    """The headline metrics a run of ``dataset`` records (the six and Score unless MQuAKE or UnKE)."""
    return {"mquake": MQUAKE_KEYS, "unke": UNKE_KEYS}.get(str(dataset), ALL_METRIC_KEYS)


def all_per_case(items: Iterable[tuple[str, bool] | None]) -> float:
    """Fraction (0-1) of cases whose items are all true (``None`` items skipped); NaN without items."""
    cases: dict[str, bool] = {}
    for case_id, hit in filter(None, items):
        cases[case_id] = cases.get(case_id, True) and bool(hit)
    return sum(cases.values()) / len(cases) if cases else math.nan


def any_per_case(items: Iterable[tuple[str, bool] | None]) -> float:
    """Fraction (0-1) of cases with at least one true item (``None`` items skipped); NaN without items."""
    cases: dict[str, bool] = {}
    for case_id, hit in filter(None, items):
        cases[case_id] = cases.get(case_id, False) or bool(hit)
    return sum(cases.values()) / len(cases) if cases else math.nan


def summarize_mquake(items: Sequence[dict]) -> dict[str, float]:
    """MQuAKE's three metrics (percent) from scored probes (``case_id``, ``ag``; ``kind`` edit/multi_hop)."""
    edits = [(i["case_id"], bool(i["ag"])) for i in items if i["kind"] == "edit"]
    hops = [(i["case_id"], bool(i["ag"])) for i in items if i["kind"] == "multi_hop"]
    return {
        "edit_wise": mean_percent([float(hit) for _, hit in edits]),
        "instance_wise": 100.0 * all_per_case(edits),
        "multi_hop": 100.0 * any_per_case(hops),
    }


def summarize_unke(items: Sequence[dict]) -> dict[str, float]:
    """UnKEBench's metrics (percent) from scored probes (``kind`` edit/rephrase, a value per measure)."""
    metrics = {}
    for name, kind in (("reliability", "edit"), ("generality", "rephrase")):
        for measure in UNKE_MEASURES:
            metrics[f"{name}_{measure}"] = mean_percent([i[measure] for i in items if i["kind"] == kind])
    return metrics
