"""MEMIT's z optimisation with context prefixes vs without: seconds per edit and the ratio, in one run.

    python benchmarks/z_prefix_cost.py [--hparams hparams/MEMIT/smollm2-135m.yaml] [--n 16] [--prefixes 5]
        [--data-path ../shared/data/counterfact/counterfact-edit.json] [--start 0]

Both settings optimise the same edits (the first ``--n`` CounterFact records from ``--start``, one chunk of
``z_batch_size`` at a time) with the hparams file's z settings, no cache, alternating which goes first
(prefixes, none, none, prefixes) so that a load change affects both alike. Prints seconds per edit for
each, the ratio, and the final mean NLL per target token.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from meg_harness.baselines.params import LocateHParams, from_mapping
from meg_harness.baselines.plan import build_plans
from meg_harness.baselines.prefixes import generate_prefixes
from meg_harness.baselines.values import optimise_values
from meg_harness.config import load_hparams
from meg_harness.data import load_cases
from meg_harness.models import get_adapter, load_model
from meg_harness.prompts import get_template


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hparams", default="hparams/MEMIT/smollm2-135m.yaml")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-path", default="../shared/data/counterfact/counterfact-edit.json")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--prefixes", type=int, default=5)
    args = parser.parse_args()
    hp, model, tokenizer, template, cases, z_layer, sites = z_setup(args)
    prefixes = generate_prefixes(model, tokenizer, args.prefixes, hp.context_prefix_length, hp.seed)
    settings = {"none": [], f"{args.prefixes} prefixes": prefixes}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    nll: dict[str, float] = {}
    for name in [*reversed(settings), *settings]:
        plans = build_plans(
            tokenizer, cases, template, settings[name], hp.kl_prompt, terminator=hp.terminator
        )
        started = time.perf_counter()
        result = optimise_values(model, tokenizer, plans, sites, hp, layer=z_layer, progress=False)
        seconds[name].append((time.perf_counter() - started) / len(cases))
        nll[name] = statistics.fmean(result.nll)
        print(f"{name}: {seconds[name][-1]:.2f} s/edit", flush=True)  # a long run shows its progress
    for name in settings:
        runs = ", ".join(f"{s:.2f}" for s in seconds[name])
        mean = statistics.fmean(seconds[name])
        print(f"{name:>12}: {mean:.2f} s/edit (runs {runs}), final NLL {nll[name]:.4f}")
    ratio = statistics.fmean(seconds[f"{args.prefixes} prefixes"]) / statistics.fmean(seconds["none"])
    print(f"threads: {torch.get_num_threads()}  edits: {len(cases)}  z layer: {z_layer}")
    print(f"ratio_prefixes_vs_none: {ratio:.2f}")


def z_setup(args: argparse.Namespace) -> tuple:
    """From ``--hparams --model --data-path --start --n``: the file's z hyper-parameters, the model and
    tokenizer, its query template, the CounterFact cases, the z layer and its site (the layer's output)."""
    hp = from_mapping(LocateHParams, _z_fields(load_hparams(args.hparams, "memit", args.hparams)), "memit")
    model, tokenizer = load_model(args.model)
    adapter = get_adapter(model)
    template = get_template(adapter.default_template(model, tokenizer))
    cases = load_cases("counterfact", args.data_path)[args.start : args.start + args.n]
    z_layer = hp.layers[-1] % adapter.num_layers(model)
    return hp, model, tokenizer, template, cases, z_layer, [adapter.layer_module_tmp.format(z_layer)]


def _z_fields(hparams: dict) -> dict:
    """The file's locate-then-edit keys (method-specific keys such as AlphaEdit's L2 dropped)."""
    known = {f for f in LocateHParams.__dataclass_fields__}
    return {k: v for k, v in hparams.items() if k in known or k in ("alg_name", "model_name")}


if __name__ == "__main__":
    main()
