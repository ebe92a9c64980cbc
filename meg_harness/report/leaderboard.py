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
    best_values,
    format_cell,
    is_marked,
    metric_values,
    read_json,
)
from meg_harness.report.runs import edit_selection, setting_title

__all__ = ["COLUMN_TITLES", "FORMATS", "Row", "collect_rows", "leaderboard", "render"]
FORMATS = ("md", "csv", "latex")


@dataclass(frozen=True)
class Row:
    group: tuple[str, str, str, str]  # (model, dataset, n_edits, edits drawn from: runs.edit_selection)
    method: str
    values: dict[str, float]
    stds: dict[str, float]
    n_seeds: int


def collect_rows(directory: Path) -> list[Row]:
    """Every ``<method>/metrics.json`` (the seed-averaged files) under ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise HarnessError("not a directory of results", file=directory)
    rows = []
    for path in sorted(directory.rglob("metrics.json")):
        if path.parent.name.startswith("seed") or any(p.startswith(".") for p in path.parts):
            continue
        data = read_json(path)
        if not isinstance(data, dict) or "method" not in data or "config" not in data:
            continue  # not a seed-averaged result of ours
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
            )
        )
    if not rows:
        raise HarnessError("no results found (looked for <method>/metrics.json)", file=directory)
    return sorted(rows, key=lambda r: (r.group, r.method != "none", -r.values["score"], r.method))


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
        ]
    )
    for row in rows:
        stds = ["" if math.isnan(row.stds[k]) else f"{row.stds[k]:.4f}" for k in ALL_METRIC_KEYS]
        writer.writerow(
            [*row.group, row.method, row.n_seeds, *(f"{row.values[k]:.4f}" for k in ALL_METRIC_KEYS), *stds]
        )
    return buffer.getvalue()


def _markdown(groups: dict[tuple[str, str, str, str], list[Row]]) -> str:
    lines = []
    for group, rows in groups.items():
        best = _best(rows)
        lines += [f"### {setting_title(*group)}", ""]
        lines.append("| Method | " + " | ".join(COLUMN_TITLES[k] for k in ALL_METRIC_KEYS) + " |")
        lines.append("|---|" + "---:|" * len(ALL_METRIC_KEYS))
        for row in rows:
            cells = []
            for key in ALL_METRIC_KEYS:
                marked = is_marked(row, key, best, len(rows))
                cells.append(f"**{_cell(row, key)}**" if marked else _cell(row, key))
            lines.append(f"| {row.method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _latex(groups: dict[tuple[str, str, str, str], list[Row]]) -> str:
    lines = []
    for group, rows in groups.items():
        best = _best(rows)
        lines.append(f"% {setting_title(*group)}")
        lines.append("\\begin{tabular}{l" + "r" * len(ALL_METRIC_KEYS) + "}")
        lines.append("\\toprule")
        lines.append("Method & " + " & ".join(COLUMN_TITLES[k] for k in ALL_METRIC_KEYS) + " \\\\")
        lines.append("\\midrule")
        for row in rows:
            cells = []
            for key in ALL_METRIC_KEYS:
                text = _cell(row, key).replace("±", "$\\pm$")
                marked = is_marked(row, key, best, len(rows))
                cells.append(f"\\textbf{{{text}}}" if marked else text)
            lines.append(row.method.replace("_", "\\_") + " & " + " & ".join(cells) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


def leaderboard(directory: Path, fmt: str = "md") -> str:
    """Collect and render in one call."""
    return render(collect_rows(directory), fmt)
