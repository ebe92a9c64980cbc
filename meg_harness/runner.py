"""`meg-harness run`: config -> cases -> each method fitted and scored per seed -> result files.

Layout written under OUT (see DESIGN.md): ``<method>/seed<k>/{metrics.json, items.jsonl, artifact/}``
and ``<method>/metrics.json`` (averaged over seeds); with ``n_edits`` a list of scales, that layout under
``OUT/n<N>/`` for each. A finished method/seed (its metrics.json exists)
is not recomputed; each one is written into a temporary folder and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from meg_harness.cache import atomic_write_text, content_hash
from meg_harness.config import RunConfig, load_hparams
from meg_harness.data import filter_unknown_facts, load_cases, select_cases
from meg_harness.data.edit_case import EditCase
from meg_harness.editing.base import Edited
from meg_harness.editing.registry import get_editor_class
from meg_harness.errors import HarnessError
from meg_harness.evaluate.evaluator import Evaluator, encode_query
from meg_harness.evaluate.protocol import ALL_METRIC_KEYS
from meg_harness.evaluate.scoring import Probe, greedy_answers
from meg_harness.evaluate.templates import get_template
from meg_harness.lm_eval_plugin.export import ARTIFACT_FILE as CASES_FILE
from meg_harness.lm_eval_plugin.export import write_cases_file
from meg_harness.lock import output_lock
from meg_harness.models import get_adapter, load_model, model_fingerprint
from meg_harness.provenance import git_sha, peak_rss_mb, versions
from meg_harness.settings import BASE_KEY, flatten, key_origin, with_base

Log = Callable[[str], None]
T = TypeVar("T")
HPARAMS_ROOT = Path(__file__).resolve().parent.parent / "hparams"  # the shipped files (a source checkout)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_experiment(
    config: RunConfig, out: Path, *, config_source: str = "<config>", log: Log = print
) -> dict:
    """Run every method and seed of ``config`` into ``out``; returns {method: averaged metrics}.

    With ``n_edits`` a list, each scale is a run of its own in ``out/n<N>``; returns {N: {method: ...}}.
    ``out`` is locked for the run: a second process on it is refused (:func:`output_lock`)."""
    with output_lock(out):
        return _run_experiment(config, Path(out), config_source=config_source, log=log)


def _run_experiment(config: RunConfig, out: Path, *, config_source: str, log: Log) -> dict:
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
    _check_previous_run(out, config)
    _check_finished_hparams(out, config, hparams, editor_classes)
    n_first = None if config.filter_known else config.n_edits  # the A.9 filter samples after filtering
    with _in_config(config_source, "n_edits"):
        selected = {
            seed: select_cases(all_cases, n_first, seed, config.range, config.one_per_subject)
            for seed in config.seeds
        }

    log(f"loading model {config.model} ({config.dtype}, {config.device})")
    with _in_config(config_source, "model"):
        model, tokenizer = load_model(
            config.model, dtype=config.dtype, device=config.device, cache_dir=config.cache_dir
        )
        try:
            adapter = get_adapter(model)
        except HarnessError as error:
            raise HarnessError(f"model {config.model}: {error.reason}", field="model") from None
    for method, editor in editors.items():  # layer indices against the model's depth, files the hparams name
        _checked(lambda editor=editor: editor.preflight(model), method, sources[method], config_source)
    with _in_config(config_source, "template"):
        template = get_template(config.template or adapter.default_template(model, tokenizer))
    fingerprint = model_fingerprint(model)
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    evaluator = Evaluator(tokenizer, template, batch_size=config.batch_size, cache_dir=cache_dir)
    unedited = Edited(model, tokenizer)

    cases_per_seed = {}
    for seed, cases in selected.items():
        if config.filter_known:
            with _in_config(config_source, "n_edits"):
                cases = _keep_unknown(unedited, evaluator, cases, config, seed)
        evaluator.check_inputs(model, cases)
        cases_per_seed[seed] = cases
    # Everything is validated: from here on, results are written.
    recorded = _merged_with_previous(out, config.to_dict())
    atomic_write_text(out / "run_config.json", json.dumps(recorded, indent=2, sort_keys=True) + "\n")

    for seed, cases in cases_per_seed.items():
        for method in config.methods:
            target = out / method / f"seed{seed}"
            if (target / "metrics.json").is_file():
                log(f"{method} seed {seed}: already done, skipped ({target})")
                continue
            log(f"{method} seed {seed}: {len(cases)} edits")
            labels = evaluator.locality_labels(unedited, cases, fingerprint)
            editor = editor_classes[method](hparams[method])
            editor.cache_dir = cache_dir
            _run_one(
                editor,
                model,
                tokenizer,
                cases,
                template,
                evaluator,
                labels,
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
            log(f"{method} seed {seed}: " + _headline(json.loads((target / "metrics.json").read_text())))

    summary = {}
    for method in config.methods:
        summary[method] = _aggregate(out / method, config.seeds)
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
    ``hparams/<METHOD>/<model>.yaml`` of the model alias, else an error (a class's defaults are one
    model's settings, e.g. GPT-J's layers, and must not be used silently on another)."""
    value = config.hparams.get(method)
    base = method.partition("@")[0]
    if value is not None or base == "none":
        return value
    name = f"{config.model.lower()}.yaml"
    folders = [d for d in HPARAMS_ROOT.iterdir() if d.name.lower() == base] if HPARAMS_ROOT.is_dir() else []
    for folder in folders:
        if "/" not in config.model and (folder / name).is_file():
            return str(folder / name)
    why = "ship only for model aliases" if "/" in config.model else f"ship none for {config.model!r}"
    raise HarnessError(
        f"no hparams for {method}: give a YAML path or a mapping (the default hparams files {why})",
        file=config_source,
        field=f"hparams.{method}",
    )


