"""Knowledge-weight collection throughput: batched + layer-cached vs one edit at a time with full forwards.

All collect neurons for the same edits (the shipped CounterFact demo data) with the same hyper-parameters
(optimiser, lr, per-edit seeded init, step budget). The loops run batches of one edit and the FULL model
every step, as the official MeG code does:

* ``official loop``: the official code's check rule: its Phi-2 setting trains 80 steps, tests the greedy
  answer, and allows one more round of 80 (a budget of 160); here the test comes every half of the budget;
* ``early-stopping loop``: this project's check rule (greedy test every ``check_every`` steps once the
  teacher-forced answer is right), i.e. the batched collection without batching and layer cache.

Prints facts/s of each and the success rates; the last two lines are ``ratio_vs_early_stopping_loop: Y``
and ``ratio: X`` (facts/s batched / facts/s of the official loop). All are measured in the same run,
alternating over ``--repeats`` rounds on a shared machine (the best rate of each is compared, as timeit
does).
On a CPU shared with other jobs, ``--threads 1`` avoids OpenMP stalls that hit batch-of-one runs hardest.

    python benchmarks/collect_throughput.py [--model smollm2-135m] [--n-edits 32] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from meg_harness.data import load_cases
from meg_harness.meg.collect import CollectHParams, CollectionResult, collect_neurons
from meg_harness.models import get_adapter, load_model
from meg_harness.prompts import get_template


def report(name: str, result: CollectionResult) -> float:
    rate = len(result.success) / result.wall_s
    mean_steps = sum(result.steps) / len(result.steps)
    print(
        f"{name}: {len(result.success)} edits in {result.wall_s:.1f}s = {rate:.4f} facts/s; "
        f"success {sum(result.success)}/{len(result.success)} ({result.success_rate:.1%}); "
        f"mean steps {mean_steps:.1f}; mode {result.mode}",
        flush=True,
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-edits", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=CollectHParams.max_steps)
    parser.add_argument("--batch-size", type=int, default=CollectHParams.batch_size)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="alternating rounds; the best rate of each is used"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    template = get_template(get_adapter(model).default_template(model, tokenizer))
    cases = load_cases("counterfact", None)[: args.n_edits]
    batched_hp = CollectHParams(max_steps=args.max_steps, batch_size=args.batch_size, shard_size=args.n_edits)
    loops = {
        "early-stopping loop": dataclasses.replace(batched_hp, batch_size=1, shard_size=1, layer_cache=False),
    }
    loops["official loop"] = dataclasses.replace(
        loops["early-stopping loop"], check_every=max(1, args.max_steps // 2), precheck=False
    )
    print(
        f"model {args.model}, {len(cases)} demo edits, template {template.name}, "
        f"threads {torch.get_num_threads()}, hparams {batched_hp.to_dict()}",
        flush=True,
    )

    variants = {f"batched (batch {batched_hp.batch_size}, layer-cached)": batched_hp, **loops}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(1, args.repeats + 1):  # alternated, so that all see the same machine load
        for name, hp in variants.items():
            result = collect_neurons(model, tokenizer, cases, template, hp, use_cache=False, progress=False)
            rates[name].append(report(f"[{round_}] {name}", result))
    best = {name: max(values) for name, values in rates.items()}
    for name, rate in best.items():
        print(f"{name}: {rate:.4f} facts/s (best of {args.repeats})")
    batched_rate = best[next(iter(variants))]
    print(f"ratio_vs_early_stopping_loop: {batched_rate / best['early-stopping loop']:.2f}")
    print(f"ratio: {batched_rate / best['official loop']:.2f}")


if __name__ == "__main__":
    main()
