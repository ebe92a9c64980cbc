"""Where DDIM puts a paraphrase's neuron, per step count: near its own edit's neuron or near another edit's.

    python benchmarks/ddim_nearest.py RUN_DIR [--method meg] [--steps 50 1000] [--seed 0] [--threads 1]

For every case of a ``meg-harness run`` folder, the artifact generates (normalised units, routing ignored) the
neuron of the edit prompt and of its first rephrase at each step count. The edit prompts' neurons at the
first step count stand for the edits' neurons. For each step count it prints: how often a rephrase's neuron
is nearest to its own edit's (L2), the mean distance to its own edit's and to the nearest other edit's, and
the same for the edit prompts themselves (their own distance is the sampler's change from the first count).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from meg_harness.runner import load_run_edit, run_cases


def normalised_neurons(meg, questions: list[str], steps: int) -> torch.Tensor:
    """The neurons inference generates for ``questions`` at ``steps`` DDIM steps, in normalised units."""
    made = meg.generate(questions, meg.encoder.encode(questions).to(meg.device), steps)
    return meg.normalizer.normalize(made.flatten())


def nearest_report(generated: torch.Tensor, edits: torch.Tensor) -> tuple[float, float, float]:
    """(% of rows nearest to their own edit, mean distance to their own edit, mean to the nearest other)."""
    distance = torch.cdist(generated, edits)
    own = distance.diagonal()
    others = distance + torch.diag(torch.full((len(edits),), float("inf")))
    nearest_other = others.min(dim=1).values
    return 100 * float((own < nearest_other).float().mean()), float(own.mean()), float(nearest_other.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--method", default="meg")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 1000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meg = load_run_edit(args.run_dir, args.method, args.seed)
    cases = [c for c in run_cases(args.run_dir, args.seed) if c.rephrases]
    prompts, rephrases = [c.prompt for c in cases], [c.rephrases[0] for c in cases]
    edits = normalised_neurons(meg.meg, prompts, args.steps[0])
    print(f"{len(cases)} cases with a rephrase; edits' neurons: edit prompts at {args.steps[0]} steps")
    print("| DDIM steps | queries | nearest to own edit | L2 to own | L2 to nearest other |")
    print("|---:|---|---:|---:|---:|")
    for steps in args.steps:
        for name, questions in (("edit prompts", prompts), ("rephrases", rephrases)):
            share, own, other = nearest_report(normalised_neurons(meg.meg, questions, steps), edits)
            print(f"| {steps} | {name} | {share:.2f}% | {own:.3f} | {other:.3f} |", flush=True)


if __name__ == "__main__":
    main()
