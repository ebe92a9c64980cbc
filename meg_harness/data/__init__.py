"""Canonical edit records and the loaders that produce them."""

from __future__ import annotations

import os

from meg_harness.data.counterfact import load_counterfact
from meg_harness.data.edit_case import EditCase, LocalityProbe, MultiHop
from meg_harness.data.mquake import flatten_mquake_edits, load_mquake
from meg_harness.data.selection import filter_unknown_facts, normalize_answer, select_cases
from meg_harness.data.sources import DATASETS, DOWNLOAD_SOURCES, check_dataset, demo_path, resolve_data_path
from meg_harness.data.unke import load_unke
from meg_harness.data.zsre import check_zsre_target, load_zsre


def load_cases(
    dataset: str,
    path: str | os.PathLike | None = None,
    *,
    zsre_target: str = "answers",
    cache_dir: str | os.PathLike | None = None,
) -> list[EditCase]:
    """EditCases of ``dataset`` (zsre | counterfact | mquake | unke) from ``path`` (a file, a URL,
    ``hf://...``, ``"download"``, or None for the shipped demo data; see :func:`resolve_data_path`).

    ``zsre_target``: ``"answers"`` (edit toward ``answers[0]``, the paper's protocol) or ``"alt"``."""
    name = check_dataset(dataset)
    if name == "zsre":
        check_zsre_target(zsre_target)  # before any download
    file = resolve_data_path(name, path, cache_dir)
    if name == "zsre":
        return load_zsre(file, zsre_target)
    loader = {"counterfact": load_counterfact, "mquake": load_mquake, "unke": load_unke}[name]
    return loader(file)


__all__ = [
    "DATASETS",
    "DOWNLOAD_SOURCES",
    "EditCase",
    "LocalityProbe",
    "MultiHop",
    "demo_path",
    "filter_unknown_facts",
    "flatten_mquake_edits",
    "load_cases",
    "load_counterfact",
    "load_mquake",
    "load_unke",
    "load_zsre",
    "normalize_answer",
    "resolve_data_path",
    "select_cases",
]
