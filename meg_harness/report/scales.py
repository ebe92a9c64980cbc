"""Runs comparable across edit scales, one run per method and scale: the points of Figures 3-4 and of the
scale leaderboard.

A series is one model, dataset and edits file with its index range (dev and reserved ranges are separate
series). Where several runs give one method at one scale (a scale study beside an earlier single-scale
run), the point comes from the *study* that ran that method at the most scales of the series, then the
first run folder by name: a multi-scale run writes ``RUN/n<N>/<method>``, and ``RUN`` is its study.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meg_harness.report.results import UNEDITED
from meg_harness.report.runs import RunResult, series_key

SCALE_FOLDER = re.compile(r"^n\d+$")


@dataclass(frozen=True)
class ScaleCurves:
    """One series: per method label, the run drawn at each number of edits."""

    model: str
    dataset: str
    edits: str  # data file and index range, e.g. "counterfact-edit.json [8000, 10000)"
    edit_range: tuple[int, int] | None
    points: Mapping[str, Mapping[int, RunResult]]

    @property
    def scales(self) -> list[int]:
        """The numbers of edits some edited method was run at (the unedited model's alone when none was)."""
        methods = self.methods(with_unedited=False) or self.methods()
        return sorted({n for method in methods for n in self.points[method]})

    def methods(self, with_unedited: bool = True) -> list[str]:
        """Method labels, the unedited model first."""
        labels = sorted(self.points, key=lambda m: (m != UNEDITED, m))
        return [m for m in labels if with_unedited or m != UNEDITED]


def study_of(run: RunResult) -> str:
    """The study a run belongs to: ``RUN`` for ``RUN/n<N>``; a single-scale run is its own study."""
    parent, _, last = run.run.rpartition("/")
    return parent if parent and SCALE_FOLDER.match(last) else run.run


def scale_curves(runs: Sequence[RunResult]) -> list[ScaleCurves]:
    """Every series of the methods' runs (variants such as ``meg@no-fn`` left out), sorted by model,
    dataset and edits."""

    plain = [r for r in runs if not r.is_variant]
    curves = []
    for key in sorted({series_key(r) for r in plain}):
        rows = [r for r in plain if series_key(r) == key]
        methods = {r.method for r in rows}
        points = {method: _choose([r for r in rows if r.method == method]) for method in methods}
        curves.append(ScaleCurves(*key, rows[0].edit_range, points))
    return curves


def _choose(candidates: Sequence[RunResult]) -> dict[int, RunResult]:
    """One run per scale: from the study with the most scales of this method, then by run folder."""
    scales_per_study = Counter(study for study, _ in {(study_of(r), r.n_edits) for r in candidates})
    chosen: dict[int, RunResult] = {}
    for run in sorted(candidates, key=lambda r: (-scales_per_study[study_of(r)], r.run)):
        chosen.setdefault(run.n_edits, run)
    return dict(sorted(chosen.items()))
