"""Forward-hook utilities (ROME's nethook idea): read a module's input/output, edit its output, stop early."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the traced modules have run."""


def first_tensor(value: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (decoder layers and attention may return tuples)."""
    return value[0] if isinstance(value, (tuple, list)) else value


def replace_first(value: Any, tensor: torch.Tensor) -> Any:
    """``value`` with its hidden-state tensor replaced by ``tensor``."""
    if isinstance(value, tuple):
        return (tensor, *value[1:])
    if isinstance(value, list):
        return [tensor, *value[1:]]
    return tensor


EditFn = Callable[[str, torch.Tensor], torch.Tensor]


class Trace(contextlib.AbstractContextManager):
    """Hooks on named modules of ``model`` for the duration of a ``with`` block.

    ``retain_input`` / ``retain_output`` keep each module's first input / hidden-state output in
    :attr:`inputs` / :attr:`outputs` (detached unless ``detach=False``); ``edit_output(name, tensor)``
    returns a replacement output tensor; ``stop_after`` names a module after which the forward pass stops (the
    :class:`StopForward` it raises is swallowed when the block exits).
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        *,
        retain_input: bool = False,
        retain_output: bool = False,
        edit_output: EditFn | None = None,
        stop_after: str | None = None,
        detach: bool = True,
    ) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in dict.fromkeys(names):
            module = model.get_submodule(name)
            self._handles.append(
                module.register_forward_hook(
                    self._hook(name, retain_input, retain_output, edit_output, name == stop_after, detach),
                    with_kwargs=True,
                )
            )

    def _hook(self, name, retain_input, retain_output, edit_output, stop, detach):
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if retain_input:
                x = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
                self.inputs[name] = x.detach() if detach else x
            if edit_output is not None:
                output = replace_first(output, edit_output(name, first_tensor(output)))
            if retain_output:
                y = first_tensor(output)
                self.outputs[name] = y.detach() if detach else y
            if stop:
                raise StopForward
            return output

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad and the model is in eval mode inside the block; both restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
