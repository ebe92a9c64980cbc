"""Greedy (AG) evaluation throughput: the evaluator's ``greedy_answers`` vs plain ``model.generate``, one run.

    OMP_NUM_THREADS=1 python benchmarks/ag_throughput.py [--model smollm2-135m] [--edits 32] [--batch-size 16]
        [--data-path ../shared/data/counterfact/counterfact-edit.json] [--start 0] [--repeats 2]

The probes are what the evaluator decodes for ``--edits`` CounterFact cases: each edit prompt, its
rephrases and its neighbourhood prompts, in the query template. Both sides decode greedily at most
``MAX_NEW_TOKENS`` tokens per probe with the same batch size and stop a batch once every row has written a
newline: the evaluator (batches sorted by prompt length, its own stopping criterion, answers cut at the
newline) and ``model.generate`` on the probes in their given order with ``stop_strings=["\\n"]``
(transformers' standard stopping). The two alternate (evaluator, generate, generate, evaluator, ...) so that
a change of load affects both alike. Prints probes/s of each, their ratio, and how many first lines agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GenerationConfig

from meg_harness.data import load_cases
from meg_harness.editing.base import Edited
from meg_harness.evaluate.scoring import Probe, greedy_answers
from meg_harness.models import get_adapter, load_model
from meg_harness.prompts import MAX_NEW_TOKENS, encode_query, get_template


def probes_of(cases, tokenizer, template) -> list[Probe]:
    """Every AG probe of the cases: edit prompt, rephrases, neighbourhood prompts."""
    questions = [q for c in cases for q in (c.prompt, *c.rephrases, *(p.prompt for p in c.locality))]
    return [Probe(q, encode_query(tokenizer, template, q)) for q in questions]


@torch.no_grad()
def plain_generate(model, tokenizer, probes: list[Probe], batch_size: int) -> list[str]:
    """``model.generate`` in the probes' order, left-padded batches, stopping at a newline."""
    pad = tokenizer.pad_token_id
    config = GenerationConfig(
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=model.generation_config.eos_token_id,
        stop_strings=["\n"],
    )
    answers = []
    for start in range(0, len(probes), batch_size):
        batch = probes[start : start + batch_size]
        width = max(len(p.query_ids) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, probe in enumerate(batch):
            ids[row, width - len(probe.query_ids) :] = torch.tensor(probe.query_ids)
            mask[row, width - len(probe.query_ids) :] = 1
        out = model.generate(
            input_ids=ids, attention_mask=mask, generation_config=config, tokenizer=tokenizer
        )
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
    return answers


def first_line(text: str) -> str:
    return text.split("\n")[0].split("\\")[0].strip()


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/ag_throughput.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-path", default="../shared/data/counterfact/counterfact-edit.json")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--edits", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    template = get_template(get_adapter(model).default_template(model, tokenizer))
    cases = load_cases("counterfact", args.data_path)[args.start : args.start + args.edits]
    probes = probes_of(cases, tokenizer, template)
    edited = Edited(model, tokenizer)
    sides = {
        "evaluator": lambda: [g.text for g in greedy_answers(edited, probes, batch_size=args.batch_size)],
        "generate": lambda: plain_generate(model, tokenizer, probes, args.batch_size),
    }
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    answers: dict[str, list[str]] = {}
    order = [name for i in range(args.repeats) for name in (list(sides) if i % 2 == 0 else list(sides)[::-1])]
    for name in order:
        started = time.perf_counter()
        answers[name] = sides[name]()
        seconds[name].append(time.perf_counter() - started)
        print(f"{name}: {len(probes) / seconds[name][-1]:.2f} probes/s", flush=True)
    rate = {name: len(probes) / statistics.fmean(seconds[name]) for name in sides}
    agree = sum(first_line(a) == first_line(b) for a, b in zip(answers["evaluator"], answers["generate"]))
    print(f"threads: {torch.get_num_threads()}  probes: {len(probes)}  batch size: {args.batch_size}")
    for name in sides:
        print(
            f"{name:>10}: {rate[name]:.2f} probes/s (runs {', '.join(f'{s:.1f}' for s in seconds[name])} s)"
        )
    print(f"ratio_evaluator_vs_generate: {rate['evaluator'] / rate['generate']:.2f}")
    print(f"first lines equal: {agree}/{len(probes)}")


if __name__ == "__main__":
    main()
