"""z optimisation on the rows' suffixes (the past kept as keys and values) vs the whole rows from the
edited layer upward (the code before, ``values.py`` at ``--before``): seconds per edit, the ratio and the
largest target difference, in one run.

    python benchmarks/z_suffix_speed.py [--hparams hparams/MEMIT/smollm2-135m.yaml] [--n 16] [--steps 5]
        [--before 3ee9c16] [--data-path ../shared/data/counterfact/counterfact-edit.json] [--start 0]

Both versions optimise the same edits (the first ``--n`` CounterFact records from ``--start``, with the
hparams file's context prefixes and terminator) for ``--steps`` steps with early stopping off, so both do
the same steps; no cache; alternating which goes first (before, after, after, before) so that a load change
affects both alike. ``--before`` is a git revision of this repository (the benchmark reads the file with
``git show``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from z_prefix_cost import z_setup  # benchmarks/ is the script's folder

from meg_harness.baselines import values as values_after
from meg_harness.baselines.plan import build_plans
from meg_harness.baselines.prefixes import generate_prefixes

REPO = Path(__file__).resolve().parents[1]


def values_at(revision: str):
    """``meg_harness/baselines/values.py`` as it was at ``revision``, imported as its own module."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{revision}:meg_harness/baselines/values.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "values_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("values_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["values_before"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(prog="z_suffix_speed.py", description=__doc__.splitlines()[0])
    parser.add_argument("--hparams", default="hparams/MEMIT/smollm2-135m.yaml")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-path", default="../shared/data/counterfact/counterfact-edit.json")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--before", default="3ee9c16")
    args = parser.parse_args()
    hp, model, tokenizer, template, cases, z_layer, sites = z_setup(args)
    hp = dataclasses.replace(hp, v_num_grad_steps=args.steps, v_loss_stop=0.0, z_batch_size=args.n)
    prefixes = generate_prefixes(model, tokenizer, hp.context_prefixes, hp.context_prefix_length, hp.seed)
    plans = build_plans(tokenizer, cases, template, prefixes, hp.kl_prompt, terminator=hp.terminator)
    versions = {"before": values_at(args.before), "after": values_after}
    seconds: dict[str, list[float]] = {name: [] for name in versions}
    targets = {}
    for name in ["before", "after", "after", "before"]:
        started = time.perf_counter()
        result = versions[name].optimise_values(
            model, tokenizer, plans, sites, hp, layer=z_layer, progress=False
        )
        seconds[name].append((time.perf_counter() - started) / len(cases))
        targets[name] = result.targets[sites[0]]
        print(f"{name}: {seconds[name][-1]:.2f} s/edit", flush=True)
    for name in versions:
        runs = ", ".join(f"{s:.2f}" for s in seconds[name])
        print(f"{name:>7}: {statistics.fmean(seconds[name]):.2f} s/edit (runs {runs})")
    diff = (targets["after"] - targets["before"]).abs().max().item()
    scale = targets["before"].abs().max().item()
    print(f"threads: {torch.get_num_threads()}  edits: {len(cases)}  steps: {args.steps}", end="  ")
    print(f"prefixes: {len(prefixes)}")
    print(f"largest target difference: {diff:.3g} (largest target entry {scale:.3g})")
    ratio = statistics.fmean(seconds["before"]) / statistics.fmean(seconds["after"])
    print(f"ratio_before_vs_after: {ratio:.2f}")


if __name__ == "__main__":
    main()
