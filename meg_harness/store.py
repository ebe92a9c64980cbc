"""The results store: where `meg-harness run` writes, what it writes, and the checks before it writes again.

Layout under OUT (ARCHITECTURE.md, "Data flow of a run"; with ``n_edits`` a list of scales, this layout
under ``OUT/n<N>/``)::

    run_config.json                 the run config, merged with earlier runs into OUT (methods, seeds)
    <method>/metrics.json           averaged over seeds (<key>_std for several seeds)
    <method>/seed<k>/metrics.json   one method and seed: its presence marks the result finished
    <method>/seed<k>/items.jsonl    one scored probe per line
    <method>/seed<k>/artifact/      what Editor.save wrote, and lm_eval_cases.json (:func:`write_cases_file`)

A seed folder is written into a temporary folder beside it and renamed when complete (:func:`staged`);
single files are written atomically (:func:`meg_harness.cache.atomic_path`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import statistics
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meg_harness.cache import atomic_write_text, content_hash
from meg_harness.config import RunConfig
from meg_harness.data.edit_case import EditCase
from meg_harness.errors import HarnessError
from meg_harness.evaluate.protocol import metric_keys
from meg_harness.prompts import MAX_NEW_TOKENS, QueryTemplate
from meg_harness.settings import BASE_KEY, flatten, with_base

RUN_CONFIG = "run_config.json"
METRICS = "metrics.json"
ITEMS = "items.jsonl"
ARTIFACT = "artifact"
CASES_FILE = "lm_eval_cases.json"  # in an artifact folder: what the knowledge-editing lm-eval tasks read
CASES_FORMAT = "meg-harness/lm-eval-cases/v1"
SEED_FOLDER = re.compile(r"^seed(\d+)$")


# -- layout -------------------------------------------------------------------------------------------------
def seed_dir(out: Path, method: str, seed: int) -> Path:
    """``OUT/<method>/seed<k>``: one method's result for one seed."""
    return Path(out) / method / f"seed{seed}"


def is_finished(folder: Path) -> bool:
    """Whether a seed folder holds a finished result (its metrics.json exists)."""
    return (Path(folder) / METRICS).is_file()


def read_metrics(folder: Path) -> dict[str, Any]:
    """The metrics.json of a seed or method folder."""
    return json.loads((Path(folder) / METRICS).read_text())