def run_cases(run_dir: Path, seed: int) -> list[EditCase]:
    """The cases a finished run evaluated for ``seed``, selected again from its ``run_config.json`` (for
    benchmarks that re-score a run's artifact). Runs with ``filter_known`` need the model: not supported."""
    config = RunConfig(**json.loads((Path(run_dir) / "run_config.json").read_text(encoding="utf-8")))
    if config.filter_known:
        raise HarnessError("runs with filter_known: re-select their cases with the model", file=run_dir)
    cases = load_cases(
        config.dataset, config.data_path, zsre_target=config.zsre_target, cache_dir=config.cache_dir
    )
    return select_cases(cases, config.n_edits, seed, config.range, config.one_per_subject)


def load_run_edit(run_dir: Path, method: str, seed: int) -> Edited:
    """The edit a finished run saved for ``method`` (a label, e.g. ``meg@18k``) and ``seed``, loaded back on
    the run's base model (for benchmarks that re-score or probe a run's artifact)."""
    config = json.loads((Path(run_dir) / "run_config.json").read_text(encoding="utf-8"))
    model, tokenizer = load_model(config["model"], dtype=config["dtype"], device=config["device"])
    artifact = Path(run_dir) / method / f"seed{seed}" / "artifact"
    return get_editor_class(method.partition("@")[0]).load(artifact, model, tokenizer)


def _run_one(
    editor, model, tokenizer, cases, template, evaluator, labels, target: Path, *, record, seed
) -> None:
    """Fit, score and save one method/seed; written to a temp folder, renamed into ``target`` at the end."""
    seed_everything(seed)
    started = time.perf_counter()
    edited = editor.fit(model, tokenizer, cases, template)
    fitted = time.perf_counter()
    try:
        metrics, items = evaluator.evaluate(edited, cases, labels)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        staging.chmod(0o755)  # mkdtemp makes it private; results are meant to be shared
        try:
            editor.save(edited, staging / "artifact")
            write_cases_file(  # what the knowledge-editing lm-eval tasks read from the artifact
                staging / "artifact" / CASES_FILE,
                record["config"]["dataset"],
                cases,
                template,
                labels,
                model_fingerprint=record["model_fingerprint"],
            )
            with open(staging / "items.jsonl", "w", encoding="utf-8") as handle:
                for item in items:
                    handle.write(json.dumps(item, ensure_ascii=False) + "\n")
            metrics["timings"]["fit_s"] = fitted - started
            metrics["resources"] = {"peak_rss_mb": peak_rss_mb()}
            if edited.info:
                metrics["fit"] = edited.info
            metrics.update(record, versions=versions(), git_sha=git_sha())
            (staging / "metrics.json").write_text(
                json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n"
            )
            if target.exists():
                shutil.rmtree(target)  # an unfinished earlier attempt (no metrics.json)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
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
    return " ".join(f"{k}={metrics[k]:.2f}" for k in ALL_METRIC_KEYS)


