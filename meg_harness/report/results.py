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


def read_result(path: Path) -> dict[str, Any]:
    """A ``metrics.json``: a JSON object, else a :class:`HarnessError` naming the file."""
    data = read_json(path)
    if not isinstance(data, dict):
        kind = {list: "list", str: "string", bool: "boolean"}.get(type(data), type(data).__name__)
        raise HarnessError(f"a result file must be a JSON object, got a JSON {kind}", file=path)
    return data


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


def mapping_or_empty(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a mapping, else an empty one (a missing or malformed optional section)."""
    return value if isinstance(value, Mapping) else {}


def number_or_nan(value: Any) -> float:
    """``value`` as a float when it is a JSON number, else NaN (a missing or malformed optional value)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


# The starts-with rate of greedy answers per probe kind (``ag_prefix`` in metrics.json): shown beside the
# protocol's strict AG so that our baseline numbers can be set beside the paper's, whose baseline code
# scored AG this way.
STARTS_WITH_TITLES = {"edit": "Rel AG starts-with", "rephrase": "Gen AG starts-with"}
STARTS_WITH_CSV = {"edit": "reliability_ag_starts_with", "rephrase": "generality_ag_starts_with"}
STARTS_WITH_NOTE = (
    "*AG starts-with*: the share of greedy answers that begin with the target (edit prompts, rephrases), "
    "the rule of the paper's baseline code; the protocol's AG is an exact match, and the Score uses only "
    "the six protocol metrics."
)


def starts_with_rates(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean ``ag_prefix`` rate per probe kind over metric records (seeds); NaN where a record has none."""
    rates = {}
    for kind in STARTS_WITH_TITLES:
        numbers = []
        for record in records:
            value = (record.get("ag_prefix") or {}).get(kind)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers.append(float(value))
        complete = bool(records) and len(numbers) == len(records)
        rates[kind] = math.fsum(numbers) / len(numbers) if complete else math.nan
    return rates


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
