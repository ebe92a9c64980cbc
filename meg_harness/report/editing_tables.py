"""The main editing tables (paper Tables 1-2 and 9-14) and AlphaEdit vs MeG by scale (Table 19)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from meg_harness.evaluate.protocol import ALL_METRIC_KEYS
from meg_harness.report.markdown import file_part, metric_cells, paper_cells, paper_label, pipe_table, section
from meg_harness.report.outputs import Built, Output, Skipped, markdown_output
from meg_harness.report.paper import PaperRow, layout_table, paper_row
from meg_harness.report.results import (
    COLUMN_TITLES,
    STARTS_WITH_NOTE,
    STARTS_WITH_TITLES,
    best_values,
    format_cell,
)
from meg_harness.report.runs import RunResult, Setting

EDITING = "Tables 1-2, 9-14 (editing performance per dataset × model × scale)"
ALPHAEDIT = "Table 19 (AlphaEdit vs MeG by edit scale)"
METRIC_HEADER = [COLUMN_TITLES[k] for k in ALL_METRIC_KEYS]
STARTS_WITH_HEADER = list(STARTS_WITH_TITLES.values())
LEGEND = (
    "Percentages; mean ± sample std over seeds where there are several. **Bold**: the best edited method "
    "per column (`none`, the unedited model, is the reference). Rows marked ↳ paper hold the paper's "
    "published numbers for the same model, dataset, scale and method (in italics): not our results."
)


def row_labels(rows: Sequence[RunResult]) -> list[str]:
    """Method labels, with the run folder added where one label comes from several runs."""
    counts = {label: sum(r.method == label for r in rows) for label in {r.method for r in rows}}
    return [r.method if counts[r.method] == 1 else f"{r.method} ({r.run})" for r in rows]


def our_row(label: str, row: RunResult, best: dict[str, float], n_rows: int) -> list[str]:
    metrics = metric_cells(row, row.stds, ALL_METRIC_KEYS, best, n_rows)
    starts_with = [format_cell(row.starts_with.get(kind)) for kind in STARTS_WITH_TITLES]
    return [label, *metrics, *starts_with, str(len(row.seeds))]


def paper_row_cells(paper: PaperRow) -> list[str]:
    """The paper's row under one of ours: its protocol metrics; no starts-with rates, no seeds."""
    return [paper_label(paper), *paper_cells(paper, ALL_METRIC_KEYS), *["–"] * len(STARTS_WITH_HEADER), "–"]


def editing_tables(runs: Sequence[RunResult]) -> Built:
    """One file per (dataset, model, scale): the methods (no variants) as rows."""
    plain = [r for r in runs if not r.is_variant]
    if not plain:
        return [Skipped(EDITING, "no run results (<run>/<method>/seed<k>/metrics.json)")]
    return [
        _editing_file(setting, list(rows)) for setting, rows in itertools.groupby(plain, lambda r: r.setting)
    ]


def _editing_file(setting: Setting, rows: list[RunResult]) -> Output:
    model, dataset, n_edits = setting.model, setting.dataset, setting.n_edits
    best = best_values(rows, ALL_METRIC_KEYS)
    body, n_paper = [], 0
    for label, row in zip(row_labels(rows), rows):
        body.append(our_row(label, row, best, len(rows)))
        paper = paper_row("editing", model, dataset, n_edits, row.method)
        if paper is not None:
            body.append(paper_row_cells(paper))
            n_paper += 1
    layout = layout_table("editing", dataset, n_edits)
    notes = [
        f"Layout of the paper's {layout.id}: {layout.caption}"
        if layout
        else "Layout of the paper's Tables 1-2 and 9-14 (the paper has no table for this dataset and scale).",
        LEGEND,
        STARTS_WITH_NOTE,
    ]
    if not n_paper:
        notes.append(
            f"The paper publishes no numbers for this setting ({model}, {dataset}, {n_edits} edits)."
        )
    table = pipe_table(["Method", *METRIC_HEADER, *STARTS_WITH_HEADER, "Seeds"], body)
    title = f"Editing performance: {setting.title}"
    name = f"editing_{file_part(dataset)}_{file_part(model)}_{setting.file_part}.md"
    return markdown_output(name, title, section(setting.title, notes, table))


def alphaedit_tables(runs: Sequence[RunResult]) -> Built:
    """Per (model, dataset) with AlphaEdit results: AlphaEdit and MeG at every scale run."""
    pairs = sorted({(r.model, r.dataset) for r in runs if r.method == "alphaedit"})
    if not pairs:
        return [Skipped(ALPHAEDIT, "no alphaedit run results")]
    return [_alphaedit_file(model, dataset, runs) for model, dataset in pairs]


def _alphaedit_file(model: str, dataset: str, runs: Sequence[RunResult]) -> Output:
    chosen = [
        r for r in runs if (r.model, r.dataset) == (model, dataset) and r.method in ("alphaedit", "meg")
    ]
    chosen.sort(key=lambda r: (r.n_edits, r.edits, r.method, r.run))
    body = []
    for (n_edits, edits), group in itertools.groupby(chosen, lambda r: (r.n_edits, r.edits)):
        rows = list(group)
        best = best_values(rows, ALL_METRIC_KEYS)
        scale = f"{n_edits} ({edits})" if edits else str(n_edits)
        for label, row in zip(row_labels(rows), rows):
            body.append([scale, *our_row(label, row, best, len(rows))])
            paper = paper_row("editing", model, dataset, n_edits, row.method, prefer="Table 19")
            if paper is not None:
                body.append(["", *paper_row_cells(paper)])
    notes = [
        "Layout of the paper's Table 19 (AlphaEdit vs MeG for Phi-2 on ZsRE by edit scale).",
        LEGEND,
        STARTS_WITH_NOTE,
    ]
    header = ["Edits", "Method", *METRIC_HEADER, *STARTS_WITH_HEADER, "Seeds"]
    table = pipe_table(header, body, text_columns=2)
    title = f"AlphaEdit vs MeG by edit scale: {dataset} · {model}"
    name = f"alphaedit_by_scale_{file_part(dataset)}_{file_part(model)}.md"
    return markdown_output(name, title, section(f"{model} · {dataset}", notes, table))
