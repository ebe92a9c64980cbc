"""Leaderboards: one row per method (grouped by model, dataset and scale), mean +- std over seeds."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meg_harness.errors import HarnessError
from meg_harness.evaluate.protocol import ALL_METRIC_KEYS
from meg_harness.report.results import (
    COLUMN_TITLES,
    STARTS_WITH_CSV,
    STARTS_WITH_NOTE,
    STARTS_WITH_TITLES,
    best_values,
    format_cell,
    is_marked,
    metric_values,
    read_json,
    read_result,
    starts_with_rates,
)
from meg_harness.report.runs import edit_selection, own_metrics, setting_title

__all__ = ["COLUMN_TITLES", "FORMATS", "Row", "collect_rows", "leaderboard", "render"]
FORMATS = ("md", "csv", "latex")


@dataclass(frozen=True)
class Row:
    group: tuple[str, str, str, str]  # (model, dataset, n_edits, edits drawn from: runs.edit_selection)
    method: str
    values: dict[str, float]
    stds: dict[str, float]
    n_seeds: int
    starts_with: dict[str, float]  # per probe kind (STARTS_WITH_TITLES); NaN when not recorded


def collect_rows(directory: Path) -> list[Row]:
    """Every ``<method>/metrics.json`` (the seed-averaged files) under ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise HarnessError("not a directory of results", file=directory)
    rows = []
    for path in sorted(directory.rglob("metrics.json")):
        if path.parent.name.startswith("seed") or any(p.startswith(".") for p in path.parts):
            continue
        data = read_result(path)
        if "method" not in data or "config" not in data or own_metrics(data):
            continue  # not a seed-averaged result of ours, or MQuAKE / UnKE (Tables 17-18: `tables`)
        values = metric_values(data, path)
        config = data["config"]
        n_edits = data.get("counts", {}).get("cases", config.get("n_edits"))
        edits, _ = edit_selection(config)
        group = (str(config.get("model")), str(config.get("dataset")), str(n_edits), edits)
        rows.append(
            Row(
                group,
                data["method"],
                values,
                {k: float(data.get(f"{k}_std", math.nan)) for k in ALL_METRIC_KEYS},
                len(data.get("seeds", [0])),
                _starts_with(path, data),
            )
        )
    if not rows:
        raise HarnessError("no results found (looked for <method>/metrics.json)", file=directory)
    return sorted(rows, key=lambda r: (r.group, r.method != "none", -r.values["score"], r.method))


def _starts_with(path: Path, averaged: dict) -> dict[str, float]:
    """The starts-with rates of a seed-averaged result (older runs recorded them per seed only)."""
    if "ag_prefix" in averaged:
        return starts_with_rates([averaged])
    seeds = [read_json(p) for p in sorted(path.parent.glob("seed*/metrics.json"))]
    return starts_with_rates([s for s in seeds if isinstance(s, dict)])


def _best(rows: Sequence[Row]) -> dict[str, float]:
    """Best value per column among edited methods (``none`` is the reference row, never marked)."""
    return best_values(rows, ALL_METRIC_KEYS)


def _cell(row: Row, key: str) -> str:
    return format_cell(row.values[key], row.stds[key])


def render(rows: Sequence[Row], fmt: str = "md") -> str:
    """The leaderboard as markdown, CSV or a LaTeX tabular; best per column in bold (md, latex)."""
    if fmt not in FORMATS:
        raise HarnessError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}", field="format")
    groups: dict[tuple[str, str, str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    if fmt == "csv":
        return _csv(rows)
    return (_markdown if fmt == "md" else _latex)(groups)


def _csv(rows: Sequence[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "model",
            "dataset",
            "n_edits",
            "edits",
            "method",
            "n_seeds",
            *ALL_METRIC_KEYS,
            *(f"{k}_std" for k in ALL_METRIC_KEYS),
            *STARTS_WITH_CSV.values(),
        ]
    )
    for row in rows:
        stds = ["" if math.isnan(row.stds[k]) else f"{row.stds[k]:.4f}" for k in ALL_METRIC_KEYS]
        values = [f"{row.values[k]:.4f}" for k in ALL_METRIC_KEYS]
        starts_with = ["" if math.isnan(v) else f"{v:.4f}" for v in row.starts_with.values()]
        writer.writerow([*row.group, row.method, row.n_seeds, *values, *stds, *starts_with])
    return buffer.getvalue()


def _markdown(groups: dict[tuple[str, str, str, str], list[Row]]) -> str:
    lines = []
    for group, rows in groups.items():
        best = _best(rows)
        lines += [f"### {setting_title(*group)}", ""]
        titles = [COLUMN_TITLES[k] for k in ALL_METRIC_KEYS] + list(STARTS_WITH_TITLES.values())
        lines.append("| Method | " + " | ".join(titles) + " |")
        lines.append("|---|" + "---:|" * len(titles))
        for row in rows:
            cells = []
            for key in ALL_METRIC_KEYS:
                marked = is_marked(row, key, best, len(rows))
                cells.append(f"**{_cell(row, key)}**" if marked else _cell(row, key))
            cells += [format_cell(row.starts_with[kind]) for kind in STARTS_WITH_TITLES]
            lines.append(f"| {row.method} | " + " | ".join(cells) + " |")
        lines.append("")
    if groups:
        lines += [STARTS_WITH_NOTE, ""]
    return "\n".join(lines)


def _latex(groups: dict[tuple[str, str, str, str], list[Row]]) -> str:
    lines = []
    for group, rows in groups.items():
        best = _best(rows)
        lines.append(f"% {setting_title(*group)}")
        titles = [COLUMN_TITLES[k] for k in ALL_METRIC_KEYS] + list(STARTS_WITH_TITLES.values())
        lines.append("\\begin{tabular}{l" + "r" * len(titles) + "}")
        lines.append("\\toprule")
        lines.append("Method & " + " & ".join(titles) + " \\\\")
        lines.append("\\midrule")
        for row in rows:
            cells = []
            for key in ALL_METRIC_KEYS:
                text = _cell(row, key).replace("±", "$\\pm$")
                marked = is_marked(row, key, best, len(rows))
                cells.append(f"\\textbf{{{text}}}" if marked else text)
            cells += [format_cell(row.starts_with[kind]).replace("–", "--") for kind in STARTS_WITH_TITLES]
            lines.append(row.method.replace("_", "\\_") + " & " + " & ".join(cells) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


def leaderboard(directory: Path, fmt: str = "md") -> str:
    """Collect and render in one call."""
    return render(collect_rows(directory), fmt)
