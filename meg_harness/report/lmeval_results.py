"""lm-eval results files (``<output_path>/<model>/results_<time>.json``): which model and edit they scored.

The edit comes from ``config.model`` and ``config.model_args``: ``hf`` (or ``edited`` without ``delta``) is
the unedited model; ``meg`` (``meg_path=``) and ``edited`` (``delta=``) name an artifact folder. For an
artifact written by ``meg-harness run`` (``<run>/<label>/seed<k>/artifact``) the label and seed come from
its path, and the edit setting (dataset, number of edits, data file and range) from the run's
``metrics.json`` beside it when that file can be read, else from what the plugin recorded of that run in
the results file (``config.meg_harness_run``); the method otherwise comes from the artifact's
``editor.json``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meg_harness.errors import HarnessError
from meg_harness.evaluate.protocol import metric_keys
from meg_harness.report.model_names import canonical_model
from meg_harness.report.results import UNEDITED, read_json
from meg_harness.report.runs import edit_selection, visible_files
from meg_harness.store import SEED_FOLDER, artifact_run

ARTIFACT_KEYS = {"meg": "meg_path", "edited": "delta"}
NATIVE_TASKS = {"mquake": "mquake_ke", "unke": "unke_ke"}  # datasets whose runs record a task's metrics
EDITOR_FILES = ("editor.json", "edit.json")


@dataclass(frozen=True)
class EvalResult:
    """One lm-eval results file: task -> metric -> value (as lm-eval writes them: fractions)."""

    model: str
    method: str
    seed: int | None
    dataset: str | None  # of the edit (None: unedited or unknown)
    n_edits: int | None
    results: Mapping[str, Mapping[str, Any]]
    source: str  # the results file, relative to the scanned folder
    parameters: int | None = None  # the model's parameter count (lm-eval's config.model_num_parameters)
    n_shot: Mapping[str, int] = field(default_factory=dict)  # task -> lm-eval's few-shot count
    chat_template: bool = False  # the prompts went through the model's chat template (--apply_chat_template)
    edits: str = ""  # the run's data file and index range, e.g. "MQuAKE-hard.json [300, 429)"; "" if unknown
    documents: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # task -> (scored, in the task)


def parse_model_args(value: Any, path: Path) -> dict[str, str]:
    """``model_args`` as lm-eval records it: a mapping, or a ``key=value,key=value`` string."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if value is None or value == "":
        return {}
    if not isinstance(value, str):
        raise HarnessError(
            "model_args is neither a mapping nor a string", file=path, field="config.model_args"
        )
    pairs = [part.split("=", 1) for part in value.split(",") if part.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise HarnessError(f"model_args {value!r} is not key=value,...", file=path, field="config.model_args")
    return {key.strip(): item.strip() for key, item in pairs}


def collect_eval_results(directory: Path, skip: Sequence[Path] = ()) -> list[EvalResult]:
    """Every ``results_*.json`` under ``directory`` (sorted by path)."""
    return [_read(directory, path) for path in visible_files(directory, "results_*.json", skip)]


def _read(directory: Path, path: Path) -> EvalResult:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise HarnessError("not an lm-eval results file", file=path, field="results")
    config = data.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        raise HarnessError("lm-eval results file lacks the model", file=path, field="config.model")
    args = parse_model_args(config.get("model_args"), path)
    recorded = config.get("meg_harness_run")
    method, seed, dataset, n_edits, run_model, edits = _edit(config["model"], args, recorded, directory, path)
    model = run_model or canonical_model(args.get("pretrained") or data.get("model_name") or "unknown")
    parameters = config.get("model_num_parameters")
    shots = data.get("n-shot") if isinstance(data.get("n-shot"), dict) else {}
    return EvalResult(
        model,
        method,
        seed,
        dataset,
        n_edits,
        data["results"],
        path.relative_to(directory).as_posix(),
        parameters if isinstance(parameters, int) and parameters > 0 else None,
        {str(k): int(v) for k, v in shots.items() if isinstance(v, int) and not isinstance(v, bool)},
        bool(data.get("chat_template")),
        edits,
        _documents(data.get("n-samples")),
    )


def _documents(recorded: Any) -> dict[str, tuple[int, int]]:
    """lm-eval's ``n-samples`` (task -> {original, effective}) as task -> (documents scored, in the task);
    ``--limit`` and ``--samples`` make the first smaller."""
    if not isinstance(recorded, dict):
        return {}
    found = {}
    for task, counts in recorded.items():
        if isinstance(counts, dict):
            scored, total = counts.get("effective"), counts.get("original")
            if all(isinstance(v, int) and not isinstance(v, bool) for v in (scored, total)):
                found[str(task)] = (scored, total)
    return found


def native_eval_results(directory: Path, skip: Sequence[Path] = ()) -> list[EvalResult]:
    """The MQuAKE / UnKE runs of ``meg-harness run`` (``<method>/seed<k>/metrics.json``) as the results of the
    lm-eval tasks ``mquake_ke`` / ``unke_ke`` that give the same numbers (fractions), for Tables 17-18."""
    found = []
    for path in visible_files(directory, "metrics.json", skip):
        seed = SEED_FOLDER.match(path.parent.name)
        data = read_json(path) if seed else None
        config = data.get("config") if isinstance(data, dict) else None
        dataset = config.get("dataset") if isinstance(config, dict) else None
        if dataset not in NATIVE_TASKS or not isinstance(config.get("model"), str):
            continue
        counts = data.get("counts") if isinstance(data.get("counts"), dict) else {}
        metrics = {
            f"{key},none": data[key] / 100.0
            for key in metric_keys(dataset)
            if isinstance(data.get(key), (int, float)) and not isinstance(data.get(key), bool)
        }
        found.append(
            EvalResult(
                canonical_model(config["model"]),
                path.parent.parent.name,
                int(seed.group(1)),
                dataset,
                counts.get("cases", config.get("n_edits")),
                {NATIVE_TASKS[dataset]: metrics},
                path.relative_to(directory).as_posix(),
                edits=edit_selection(config)[0],
            )
        )
    return found


def _edit(kind: str, args: Mapping[str, str], recorded: Any, directory: Path, path: Path) -> tuple:
    """(method label, seed, dataset, n_edits, model of the run, its data file and range) of the edit that
    was evaluated: from the run beside the artifact folder when it can be found here, else from what the
    plugin recorded of that run in the results file (``config.meg_harness_run``)."""
    artifact = args.get(ARTIFACT_KEYS.get(kind, ""))
    if kind == "hf" or (kind == "edited" and not artifact):
        return UNEDITED, None, None, None, None, ""
    if not artifact:
        return kind, None, None, None, None, ""
    folder = Path(artifact)
    runs = (artifact_run(candidate) for candidate in _candidates(folder, directory, path))  # first found
    run = next((r for r in runs if r is not None), recorded if isinstance(recorded, dict) else None)
    if run is not None:
        model = canonical_model(run["model"]) if isinstance(run.get("model"), str) else None
        seed = run.get("seed") if isinstance(run.get("seed"), int) else None
        method = str(run.get("method") or _editor_method(folder) or kind)
        return method, seed, run.get("dataset"), run.get("n_edits"), model, edit_selection(run)[0]
    seed_match = SEED_FOLDER.match(folder.parent.name)  # a run's layout without its record: label and seed
    if folder.name == "artifact" and seed_match:
        return folder.parent.parent.name, int(seed_match.group(1)), None, None, None, ""
    return _editor_method(folder) or kind, None, None, None, None, ""


def _candidates(folder: Path, directory: Path, path: Path) -> list[Path]:
    """Where the artifact folder may be: as recorded (absolute or from the working directory), or relative
    to the scanned folder or to the results file."""
    if folder.is_absolute():
        return [folder]
    return [folder, directory / folder, path.parent / folder]


def _editor_method(folder: Path) -> str | None:
    for name in EDITOR_FILES:
        if (folder / name).is_file():
            data = read_json(folder / name)
            method = data.get("method") if isinstance(data, dict) else None
            if isinstance(method, str) and method:
                return method
    return None


_TIMESTAMP = re.compile(r"results_(.+)\.json$")


def recency_key(result: EvalResult) -> tuple[str, str]:
    """Sort key that puts the latest results file last (lm-eval's timestamp in the name, then the path)."""
    match = _TIMESTAMP.search(result.source)
    return (match.group(1) if match else "", result.source)
