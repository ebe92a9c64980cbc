"""Knowledge-editing lm-eval tasks (``counterfact_ke``, ``zsre_ke`` and their parts): the native protocol.

One document per probe, in the native order (per case: the edit prompt, every rephrase, every locality
prompt). Each document asks for a teacher-forced score (a ``loglikelihood`` request of the templated
query and ``" " + target``) and a greedy answer (``generate_until``, at most 20 new tokens); the
``meg``/``edited`` models answer both with the native scoring code, so the six numbers and Score equal
``meg-harness run``'s (as fractions: lm-eval reports 0-1, metrics.json percent).

Documents come from a cases file (:func:`meg_harness.store.read_cases_file`; written by a run or by
:mod:`meg_harness.lm_eval_plugin.export`): ``--metadata cases=FILE``, or ``lm_eval_cases.json`` inside the
artifact folder given as ``meg_path=`` / ``delta=``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask

from meg_harness.errors import HarnessError
from meg_harness.evaluate.evaluator import probe_specs
from meg_harness.evaluate.protocol import ag_match, summarize
from meg_harness.lm_eval_plugin.probes import PROBE_KEY, probe_of, tf_value
from meg_harness.prompts import LONG_ANSWER_CUTS, LONG_MAX_NEW_TOKENS, MAX_NEW_TOKENS
from meg_harness.store import CASES_FILE, CasesFile, read_cases_file

KIND_NAMES = {"edit": "reliability", "rephrase": "generality", "locality": "locality"}
MEASURES = ("tf", "ag")
ANSWER_STOPS = ["\n", "\\"]


def find_cases_file(metadata: dict[str, Any]) -> Path | None:
    """``cases`` from the metadata, else ``lm_eval_cases.json`` of the ``meg_path``/``delta`` artifact."""
    if metadata.get("cases"):
        return Path(str(metadata["cases"])).expanduser()
    for key in ("meg_path", "delta"):
        if metadata.get(key) and (Path(str(metadata[key])) / CASES_FILE).is_file():
            return Path(str(metadata[key])) / CASES_FILE
    return None


def load_source(
    dataset: str, metadata: dict[str, Any], *, needs_labels: bool, long_answers: bool = False
) -> CasesFile:
    """The cases of a task: a cases file (:func:`find_cases_file`), or, for tasks without locality probes,
    ``data_path`` (a data file; all its cases) with the query template from ``template``, by default the
    model family's (of the ``pretrained`` model arg; its long-answer form with ``long_answers``).

    Reads no model weights: :mod:`meg_harness.lm_eval_plugin.preflight` calls it before the model loads."""
    task = f"{dataset}_ke"
    path = find_cases_file(metadata)
    if path is not None and not metadata.get("cases") and not needs_labels and metadata.get("data_path"):
        path = None  # an explicit data_path= wins over the cases file inside the artifact folder
    if path is not None:
        if not path.is_file():
            raise HarnessError("the cases file does not exist", file=path, field="cases")
        source = read_cases_file(path)
        if source.dataset != dataset:
            hint = "" if needs_labels else f" or `--metadata data_path=FILE` of {dataset} data"
            raise HarnessError(
                f"task {task} got a cases file of dataset {source.dataset!r}: pass `--metadata "
                f"cases=FILE` of dataset {dataset}{hint}",
                file=path,
            )
        return source
    if not needs_labels and metadata.get("data_path"):
        from meg_harness.data import load_cases
        from meg_harness.prompts import get_template

        data_path = str(metadata["data_path"])
        if "://" not in data_path and data_path != "download" and not Path(data_path).expanduser().is_file():
            raise HarnessError(
                f"task {task}: the data file does not exist", file=data_path, field="data_path"
            )
        template = get_template(
            str(metadata.get("template") or _family_template(task, metadata, long_answers))
        )
        cases = load_cases(dataset, data_path)
        return CasesFile(
            dataset, template, cases, {}, LONG_MAX_NEW_TOKENS if long_answers else MAX_NEW_TOKENS
        )
    what = "the edit cases and the unedited model's locality answers" if needs_labels else "its cases"
    raise HarnessError(
        f"task {task} needs {what}: pass `--metadata cases=FILE` (write FILE with `python -m "
        f"meg_harness.lm_eval_plugin.export`)"
        + ("" if needs_labels else " or `--metadata data_path=FILE` [template=NAME]")
        + f", or an artifact folder (meg_path=/delta=) that contains {CASES_FILE}",
        field="cases",
    )


def _family_template(task: str, metadata: dict[str, Any], long_answers: bool) -> str:
    """The default query template of the ``pretrained`` model's family (no weights are loaded)."""
    from meg_harness.models.loading import default_template_of

    pretrained = metadata.get("pretrained")
    if not isinstance(pretrained, str) or not pretrained:
        raise HarnessError(
            f"task {task} with data_path= needs template=NAME (there is no pretrained= model arg to take "
            "the model family's default from)",
            field="template",
        )
    return default_template_of(pretrained, long_answers=long_answers, cache_dir=metadata.get("cache_dir"))


def probe_doc(case_id: str, kind: str, question: str, target: str, source: CasesFile, **extra: Any) -> dict:
    """A probe document (see :mod:`meg_harness.lm_eval_plugin.probes`): a short answer, or with
    ``long=True`` a long one (up to the source's ``max_new_tokens``, cut at a blank line)."""
    target_ids = list(extra.pop("target_ids", []))
    long = bool(extra.pop("long", False))
    return {
        "case_id": case_id,
        "query": source.template.format(question),
        "target": target,
        **extra,
        PROBE_KEY: {
            "question": question,
            "template": source.template.text,
            "kind": kind,
            "target": target,
            "target_ids": target_ids,
            "max_new_tokens": source.max_new_tokens,
            "long": long,
        },
    }


