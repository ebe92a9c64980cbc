"""TF by ONE forward per item (meg_harness) vs one forward per target-token prefix (the official MeG
code's way). Checks the values are identical and prints the speed ratios, measured in this one run.

    python benchmarks/tf_eval.py [--model smollm2-135m] [--n 64] [--dataset zsre --data-path FILE]

ZsRE answers are multi-token (a few tokens each), which is where one forward per prefix costs most; the
shipped CounterFact demo targets are mostly one token.
"""

from __future__ import annotations

import argparse
import time

import torch

from meg_harness.data import load_cases
from meg_harness.editing.base import Edited
from meg_harness.evaluate.scoring import Probe, teacher_forced_accuracy
from meg_harness.models import get_adapter, load_model
from meg_harness.prompts import encode_query, encode_target, get_template


@torch.no_grad()
def tf_per_prefix(model, probe: Probe) -> float:
    """One forward per target-token prefix, batch of one."""
    hits = 0
    for j, token in enumerate(probe.target_ids):
        ids = torch.tensor([list(probe.query_ids) + list(probe.target_ids[:j])])
        hits += int(model(input_ids=ids).logits[0, -1].argmax().item() == token)
    return hits / len(probe.target_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=64, help="number of probes (edit prompts + rephrases)")
    parser.add_argument("--dataset", default="counterfact")
    parser.add_argument("--data-path", default=None, help="default: the shipped demo data")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    model, tokenizer = load_model(args.model)
    template = get_template(get_adapter(model).default_template(model, tokenizer))
    probes = []
    for case in load_cases(args.dataset, args.data_path):
        for question in (case.prompt, *case.rephrases):
            # True and new targets alike, so that TF values are not all 0.
            target = case.target_true if len(probes) % 2 and case.target_true else case.target_new
            probes.append(
                Probe(question, encode_query(tokenizer, template, question), encode_target(tokenizer, target))
            )
    probes = probes[: args.n]
    edited = Edited(model, tokenizer)
    teacher_forced_accuracy(edited, probes[:4], batch_size=4)  # warm-up

    start = time.perf_counter()
    reference = [tf_per_prefix(model, p) for p in probes]
    t_prefix = time.perf_counter() - start
    start = time.perf_counter()
    single = teacher_forced_accuracy(edited, probes, batch_size=1)
    t_single = time.perf_counter() - start
    start = time.perf_counter()
    batched = teacher_forced_accuracy(edited, probes, batch_size=16)
    t_batched = time.perf_counter() - start

    target_tokens = sum(len(p.target_ids) for p in probes)
    print(
        f"model={args.model} probes={len(probes)} target_tokens={target_tokens} "
        f"mean_tf={sum(batched) / len(batched):.4f}"
    )
    print(
        f"identical values: per-item batch 1 {single == reference}; per-item batch 16 {batched == reference}"
    )
    print(f"per-prefix loop:       {t_prefix:8.2f} s")
    print(f"one forward per item:  {t_single:8.2f} s (batch 1)   ratio {t_prefix / t_single:5.2f}x")
    print(f"one forward per item:  {t_batched:8.2f} s (batch 16)  ratio {t_prefix / t_batched:5.2f}x")
    if single != reference or batched != reference:
        raise SystemExit("TF values differ")


if __name__ == "__main__":
    main()
