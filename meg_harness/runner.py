"""`meg-harness run`: config -> cases -> each method fitted and scored per seed -> result files.

Layout written under OUT (ARCHITECTURE.md, "Data flow of a run"):
``<method>/seed<k>/{metrics.json, items.jsonl, artifact/}`` and ``<method>/metrics.json`` (averaged over
seeds); with ``n_edits`` a list of scales, that layout under ``OUT/n<N>/`` for each. A finished method/seed
(its metrics.json exists) is not recomputed; each one is written into a temporary folder and renamed when
complete. Where and how results are written, and the checks before a run writes into a folder again:
:mod:`meg_harness.store`.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from meg_harness.config import RunConfig, load_hparams
from meg_harness.data import filter_unknown_facts, flatten_mquake_edits, load_cases, select_cases
from meg_harness.data.edit_case import EditCase
from meg_harness.editing.base import Edited
from meg_harness.editing.registry import get_editor_class
from meg_harness.errors import HarnessError
from meg_harness.evaluate.evaluator import Evaluator, evaluator_for, long_answers
from meg_harness.evaluate.protocol import metric_keys
from meg_harness.evaluate.scoring import Probe, greedy_answers
from meg_harness.lock import output_lock
from meg_harness.models import get_adapter, load_model, model_fingerprint
from meg_harness.prompts import encode_query, get_template
from meg_harness.provenance import git_sha, peak_rss_mb, versions
from meg_harness.ranks import barrier, init_from_launcher, is_main, spread_over_ranks
from meg_harness.settings import key_origin
from meg_harness.shipped import shipped_hparams
from meg_harness.store import (
    ARTIFACT,
    CASES_FILE,
    RUN_CONFIG,
    aggregate,
    check_finished_hparams,
    check_previous_run,
    is_finished,
    read_metrics,
    seed_dir,
    staged,
    write_cases_file,
    write_items,
    write_metrics,
    write_run_config,
)

Log = Callable[[str], None]
T = TypeVar("T")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_experiment(
    config: RunConfig, out: Path, *, config_source: str = "<config>", log: Log = print
) -> dict:
    """Run every method and seed of ``config`` into ``out``; returns {method: averaged metrics}.

    With ``n_edits`` a list, each scale is a run of its own in ``out/n<N>``; returns {N: {method: ...}}.
    ``out`` is locked for the run: a second process on it is refused (:func:`output_lock`).

    Under ``torchrun`` / ``accelerate launch`` every rank runs this; the per-edit work (z chunks, MeG
    neuron shards, probe batches, the unedited answers) is spread over the ranks and gathered
    (:mod:`meg_harness.ranks`), and rank 0 alone locks ``out`` and writes the results."""
    device = init_from_launcher(config.device)
    if not is_main():
        return _run_experiment(config, Path(out), config_source=config_source, log=_quiet, device=device)
    with output_lock(out):
        return _run_experiment(config, Path(out), config_source=config_source, log=log, device=device)


def _quiet(_message: str) -> None:
    """The log of ranks other than 0."""


def _run_experiment(config: RunConfig, out: Path, *, config_source: str, log: Log, device: str) -> dict:
    if isinstance(config.n_edits, list):
        results = {}
        for scaled in config.scales():
            log(f"scale {scaled.n_edits}: {Path(out) / f'n{scaled.n_edits}'}")
            results[scaled.n_edits] = run_experiment(
                scaled, Path(out) / f"n{scaled.n_edits}", config_source=config_source, log=log
            )
        return results
    out = Path(out)
    # Every method's hparams are validated before any work: "meg@no-fn" is a labelled variant of "meg"
    # (own hparams and folder); a method without hparams takes its file for the model alias, if one ships.
    with _in_config(config_source, "methods"):
        editor_classes = {m: get_editor_class(m.partition("@")[0]) for m in config.methods}
    sources = {m: _hparams_source(config, m, config_source) for m in config.methods}
    hparams = {m: load_hparams(sources[m], m, config_source) for m in config.methods}
    editors = {
        m: _checked(lambda m=m: editor_classes[m](hparams[m]), m, sources[m], config_source)
        for m in config.methods
    }
    with _in_config(config_source, "data_path"):
        all_cases = load_cases(
            config.dataset, config.data_path, zsre_target=config.zsre_target, cache_dir=config.cache_dir
        )
    check_previous_run(out, config)
    check_finished_hparams(out, config, hparams, editor_classes)
    n_first = None if config.filter_known else config.n_edits  # the A.9 filter samples after filtering
    with _in_config(config_source, "n_edits"):
        selected = {
            seed: select_cases(all_cases, n_first, seed, config.range, config.one_per_subject)
            for seed in config.seeds
        }

    log(f"loading model {config.model} ({config.dtype}, {config.device})")
    with _in_config(config_source, "model"):
        model, tokenizer = load_model(
            config.model, dtype=config.dtype, device=device, cache_dir=config.cache_dir
        )
        try:
            adapter = get_adapter(model)
        except HarnessError as error:
            raise HarnessError(f"model {config.model}: {error.reason}", field="model") from None
    for method, editor in editors.items():  # layer indices against the model's depth, files the hparams name
        _checked(lambda editor=editor: editor.preflight(model), method, sources[method], config_source)
    with _in_config(config_source, "template"):  # UnKE: the family's long-answer template
        default = adapter.default_template(model, tokenizer, long_answers=long_answers(config.dataset))
        template = get_template(config.template or default)
    fingerprint = model_fingerprint(model)
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    evaluator = evaluator_for(
        config.dataset, tokenizer, template, batch_size=config.batch_size, cache_dir=cache_dir
    )
    unedited = Edited(model, tokenizer)

    cases_per_seed = {}
    for seed, cases in selected.items():
        if config.filter_known:
            with _in_config(config_source, "n_edits"):
                cases = _keep_unknown(unedited, evaluator, cases, config, seed)
        evaluator.check_inputs(model, cases)
        cases_per_seed[seed] = cases
    # Everything is validated: from here on, results are written (by rank 0 of a multi-process run).
    if is_main():
        write_run_config(out, config.to_dict())

    for seed, cases in cases_per_seed.items():
        for method in config.methods:
            target = seed_dir(out, method, seed)
            if is_finished(target):
                log(f"{method} seed {seed}: already done, skipped ({target})")
                continue
            log(f"{method} seed {seed}: {len(cases)} edits")
            editor = editor_classes[method](hparams[method])
            editor.cache_dir = cache_dir
            _run_one(
                editor,
                unedited,
                cases,
                template,
                evaluator,
                target,
                record={
                    "method": method,
                    "seed": seed,
                    "config": config.to_dict(),
                    "hparams": hparams[method],
                    "template": {"name": template.name, "text": template.text},
                    "model_fingerprint": fingerprint,
                    "model_family": adapter.family,
                },
                seed=seed,
            )
            barrier()  # rank 0 has written the result
            log(f"{method} seed {seed}: " + _headline(read_metrics(target)))

    if not is_main():
        return {}
    summary = {}
    for method in config.methods:
        summary[method] = aggregate(out / method, config.seeds)
    return summary


@contextlib.contextmanager
def _in_config(config_source: str, field: str) -> Iterator[None]:
    """A HarnessError raised inside that names no file is about the run config: it names the config file,
    and ``field`` when it names no field."""
    try:
        yield
    except HarnessError as error:
        if error.file is not None:
            raise
        raise HarnessError(
            error.reason, file=config_source, record=error.record, field=error.field or field
        ) from None


def _checked(check: Callable[[], T], method: str, source: Any, config_source: str) -> T:
    """``check()``; its HarnessError about an hparams key names where that key is set: the hparams file
    (and ``section.key``), or the run config (and ``hparams.<method>.<key>``) for an inline mapping."""
    try:
        return check()
    except HarnessError as error:
        if error.file is not None:  # a file the hparams name (a data file, a base file) is at fault
            raise
        key = (error.field or "").removeprefix("hparams.")
        origin = key_origin(source, key) if source is not None else None
        if origin is not None:
            raise HarnessError(error.reason, file=origin, field=key or None) from None
        field = f"hparams.{method}" + (f".{key}" if key else "")
        raise HarnessError(error.reason, file=config_source, field=field) from None


def _hparams_source(config: RunConfig, method: str, config_source: str) -> Any:
    """What ``hparams.<method>`` gives (a YAML path or a mapping); for a method given none, the shipped
    ``hparams/<METHOD>/<model>.yaml`` of the model alias (:func:`shipped_hparams`: the checkout's or the
    installed copy), else an error (a class's defaults are one model's settings, e.g. GPT-J's layers, and
    must not be used silently on another)."""
    value = config.hparams.get(method)
    base = method.partition("@")[0]
    if value is not None or base == "none":
        return value
    shipped = shipped_hparams(base, config.model) if "/" not in config.model else None  # only for aliases
    if shipped is not None:
        return str(shipped)
    why = "ship only for model aliases" if "/" in config.model else f"ship none for {config.model!r}"
    raise HarnessError(
        f"no hparams for {method}: give a YAML path or a mapping (the default hparams files {why})",
        file=config_source,
        field=f"hparams.{method}",
    )


def run_cases(run_dir: Path, seed: int) -> list[EditCase]:
    """The cases a finished run evaluated for ``seed``, selected again from its ``run_config.json`` (for
    benchmarks that re-score a run's artifact). Runs with ``filter_known`` need the model: not supported."""
    config = RunConfig(**json.loads((Path(run_dir) / RUN_CONFIG).read_text(encoding="utf-8")))
    if config.filter_known:
        raise HarnessError("runs with filter_known: re-select their cases with the model", file=run_dir)
    cases = load_cases(
        config.dataset, config.data_path, zsre_target=config.zsre_target, cache_dir=config.cache_dir
    )
    return select_cases(cases, config.n_edits, seed, config.range, config.one_per_subject)


def load_run_edit(run_dir: Path, method: str, seed: int) -> Edited:
    """The edit a finished run saved for ``method`` (a label, e.g. ``meg@18k``) and ``seed``, loaded back on
    the run's base model (for benchmarks that re-score or probe a run's artifact)."""
    config = json.loads((Path(run_dir) / RUN_CONFIG).read_text(encoding="utf-8"))
    model, tokenizer = load_model(config["model"], dtype=config["dtype"], device=config["device"])
    artifact = seed_dir(Path(run_dir), method, seed) / ARTIFACT
    return get_editor_class(method.partition("@")[0]).load(artifact, model, tokenizer)


def edit_requests(dataset: str, cases: list[EditCase]) -> list[EditCase]:
    """What a method is fitted on: MQuAKE's every single-hop rewrite of every case (one EditCase each), the
    cases themselves otherwise."""
    return flatten_mquake_edits(cases) if dataset == "mquake" else cases


def _run_one(
    editor, unedited: Edited, cases, template, evaluator, target: Path, *, record: dict, seed: int
) -> None:
    """Fit, score and save one method/seed; written to a temp folder, renamed into ``target`` at the end."""
    model, tokenizer = unedited.model, unedited.tokenizer
    clock = time.perf_counter()
    with spread_over_ranks():  # the unedited answers (read back from the cache after one method)
        labels = evaluator.locality_labels(unedited, cases, record["model_fingerprint"])
    labels_s = time.perf_counter() - clock
    seed_everything(seed)
    started = time.perf_counter()
    with spread_over_ranks():
        edited = editor.fit(model, tokenizer, edit_requests(record["config"]["dataset"], cases), template)
    fitted = time.perf_counter()
    try:
        with spread_over_ranks():
            metrics, items = evaluator.evaluate(edited, cases, labels)
        if not is_main():
            return
        with staged(target) as staging:
            editor.save(edited, staging / ARTIFACT)
            write_cases_file(  # what the knowledge-editing lm-eval tasks read from the artifact
                staging / ARTIFACT / CASES_FILE,
                record["config"]["dataset"],
                cases,
                template,
                labels,
                model_fingerprint=record["model_fingerprint"],
                max_new_tokens=evaluator.max_new_tokens,
            )
            write_items(staging, items)
            metrics["timings"]["fit_s"] = fitted - started
            metrics["timings"]["labels_s"] = labels_s
            metrics["resources"] = {"peak_rss_mb": peak_rss_mb()}
            metrics["fit"] = {"reused": [], **edited.info}  # reused: what the fit read back from caches
            metrics.update(record, versions=versions(), git_sha=git_sha())
            write_metrics(staging, metrics)
    finally:
        edited.restore()


def _keep_unknown(
    unedited: Edited, evaluator: Evaluator, cases: list[EditCase], config: RunConfig, seed: int
):
    """Paper A.9: keep the facts the unedited model answers wrongly, then sample ``n_edits`` of them."""

    def answer(prompts: list[str]) -> list[str]:
        probes = [Probe(p, encode_query(evaluator.tokenizer, evaluator.template, p)) for p in prompts]
        return [g.text for g in greedy_answers(unedited, probes, config.batch_size)]

    unknown = filter_unknown_facts(cases, answer)
    return select_cases(unknown, config.n_edits, seed, None, False)


def _headline(metrics: dict) -> str:
    keys = metric_keys(metrics.get("config", {}).get("dataset"))
    return " ".join(f"{k}={metrics[k]:.2f}" for k in keys if k in metrics)