def probe_docs(source: CasesFile, kinds: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One document per probe of the native protocol (``probe_specs`` order)."""
    docs = []
    for spec in probe_specs(source.cases):
        if kinds and spec.kind not in kinds:
            continue
        if spec.target is None:
            text, ids = source.labels[spec.question]
            docs.append(probe_doc(spec.case_id, spec.kind, spec.question, text, source, target_ids=ids))
        else:
            docs.append(probe_doc(spec.case_id, spec.kind, spec.question, spec.target, source))
    return docs


def as_dataset(docs: list[dict[str, Any]], task: str) -> dict[str, Any]:
    import datasets

    if not docs:
        raise HarnessError(f"no documents for task {task}")
    return {"test": datasets.Dataset.from_list(docs)}


def load_ke_docs(dataset: str, kinds: Sequence[str] | None = None, **metadata: Any) -> dict[str, Any]:
    """``custom_dataset`` of the KE tasks (lm-eval passes the metadata, model args included)."""
    source = load_source(dataset, metadata, needs_labels=not kinds or "locality" in kinds)
    return as_dataset(probe_docs(source, kinds), f"{dataset}_ke")


def present_mean(items: Sequence[float | None]) -> float:
    """Mean of the values that are not ``None`` (NaN when there are none).

    Every document reports every metric of its task (``None`` where it does not apply): lm-eval's
    data-parallel gathering expects each rank to have every metric key."""
    values = [v for v in items if v is not None]
    return sum(values) / len(values) if values else float("nan")


def ke_score(items: Sequence[tuple[str, float, bool]]) -> float:
    """Score (0-1): the harmonic mean of the six metrics, by the native ``summarize``."""
    rows = [{"kind": kind, "tf": tf, "ag": ag} for kind, tf, ag in items]
    return summarize(rows)["score"] / 100.0


class ProbeTask(ConfigurableTask):
    """Base of the meg-harness tasks: documents carry their query; zero-shot, no chat template."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"})

    def doc_to_text(self, doc, doc_to_text=None) -> str:
        return doc["query"]

    def doc_to_target(self, doc, doc_to_target=None) -> str:
        return doc["target"]

    def fewshot_context(self, doc, num_fewshot, **kwargs) -> str:
        return doc["query"]

    @staticmethod
    def request(kind: str, doc: dict, arguments: tuple, index: int, kwargs: dict) -> Instance:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("apply_chat_template", "chat_template")}
        return Instance(kind, doc, arguments, index, **kwargs)

    @staticmethod
    def answer_request(doc: dict, index: int, kwargs: dict) -> Instance:
        """A greedy answer by the native path: <= max_new_tokens, cut at newline or backslash (a long answer:
        at a blank line)."""
        probe = probe_of(doc)
        generation = {
            "until": list(LONG_ANSWER_CUTS if probe.get("long") else ANSWER_STOPS),
            "max_gen_toks": probe["max_new_tokens"],
            "do_sample": False,
        }
        return ProbeTask.request("generate_until", doc, (doc["query"], generation), index, kwargs)


class KETask(ProbeTask):
    """Probes of a cases file; ``dataset_kwargs.measures`` (tf, ag) selects the requests and metrics."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        config = dict(config or {})
        kwargs = dict(config.get("dataset_kwargs") or {})
        self.measures = tuple(kwargs.pop("measures", MEASURES))
        self.kinds = tuple(kwargs.get("kinds") or KIND_NAMES)
        self.with_score = set(self.kinds) == set(KIND_NAMES) and set(self.measures) == set(MEASURES)
        config["dataset_kwargs"] = kwargs
        super().__init__(config=config)

    def construct_requests(self, doc, ctx, **kwargs) -> list[Instance]:
        requests = []
        if "tf" in self.measures:
            arguments = (doc["query"], " " + doc["target"].strip())
            requests.append(self.request("loglikelihood", doc, arguments, len(requests), kwargs))
        if "ag" in self.measures:
            requests.append(self.answer_request(doc, len(requests), kwargs))
        return requests

    def process_results(self, doc, results) -> dict[str, Any]:
        probe = probe_of(doc)
        name = KIND_NAMES[probe["kind"]]
        out: dict[str, Any] = dict.fromkeys(self._metric_names())
        tf, ag = float("nan"), False
        results = list(results)
        if "tf" in self.measures:
            tf = tf_value(results.pop(0), self.config.task)
            out[f"{name}_tf"] = tf
        if "ag" in self.measures:
            ag = ag_match(results.pop(0), probe["target"])
            out[f"{name}_ag"] = float(ag)
        if self.with_score:
            out["score"] = (probe["kind"], tf, ag)
        return out

    def _metric_names(self) -> list[str]:
        names = [
            f"{KIND_NAMES[k]}_{m}"
            for k in KIND_NAMES
            if k in self.kinds
            for m in MEASURES
            if m in self.measures
        ]
        return names + (["score"] if self.with_score else [])

    def aggregation(self) -> dict[str, Any]:
        return {name: ke_score if name == "score" else present_mean for name in self._metric_names()}

    def higher_is_better(self) -> dict[str, bool]:
        return dict.fromkeys(self._metric_names(), True)