def _aggregate(method_dir: Path, seeds: list[int]) -> dict:
    """Average the per-seed metrics into ``<method>/metrics.json`` (with ``<key>_std`` for several seeds)."""
    per_seed = [json.loads((method_dir / f"seed{s}" / "metrics.json").read_text()) for s in seeds]
    first = per_seed[0]
    averaged: dict[str, Any] = {}
    for key in ALL_METRIC_KEYS:
        values = [m[key] for m in per_seed]
        averaged[key] = math.fsum(values) / len(values)
        if len(values) > 1:
            averaged[f"{key}_std"] = statistics.stdev(values)
    if all("ag_prefix" in m for m in per_seed):  # the starts-with rates (not a protocol metric)
        rates = [m["ag_prefix"] for m in per_seed]
        averaged["ag_prefix"] = {k: math.fsum(r[k] for r in rates) / len(rates) for k in rates[0]}
    averaged.update(
        method=first["method"],
        seeds=seeds,
        counts=first["counts"],
        config=first["config"],
        model_family=first["model_family"],
        template=first["template"],
    )
    atomic_write_text(method_dir / "metrics.json", json.dumps(averaged, indent=2, sort_keys=True) + "\n")
    return averaged


def _merged_with_previous(out: Path, new: dict[str, Any]) -> dict[str, Any]:
    """The run config to record: a run that adds methods or seeds to ``out`` keeps the earlier ones."""
    previous = out / "run_config.json"
    if not previous.is_file():
        return new
    old = json.loads(previous.read_text())
    merged = dict(new)
    for key in ("methods", "seeds"):
        merged[key] = old.get(key, []) + [v for v in new[key] if v not in old.get(key, [])]
    merged["hparams"] = {**old.get("hparams", {}), **new.get("hparams", {})}
    return merged


def _check_finished_hparams(
    out: Path, config: RunConfig, hparams: dict[str, dict[str, Any]], editor_classes: dict[str, type]
) -> None:
    """Refuse to skip a finished method whose hparams are not the ones it would run with now: the config
    names a YAML file whose contents changed since (the run config itself only holds its path). A key
    written out since with its default value is no change."""
    for seed in config.seeds:
        for method in config.methods:
            finished = out / method / f"seed{seed}" / "metrics.json"
            if not finished.is_file():
                continue
            recorded = json.loads(finished.read_text()).get("hparams")
            if recorded is None:
                continue
            if BASE_KEY in recorded:  # results written before variants were recorded resolved
                recorded = with_base(recorded)
            was, now = flatten(recorded), flatten(json.loads(json.dumps(hparams[method])))
            with contextlib.suppress(HarnessError):  # recorded hparams no longer valid: compare as written
                editor_class = editor_classes[method]
                was = flatten(editor_class(recorded).resolved_hparams())
                now = flatten(editor_class(hparams[method]).resolved_hparams())
            changed = sorted(k for k in set(was) | set(now) if was.get(k, "absent") != now.get(k, "absent"))
            if changed:
                raise HarnessError(
                    f"{method} seed {seed} was run with other hparams (changed: {', '.join(changed)}); "
                    "use another --out, or delete that result to recompute it",
                    file=finished,
                    field=f"hparams.{method}",
                )


def _check_previous_run(out: Path, config: RunConfig) -> None:
    """Refuse to mix results of a different config into ``out`` (never overwrite silently)."""
    previous = out / "run_config.json"
    if not previous.is_file():
        return
    old = json.loads(previous.read_text())
    new = config.to_dict()
    # adding methods (with their hparams) or seeds to a finished run is allowed; nothing else may change
    new["hparams"] = {m: h for m, h in new.get("hparams", {}).items() if m in old.get("methods", [])}
    old["hparams"] = {m: h for m, h in old.get("hparams", {}).items() if m in new.get("methods", [])}
    ignore = {"methods", "seeds"}
    if content_hash({k: v for k, v in old.items() if k not in ignore}) != content_hash(
        {k: v for k, v in new.items() if k not in ignore}
    ):
        changed = sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))
        raise HarnessError(
            f"holds results of a different run config (changed: {', '.join(changed)}); use another --out",
            file=out,
            field=changed[0] if changed else None,
        )
