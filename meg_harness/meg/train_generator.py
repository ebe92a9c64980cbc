"""Training MeG's weight generator on (encoded edit prompt -> collected neuron) pairs (paper 4.1 c.2, A.3).

AdamW at a fixed lr (1e-4; optionally lowered linearly to 0 over the last ``lr_decay_steps``), the
v-prediction loss on per-dimension normalised targets, an EMA of the weights (diffusers'
:class:`~diffusers.training_utils.EMAModel`), mixed precision and multi-process data parallelism through
:class:`accelerate.Accelerator`: ``accelerate launch --num_processes N -m meg_harness.meg.train_generator``
runs the same loop DDP, as the official code's ``accelerate launch --multi_gpu``. Every ``eval_every`` steps
the EMA generator samples every training condition by DDIM and the paper's success criterion is checked: mean
+ std of the per-edit L2 distance between generated and target (normalised) vectors below ``success_l2``
(0.5). Checkpoints (generator, EMA, optimiser, step, RNG) are written atomically and resumed from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from meg_harness.budget import WallClock, stopped
from meg_harness.cache import atomic_path
from meg_harness.errors import HarnessError
from meg_harness.meg.diffusion import DiffusionConfig, WeightNormalizer, ddim_sample, v_prediction_loss
from meg_harness.settings import (
    NON_NEGATIVE,
    POSITIVE,
    Rule,
    Settings,
    in_range,
    one_of,
    settings_from_mapping,
)

CHECKPOINT = "checkpoint.pt"
LINEAGE = "lineage.json"
MIXED_PRECISION = ("no", "fp16", "bf16")
# The settings that only say how long training runs; a run's lineage is everything else.
LENGTH_SETTINGS = ("max_steps", "lr_decay_steps")


@dataclass(frozen=True)
class TrainConfig(Settings):
    """Generator training settings. ``batch_size`` is the global batch (split across processes);
    ``max_steps`` decides the result; ``max_minutes`` is only a wall-clock limit of one call (the checkpoint
    is saved and :class:`~meg_harness.budget.TrainingStopped` raised: no result; the next call resumes, and
    the finished run is that of an unstopped one); ``eval_every`` and ``checkpoint_every`` are in steps.
    ``cond_noise`` (not in the paper; 0 = off) adds Gaussian noise to each training condition, its norm
    about ``cond_noise`` times the conditions' mean norm, so that the generator treats the neighbourhood
    of an edit prompt's embedding (its paraphrases) as that edit.
    ``lr_decay_steps`` (not in the paper; 0 = the paper's constant lr) lowers the lr linearly to 0 over the
    last that many steps, so that the generator settles into the training pairs (:func:`learning_rate`)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 256
    max_steps: int = 20000
    min_steps: int = 0
    max_minutes: float | None = None
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    eval_every: int = 1000
    eval_ddim_steps: int = 50
    success_l2: float = 0.5
    checkpoint_every: int = 1000
    mixed_precision: str = "no"
    seed: int = 0
    cond_noise: float = 0.0
    lr_decay_steps: int = 0

    CHECKS: ClassVar[Mapping[str, Rule]] = {
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "batch_size": POSITIVE,
        "max_steps": POSITIVE,
        "min_steps": NON_NEGATIVE,
        "max_minutes": POSITIVE,
        "ema_decay": in_range(0, 1, high_open=True),
        "eval_every": POSITIVE,
        "eval_ddim_steps": POSITIVE,
        "success_l2": NON_NEGATIVE,
        "checkpoint_every": POSITIVE,
        "mixed_precision": one_of(*MIXED_PRECISION),
        "cond_noise": NON_NEGATIVE,
        "lr_decay_steps": NON_NEGATIVE,
    }

    def check(self) -> None:
        if self.lr_decay_steps > self.max_steps:
            raise HarnessError(
                f"lr_decay_steps must be an integer <= max_steps ({self.max_steps}), "
                f"got {self.lr_decay_steps!r}",
                field="lr_decay_steps",
            )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> TrainConfig:
        return settings_from_mapping(cls, mapping, "training setting", "train.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def constant_lr_steps(self) -> int:
        """How many steps run at the constant ``lr`` before the decay begins."""
        return self.max_steps - self.lr_decay_steps


def learning_rate(config: TrainConfig, step: int) -> float:
    """The lr of (0-based) optimiser step ``step``: ``config.lr`` until the last ``lr_decay_steps`` steps,
    then linearly lower, reaching ``lr / lr_decay_steps`` at the last step."""
    if step < config.constant_lr_steps:
        return config.lr
    return config.lr * (config.max_steps - step) / config.lr_decay_steps


@dataclass
class TrainResult:
    """What training did: steps, losses (mean per ``eval_every`` window), the success checks, wall time."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)
    success: bool = False
    wall_s: float = 0.0
    resumed_from: int = 0  # steps read back from the checkpoint (done by earlier processes)
    resumed_s: float = 0.0  # their wall time

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def l2_report(generated: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Per-row L2 distance between generated and target vectors: mean, std and their sum (the criterion)."""
    distance = (generated.float() - targets.float()).norm(dim=-1)
    std = float(distance.std(unbiased=False)) if len(distance) > 1 else 0.0
    mean = float(distance.mean())
    return {"l2_mean": mean, "l2_std": std, "l2_mean_plus_std": mean + std}


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path, mode=0o644) as tmp:
        torch.save(state, tmp)


def continue_shorter_run(folder: str | os.PathLike, lineage: str, config: TrainConfig) -> int:
    """Seed the checkpoint folder ``folder`` from the longest run of the same ``lineage`` beside it.

    A lineage is a caller's hash of everything that shapes training except the :data:`LENGTH_SETTINGS`
    (pairs, generator, schedule, the other settings). When ``folder`` has no checkpoint, the sibling folder of
    the same lineage whose checkpoint went furthest while both runs were still at the constant lr (so within
    ``config.max_steps``) is copied in; it must have stopped at an evaluation step (or on success), so
    continuing it is bit-identical to an uninterrupted run. Raising ``train.max_steps``, or adding an lr
    decay after a constant-lr run, then trains only the extra steps. Tags ``folder`` with ``lineage`` and
    its constant-lr span, and returns the step it continues from (0: none).
    """
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    constant = config.constant_lr_steps if config.lr_decay_steps else None  # None: constant throughout
    tag = {"lineage": lineage, "constant_lr_steps": constant}
    (folder / LINEAGE).write_text(json.dumps(tag) + "\n")
    if (folder / CHECKPOINT).is_file():
        return 0
    best_steps, best_path = 0, None
    for sibling_tag in folder.parent.glob(f"*/{LINEAGE}"):
        checkpoint = sibling_tag.parent / CHECKPOINT
        if sibling_tag.parent == folder or not checkpoint.is_file():
            continue
        sibling = json.loads(sibling_tag.read_text())
        if sibling.get("lineage") != lineage:
            continue
        result = torch.load(checkpoint, map_location="cpu", weights_only=False)["result"]
        steps = result["steps"]
        shared = min(config.constant_lr_steps, sibling.get("constant_lr_steps") or config.max_steps)
        resumable = result["success"] or steps % config.eval_every == 0
        if resumable and best_steps < steps <= shared:
            best_steps, best_path = steps, checkpoint
    if best_path is not None:
        with atomic_path(folder / CHECKPOINT, mode=0o644) as tmp:
            shutil.copyfile(best_path, tmp)
    return best_steps


def train_generator(
    generator: nn.Module,
    cond: torch.Tensor,
    targets: torch.Tensor,
    diffusion: DiffusionConfig,
    config: TrainConfig,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    accelerator=None,
) -> tuple[nn.Module, TrainResult]:
    """Train ``generator`` to map each condition row to its NORMALISED target row; returns the EMA generator
    (a copy, in eval mode, on the generator's device) and a :class:`TrainResult`.

    ``cond [N, C]`` and ``targets [N, D]`` are the training pairs (targets already normalised with a
    :class:`~meg_harness.meg.diffusion.WeightNormalizer`). With ``checkpoint_dir``, training resumes from the
    checkpoint there and stops early once the success criterion holds (after ``min_steps``).
    """
    import copy

    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    if len(cond) != len(targets) or not len(cond):
        raise HarnessError(f"need as many conditions as targets (>0), got {len(cond)} and {len(targets)}")
    started = time.perf_counter()
    accelerator = accelerator or Accelerator(
        mixed_precision=config.mixed_precision, cpu=cond.device.type == "cpu"
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    local_batch = max(1, config.batch_size // world)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = EMAModel(
        generator.parameters(), decay=config.ema_decay, use_ema_warmup=config.ema_warmup, foreach=False
    )
    result = TrainResult()
    window: list[float] = []  # losses since the last evaluation (checkpointed: a resume mid-window is exact)
    generator_rng = torch.Generator().manual_seed(config.seed * 1000 + rank)
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if path is not None and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=False)
        generator.load_state_dict(state["generator"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        result = TrainResult(**state["result"])
        result.resumed_from, result.resumed_s = result.steps, result.wall_s
        window = list(state.get("window", []))
        generator_rng.set_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        if result.success and result.steps >= config.min_steps:
            return _ema_copy(generator, ema, copy), result
    model, optimizer = accelerator.prepare(generator, optimizer)
    device = accelerator.device
    cond, targets = cond.to(device), targets.to(device)
    scheduler = diffusion.train_scheduler()
    noise_std = config.cond_noise * float(cond.float().norm(dim=1).mean()) / math.sqrt(cond.shape[1])
    clock = WallClock(config.max_minutes)
    bar = tqdm(
        total=config.max_steps, initial=result.steps, desc="generator", disable=not progress or rank != 0
    )
    model.train()
    while result.steps < config.max_steps:
        index = torch.randint(0, len(cond), (local_batch,), generator=generator_rng).to(device)
        condition = cond[index]
        if noise_std:
            condition = condition + noise_std * torch.randn(condition.shape, generator=generator_rng).to(
                condition
            )
        with accelerator.autocast():
            loss = v_prediction_loss(model, targets[index], condition, scheduler, generator_rng)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, result.steps)
        optimizer.step()
        ema.step(accelerator.unwrap_model(model).parameters())
        result.steps += 1
        window.append(float(loss.detach()))
        bar.update(1)
        if result.steps % config.eval_every == 0 or result.steps == config.max_steps:
            result.losses.append(sum(window) / len(window))
            window = []
            evaluation = _evaluate(accelerator.unwrap_model(model), ema, cond, targets, diffusion, config)
            evaluation["step"] = result.steps
            result.evaluations.append(evaluation)
            result.success = evaluation["l2_mean_plus_std"] < config.success_l2
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", l2=f"{evaluation['l2_mean_plus_std']:.3f}")
        clock.step_done()
        done = result.success and result.steps >= config.min_steps
        out_of_time = _agreed(
            accelerator, not done and result.steps < config.max_steps and clock.next_step_overruns()
        )
        if path is not None and (result.steps % config.checkpoint_every == 0 or done or out_of_time):
            result.wall_s += time.perf_counter() - started
            started = time.perf_counter()
            state = _state(accelerator, model, optimizer, ema, result, generator_rng)  # collective: all ranks
            state["window"] = list(window)
            if rank == 0:
                _save_checkpoint(path, state)
        accelerator.wait_for_everyone()
        if out_of_time:
            bar.close()
            where = path.parent if path is not None else "nowhere: no checkpoint_dir"
            raise stopped(
                "generator training", config.max_minutes, result.steps, config.max_steps, where, "max_minutes"
            )
        if done:
            break
    bar.close()
    result.wall_s += time.perf_counter() - started
    return _ema_copy(accelerator.unwrap_model(model), ema, copy), result


def _agreed(accelerator, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (a wall-clock decision must not differ between DDP processes)."""
    if accelerator.num_processes == 1:
        return flag
    from accelerate.utils import broadcast_object_list

    return bool(broadcast_object_list([flag])[0])


def _state(accelerator, model, optimizer, ema, result: TrainResult, rng: torch.Generator) -> dict[str, Any]:
    states = [rng.get_state()]
    if accelerator.num_processes > 1:  # every rank's RNG, so a resumed DDP run continues each stream
        from accelerate.utils import gather_object

        states = gather_object([rng.get_state()])
    return {
        "generator": accelerator.unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict(),
        "result": result.to_dict(),
        "rng": states,
    }


def _ema_copy(model: nn.Module, ema, copy_module) -> nn.Module:
    averaged = copy_module.deepcopy(model)
    ema.copy_to(averaged.parameters())
    return averaged.eval().float()


@torch.no_grad()
def _evaluate(model, ema, cond, targets, diffusion: DiffusionConfig, config: TrainConfig) -> dict[str, float]:
    import copy

    averaged = _ema_copy(model, ema, copy)
    generated = ddim_sample(averaged, cond.float(), targets.shape[1], diffusion, steps=config.eval_ddim_steps)
    return l2_report(generated, targets.float().to(generated.device))


# -- command line (for `accelerate launch -m meg_harness.meg.train_generator`) ------------------------------


def save_pairs(path: str | os.PathLike, cond: torch.Tensor, neurons: torch.Tensor) -> None:
    """Write training pairs (``cond [N, C]``, raw ``neurons [N, D]``) for the command-line trainer."""
    from safetensors.torch import save_file

    save_file({"cond": cond.contiguous().float(), "neurons": neurons.contiguous().float()}, str(path))


def main(argv: list[str] | None = None) -> int:
    """Train a generator on saved pairs: ``--pairs P.safetensors --config C.json --out DIR``; writes
    ``DIR/generator.safetensors`` (EMA weights), ``DIR/normalizer.safetensors`` and ``DIR/train.json``."""
    from accelerate import Accelerator
    from safetensors.torch import load_file, save_file

    from meg_harness.meg.generator import GeneratorConfig, build_generator

    parser = argparse.ArgumentParser(prog="python -m meg_harness.meg.train_generator")
    parser.add_argument("--pairs", required=True)
    parser.add_argument(
        "--config", required=True, help="JSON with 'generator', 'diffusion', 'train' mappings"
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    settings = json.loads(Path(args.config).read_text(encoding="utf-8"))
    pairs = load_file(args.pairs)
    cond, neurons = pairs["cond"], pairs["neurons"]
    train = TrainConfig.from_mapping(settings.get("train"))
    diffusion = DiffusionConfig.from_mapping(settings.get("diffusion"))
    gen_config = GeneratorConfig.from_mapping(
        settings.get("generator", {}), vector_dim=neurons.shape[1], cond_dim=cond.shape[1]
    )
    accelerator = Accelerator(mixed_precision=train.mixed_precision, cpu=not torch.cuda.is_available())
    normalizer = WeightNormalizer.fit(neurons)
    generator = build_generator(gen_config, seed=train.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        ema_model, result = train_generator(
            generator,
            cond,
            normalizer.normalize(neurons),
            diffusion,
            train,
            checkpoint_dir=out,
            accelerator=accelerator,
        )
    except HarnessError as error:  # e.g. stopped by max_minutes: one line, and the next call resumes
        print(f"train_generator: error: {error}", file=sys.stderr)
        return 2
    if accelerator.is_main_process:
        save_file(
            {k: v.contiguous() for k, v in ema_model.state_dict().items()}, str(out / "generator.safetensors")
        )
        save_file(dict(normalizer.state_dict()), str(out / "normalizer.safetensors"))
        record = {
            "processes": accelerator.num_processes,
            "generator": gen_config.to_dict(),
            **result.to_dict(),
        }
        (out / "train.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    return 0 if math.isfinite(result.losses[-1] if result.losses else 0.0) else 1


if __name__ == "__main__":
    raise SystemExit(main())
