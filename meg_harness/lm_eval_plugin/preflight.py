"""Checks of the ``lm_eval`` command's task arguments before the model loads.

lm-eval loads the model first and builds the tasks (reads their data) afterwards, so a missing or wrong
``--metadata`` value of a meg-harness task would surface only after minutes of model loading. The
``meg``/``edited`` models call :func:`check_command_line` first thing: in an ``lm_eval`` process it reads
the command line with lm-eval's own argument parser, takes the metadata the tasks will get (``--model_args``
merged with ``--metadata``, as lm-eval merges them), and runs, for every meg-harness task named by
``--tasks`` (directly or through a tag), the check of its ``custom_dataset``: the cases file or data file
of the knowledge-editing tasks and their query template (the model family's default comes from the
model's config and tokenizer, no weights), ``prompt_style`` and the local data folder of the general tasks.
A problem is a :class:`HarnessError`, which the ``lm_eval`` command prints as one line
(``lm_eval: error: ...``, exit code 2; :mod:`meg_harness.lm_eval_plugin.cli_errors`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from meg_harness.errors import HarnessError
from meg_harness.lm_eval_plugin.cli_errors import running_lm_eval_cli
from meg_harness.shipped import tasks_root


# -- our task YAMLs ---------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """YAML with lm-eval's ``!function module.name`` tags read as the text ``module.name``."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _read(path: Path) -> dict[str, Any]:
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    include = config.pop("include", None)
    return {**_read(path.parent / include), **config} if include else config


def our_tasks(root: Path | None = None) -> dict[str, dict[str, Any]]:
    """Task name -> its merged YAML config (``include`` resolved), for every task YAML under ``root``
    (default: ``meg-harness tasks-path``)."""
    tasks = {}
    for path in sorted((root or tasks_root()).rglob("*.yaml")):
        config = _read(path)
        if isinstance(config.get("task"), str):
            tasks[config["task"]] = config
    return tasks


def expand(names: Iterable[str], tasks: Mapping[str, dict[str, Any]]) -> list[str]:
    """The meg-harness tasks among ``names`` (task names or their tags), in order, each once."""
    found: list[str] = []
    for name in names:
        for task, config in tasks.items():
            tags = config.get("tag") or []
            tags = [tags] if isinstance(tags, str) else list(tags)
            if (name == task or name in tags) and task not in found:
                found.append(task)
    return found


# -- the checks of each custom_dataset --------------------------------------------------------------------
def _ke(metadata: dict[str, Any], dataset: str, kinds: Sequence[str] | None = None, **_: Any) -> None:
    from meg_harness.lm_eval_plugin.ke import load_source

    load_source(dataset, metadata, needs_labels=not kinds or "locality" in kinds)


def _mquake(metadata: dict[str, Any], **_: Any) -> None:
    from meg_harness.lm_eval_plugin.mquake import mquake_source

    mquake_source(metadata)


def _unke(metadata: dict[str, Any], **_: Any) -> None:
    from meg_harness.lm_eval_plugin.unke import unke_source

    unke_source(metadata)


def _general(metadata: dict[str, Any], benchmark: str, source: str = "local", **_: Any) -> None:
    from meg_harness.lm_eval_plugin.general import check_general_metadata

    check_general_metadata(metadata, benchmark=benchmark, source=source)


CHECKS: dict[str, Callable[..., None]] = {
    "load_ke_docs": _ke,
    "load_mquake_docs": _mquake,
    "load_unke_docs": _unke,
    "load_general": _general,
    "load_general_mc": _general,
}


def check_tasks(names: Iterable[str], metadata: Mapping[str, Any], root: Path | None = None) -> list[str]:
    """Run the check of every meg-harness task among ``names`` with ``metadata``; the tasks checked."""
    tasks = our_tasks(root)
    checked = expand(names, tasks)
    for task in checked:
        config = tasks[task]
        function = str(config.get("custom_dataset") or "").rsplit(".", 1)[-1]
        check = CHECKS.get(function)
        if check is not None:
            try:
                check(dict(metadata), **(config.get("dataset_kwargs") or {}))
            except HarnessError as error:
                if error.reason.startswith(("task ", f"{task}")):
                    raise
                raise HarnessError(
                    f"task {task}: {error.reason}", file=error.file, record=error.record, field=error.field
                ) from None
    return checked


# -- the command line ---------------------------------------------------------------------------------------
def command_line_request(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]] | None:
    """(task names, task metadata) of an ``lm_eval`` command line (without the program name), read by
    lm-eval's own ``run`` parser; None when it cannot be read (lm-eval reports that itself) or when a
    ``--config`` file supplies the arguments."""
    from lm_eval._cli.run import Run

    parser = argparse.ArgumentParser(add_help=False)
    Run.create(parser.add_subparsers(dest="command"))
    args = list(argv)
    if not args or args[0] != "run":
        args = ["run", *args]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            namespace, _unknown = parser.parse_known_args(args)
    except SystemExit:
        return None
    if getattr(namespace, "config", None):
        return None
    names = [t for task in getattr(namespace, "tasks", None) or [] for t in str(task).split(",") if t]
    model_args = getattr(namespace, "model_args", None) or {}
    metadata = getattr(namespace, "metadata", None) or {}
    if not isinstance(model_args, dict) or not isinstance(metadata, dict):
        return None
    return names, {**model_args, **metadata}


_done = False


def check_command_line(argv: Sequence[str] | None = None) -> None:
    """In an ``lm_eval`` process: check the meg-harness tasks of its command line (once per process)."""
    global _done
    if _done or (argv is None and not running_lm_eval_cli()):
        return
    _done = True
    request = command_line_request(sys.argv[1:] if argv is None else argv)
    if request is not None:
        check_tasks(*request)
