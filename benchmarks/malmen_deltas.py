"""MALMEN's edit deltas by part at two sizes, alternating, in one process (issue 18, cost growth).

    OMP_NUM_THREADS=1 python benchmarks/malmen_deltas.py [--root /tmp/cost_growth] [--sizes 4000 10000]

Reads what ``benchmarks/cost_growth.py --out ROOT`` left (its tiny model, edits file, MALMEN config and
per-size caches, so the meta-training is read back), fits MALMEN on the first N edits at each size twice,
in alternating order, and prints the seconds of each part of the deltas (examples, keys and gradients,
hypernetwork shifts, ridge solve) and the local exponent of the deltas between the two sizes.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from pathlib import Path

import yaml

import meg_harness.baselines.malmen_net as malmen_net
import meg_harness.baselines.malmen_train as malmen_train
from meg_harness.config import load_hparams
from meg_harness.data import load_cases
from meg_harness.editing import get_editor_class
from meg_harness.models.loading import default_template_of, load_model
from meg_harness.prompts import get_template

SPENT: dict[str, float] = defaultdict(float)


def timed(name: str, function):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - started

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/malmen_deltas.py", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/cost_growth"))
    parser.add_argument("--sizes", type=int, nargs=2, default=[4000, 10000])
    args = parser.parse_args()
    malmen_train.edit_examples = timed("examples", malmen_train.edit_examples)
    malmen_train.cache_keys_and_grads = timed("keys_and_gradients", malmen_train.cache_keys_and_grads)
    malmen_net.MalmenHypernet.shifts = timed("shifts", malmen_net.MalmenHypernet.shifts)
    malmen_train.ridge_update = timed("solve", malmen_train.ridge_update)
    small, large = args.sizes
    config = yaml.safe_load((args.root / f"n{large}-malmen.yaml").read_text())
    hparams = load_hparams(config["hparams"]["malmen"], "malmen", "cost_growth")
    model, tokenizer = load_model(config["model"])
    template = get_template(default_template_of(config["model"]))
    cases = load_cases("counterfact", config["data_path"])
    deltas: dict[int, list[float]] = defaultdict(list)
    for n in (large, small, large, small):
        editor = get_editor_class("malmen")(hparams)
        editor.cache_dir = args.root / f"n{n}" / "cache"
        SPENT.clear()
        edited = editor.fit(model, tokenizer, cases[:n], template)
        edited.restore()
        deltas[n].append(edited.info["deltas_s"])
        parts = " ".join(f"{k} {v:.2f}" for k, v in SPENT.items())
        print(f"n={n}: deltas {edited.info['deltas_s']:.2f} s ({parts})", flush=True)
    ratio = (sum(deltas[large]) / len(deltas[large])) / (sum(deltas[small]) / len(deltas[small]))
    exponent = math.log(ratio) / math.log(large / small)
    print(f"deltas {large}/{small}: {ratio:.2f} for {large / small:.2f}x the edits, exponent {exponent:.2f}")


if __name__ == "__main__":
    main()
