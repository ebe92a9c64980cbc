"""Markdown pieces of the paper tables: a pipe table, our metric cells (best in bold), the paper's rows."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from meg_harness.report.paper import PaperRow
from meg_harness.report.results import Scored, format_cell, is_marked

PAPER_MARK = "↳ paper"


def pipe_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> list[str]:
    """A markdown table: the first ``text_columns`` columns left-aligned, the others right-aligned."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_escape(cell) for cell in row) + " |" for row in rows]
    return lines


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def metric_cells(
    row: Scored, stds: Mapping[str, float], keys: Sequence[str], best: Mapping[str, float], n_rows: int
) -> list[str]:
    """Our values (mean ± std) for ``keys``; the best edited value per column in bold."""
    cells = []
    for key in keys:
        text = format_cell(row.values.get(key), stds.get(key, math.nan))
        cells.append(f"**{text}**" if is_marked(row, key, best, n_rows) else text)
    return cells


def paper_cells(row: PaperRow, keys: Sequence[str]) -> list[str]:
    """The paper's values for ``keys`` in italics (``–`` where the paper has none)."""
    cells = []
    for key in keys:
        value = row.values.get(key)
        cells.append("–" if value is None else f"*{format_cell(float(value))}*")
    return cells


def paper_label(row: PaperRow, with_label: bool = False) -> str:
    """``↳ paper (Table 12)`` or, for ablations, ``↳ paper (Table 5: w/o FN)``."""
    return f"{PAPER_MARK} ({row.table}: {row.label})" if with_label else f"{PAPER_MARK} ({row.table})"


def file_part(text: str) -> str:
    """``text`` made safe for a file name (letters, digits, ``.``, ``-``, ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "unknown"


def section(title: str, notes: Sequence[str], table: Sequence[str]) -> list[str]:
    """``## title``, the notes as paragraphs, then the table and a blank line."""
    lines = [f"## {title}", ""]
    for note in notes:
        lines += [note, ""]
    return lines + list(table) + [""]
