"""Layer sweep (paper A.4, Figs. 5-7): single-neuron Reliability of knowledge-weight collection per layer.

For every layer L, one neuron per edit of a sample is collected at L (:func:`collect_neurons` with the
collection hparams' ``layer`` replaced by L). Reliability(L) = 100 * the fraction of edits whose greedy
answer with their neuron attached matches the target (the protocol's AG rule, as collection checks it).

Resumable: :func:`collect_neurons` caches each layer's neurons by content hash, so a rerun only collects the
layers (shards) not yet done. The wall time of a layer is the time of the collection that produced its
neurons: it is kept beside the cache (``<cache>/layer_sweep/``) and reported again when they are reused.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from meg_harness.cache import JsonCache, atomic_path, default_cache_dir
from meg_harness.data.edit_case import EditCase
from meg_harness.errors import HarnessError
from meg_harness.meg.collect import CollectHParams, collect_neurons
from meg_harness.models.adapters import get_adapter
from meg_harness.prompts import QueryTemplate

Row = dict[str, Any]
TIMING_NAMESPACE = "layer_sweep"
_SPEC_PART = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_layers(spec: str) -> list[int]:
    """``"0-29"``, ``"2,4,6"`` or a mix (``"0-10,12"``) -> sorted distinct layer indices."""
    layers: set[int] = set()
    for part in str(spec).split(","):
        match = _SPEC_PART.match(part)
        if match is None:
            raise HarnessError(
                f"bad layer list {spec!r}: expected e.g. '0-29' or '2,4,6' (non-negative integers)",
                field="layers",
            )
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if end < start:
            raise HarnessError(f"bad layer range '{part.strip()}' in {spec!r}: end < start", field="layers")
        layers.update(range(start, end + 1))
    return sorted(layers)


def check_layers(model: nn.Module, layers: Sequence[int]) -> list[int]:
    """The layers as a list, each an index ``0 <= L < num_layers`` of ``model``, with no repeats."""
    n = get_adapter(model).num_layers(model)
    layers = list(layers)
    if not layers:
        raise HarnessError("no layers to sweep", field="layers")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise HarnessError(
                f"layer {layer!r} does not exist: the model has {n} layers (0-{n - 1})", field="layers"
            )
    if len(set(layers)) != len(layers):
        raise HarnessError(f"repeated layers in {layers}", field="layers")
    return layers


def sweep_layers(
    model: nn.Module,
    tok: Any,
    cases: Sequence[EditCase],
    template: QueryTemplate,
    hparams: Mapping[str, Any] | CollectHParams | None,
    layers: Sequence[int],
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Collect the cases' neurons at each layer; one row per layer, in the order given.

    Row keys: ``layer``, ``reliability_ag`` (100 * success rate), ``mean_steps`` (over all edits, failures
    count ``max_steps``), ``wall_s`` (the collection's time; see the module doc), ``n``, ``n_success``,
    ``reused`` (edits read back from the cache) and ``mode`` (layer-cached | full). ``on_row`` sees each row
    as soon as it is done.
    """
    layers = check_layers(model, layers)
    base = CollectHParams.from_mapping(hparams)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    timings = JsonCache(root, TIMING_NAMESPACE)
    rows: list[Row] = []
    for layer in layers:
        hp = dataclasses.replace(base, layer=layer)
        result = collect_neurons(model, tok, cases, template, hp, cache_dir=root, progress=progress)
        key = result.cache_path.name if result.cache_path is not None else None
        wall_s = result.wall_s
        if key is not None:
            stored = timings.get(key) if result.reused else None
            if result.reused == len(cases) and stored is not None:
                wall_s = float(stored["wall_s"])
            elif result.reused == 0:
                timings.put(key, {"wall_s": wall_s, "layer": layer, "n": len(cases)})
        n = len(result.success)
        row = {
            "layer": layer,
            "reliability_ag": 100.0 * sum(result.success) / n,
            "mean_steps": sum(result.steps) / n,
            "wall_s": wall_s,
            "n": n,
            "n_success": sum(result.success),
            "reused": result.reused,
            "mode": result.mode,
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def best_layer(rows: Sequence[Row]) -> int:
    """The layer with the highest Reliability AG; ties: fewer mean steps, then the lower layer."""
    if not rows:
        raise ValueError("no rows")
    best = min(rows, key=lambda r: (-r["reliability_ag"], r["mean_steps"], r["layer"]))
    return int(best["layer"])


def _best_row(rows: Sequence[Row]) -> Row:
    layer = best_layer(rows)
    return next(r for r in rows if r["layer"] == layer)


def sweep_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| layer | Reliability AG (%) | edits | mean steps | wall (s) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['reliability_ag']:.2f} | {r.get('n_success', '?')}/{r['n']} "
            f"| {r['mean_steps']:.1f} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def sweep_markdown(rows: Sequence[Row], meta: Mapping[str, Any]) -> str:
    """A markdown report: what was swept (from ``meta``), the table and the best layer."""
    best = _best_row(rows)
    total = math.fsum(r["wall_s"] for r in rows)
    model = meta.get("model", "?")
    dataset = meta.get("dataset", "?")
    hp = meta.get("hparams") or {}
    settings = ", ".join(f"{k}={v}" for k, v in sorted(hp.items()))
    lines = [
        f"# Layer sweep: {model} on {dataset}",
        "",
        "Single-neuron Reliability (AG: greedy answer == target, the protocol's rule) of MeG "
        "knowledge-weight collection with the neuron at each layer (paper A.4).",
        "",
        f"- edits: {meta.get('n', best['n'])} (seed {meta.get('seed', '?')}, range {meta.get('range')}, "
        f"data {meta.get('data', '?')})",
        f"- template: {meta.get('template', {}).get('name', '?')}",
        f"- collection hparams: {meta.get('hparams_file', '?')}" + (f" ({settings})" if settings else ""),
        f"- total collection time: {total:.0f} s",
        "",
        sweep_table(rows).rstrip("\n"),
        "",
        f"**Best layer: {best['layer']}** (Reliability AG {best['reliability_ag']:.2f}%, "
        f"mean steps {best['mean_steps']:.1f}).",
        "",
    ]
    return "\n".join(lines)


def plot_sweep(rows: Sequence[Row], path: str | os.PathLike, title: str = "") -> Path:
    """A PNG of Reliability AG (and mean steps, right axis) vs layer; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rows = sorted(rows, key=lambda r: r["layer"])
    layers = [r["layer"] for r in rows]
    best = _best_row(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        ax.plot(layers, [r["reliability_ag"] for r in rows], "o-", color="tab:blue", label="Reliability AG")
        ax.plot([best["layer"]], [best["reliability_ag"]], "*", color="tab:red", markersize=14, label="best")
        ax.set_xlabel("layer of the edit neuron")
        ax.set_ylabel("Reliability AG (%)")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        steps = ax.twinx()
        steps.plot(
            layers,
            [r["mean_steps"] for r in rows],
            "s--",
            color="tab:gray",
            alpha=0.6,
            markersize=3,
            label="mean steps (right)",
        )
        steps.set_ylabel("mean optimisation steps", color="tab:gray")
        steps.set_ylim(bottom=0)
        handles = ax.get_legend_handles_labels()[0] + steps.get_legend_handles_labels()[0]
        ax.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.14),
            ncol=3,
            fontsize="small",
            frameon=False,
        )
        if title:
            ax.set_title(title)
        fig.tight_layout()
        with atomic_path(path, mode=0o644) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
