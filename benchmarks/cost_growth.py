"""How each stage's cost grows with the number of edits: time and peak memory at 1k-10k edits, exponents.

    OMP_NUM_THREADS=1 python benchmarks/cost_growth.py [--sizes 1000 2000 4000 10000] [--methods meg ...]
        [--out /tmp/cost_growth] [--data ../shared/data/counterfact]

Each method runs through ``meg-harness run`` on a tiny random Llama (2 layers, width 64, built offline) at
each size, one subprocess per (size, method) so that its peak RSS is its own. The edits are CounterFact's
dev records (``counterfact-edit.json`` 0-7999) followed by ``counterfact-train.json`` records beyond that;
MALMEN meta-trains on the train file, MeG's familiarity negatives come from it. Each method uses its
shipped SmolLM2 hparams file with only what a 2-layer model needs changed (``OVERRIDES``); stages whose work
does not depend on the edits (layer statistics, MeG's generator steps, MALMEN's meta-steps) are shortened,
their time is printed but they are constant by construction; MeG's familiarity network trains a fixed 30
epochs at every size (each epoch is a pass over the edits; when it stops early depends on the data).

Per stage: seconds at each size and the exponent ``b`` of the least-squares fit ``seconds = a * n**b``
(the issue's goal: ``b <= 1.15``; 2 is quadratic). Per method: the run's peak RSS at each size and its
exponent. Stages come from each result's ``metrics.json`` (``timings`` and the ``fit`` section's ``*_s``),
plus ``report`` (``meg-harness leaderboard`` of the size's folder). Runs are kept in ``--out`` and a
finished (size, method) is not recomputed (delete the folder to measure again).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

from meg_harness.models.tiny import make_tiny_model
from meg_harness.shipped import shipped_hparams

SIZES = (1000, 2000, 4000, 10000)
METHODS = ("none", "meg", "memit", "alphaedit", "pmet", "ft", "malmen")
DEV_RECORDS = 8000  # counterfact-edit.json indices 0-7999 (data/README.md: 8000-9999 are reserved)
TINY_LAYERS = {"memit": [0], "alphaedit": [0], "pmet": [0], "ft": [1], "malmen": [0, 1]}  # z below the last
OVERRIDES = {  # what a 2-layer model needs, and constant-cost stages shortened
    "meg": {
        "layer": 1,
        "encoder": {"tuning": "frozen"},
        "familiarity": {"max_epochs": 30, "loss_tol": 0.0},
        "train": {"max_steps": 200, "eval_every": 200},
    },
    "memit": {"mom2_n_samples": 256},
    "alphaedit": {"mom2_n_samples": 256},
    "pmet": {"mom2_n_samples": 256},
    "ft": {},
    "malmen": {"max_steps": 2, "train_n_edits": 64, "train_dataset": "counterfact"},
}


def edits_file(data: Path, n: int, out: Path) -> Path:
    """The first ``n`` edits: dev records of the edit file, then train-file records (written once)."""
    path = out / "edits.json"
    if not path.is_file():
        dev = json.loads((data / "counterfact-edit.json").read_text())[:DEV_RECORDS]
        train = json.loads((data / "counterfact-train.json").read_text())
        path.write_text(json.dumps(dev + train))
    assert n <= DEV_RECORDS + 10000, n
    return path


def hparams(method: str, data: Path) -> dict:
    if method == "none":
        return {}
    spec = {"base": str(shipped_hparams(method, "smollm2-135m")), **OVERRIDES[method]}
    if method in TINY_LAYERS:
        spec["layers"] = TINY_LAYERS[method]
    if method == "malmen":
        spec["train_path"] = str(data / "counterfact-train.json")
    if method == "meg":
        spec["encoder"] = {**spec["encoder"], "pairs": str(data / "counterfact-train.json")}
    return spec


def run(model: Path, method: str, n: int, edits: Path, out: Path, root: Path, data: Path) -> Path:
    """``meg-harness run`` of one method at one size (skipped when finished); its result folder."""
    folder = out / f"n{n}"  # one output folder per size; each run adds its method
    result = folder / method / "seed0"
    if (result / "metrics.json").is_file():
        return result
    config = {
        "model": str(model),
        "dataset": "counterfact",
        "data_path": str(edits),
        "n_edits": n,
        "range": [0, n],
        "seeds": [0],
        "one_per_subject": False,
        "methods": [method],
        "hparams": {method: hparams(method, data)} if method != "none" else {},
        "cache_dir": str(folder / "cache"),  # per size: a larger size must not read a smaller one's chunks
    }
    path = out / f"n{n}-{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "meg_harness.cli", "run", str(path), "--out", str(folder)]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return result


def stage_seconds(metrics: dict) -> dict[str, float]:
    """Every stage's seconds in a metrics.json: the timings and the fit section's ``*_s`` numbers."""
    stages = {k.removesuffix("_s"): v for k, v in metrics.get("timings", {}).items() if k.endswith("_s")}
    fit = metrics.get("fit") or {}
    stages |= {f"fit.{k.removesuffix('_s')}": v for k, v in fit.items() if k.endswith("_s") and v is not None}
    statistics = fit.get("statistics") or {}
    if "seconds" in statistics:
        stages["fit.statistics"] = statistics["seconds"]
    return stages


def exponent(sizes: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) on log(size)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(max(v, 1e-6)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/cost_growth.py", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("/tmp/cost_growth"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/counterfact"))
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    out, data = args.out.resolve(), args.data.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = out / "tiny-llama"
    if not (model / "config.json").is_file():
        make_tiny_model(model, "llama")
    edits = edits_file(data, max(args.sizes), out)

    seconds: dict[tuple[str, str], dict[int, float]] = {}
    peak: dict[str, dict[int, float]] = {}
    for n in args.sizes:
        for method in args.methods:
            metrics = json.loads((run(model, method, n, edits, out, root, data) / "metrics.json").read_text())
            for stage, value in stage_seconds(metrics).items():
                seconds.setdefault((method, stage), {})[n] = value
            peak.setdefault(method, {})[n] = metrics["resources"]["peak_rss_mb"]
            print(
                f"n={n} {method}: " + json.dumps({k: round(v, 1) for k, v in stage_seconds(metrics).items()})
            )
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "meg_harness.cli", "leaderboard", str(out / f"n{n}")],
            check=True,
            capture_output=True,
        )
        seconds.setdefault(("all", "report"), {})[n] = time.perf_counter() - started

    sizes = args.sizes
    header = " ".join(f"{n:>9}" for n in sizes)
    print(f"\n{'method':<10} {'stage':<22} {header}  exponent  (seconds)")
    for (method, stage), by_size in sorted(seconds.items()):
        values = [by_size.get(n, float("nan")) for n in sizes]
        b = exponent(sizes, values) if len(sizes) > 1 and all(v == v for v in values) else float("nan")
        print(f"{method:<10} {stage:<22} " + " ".join(f"{v:>9.2f}" for v in values) + f"  {b:>8.2f}")
    print(f"\n{'method':<10} {'peak RSS MB':<22} {header}  exponent")
    for method, by_size in peak.items():
        values = [by_size[n] for n in sizes]
        b = exponent(sizes, values) if len(sizes) > 1 else float("nan")
        print(f"{method:<10} {'':<22} " + " ".join(f"{v:>9.0f}" for v in values) + f"  {b:>8.2f}")


if __name__ == "__main__":
    main()
