"""Where MeG loses as edits grow: each MeG run's stages measured beside its metrics, by edit scale.

Per seed folder of a MeG label: the fit's own numbers (``fit`` in metrics.json: the share of edits whose
collected neuron made the greedy answer exact, the generator's L2 to the collected neurons at its last
evaluation) and, from ``items.jsonl``, which probes the familiarity network routed to the generator and the
AG of the routed ones. A rephrase that is not routed keeps the unedited answer, so Gen AG is about
``routed rephrases x Gen AG if routed``; a locality prompt that is routed gets a generated neuron, so the Loc
AG lost is about ``routed locality x (100 - Loc AG if routed)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meg_harness.errors import HarnessError
from meg_harness.report.markdown import file_part, pipe_table, section
from meg_harness.report.outputs import Built, Output, Skipped, markdown_output
from meg_harness.report.results import (
    COLUMN_TITLES,
    format_cell,
    mapping_or_empty,
    number_or_nan,
    read_result,
)
from meg_harness.report.runs import RunResult, range_file_part, scale_series

STAGES = "MeG's stages by edit scale (collection, generator fit, routing)"
KINDS = ("edit", "rephrase", "locality")
METRICS = ("reliability_ag", "generality_ag", "locality_ag", "score")
NOTES = (
    "Per MeG run: **collected** = % of edits whose optimised neuron made the greedy answer exact (stage 3); "
    "**neuron steps** = mean optimisation steps per edit; **generator L2** = mean L2 distance, in the "
    "normalised space, between the generated and the collected neurons of the edit prompts at the "
    "generator's last evaluation (0: it reproduces them); **routed** = % of the "
    "probes of each kind the familiarity network sent to the generator (edit and rephrase prompts should "
    "be 100, locality prompts 0); **AG if routed** = exact-match AG among the routed probes of that kind.",
    "A rephrase that is not routed keeps the unedited answer, so Gen AG ≈ routed rephrases × Gen AG if "
    "routed / 100; a routed locality prompt gets a generated neuron, so the Loc AG lost ≈ routed locality × "
    "(100 − Loc AG if routed) / 100. Means over seeds.",
)


@dataclass(frozen=True)
class StageNumbers:
    """One seed's stage measurements (percentages, except steps and L2)."""

    collected: float
    neuron_steps: float
    generator_l2: float
    generator_steps: float
    routed: dict[str, float]
    ag_if_routed: dict[str, float]

    def values(self) -> list[float]:
        stages = [self.collected, self.neuron_steps, self.generator_l2, self.generator_steps]
        return stages + [*self.routed.values(), *self.ag_if_routed.values()]


def stage_numbers(seed_folder: Path) -> StageNumbers:
    """The stage measurements of one MeG seed folder (``metrics.json`` and ``items.jsonl``)."""
    fit = mapping_or_empty(read_result(seed_folder / "metrics.json").get("fit"))
    collection = mapping_or_empty(fit.get("collection"))
    generator = mapping_or_empty(fit.get("generator"))
    evaluations = generator.get("evaluations")
    last = evaluations[-1] if isinstance(evaluations, list) and evaluations else {}
    routed, ag_if_routed = _routing(seed_folder / "items.jsonl")
    return StageNumbers(
        collected=number_or_nan(collection.get("success_rate")),
        neuron_steps=number_or_nan(collection.get("mean_steps")),
        generator_l2=number_or_nan(mapping_or_empty(last).get("l2_mean")),
        generator_steps=number_or_nan(generator.get("steps")),
        routed=routed,
        ag_if_routed=ag_if_routed,
    )


def _routing(items: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Per probe kind: % routed, and AG (%) among the routed; NaN where there are no such probes."""
    counts = {kind: [0, 0, 0] for kind in KINDS}  # probes, routed, routed with AG
    if not items.is_file():
        return {k: math.nan for k in KINDS}, {k: math.nan for k in KINDS}
    with items.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise HarnessError(f"line {number} is not JSON: {error.msg}", file=items) from None
            count = counts.get(item.get("kind")) if isinstance(item, dict) else None
            if count is None or "ag" not in item:  # another dataset's probe kinds, or no greedy answer
                continue
            count[0] += 1
            if item.get("routed"):
                count[1] += 1
                count[2] += bool(item["ag"])
    routed = {k: 100.0 * c[1] / c[0] if c[0] else math.nan for k, c in counts.items()}
    ag = {k: 100.0 * c[2] / c[1] if c[1] else math.nan for k, c in counts.items()}
    return routed, ag


def _mean(values: Sequence[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return math.fsum(present) / len(present) if present else math.nan


def meg_stage_tables(runs: Sequence[RunResult]) -> Built:
    """One file per (model, dataset, edits file and range): every MeG label's stages at each scale run."""
    meg = [r for r in runs if r.base_method == "meg"]
    series = scale_series(
        meg, stage_numbers, lambda seeds: any(not math.isnan(v) for s in seeds for v in s.values())
    )
    if not series:
        return [Skipped(STAGES, "no MeG run results with stage measurements (metrics.json fit, items.jsonl)")]
    return [_stages_file(rows) for rows in series]


def _stages_file(measured: list[tuple[RunResult, list[StageNumbers]]]) -> Output:
    body = []
    for row, seeds in measured:
        cells = [str(row.n_edits), row.method, *(format_cell(row.values[k]) for k in METRICS)]
        cells += [
            format_cell(_mean([s.collected for s in seeds])),
            format_cell(_mean([s.neuron_steps for s in seeds])),
            format_cell(_mean([s.generator_l2 for s in seeds])),
            format_cell(_mean([s.generator_steps for s in seeds])).removesuffix(".00"),
        ]
        cells += [format_cell(_mean([s.routed[k] for s in seeds])) for k in KINDS]
        cells += [format_cell(_mean([s.ag_if_routed[k] for s in seeds])) for k in ("rephrase", "locality")]
        body.append(cells)
    header = ["Edits", "Method", *(COLUMN_TITLES[k] for k in METRICS), "Collected", "Neuron steps"]
    header += ["Generator L2", "Generator steps", "Routed edit", "Routed rephrase", "Routed locality"]
    header += ["Gen AG if routed", "Loc AG if routed"]
    first = measured[0][0]
    title = " · ".join(part for part in (first.model, first.dataset, first.edits) if part)
    where = range_file_part(first.edit_range)
    name = f"meg_stages_{file_part(first.dataset)}_{file_part(first.model)}{where}.md"
    table = pipe_table(header, body, text_columns=2)
    return markdown_output(name, f"MeG's stages by edit scale: {title}", section(title, NOTES, table))
