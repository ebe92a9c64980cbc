"""The processes of one run under ``torchrun`` / ``accelerate launch``: which share of per-edit work is whose.

Every rank runs the same code on the same data. Inside :func:`spread_over_ranks` (the runner's fit and
evaluation), :func:`map_shared` hands item ``i`` of a list of independent work items (a chunk of z
vectors, a shard of MeG neurons, a batch of probes) to rank ``i % world_size`` and gathers the results, so
that every rank ends with all of them, in order, as one process would compute them: the items and their
order are the same, only who computes them changes. Outside that context, or in one process,
:func:`map_shared` is a plain loop; work done for one rank's item never spreads again (no nested
collectives), and code that other tools run per rank (lm-eval's data parallelism) never gathers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
_spreading: ContextVar[bool] = ContextVar("meg_harness_spreading", default=False)


def world() -> tuple[int, int]:
    """(rank, number of ranks) of this process; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes results (rank 0)."""
    return world()[0] == 0


def init_from_launcher(device: str) -> str:
    """Join the process group a launcher described in the environment (``WORLD_SIZE`` > 1): gloo on the
    CPU, nccl on CUDA; returns this rank's device (``cuda`` becomes ``cuda:<LOCAL_RANK>``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    cuda = device.startswith("cuda")
    if cuda and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if world()[1] > 1:
        dist.barrier()


@contextlib.contextmanager
def spread_over_ranks() -> Iterator[None]:
    """Within this block, :func:`map_shared` spreads its items over the ranks (when there are several)."""
    token = _spreading.set(world()[1] > 1)
    try:
        yield
    finally:
        _spreading.reset(token)


def map_shared(items: Sequence[Any], compute: Callable[[Any], T], device: Any = None) -> list[T]:
    """``[compute(item) for item in items]``; inside :func:`spread_over_ranks` each rank computes every
    ``world_size``-th item and all results are gathered to every rank (moved to ``device`` when given,
    else to the CPU for tensors computed elsewhere). An error on any rank is raised on all of them."""
    if not _spreading.get():
        return [compute(item) for item in items]
    rank, size = world()
    token = _spreading.set(False)  # an item's own work stays on this rank
    local: dict[int, Any] = {}
    failure: Exception | None = None
    try:
        for index in range(rank, len(items), size):
            local[index] = _to(compute(items[index]), "cpu")
    except Exception as error:  # every rank must reach the gather, or the others would wait forever
        failure = error
    finally:
        _spreading.reset(token)
    said = None if failure is None else f"rank {rank}: {type(failure).__name__}: {failure}"
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, (local, said))
    if failure is not None:
        raise failure
    failures = [text for _, text in gathered if text]
    if failures:
        raise RuntimeError("work on another rank failed: " + "; ".join(failures))
    merged = {index: result for part, _ in gathered for index, result in part.items()}
    return [merged[index] if device is None else _to(merged[index], device) for index in range(len(items))]


def _to(value: Any, device: Any) -> Any:
    """``value`` with every tensor inside it (dataclass fields, lists, tuples, dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = dataclasses.replace(
            value,
            **{f.name: _to(getattr(value, f.name), device) for f in dataclasses.fields(value) if f.init},
        )
        for f in dataclasses.fields(value):  # fields set after construction
            if not f.init:
                object.__setattr__(moved, f.name, _to(getattr(value, f.name), device))
        return moved
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, tuple):
        moved = [_to(v, device) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
