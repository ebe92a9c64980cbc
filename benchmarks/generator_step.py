"""Why MeG's CPU generator (``DiT-CPU``) trains far below this machine's matmul limit, and what does not
help: seconds per training step of variants, alternating, and the FLOP/s of its matmul shapes, in one run.

    OMP_NUM_THREADS=1 python benchmarks/generator_step.py [--preset DiT-CPU] [--batch 128] [--steps 30]

Variants of one step (v-prediction loss, backward, AdamW, EMA), each on a fresh generator with the same
seed: ``shipped`` (``train_generator``'s settings: AdamW defaults, ``EMAModel(foreach=False)``),
``fused-adamw`` (``AdamW(fused=True)``), ``foreach-ema`` (``EMAModel(foreach=True)``), ``compiled``
(``torch.compile`` of the generator; its compile time is left out). Then ``torch.mm`` FLOP/s at the
generator's shapes (batch x tokens rows, width ``hidden``) against a 1024-square one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers.training_utils import EMAModel

from meg_harness.meg.diffusion import DiffusionConfig, v_prediction_loss
from meg_harness.meg.generator import GeneratorConfig, build_generator

VARIANTS = ("shipped", "fused-adamw", "foreach-ema", "compiled")
VECTOR_DIM, COND_DIM, N_EXAMPLES = 1152, 384, 2000  # SmolLM2-135M's neuron (2 x 576), MiniLM's [CLS]


def step_seconds(variant: str, config: GeneratorConfig, batch: int, steps: int) -> float:
    """Mean seconds of ``steps`` training steps (after 3 warm-up steps) of ``variant``."""
    torch.manual_seed(0)
    cond, targets = torch.randn(N_EXAMPLES, COND_DIM), torch.randn(N_EXAMPLES, VECTOR_DIM)
    generator = build_generator(config, seed=0)
    model = torch.compile(generator) if variant == "compiled" else generator
    optimizer = torch.optim.AdamW(generator.parameters(), lr=1e-4, fused=variant == "fused-adamw")
    ema = EMAModel(generator.parameters(), decay=0.9999, foreach=variant == "foreach-ema")
    scheduler = DiffusionConfig().train_scheduler()
    rng = torch.Generator().manual_seed(0)

    def step() -> None:
        index = torch.randint(0, N_EXAMPLES, (batch,), generator=rng)
        loss = v_prediction_loss(model, targets[index], cond[index], scheduler, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.step(generator.parameters())

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def mm_flops_per_s(m: int, k: int, n: int, repeats: int = 20) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * m * k * n / best


def main() -> None:
    parser = argparse.ArgumentParser(prog="generator_step.py", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="DiT-CPU")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    config = GeneratorConfig.from_mapping({"preset": args.preset}, vector_dim=VECTOR_DIM, cond_dim=COND_DIM)
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for order in (VARIANTS, tuple(reversed(VARIANTS))):
        for variant in order:
            seconds[variant].append(step_seconds(variant, config, args.batch, args.steps))
    shipped = statistics.fmean(seconds["shipped"])
    print(f"threads: {torch.get_num_threads()}  preset: {args.preset}  batch: {args.batch}")
    for variant in VARIANTS:
        mean = statistics.fmean(seconds[variant])
        runs = ", ".join(f"{s * 1e3:.0f}" for s in seconds[variant])
        print(
            f"{variant:>12}: {mean * 1e3:6.0f} ms/step (runs {runs}), shipped / this = {shipped / mean:.2f}"
        )
    rows, width = args.batch * config.num_patches, config.hidden
    limit = mm_flops_per_s(1024, 1024, 1024)
    for k, n in (
        (width, 3 * width),
        (width, int(width * config.mlp_ratio)),
        (int(width * config.mlp_ratio), width),
    ):
        rate = mm_flops_per_s(rows, k, n)
        shape = f"mm {rows}x{k} @ {k}x{n}"
        print(
            f"{shape}: {rate / 1e9:6.1f} GFLOP/s = {rate / limit:.2f} of 1024^3 ({limit / 1e9:.1f} GFLOP/s)"
        )


if __name__ == "__main__":
    main()
