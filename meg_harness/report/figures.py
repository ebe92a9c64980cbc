"""The paper's figures as PNG: Score vs edit scale (Figs. 3-4; with AG per metric), Reliability vs layer
(Figs. 5-7), and Score / Generality / Locality vs the familiarity threshold (Table 16 as a plot).

Drawn on a bare Agg canvas with matplotlib's default style and saved without metadata, so the same inputs
give the same bytes.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Sequence

from meg_harness.report.ablation import threshold_series
from meg_harness.report.markdown import file_part
from meg_harness.report.outputs import Built, Output, Skipped
from meg_harness.report.paper import method_title, paper_tables
from meg_harness.report.runs import RunResult, range_file_part
from meg_harness.report.scales import ScaleCurves, scale_curves
from meg_harness.report.sweeps import LayerSweep

SCALE = "Figures 3-4 (Score vs number of edits)"
LAYERS = "Figures 5-7 (Reliability AG vs layer of the edit neuron)"
THRESHOLD = "Threshold sensitivity (Score, Generality, Locality vs familiarity.threshold; cf. Table 16)"
THRESHOLD_CURVES = {
    "score": "Score",
    "generality_ag": "Generality AG",
    "locality_ag": "Locality AG",
    "locality_tf": "Locality TF",
}


def _new_axes(figsize: tuple[float, float] = (6.4, 4.0), panels: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    return figure, axes[0] if panels == 1 else list(axes)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _draw(draw, *args, panels: int = 1) -> bytes:
    """Run ``draw(axes, *args)`` under matplotlib's default style (``axes`` a list when ``panels`` > 1,
    side by side); the PNG bytes."""
    import matplotlib.style

    with matplotlib.style.context("default"):
        figure, axes = _new_axes((6.4 * panels, 4.0), panels)
        draw(axes, *args)
        return _png(figure)


AG_CURVES = {
    "reliability_ag": "Reliability AG",
    "generality_ag": "Generality AG",
    "locality_ag": "Locality AG",
}


def scale_figures(runs: Sequence[RunResult]) -> Built:
    """Per model: each method's Score vs the number of edits, a panel per dataset (and edit range) with runs
    at two or more scales (Figs. 3-4); and per such panel, Reliability / Generality / Locality AG vs edits.
    One run per method and scale, chosen as :mod:`meg_harness.report.scales` says."""
    panels: dict[str, list[ScaleCurves]] = {}
    for curve in scale_curves(runs):
        if len(curve.scales) >= 2 and curve.methods(with_unedited=False):
            panels.setdefault(curve.model, []).append(curve)
    outputs = []
    for model, curves in panels.items():
        png = _draw(_scale_panels, curves, panels=len(curves))
        names = ", ".join(curve.dataset for curve in curves)
        outputs.append(
            Output(
                f"score_vs_scale_{file_part(model)}.png", png, f"Score vs number of edits: {model} ({names})"
            )
        )
        for curve in curves:
            png = _draw(_ag_panels, curve, panels=len(AG_CURVES))
            where = f"{file_part(curve.dataset)}_{file_part(model)}{range_file_part(curve.edit_range)}"
            title = f"Reliability / Generality / Locality AG vs number of edits: {curve.dataset} · {model}"
            outputs.append(
                Output(f"ag_vs_scale_{where}.png", png, title + (f" · {curve.edits}" if curve.edits else ""))
            )
    return outputs or [Skipped(SCALE, "no model × dataset with run results at two or more edit scales")]


def _scale_panels(axes, curves: Sequence[ScaleCurves]) -> None:
    for panel, curve in zip(axes if isinstance(axes, list) else [axes], curves):
        _scale_plot(panel, curve)


def _ag_panels(axes, curve: ScaleCurves) -> None:
    scales = curve.scales
    for panel, (key, label) in zip(axes, AG_CURVES.items()):
        methods = curve.methods(with_unedited=False)
        for method, color in zip(methods, itertools.cycle(f"C{i}" for i in range(10))):
            points = curve.points[method]
            xs = sorted(points)
            panel.plot(xs, [points[n].values[key] for n in xs], marker="o", color=color, label=method)
        panel.set_xscale("log", base=2)
        panel.set_xticks(scales, [str(n) for n in scales])
        panel.minorticks_off()
        panel.set_xlabel("number of edits")
        panel.set_ylabel(f"{label} (%)")
        panel.set_ylim(0, 100)
        panel.set_title(f"{curve.model} · {curve.dataset}: {label}")
        panel.grid(alpha=0.3)
    axes[0].legend(fontsize="small")


def _paper_scores(model: str, dataset: str, method: str) -> list[tuple[int, float]]:
    points: dict[int, float] = {}
    for table in paper_tables():
        for row in table.rows:
            if table.kind == "editing" and (row.model, row.dataset, row.method) == (model, dataset, method):
                points.setdefault(row.n_edits, row.values["score"])
    return sorted(points.items())


def _scale_plot(axes, curve: ScaleCurves) -> None:
    colors = itertools.cycle(f"C{i}" for i in range(10))
    scales: set[int] = set()
    for method in curve.methods(with_unedited=False):
        points = curve.points[method]
        xs = sorted(points)
        ys = [points[n].values["score"] for n in xs]
        errors = [0.0 if math.isnan(points[n].stds["score"]) else points[n].stds["score"] for n in xs]
        color = next(colors)
        axes.errorbar(xs, ys, yerr=errors, marker="o", color=color, capsize=3, label=method)
        scales.update(xs)
        published = _paper_scores(curve.model, curve.dataset, method)
        if published:
            axes.plot(
                *zip(*published),
                "--",
                marker="x",
                color=color,
                alpha=0.7,
                label=f"paper: {method_title(method)}",
            )
            scales.update(n for n, _ in published)
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted(scales), [str(n) for n in sorted(scales)])
    axes.minorticks_off()
    axes.set_xlabel("number of edits")
    axes.set_ylabel("Score (%)")
    axes.set_ylim(0, 100)
    axes.set_title(f"{curve.model} · {curve.dataset}: Score vs edit scale")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def layer_figures(sweeps: Sequence[LayerSweep]) -> Built:
    """Per model: Reliability AG vs layer, one line per layer sweep (dataset)."""
    if not sweeps:
        return [Skipped(LAYERS, "no layer_sweep.json (meg-harness layer-sweep)")]
    outputs = []
    for model in sorted({s.model for s in sweeps}):
        mine = sorted((s for s in sweeps if s.model == model), key=lambda s: (s.dataset, s.source))
        png = _draw(_layer_plot, model, mine)
        outputs.append(
            Output(f"reliability_vs_layer_{file_part(model)}.png", png, f"Reliability vs layer: {model}")
        )
    return outputs


def _layer_plot(axes, model: str, sweeps: Sequence[LayerSweep]) -> None:
    datasets = [s.dataset for s in sweeps]
    for sweep in sweeps:
        label = sweep.dataset + (f" (n={sweep.n})" if sweep.n is not None else "")
        if datasets.count(sweep.dataset) > 1:
            label += f" [{sweep.source}]"
        axes.plot(sweep.layers, sweep.reliability_ag, "o-", markersize=4, label=label)
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("layer of the edit neuron")
    axes.set_ylabel("Reliability AG (%)")
    axes.set_ylim(0, 105)
    axes.set_title(f"{model}: single-neuron Reliability per layer")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def threshold_figures(runs: Sequence[RunResult]) -> Built:
    """Per setting with MeG results that differ only in the familiarity threshold (two or more values)."""
    outputs = []
    for setting, points in sorted(threshold_series(runs).items()):
        png = _draw(_threshold_plot, setting.title, points)
        name = f"threshold_{file_part(setting.dataset)}_{file_part(setting.model)}_{setting.file_part}.png"
        outputs.append(Output(name, png, f"Threshold sensitivity: {setting.title}"))
    reason = "no MeG results that differ only in familiarity.threshold (e.g. meg@eps0.1 beside meg)"
    return outputs or [Skipped(THRESHOLD, reason)]


def _threshold_plot(axes, title: str, points: Sequence[tuple[float, RunResult]]) -> None:
    thresholds = [t for t, _ in points]
    for key, label in THRESHOLD_CURVES.items():
        axes.plot(thresholds, [r.values[key] for _, r in points], "o-", label=label)
    if thresholds[0] > 0 and thresholds[-1] / thresholds[0] >= 10:
        axes.set_xscale("log")
    axes.set_xticks(thresholds, [f"{t:g}" for t in thresholds])
    axes.minorticks_off()
    axes.set_xlabel("familiarity threshold (entropy, nats)")
    axes.set_ylabel("%")
    axes.set_ylim(0, 105)
    axes.set_title(f"{title}: familiarity threshold")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
