"""The paper's published numbers (``paper_numbers.yaml``) and the look-ups that put them beside ours."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

NUMBERS_FILE = "paper_numbers.yaml"


@dataclass(frozen=True)
class PaperRow:
    """One published result: a method (or an ablation variant) in one setting, values by column."""

    table: str  # "Table 12"
    kind: str  # editing | ablation | general | mquake | unke
    model: str
    dataset: str
    n_edits: int
    method: str
    label: str  # the paper's row name (ablations), else the method's display name
    hparams: Mapping[str, Any]  # ablations: the variant's dotted hparams
    values: Mapping[str, float | None]

    def matches(self, model: str, dataset: str | None, n_edits: int | None) -> bool:
        return (self.model, self.dataset, self.n_edits) == (model, dataset, n_edits)


@dataclass(frozen=True)
class PaperTable:
    id: str
    kind: str
    caption: str
    columns: tuple[str, ...]
    rows: tuple[PaperRow, ...]


@functools.lru_cache(maxsize=1)
def _data() -> dict[str, Any]:
    text = (resources.files("meg_harness.report") / NUMBERS_FILE).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def method_title(method: str) -> str:
    """The paper's name of one of our method labels (``memit`` -> ``MEMIT``); unknown labels unchanged."""
    return _data()["methods"].get(method, method)


@functools.lru_cache(maxsize=1)
def paper_tables() -> tuple[PaperTable, ...]:
    """Every table of ``paper_numbers.yaml``, in file order."""
    tables = []
    for spec in _data()["tables"]:
        defaults = {k: spec.get(k) for k in ("model", "dataset", "n_edits", "method")}
        rows = []
        for row in spec["rows"]:
            setting = {**defaults, **{k: row[k] for k in defaults if k in row}}
            label = row.get("label") or method_title(setting["method"])
            values = dict(zip(spec["columns"], row["values"]))
            rows.append(
                PaperRow(
                    spec["id"],
                    spec["kind"],
                    **setting,
                    label=label,
                    hparams=row.get("hparams", {}),
                    values=values,
                )
            )
        tables.append(
            PaperTable(spec["id"], spec["kind"], spec["caption"], tuple(spec["columns"]), tuple(rows))
        )
    return tuple(tables)


def paper_rows(kind: str, model: str, dataset: str | None, n_edits: int | None) -> list[PaperRow]:
    """The published rows of tables of ``kind`` in this setting (file order)."""
    return [
        row
        for table in paper_tables()
        if table.kind == kind
        for row in table.rows
        if row.matches(model, dataset, n_edits)
    ]


def paper_row(
    kind: str, model: str, dataset: str | None, n_edits: int | None, method: str, prefer: str | None = None
) -> PaperRow | None:
    """The published row of ``method`` in this setting, from table ``prefer`` when it has one."""
    found = [row for row in paper_rows(kind, model, dataset, n_edits) if row.method == method]
    preferred = [row for row in found if row.table == prefer]
    return (preferred or found or [None])[0]


def paper_columns(kind: str) -> list[str]:
    """The columns of the paper's tables of ``kind`` (first appearance order)."""
    columns = [c for table in paper_tables() if table.kind == kind for c in table.columns]
    return list(dict.fromkeys(columns))


def layout_table(kind: str, dataset: str, n_edits: int) -> PaperTable | None:
    """The paper's table of ``kind`` for this dataset and scale across models (e.g. Table 12), if any."""
    for table in paper_tables():
        settings = {(row.dataset, row.n_edits) for row in table.rows}
        models = {row.model for row in table.rows}
        if table.kind == kind and settings == {(dataset, n_edits)} and len(models) > 1:
            return table
    return None
