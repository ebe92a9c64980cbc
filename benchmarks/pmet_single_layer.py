"""PMET's FFN-only update on ONE layer of SmolLM2-135M, beside MEMIT's on the same layer (diagnosis).

PMET optimises an attention delta and an FFN delta jointly at the last edited layer and writes only the FFN
one into the weights. With a single edited layer the FFN update realises its delta exactly at the subject's
last token, so the result shows whether the FFN delta alone carries the edit. For each method this prints
the z NLL (with every optimised delta applied), the change of the FFN output at the subject's last token
after the weight update, and Reliability TF / Locality TF before and after.

    python benchmarks/pmet_single_layer.py [--layer 7] [--n 8] [--methods pmet memit] [--set key=value ...]

``--set`` overrides an hparam of every method (e.g. ``--set clamp_norm_factor=3 ffn_target=block``); the
defaults are the methods' SmolLM2 files (``hparams/<METHOD>/smollm2-135m.yaml``), ``layers`` = ``[--layer]``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import yaml

from meg_harness.baselines.keys import edit_outputs
from meg_harness.baselines.plan import build_plans
from meg_harness.data import load_cases
from meg_harness.editing.base import Edited
from meg_harness.editing.registry import get_editor_class
from meg_harness.evaluate.evaluator import Evaluator
from meg_harness.models import get_adapter, load_model
from meg_harness.models.loading import model_fingerprint
from meg_harness.prompts import get_template
from meg_harness.settings import read_hparams_file

REPO = Path(__file__).resolve().parents[1]
HPARAMS_DIR = {"pmet": "PMET", "memit": "MEMIT", "alphaedit": "AlphaEdit"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=7)
    parser.add_argument("--n", type=int, default=8, help="demo CounterFact edits")
    parser.add_argument("--methods", nargs="+", default=["pmet", "memit"], choices=sorted(HPARAMS_DIR))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="hparam overrides")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}

    model, tokenizer = load_model("smollm2-135m")
    adapter = get_adapter(model)
    template = get_template(adapter.default_template(model, tokenizer))
    cases = load_cases("counterfact", None)[: args.n]
    plans = build_plans(tokenizer, cases, template, [], "{} is a")
    ffn = adapter.mlp_module_tmp.format(args.layer)
    evaluator = Evaluator(tokenizer, template, batch_size=args.n)
    unedited = Edited(model, tokenizer)
    labels = evaluator.locality_labels(unedited, cases, model_fingerprint(model))
    before, _ = evaluator.evaluate(unedited, cases, labels)
    ffn_before = edit_outputs(model, tokenizer, plans, ffn)
    print(f"{args.n} demo edits, layer {args.layer}, overrides {overrides or 'none'}")
    print(f"unedited: Rel TF {before['reliability_tf']:.2f}, Loc TF {before['locality_tf']:.2f}")
    for method in args.methods:
        path = REPO / "hparams" / HPARAMS_DIR[method] / "smollm2-135m.yaml"
        hparams = {**read_hparams_file(path), "layers": [args.layer], "context_prefixes": 0, **overrides}
        edited = get_editor_class(method)(hparams).fit(model, tokenizer, cases, template)
        try:
            moved = (edit_outputs(model, tokenizer, plans, ffn) - ffn_before).norm(dim=1)
            after, _ = evaluator.evaluate(edited, cases, labels)
        finally:
            edited.restore()
        print(
            f"{method}: z NLL median {statistics.median(edited.info['z_nll']):.3f}; FFN output at the "
            f"subject moved by {moved.mean():.1f} (mean norm); Rel TF {after['reliability_tf']:.2f}, "
            f"Loc TF {after['locality_tf']:.2f}"
        )


if __name__ == "__main__":
    main()
