"""Layer-sweep results (``layer_sweep.json`` of ``meg-harness layer-sweep``) found under a folder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meg_harness.errors import HarnessError
from meg_harness.report.model_names import canonical_model
from meg_harness.report.results import read_json
from meg_harness.report.runs import visible_files

SWEEP_FILE = "layer_sweep.json"


@dataclass(frozen=True)
class LayerSweep:
    model: str
    dataset: str
    n: int | None  # edits sampled
    layers: tuple[int, ...]
    reliability_ag: tuple[float, ...]
    source: str  # relative to the scanned folder


def collect_sweeps(directory: Path, skip: Sequence[Path] = ()) -> list[LayerSweep]:
    return [_read(directory, path) for path in visible_files(directory, SWEEP_FILE, skip)]


def _read(directory: Path, path: Path) -> LayerSweep:
    data = read_json(path)
    rows = data.get("rows") if isinstance(data, dict) else None
    meta = data.get("meta") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise HarnessError("layer sweep without rows", file=path, field="rows")
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), str) for k in ("model", "dataset")):
        raise HarnessError("layer sweep lacks its model or dataset", file=path, field="meta")
    points = []
    for index, row in enumerate(rows):
        layer = row.get("layer") if isinstance(row, dict) else None
        value = row.get("reliability_ag") if isinstance(row, dict) else None
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise HarnessError("layer is not an integer", file=path, record=index, field="layer")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HarnessError("not a number", file=path, record=index, field="reliability_ag")
        points.append((layer, float(value)))
    points.sort()
    n = meta.get("n") if isinstance(meta.get("n"), int) else None
    return LayerSweep(
        canonical_model(meta["model"]),
        meta["dataset"],
        n,
        tuple(p[0] for p in points),
        tuple(p[1] for p in points),
        path.relative_to(directory).as_posix(),
    )
