"""The scale leaderboard: every method × number of edits × dataset, one file per model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from meg_harness.report.markdown import file_part, pipe_table, section
from meg_harness.report.outputs import Built, Skipped, markdown_output
from meg_harness.report.results import best_values, format_cell, is_marked
from meg_harness.report.runs import RunResult
from meg_harness.report.scales import ScaleCurves, scale_curves

SCALE_LEADERBOARD = "Scale leaderboard (every method × number of edits × dataset)"
AG_KEYS = ("reliability_ag", "generality_ag", "locality_ag")
NOTES = (
    "Score (harmonic mean of the six protocol metrics) at each number of edits, one row per method; "
    "**bold**: the best edited method at that scale (`none`, the unedited model, is the reference); "
    "**Δ** = Score at the largest scale the method has minus its Score at the smallest; – = not run. "
    "The second table gives Reliability / Generality / Locality AG at each scale. Percentages, mean over "
    "seeds.",
    "Where several runs give one method at one scale, the point comes from the study (`RUN` of "
    "`RUN/n<N>/`) that ran the method at the most scales of this series; **Runs** lists the run folders "
    "each scale's points come from.",
)


def scale_leaderboards(runs: Sequence[RunResult]) -> Built:
    """One file per model with runs at two or more scales of one series: a section per dataset and edits
    range (single-scale series of that model included), Score and AG by scale."""
    curves = scale_curves(runs)
    models = sorted({c.model for c in curves if len(c.scales) >= 2})
    if not models:
        return [Skipped(SCALE_LEADERBOARD, "no model × dataset with run results at two or more edit scales")]
    outputs = []
    for model in models:
        lines = [*(f"{note}\n" for note in NOTES)]
        for curve in (c for c in curves if c.model == model):
            lines += _section(curve)
        name = f"scale_leaderboard_{file_part(model)}.md"
        outputs.append(markdown_output(name, f"Scale leaderboard: {model}", lines))
    return outputs


def _section(curve: ScaleCurves) -> list[str]:
    scales = curve.scales
    at_scale = {n: [by_scale[n] for by_scale in curve.points.values() if n in by_scale] for n in scales}
    best = {n: best_values(rows, ["score"]) for n, rows in at_scale.items()}
    scores, ags = [], []
    for method in curve.methods():
        by_scale = {n: run for n, run in curve.points[method].items() if n in at_scale}
        cells = []
        for n in scales:
            run = by_scale.get(n)
            text = format_cell(run.values["score"] if run else None)
            marked = run is not None and is_marked(run, "score", best[n], len(at_scale[n]))
            cells.append(f"**{text}**" if marked else text)
        scores.append([method, *cells, _delta(by_scale)])
        ags.append([method, *(_ag_cell(by_scale.get(n)) for n in scales)])
    header = ["Method", *(str(n) for n in scales)]
    title = " · ".join(part for part in (curve.model, curve.dataset, curve.edits) if part)
    runs = "; ".join(f"{n}: {', '.join(sorted({run.run for run in at_scale[n]}))}" for n in scales)
    tables = [
        "Score by number of edits:",
        "",
        *pipe_table([*header, "Δ"], scores),
        "",
        "Rel AG / Gen AG / Loc AG by number of edits:",
        "",
        *pipe_table(header, ags),
        "",
        f"**Runs**: {runs}.",
    ]
    return section(title, (), tables)


def _delta(by_scale: Mapping[int, RunResult]) -> str:
    if len(by_scale) < 2:
        return "–"
    first, last = by_scale[min(by_scale)], by_scale[max(by_scale)]
    return f"{last.values['score'] - first.values['score']:+.2f}"


def _ag_cell(run: RunResult | None) -> str:
    if run is None:
        return "–"
    return " / ".join(format_cell(run.values[key]) for key in AG_KEYS)
