"""Ablation tables (paper Tables 4-8, 15-16): a method's labelled variants (``meg@no-fn``) beside it.

A variant's hparams are compared with its reference (the plain label, from the same run when there is
one). Variants given as ``{base: FILE, <overrides>}`` are taken to be the reference with the overrides.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from meg_harness.evaluate.protocol import ALL_METRIC_KEYS
from meg_harness.report.editing_tables import LEGEND, METRIC_HEADER, row_labels
from meg_harness.report.markdown import file_part, metric_cells, paper_cells, paper_label, pipe_table, section
from meg_harness.report.outputs import Built, Output, Skipped, markdown_output
from meg_harness.report.paper import PaperRow, paper_rows
from meg_harness.report.results import best_values
from meg_harness.report.runs import RunResult, Setting
from meg_harness.settings import BASE_KEY, flatten

ABLATIONS = "Tables 4-8, 15-16 (ablations: labelled variants such as meg@no-fn beside the method)"


def effective_hparams(result: RunResult, reference: RunResult | None) -> dict[str, Any]:
    """``result``'s hparams, flattened; a ``base`` + overrides variant is the reference's with overrides."""
    own = dict(result.hparams)
    if BASE_KEY in own and reference is not None and reference is not result:
        own.pop(BASE_KEY)
        return {**effective_hparams(reference, None), **flatten(own)}
    own.pop(BASE_KEY, None)
    return flatten(own)


def changed_hparams(result: RunResult, reference: RunResult | None) -> dict[str, Any]:
    """The hparams of ``result`` that differ from its reference's (empty for the reference itself)."""
    if reference is None or reference is result:
        return {}
    mine, theirs = effective_hparams(result, reference), effective_hparams(reference, None)
    missing = object()
    return {k: v for k, v in sorted(mine.items()) if theirs.get(k, missing) != v}


def reference_of(result: RunResult, results: Sequence[RunResult]) -> RunResult | None:
    """The plain-label result a variant is compared with: from the same run if possible."""
    plain = [r for r in results if r.method == result.base_method and r.setting == result.setting]
    same_run = [r for r in plain if r.run == result.run]
    return (same_run or plain or [None])[0]


def format_hparams(values: Mapping[str, Any]) -> str:
    """``a.b=1, c=text`` (JSON for non-strings: ``false``, ``0.1``)."""
    return ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(values.items()))


def matching_paper_rows(
    effective: Mapping[str, Any], changed: Mapping[str, Any], rows: Sequence[PaperRow]
) -> list[PaperRow]:
    """Published ablation rows for one of our rows: the paper's variant hparams have our values, and every
    hparam we changed is one of them."""
    return [
        row
        for row in rows
        if all(k in effective and effective[k] == v for k, v in row.hparams.items())
        and set(changed) <= set(row.hparams)
    ]


def ablation_tables(runs: Sequence[RunResult]) -> Built:
    """One file per (dataset, model, scale, method) that has labelled variants."""
    groups = sorted({(r.setting, r.base_method) for r in runs if r.is_variant})
    if not groups:
        return [Skipped(ABLATIONS, "no labelled variants (e.g. meg@no-fn) among the run results")]
    outputs = []
    for setting, method in groups:
        rows = [r for r in runs if r.setting == setting and r.base_method == method]
        outputs.append(_ablation_file(setting, method, rows))
    return outputs


def _ablation_file(setting: Setting, method: str, rows: list[RunResult]) -> Output:
    model, dataset, n_edits = setting.model, setting.dataset, setting.n_edits
    published = [r for r in paper_rows("ablation", model, dataset, n_edits) if r.method == method]
    rows.sort(key=lambda r: (r.is_variant, r.method, r.run))
    best = best_values(rows, ALL_METRIC_KEYS)
    body, shown = [], 0
    for label, row in zip(row_labels(rows), rows):
        reference = reference_of(row, rows)
        changed = changed_hparams(row, reference)
        what = format_hparams(changed) if row.is_variant else "(reference)"
        if row.is_variant and not row.hparams:
            what = "? (no hparams recorded)"
        cells = metric_cells(row, row.stds, ALL_METRIC_KEYS, best, len(rows))
        body.append([label, what or "(none)", *cells, str(len(row.seeds))])
        for paper in matching_paper_rows(effective_hparams(row, reference), changed, published):
            body.append(
                [
                    paper_label(paper, with_label=True),
                    format_hparams(paper.hparams),
                    *paper_cells(paper, ALL_METRIC_KEYS),
                    "–",
                ]
            )
            shown += 1
    notes = [
        "Layout of the paper's ablation tables (Tables 4-8, 15-16): the method's labelled variants beside "
        "it, with the hparams each variant changes against the reference (the plain label).",
        LEGEND.replace(
            "same model, dataset, scale and method", "same model, dataset, scale and variant hparams"
        ),
    ]
    if not shown:
        notes.append(
            f"The paper publishes no ablation numbers for this setting ({model}, {dataset}, {n_edits} edits)."
        )
    table = pipe_table(["Method", "Changed hparams", *METRIC_HEADER, "Seeds"], body, text_columns=2)
    title = f"Ablations of {method}: {setting.title}"
    name = f"ablation_{file_part(method)}_{file_part(dataset)}_{file_part(model)}_{setting.file_part}.md"
    return markdown_output(name, title, section(setting.title, notes, table))


def threshold_series(
    runs: Sequence[RunResult], key: str = "familiarity.threshold"
) -> dict[Setting, list[tuple[float, RunResult]]]:
    """Per setting: (threshold, result) for MeG results that differ from their reference only in ``key``."""
    per_setting: dict[Setting, list[RunResult]] = {}
    for run in runs:
        if run.base_method == "meg":
            per_setting.setdefault(run.setting, []).append(run)
    series = {}
    for setting, rows in per_setting.items():
        points: dict[float, RunResult] = {}
        for row in rows:
            reference = reference_of(row, rows)
            effective = effective_hparams(row, reference)
            if key in effective and set(changed_hparams(row, reference)) <= {key}:
                points.setdefault(float(effective[key]), row)
        if len(points) > 1:
            series[setting] = sorted(points.items())
    return series
