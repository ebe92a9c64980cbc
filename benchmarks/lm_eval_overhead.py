"""What ``--model meg`` costs in lm-eval over the unedited model, on a general benchmark (issue 7).

    python benchmarks/lm_eval_overhead.py ARTIFACT [--pretrained smollm2-135m] [--limit 100]
        [--tasks mmlu_meg_local] [--batch-size 8] [--repeats 2] [--forced-ddim-steps 50] [--threads 1]

ARTIFACT is a MeG artifact folder (``OUT/meg/seed<k>/artifact`` of ``meg-harness run``); ``--pretrained`` its
base model. In ONE process it times ``lm_eval.simple_evaluate`` (tasks from ``meg-harness tasks-path``) for

* ``hf``: ``--model edited`` without ``delta`` (HFLM's own code path: no per-row hooks),
* ``meg-auto``: ``--model meg`` with ``route=auto`` (the familiarity network routes unrelated queries away;
  the number of routed queries is reported),
* ``meg-all``: ``--model meg`` with ``route=all`` at ``--forced-ddim-steps`` DDIM steps (every query gets a
  generated neuron: the cost without the familiarity network),

each ``--repeats`` times in alternating order (neurons are regenerated on every repeat), and prints the ratios
meg/hf of the best wall times; the last two lines are ``ratio_forced_ddim<N>: Y`` and
``ratio_routed_away: X`` (goal: X <= 1.10). The models are loaded before timing. The local benchmark data is
read from ``--general-data`` (default ``../shared/data/general`` beside the repository, else lm-eval's
metadata / ``$MEG_HARNESS_GENERAL_DATA``).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from meg_harness.shipped import tasks_root

REPO = Path(__file__).resolve().parents[1]
TASKS_PATH = tasks_root()  # what `meg-harness tasks-path` prints
DEFAULT_GENERAL_DATA = REPO.parent / "shared" / "data" / "general"


def timed_requests(lm: Any) -> dict[str, float]:
    """Wrap ``lm``'s request methods (instance attributes shadow the class's) to add up their time."""
    clock = {"model_s": 0.0}

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                clock["model_s"] += time.perf_counter() - started

        return call

    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        setattr(lm, name, wrap(getattr(lm, name)))
    return clock


def headline(results: dict[str, Any]) -> str:
    """``task metric=value`` of the first numeric metric of every task (a sanity check between variants)."""
    parts = []
    for task, metrics in sorted(results.items()):
        value = next((v for k, v in metrics.items() if k.endswith(",none") and isinstance(v, float)), None)
        parts.append(f"{task} {value:.4f}" if value is not None else task)
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--pretrained", default="smollm2-135m")
    parser.add_argument("--tasks", default="mmlu_meg_local", help="comma-separated lm-eval task names")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--forced-ddim-steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--general-data", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lm-eval").setLevel(logging.WARNING)

    import lm_eval
    from lm_eval.tasks import TaskManager

    from meg_harness.lm_eval_plugin.models import EditedLM, MegLM

    metadata: dict[str, Any] = {}
    general = args.general_data or (DEFAULT_GENERAL_DATA if DEFAULT_GENERAL_DATA.is_dir() else None)
    if general is not None:
        metadata["general_data"] = str(general)
    tasks = [t for t in args.tasks.split(",") if t]
    common = {"batch_size": args.batch_size, "device": args.device}
    base = EditedLM(pretrained=args.pretrained, **common)
    meg = MegLM(pretrained=args.pretrained, meg_path=str(args.artifact), **common)
    artifact_steps = meg.edited.meg.diffusion.ddim_steps
    described = meg.edited.meg.describe()
    print(
        f"tasks {','.join(tasks)}, limit {args.limit}, batch size {args.batch_size}, device {args.device}, "
        f"threads {args.threads}, base {args.pretrained}"
    )
    print("artifact: " + ", ".join(f"{k} {v}" for k, v in described.items()))

    variants: dict[str, tuple[Any, Callable[[], None]]] = {
        "hf": (base, lambda: None),
        "meg-auto": (meg, lambda: meg.edited.configure(routing="auto", ddim_steps=artifact_steps)),
        "meg-all": (meg, lambda: meg.edited.configure(routing="all", ddim_steps=args.forced_ddim_steps)),
    }
    clocks = {id(lm): timed_requests(lm) for lm in (base, meg)}
    walls: dict[str, list[float]] = {name: [] for name in variants}
    model_times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in order:
            lm, prepare = variants[name]
            prepare()  # meg: forget the neurons of the previous run, set routing and DDIM steps
            clock = clocks[id(lm)]
            clock["model_s"] = 0.0
            manager = TaskManager(include_path=str(TASKS_PATH), include_defaults=False, metadata=metadata)
            started = time.perf_counter()
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                metadata=metadata,
                limit=args.limit,
                bootstrap_iters=0,
                log_samples=False,
                verbosity="WARNING",
            )
            wall = time.perf_counter() - started
            walls[name].append(wall)
            model_times[name].append(clock["model_s"])
            line = f"repeat {repeat + 1} {name:8s} wall {wall:8.2f} s, model calls {clock['model_s']:8.2f} s"
            if lm is meg:
                stats = meg.edited.stats
                line += (
                    f", routed {stats['routed']}/{stats['queries']} queries, "
                    f"generation {stats['generate_s']:.2f} s (DDIM {meg.edited.meg.diffusion.ddim_steps})"
                )
            print(line + f"; {headline(output['results'])}", flush=True)

    best = {name: min(times) for name, times in walls.items()}
    best_model = {name: min(times) for name, times in model_times.items()}
    print("| variant | best wall s | best model-call s | wall / hf | model-call / hf |")
    print("|---|---:|---:|---:|---:|")
    for name in variants:
        print(
            f"| {name} | {best[name]:.2f} | {best_model[name]:.2f} | {best[name] / best['hf']:.3f} | "
            f"{best_model[name] / best_model['hf']:.3f} |"
        )
    print(f"ratio_forced_ddim{args.forced_ddim_steps}: {best['meg-all'] / best['hf']:.3f}")
    print(f"ratio_routed_away: {best['meg-auto'] / best['hf']:.3f}")


if __name__ == "__main__":
    main()
