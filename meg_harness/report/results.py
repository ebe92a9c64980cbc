"""Helpers shared by the reports: reading result files, metric titles, cell formatting, best per column."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from meg_harness.errors import HarnessError
from meg_harness.evaluate.protocol import ALL_METRIC_KEYS

COLUMN_TITLES = {
    "reliability_ag": "Rel AG",
    "reliability_tf": "Rel TF",
    "generality_ag": "Gen AG",
    "generality_tf": "Gen TF",
    "locality_ag": "Loc AG",
    "locality_tf": "Loc TF",
    "score": "Score",
}
UNEDITED = "none"  # the method label of the unedited model: a reference row, never marked best


class Scored(Protocol):
    method: str
    values: Mapping[str, float]


def read_json(path: Path) -> Any:
    """The JSON content of ``path``; a :class:`HarnessError` naming the file when it is unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HarnessError(f"unreadable result file: {error}", file=path) from None


def metric_values(
    data: Mapping[str, Any], path: Path, keys: Sequence[str] = ALL_METRIC_KEYS
) -> dict[str, float]:
    """``keys`` of a result record as floats; a :class:`HarnessError` naming the first missing or bad one."""
    values = {}
    for key in keys:
        value = data.get(key)
        if value is None:
            raise HarnessError("result file lacks a metric", file=path, field=key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HarnessError(f"metric is not a number: {value!r}", file=path, field=key)
        values[key] = float(value)
    return values


def format_cell(value: float | None, std: float = math.nan) -> str:
    """``12.34`` or ``12.34 ± 0.56`` (std shown when known); ``–`` for a missing value."""
    if value is None or math.isnan(value):
        return "–"
    text = f"{value:.2f}"
    if not math.isnan(std):
        text += f" ± {std:.2f}"
    return text


def best_values(rows: Iterable[Scored], keys: Sequence[str]) -> dict[str, float]:
    """Best (highest) value per key among edited methods; the unedited row counts only when alone."""
    rows = list(rows)
    edited = [r for r in rows if r.method != UNEDITED] or rows
    best = {}
    for key in keys:
        present = [r.values[key] for r in edited if key in r.values and not math.isnan(r.values[key])]
        if present:
            best[key] = max(present)
    return best


def is_marked(row: Scored, key: str, best: Mapping[str, float], n_rows: int) -> bool:
    """Whether ``row``'s ``key`` is bold: an edited method holding the best value among several rows."""
    return row.method != UNEDITED and n_rows > 1 and key in best and row.values.get(key) == best[key]
