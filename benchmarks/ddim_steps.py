"""Table 8 on this machine: MeG's metrics and generation cost per DDIM step count.

    python benchmarks/ddim_steps.py RUN_DIR [--steps 10 50 100 1000] [--method meg] [--seed 0] [--threads 1]
        [--n N]

RUN_DIR is a ``meg-harness run`` output folder with a MeG result (``RUN_DIR/<method>/seed<k>/artifact``). For
each step count it re-scores the run's cases with the artifact at that many DDIM steps (the six metrics and
Score), and times (in the same process) the neuron generation per query against the base LM's greedy answer
generation for the same queries: the "Proportion" column is generation / (generation + LLM answering).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from meg_harness.editing.base import Edited
from meg_harness.evaluate.evaluator import Evaluator
from meg_harness.evaluate.protocol import ALL_METRIC_KEYS
from meg_harness.evaluate.scoring import Probe, greedy_answers
from meg_harness.models.loading import model_fingerprint
from meg_harness.prompts import encode_query
from meg_harness.runner import load_run_edit, run_cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50, 100, 1000])
    parser.add_argument("--method", default="meg", help="the run's MeG variant (e.g. meg@18k)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=None, help="score only the run's first N cases")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = json.loads((args.run_dir / "run_config.json").read_text())
    edited = load_run_edit(args.run_dir, args.method, args.seed)
    model, tokenizer = edited.model, edited.tokenizer
    cases = run_cases(args.run_dir, args.seed)[: args.n]
    evaluator = Evaluator(tokenizer, edited.template, batch_size=config["batch_size"])
    labels = evaluator.locality_labels(Edited(model, tokenizer), cases, model_fingerprint(model))
    questions = [c.prompt for c in cases]
    probes = [Probe(q, encode_query(tokenizer, edited.template, q)) for q in questions]
    started = time.perf_counter()
    greedy_answers(Edited(model, tokenizer), probes, batch_size=config["batch_size"], max_new_tokens=20)
    llm_s = (time.perf_counter() - started) / len(questions)
    print(f"{len(cases)} cases; LLM answer generation: {llm_s:.4f} s/query")
    print(
        "| DDIM steps | Rel AG | Rel TF | Gen AG | Gen TF | Loc AG | Loc TF | Score | s/neuron | Proportion |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for steps in args.steps:
        meg = dataclasses.replace(
            edited.meg, diffusion=dataclasses.replace(edited.meg.diffusion, ddim_steps=steps)
        )
        started = time.perf_counter()
        meg.neurons_for(questions)
        per_neuron = (time.perf_counter() - started) / len(questions)
        variant = type(edited)(model, tokenizer, meg, edited.template)
        metrics, _ = evaluator.evaluate(variant, cases, labels)
        share = per_neuron / (per_neuron + llm_s)
        cells = " | ".join(f"{metrics[k]:.2f}" for k in ALL_METRIC_KEYS)
        print(f"| {steps} | {cells} | {per_neuron:.4f} | {100 * share:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
