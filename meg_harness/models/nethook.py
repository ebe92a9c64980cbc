"""Forward hooks on a model's modules, after ROME's nethook: keep a module's input or output, edit its output,
stop the forward at a module; and the frozen-model context. Every forward hook of the package goes through
:class:`Trace` (one module) or :class:`TraceDict` (several)."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the traced modules have run (swallowed on leaving the
    :class:`Trace` / :class:`TraceDict` block)."""


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


def module_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The main input of a module call: the first positional argument, else ``hidden_states``, else the first
    tensor keyword argument (None when there is none)."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if torch.is_tensor(v)), None)


# ``edit_output(name, output, input) -> new output``: ``output`` is the module's hidden-state tensor (the
# first of a tuple), ``input`` its main input (see :func:`module_input`), ``name`` the traced module's name.
EditFn = Callable[[str, torch.Tensor, Any], torch.Tensor]


class Trace(contextlib.AbstractContextManager):
    """Hooks on one module, ``layer`` of ``model`` (``model`` itself when ``layer`` is None), until the
    ``with`` block ends or :meth:`close` (alias :meth:`remove`) is called.

    ``retain_input`` / ``retain_output`` keep the module's main input / hidden-state output in :attr:`input`
    / :attr:`output` (detached unless ``detach=False``); ``edit_output(name, output, input)`` returns the
    output that replaces it; ``stop`` ends the forward after the module, ``stop_before`` before it (only the
    input is seen then). The :class:`StopForward` that ends it is swallowed when the block exits.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        *,
        retain_input: bool = False,
        retain_output: bool = False,
        edit_output: EditFn | None = None,
        stop: bool = False,
        stop_before: bool = False,
        detach: bool = True,
    ) -> None:
        if stop_before and (retain_output or edit_output is not None or stop):
            raise ValueError("stop_before: the module does not run, so there is no output to keep or edit")
        self.name = layer or ""
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self._retain_input, self._retain_output = retain_input, retain_output
        self._edit, self._stop, self._detach = edit_output, stop, detach
        module = model if layer is None else model.get_submodule(layer)
        if stop_before:
            self._handle = module.register_forward_pre_hook(self._before, with_kwargs=True)
        else:
            self._handle = module.register_forward_hook(self._after, with_kwargs=True)

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach() if self._detach else tensor

    def _before(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._retain_input:
            self.input = self._keep(module_input(args, kwargs))
        raise StopForward

    def _after(self, _module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = module_input(args, kwargs)
        if self._retain_input:
            self.input = self._keep(x)
        if self._edit is not None:
            output = replace_first(output, self._edit(self.name, first_tensor(output), x))
        if self._retain_output:
            self.output = self._keep(first_tensor(output))
        if self._stop:
            raise StopForward
        return output

    def close(self) -> None:
        self._handle.remove()

    remove = close  # a Trace can stand where a hook handle was returned

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(OrderedDict, contextlib.AbstractContextManager):
    """A :class:`Trace` per module name in ``layers`` (``trace[name].input`` / ``.output``), with the same
    options; ``edit_output`` receives each module's name. ``stop`` ends the forward after the LAST module
    listed (list the deepest last)."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        *,
        retain_input: bool = False,
        retain_output: bool = False,
        edit_output: EditFn | None = None,
        stop: bool = False,
        detach: bool = True,
    ) -> None:
        super().__init__()
        names = list(dict.fromkeys(layers))
        try:
            for name in names:
                self[name] = Trace(
                    model,
                    name,
                    retain_input=retain_input,
                    retain_output=retain_output,
                    edit_output=edit_output,
                    stop=stop and name == names[-1],
                    detach=detach,
                )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for trace in self.values():
            trace.close()

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
