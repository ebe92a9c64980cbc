"""Which timesteps make a long DDIM chain drift: coarse DDIM on one side of a timestep, fine on the other.

    python benchmarks/ddim_switch.py RUN_DIR [--method meg] [--coarse 50] [--fine 1000]
        [--switch 400 100 40 20] [--seed 0] [--threads 1]

For every case of a ``meg-harness run`` folder the artifact's generator samples the neuron of the edit prompt
and of its first rephrase (routing ignored) from the same start noise with the fine step count only below a
switch timestep (coarse above it), and with the fine count only above it (coarse below). Each row prints the
mean L2 distance (normalised units) to the edit's collected neuron (read from the collection cache).
All-coarse and all-fine rows bracket the switches: the timesteps whose fine sampling moves the distance from
the all-coarse value toward the all-fine one are where the chain drifts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from meg_harness.meg.collect import collect_neurons
from meg_harness.meg.diffusion import DiffusionConfig
from meg_harness.meg.hparams import MEGHyperParams
from meg_harness.runner import load_run_edit, run_cases


@torch.no_grad()
def switched_sample(
    generator,
    cond: torch.Tensor,
    noise: torch.Tensor,
    diffusion: DiffusionConfig,
    above: int,
    below: int,
    switch: int,
) -> torch.Tensor:
    """DDIM (diffusers' scheduler) with ``above`` steps' spacing for timesteps > ``switch`` and ``below``
    steps' spacing for the rest (each scheduler steps from where the other stopped)."""
    sample, reached = noise, diffusion.num_train_timesteps - 1
    for steps, keep in ((above, lambda t: t > switch), (below, lambda t: t <= switch)):
        scheduler = diffusion.sampler(steps)
        stride = diffusion.num_train_timesteps // steps
        for t in scheduler.timesteps:
            if int(t) > reached or not keep(int(t)):
                continue
            timestep = torch.full((len(cond),), int(t), dtype=torch.long, device=sample.device)
            sample = scheduler.step(generator(sample, timestep, cond), t, sample).prev_sample
            reached = int(t) - stride
    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--method", default="meg")
    parser.add_argument("--coarse", type=int, default=50)
    parser.add_argument("--fine", type=int, default=1000)
    parser.add_argument("--switch", type=int, nargs="+", default=[400, 100, 40, 20])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    edited = load_run_edit(args.run_dir, args.method, args.seed)
    meg = edited.meg
    cases = [c for c in run_cases(args.run_dir, args.seed) if c.rephrases]
    hparams = MEGHyperParams.from_dict(meg.extra["hparams"])
    collection = collect_neurons(
        edited.model, edited.tokenizer, cases, edited.template, hparams.collect, progress=False
    )
    targets = meg.normalizer.normalize(collection.neurons.flatten().float().to(meg.device))
    generator, diffusion = meg.generator.eval(), meg.diffusion
    queries = {"edit prompts": [c.prompt for c in cases], "rephrases": [c.rephrases[0] for c in cases]}
    conditions = {name: meg.encoder.encode(texts).to(meg.device) for name, texts in queries.items()}
    noise = torch.randn(targets.shape, generator=torch.Generator().manual_seed(args.seed)).to(targets)
    last = diffusion.num_train_timesteps - 1
    rows = [("all coarse", args.coarse, args.coarse, last), ("all fine", args.fine, args.fine, last)]
    for switch in args.switch:
        rows.append((f"fine at t <= {switch}", args.coarse, args.fine, switch))
        rows.append((f"fine at t > {switch}", args.fine, args.coarse, switch))
    print(
        f"{len(cases)} cases; coarse {args.coarse}, fine {args.fine} DDIM steps; mean L2 to the edit's neuron"
    )
    print("| sampling | edit prompts | rephrases |")
    print("|---|---:|---:|")
    for label, above, below, switch in rows:
        distances = [
            float(
                (switched_sample(generator, cond, noise, diffusion, above, below, switch) - targets)
                .norm(dim=1)
                .mean()
            )
            for cond in conditions.values()
        ]
        print(f"| {label} | {distances[0]:.3f} | {distances[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
