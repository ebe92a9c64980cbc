"""MeG with each case's *collected* neuron in place of the generated one: how much Generality a perfect
generator and perfect routing would give (issue 19 item 3, which stage limits MeG).

    OMP_NUM_THREADS=1 python benchmarks/meg_collected_neurons.py RUN_DIR [--method meg] [--seed 0]

For a finished ``meg-harness run`` folder: the run's cases are selected again, their neurons collected
again with the run's hparams (read back from meg-harness's neuron cache when the run computed them on this
machine), and every case's edit prompt and rephrases get that case's collected neuron; locality prompts get
none. The protocol's evaluator scores it. Printed beside the run's own numbers (generated neurons, its
familiarity routing): Rel AG and Gen AG, and Gen AG among the rephrases the run routed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from meg_harness.editing import Edited
from meg_harness.evaluate.evaluator import evaluator_for
from meg_harness.meg.collect import collect_neurons
from meg_harness.meg.hparams import MEGHyperParams
from meg_harness.meg.neuron import NeuronEdited
from meg_harness.models.loading import load_model, model_fingerprint
from meg_harness.prompts import get_template
from meg_harness.report.meg_stages import stage_numbers
from meg_harness.runner import run_cases


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/meg_collected_neurons.py", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--method", default="meg")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    seed_folder = args.run_dir / args.method / f"seed{args.seed}"
    run = json.loads((seed_folder / "metrics.json").read_text(encoding="utf-8"))
    resolved = json.loads((seed_folder / "artifact" / "config.json").read_text(encoding="utf-8"))["hparams"]
    hp = MEGHyperParams.from_dict(resolved)
    config = run["config"]
    cases = run_cases(args.run_dir, args.seed)
    model, tokenizer = load_model(config["model"], dtype=config["dtype"], device=config["device"])
    template = get_template(run["template"]["name"])

    collection = collect_neurons(model, tokenizer, cases, template, hp.collect)
    neurons = {}
    for index, case in enumerate(cases):
        neuron = collection.neurons.row(index)
        for question in (case.prompt, *case.rephrases):
            neurons[question] = neuron
    oracle = NeuronEdited(model, tokenizer, neurons, collection.layer)

    evaluator = evaluator_for(config["dataset"], tokenizer, template, batch_size=config["batch_size"])
    labels = evaluator.locality_labels(Edited(model, tokenizer), cases, model_fingerprint(model))
    metrics, _ = evaluator.evaluate(oracle, cases, labels)

    stages = stage_numbers(seed_folder)  # the run's routing, from its items.jsonl
    rephrases = run["counts"]["rephrase"]
    routed = round(rephrases * stages.routed["rephrase"] / 100.0)
    print(f"{args.run_dir} {args.method} seed {args.seed}: {len(cases)} cases, {rephrases} rephrases")
    print(f"collected neurons exact on their edit prompt: {100.0 * collection.success_rate:.2f}%")
    print(
        f"collected neurons (every rephrase routed): Rel AG {metrics['reliability_ag']:.2f}  "
        f"Gen AG {metrics['generality_ag']:.2f}  Gen TF {metrics['generality_tf']:.2f}"
    )
    print(
        f"the run (generated neurons, its routing): Rel AG {run['reliability_ag']:.2f}  "
        f"Gen AG {run['generality_ag']:.2f}  Gen TF {run['generality_tf']:.2f}  "
        f"Gen AG if routed {stages.ag_if_routed['rephrase']:.2f} ({routed} routed)"
    )


if __name__ == "__main__":
    main()
