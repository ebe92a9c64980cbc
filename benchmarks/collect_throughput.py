"""Knowledge-weight collection throughput: batched + layer-cached vs one edit at a time with full forwards.

Both collect neurons for the same edits (the shipped CounterFact demo data) with the same hyper-parameters
(optimiser, lr, per-edit seeded init, step budget, check rule); the loop runs batches of one edit and the
FULL model every step, as the official MeG code does. Prints facts/s of each, both success rates, and as
the last line ``ratio: X`` (facts/s batched / facts/s loop). Both are measured in the same run, alternating
over ``--repeats`` rounds on a shared machine (the best rate of each is compared, as timeit does).
On a CPU shared with other jobs, ``--threads 1`` avoids OpenMP stalls that hit batch-of-one runs hardest.

    python benchmarks/collect_throughput.py [--model smollm2-135m] [--n-edits 32] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from meg_harness.data import load_cases
from meg_harness.evaluate.templates import get_template
from meg_harness.meg.collect import CollectHParams, CollectionResult, collect_neurons
from meg_harness.models import get_adapter, load_model


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
    loop_hp = dataclasses.replace(batched_hp, batch_size=1, shard_size=1, layer_cache=False)
    print(
        f"model {args.model}, {len(cases)} demo edits, template {template.name}, "
        f"threads {torch.get_num_threads()}, hparams {batched_hp.to_dict()}",
        flush=True,
    )

    batched_rates, loop_rates = [], []
    for round_ in range(1, args.repeats + 1):  # alternated, so that both see the same machine load
        batched = collect_neurons(
            model, tokenizer, cases, template, batched_hp, use_cache=False, progress=False
        )
        batched_rates.append(
            report(f"[{round_}] batched (batch {batched_hp.batch_size}, layer-cached)", batched)
        )
        loop = collect_neurons(model, tokenizer, cases, template, loop_hp, use_cache=False, progress=False)
        loop_rates.append(report(f"[{round_}] one at a time (full forwards)", loop))
    best_batched, best_loop = max(batched_rates), max(loop_rates)
    print(f"batched: {best_batched:.4f} facts/s (best of {args.repeats})")
    print(f"loop: {best_loop:.4f} facts/s (best of {args.repeats})")
    print(f"ratio: {best_batched / best_loop:.2f}")


if __name__ == "__main__":
    main()
