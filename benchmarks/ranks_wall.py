"""Two gloo processes (``torchrun``, 1 thread each) against one process, on SmolLM2: the results are equal
and the wall-time ratio, in one run.

    python benchmarks/ranks_wall.py [--edits 32] [--out /tmp/ranks_wall]

The same config (none + MEMIT with its shipped SmolLM2 file, statistics cut to 16 WikiText paragraphs, on
the first ``--edits`` CounterFact dev edits: two z chunks of 16) runs three times, each with its own empty
cache: 1 process x 1 thread, 2 processes x 1 thread, 1 process x 2 threads. The 1-thread runs must be equal
(every probe of items.jsonl byte for byte; metrics.json apart from timings and resources); the 2-thread
run's floating-point reductions are blocked differently, so it is only timed. Run it on quiet cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

VOLATILE = {"timings", "resources", "git_sha", "config"}  # config: each run has its own cache_dir
RUNS = {"1 process x 1 thread": (1, 1), "2 processes x 1 thread": (2, 1), "1 process x 2 threads": (1, 2)}


def write_config(out: Path, edits: int, cache: Path) -> Path:
    config = {
        "model": "smollm2-135m",
        "dataset": "counterfact",
        "data_path": "../shared/data/counterfact/counterfact-edit.json",
        "n_edits": edits,
        "range": [0, 8000],
        "seeds": [0],
        "cache_dir": str(cache),
        "methods": ["none", "memit"],
        "hparams": {"memit": {"base": "hparams/MEMIT/smollm2-135m.yaml", "mom2_n_samples": 16}},
    }
    path = out / f"{cache.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(config: Path, out: Path, processes: int, threads: int) -> float:
    """Wall seconds of ``meg-harness run`` under ``processes`` ranks of ``threads`` threads each."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
    ]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "meg_harness.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    started = time.perf_counter()
    subprocess.run(
        [*command, "run", str(config), "--out", str(out)], check=True, env=env, capture_output=True
    )
    return time.perf_counter() - started


def stable(metrics: dict) -> dict:
    """metrics.json without what differs between equal runs (timings, resources, paths, ``*_s``)."""
    kept = {k: v for k, v in metrics.items() if k not in VOLATILE}
    fit = {k: v for k, v in (kept.get("fit") or {}).items() if not k.endswith("_s")}
    if "statistics" in fit:
        fit["statistics"] = {k: v for k, v in fit["statistics"].items() if k != "seconds"}
    return {**kept, "fit": fit}


def main() -> None:
    parser = argparse.ArgumentParser(prog="ranks_wall.py", description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ranks_wall"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seconds, outs = {}, {}
    for i, (name, (processes, threads)) in enumerate(RUNS.items()):
        outs[name] = args.out / f"run{i}"
        config = write_config(args.out, args.edits, args.out / f"cache{i}")
        seconds[name] = run(config, outs[name], processes, threads)
        print(f"{name}: {seconds[name]:.1f} s", flush=True)
    one, two = outs["1 process x 1 thread"], outs["2 processes x 1 thread"]
    for method in ("none", "memit"):
        a, b = (folder / method / "seed0" for folder in (one, two))
        same_items = (a / "items.jsonl").read_bytes() == (b / "items.jsonl").read_bytes()
        metrics = [stable(json.loads((f / "metrics.json").read_text())) for f in (a, b)]
        print(
            f"{method}: items.jsonl identical: {same_items}; metrics.json equal: {metrics[0] == metrics[1]}"
        )
    base = seconds["2 processes x 1 thread"]
    for name in ("1 process x 1 thread", "1 process x 2 threads"):
        print(f"wall time {name} / 2 processes x 1 thread: {seconds[name] / base:.2f}")


if __name__ == "__main__":
    main()