def artifact_run(artifact: Path) -> dict[str, Any] | None:
    """What an artifact folder of ``meg-harness run`` (``<run>/<label>/seed<k>/artifact``) edited, from the
    metrics.json beside it: method label, seed, model, dataset, number of cases, data file and index range;
    None for any other folder or an unreadable record."""
    artifact = Path(artifact)
    seed = SEED_FOLDER.match(artifact.parent.name)
    if artifact.name != ARTIFACT or seed is None:
        return None
    try:
        record = json.loads((artifact.parent / METRICS).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    config = record.get("config") if isinstance(record, dict) else None
    if not isinstance(config, dict):
        return None
    counts = record.get("counts") if isinstance(record.get("counts"), dict) else {}
    return {
        "method": artifact.parent.parent.name,
        "seed": int(seed.group(1)),
        "model": config.get("model"),
        "dataset": config.get("dataset"),
        "n_edits": counts.get("cases", config.get("n_edits")),
        "data_path": config.get("data_path"),
        "range": config.get("range"),
    }


# -- writing ------------------------------------------------------------------------------------------------
def write_run_config(out: Path, config: dict[str, Any]) -> None:
    """Record the run config in ``OUT/run_config.json`` (a run that adds methods or seeds keeps the earlier
    ones: :func:`merged_with_previous`)."""
    recorded = merged_with_previous(out, config)
    atomic_write_text(Path(out) / RUN_CONFIG, json.dumps(recorded, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A temporary folder beside the seed folder ``target`` to write the result into; when the block ends
    without error it replaces ``target`` (an unfinished earlier attempt, without metrics.json), when it
    raises it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    staging.chmod(0o755)  # mkdtemp makes it private; results are meant to be shared
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)  # an unfinished earlier attempt (no metrics.json)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_items(folder: Path, items: Iterable[Mapping[str, Any]]) -> None:
    """``items.jsonl``: one scored probe per line (into a :func:`staged` folder)."""
    with open(Path(folder) / ITEMS, "w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")


def write_metrics(folder: Path, metrics: Mapping[str, Any]) -> None:
    """A seed's ``metrics.json`` (into a :func:`staged` folder; written last: it marks the result done)."""
    (Path(folder) / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n")


def aggregate(method_dir: Path, seeds: list[int]) -> dict:
    """Average the per-seed metrics into ``<method>/metrics.json`` (with ``<key>_std`` for several seeds)."""
    per_seed = [json.loads((method_dir / f"seed{s}" / METRICS).read_text()) for s in seeds]
    first = per_seed[0]
    averaged: dict[str, Any] = {}
    for key in metric_keys(first.get("config", {}).get("dataset")):
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
    atomic_write_text(method_dir / METRICS, json.dumps(averaged, indent=2, sort_keys=True) + "\n")
    return averaged


# -- checks before writing again ----------------------------------------------------------------------------
def merged_with_previous(out: Path, new: dict[str, Any]) -> dict[str, Any]:
    """The run config to record: a run that adds methods or seeds to ``out`` keeps the earlier ones."""
    previous = Path(out) / RUN_CONFIG
    if not previous.is_file():
        return new
    old = json.loads(previous.read_text())
    merged = dict(new)
    for key in ("methods", "seeds"):
        merged[key] = old.get(key, []) + [v for v in new[key] if v not in old.get(key, [])]
    merged["hparams"] = {**old.get("hparams", {}), **new.get("hparams", {})}
    return merged


def check_finished_hparams(
    out: Path, config: RunConfig, hparams: dict[str, dict[str, Any]], editor_classes: dict[str, type]
) -> None:
    """Refuse to skip a finished method whose hparams are not the ones it would run with now: the config
    names a YAML file whose contents changed since (the run config itself only holds its path). A key
    written out since with its default value is no change."""
    for seed in config.seeds:
        for method in config.methods:
            finished = seed_dir(out, method, seed) / METRICS
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


def check_previous_run(out: Path, config: RunConfig) -> None:
    """Refuse to mix results of a different config into ``out`` (never overwrite silently)."""
    previous = Path(out) / RUN_CONFIG
    if not previous.is_file():
        return
    old = json.loads(previous.read_text())
    new = config.to_dict()
    # Adding methods or seeds is allowed, and so is changing the hparams of a method with no finished
    # result yet (an interrupted or never-started one); check_finished_hparams guards the finished ones.
    # Nothing else may change.
    seeds = set(old.get("seeds", [])) | set(new.get("seeds", []))

    def finished(method: str) -> bool:
        return any(is_finished(seed_dir(out, method, seed)) for seed in seeds)

    shared = set(old.get("methods", [])) & set(new.get("methods", []))
    kept = {m for m in shared if finished(m)}
    new["hparams"] = {m: h for m, h in new.get("hparams", {}).items() if m in kept}
    old["hparams"] = {m: h for m, h in old.get("hparams", {}).items() if m in kept}
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


# -- the cases file (edit cases + the UNEDITED model's locality answers) -------------------------------------
@dataclass(frozen=True)
class CasesFile:
    """The contents of a cases file: what the knowledge-editing lm-eval tasks score (written by a run into
    its artifact folder as ``lm_eval_cases.json``, or by ``python -m meg_harness.lm_eval_plugin.export``)."""

    dataset: str
    template: QueryTemplate
    cases: list[EditCase]
    labels: dict[str, tuple[str, tuple[int, ...]]]  # locality prompt -> (answer text, answer token ids)
    max_new_tokens: int = MAX_NEW_TOKENS


def write_cases_file(
    path: str | os.PathLike,
    dataset: str,
    cases: Sequence[EditCase],
    template: QueryTemplate,
    labels: Mapping[str, Any],
    *,
    model_fingerprint: str | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> Path:
    """Write the cases file (atomically). ``labels``: ``Evaluator.locality_labels`` output (prompt ->
    Generation), or prompt -> (text, ids)."""
    record = {
        "format": CASES_FORMAT,
        "dataset": dataset,
        "template": {"name": template.name, "text": template.text},
        "max_new_tokens": max_new_tokens,
        "model_fingerprint": model_fingerprint,
        "cases": [case.to_dict() for case in cases],
        "locality_labels": {q: _label(g) for q, g in sorted(labels.items())},
    }
    path = Path(path)
    atomic_write_text(path, json.dumps(record, ensure_ascii=False, default=str) + "\n")
    return path


def _label(generation: Any) -> dict[str, Any]:
    text, ids = (generation.text, generation.answer_ids) if hasattr(generation, "text") else generation
    return {"text": text, "answer_ids": [int(i) for i in ids]}


def read_cases_file(path: str | os.PathLike) -> CasesFile:
    """Read a cases file; a HarnessError naming the file for anything malformed."""
    path = Path(path).expanduser()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise HarnessError(f"cannot read the lm-eval cases file: {error}", file=path) from None
    if not isinstance(record, dict) or record.get("format") != CASES_FORMAT:
        raise HarnessError(
            f"not a {CASES_FORMAT} file (write one with `python -m meg_harness.lm_eval_plugin.export`)",
            file=path,
        )
    try:
        template = QueryTemplate(record["template"]["name"], record["template"]["text"])
        cases = [EditCase.from_dict(c) for c in record["cases"]]
        labels = {q: (v["text"], tuple(v["answer_ids"])) for q, v in record["locality_labels"].items()}
    except (KeyError, TypeError) as error:
        raise HarnessError(f"malformed lm-eval cases file: {error!r}", file=path) from None
    missing = sorted({p.prompt for c in cases for p in c.locality} - set(labels))
    if missing:
        raise HarnessError(f"no unedited answer for locality prompt {missing[0]!r}", file=path)
    return CasesFile(
        record["dataset"], template, cases, labels, int(record.get("max_new_tokens", MAX_NEW_TOKENS))
    )
