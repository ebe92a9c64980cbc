"""The UnKEBench lm-eval task (``unke_ke``): long answers vs the target answer, UnKE's Bert Score and
ROUGE-L recall.

One probe document per question and per paraphrased question (kinds ``edit`` / ``rephrase``), in the order
of the native :func:`~meg_harness.evaluate.evaluator.unke_probe_specs`. The ``meg``/``edited`` models
answer them with the native greedy decoding (up to 256 new tokens, to EOS or a blank line), routed on the
raw question, and the measures are the native :class:`~meg_harness.evaluate.evaluator.UnKEEvaluator`'s
(:mod:`meg_harness.evaluate.longform`; lm-eval reports fractions, metrics.json percent):
``<reliability|generality>_bert_score`` (cosine of all-MiniLM-L6-v2 sentence embeddings, UnKE's "Bert
Score", the measure of the paper's Table 17) and ``_rougeL`` (ROUGE-L recall). Cases from ``--metadata
cases=FILE`` (or the artifact's ``lm_eval_cases.json``) or ``data_path=final_data_v2.json`` (all its
cases); ``template=`` defaults to the model family's long-answer template (e.g. ``chatml_long``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meg_harness.evaluate.evaluator import unke_probe_specs
from meg_harness.evaluate.protocol import UNKE_KEYS
from meg_harness.lm_eval_plugin.ke import ProbeTask, as_dataset, load_source, present_mean, probe_doc
from meg_harness.lm_eval_plugin.probes import probe_of
from meg_harness.prompts import cut_long_answer
from meg_harness.store import CasesFile

KINDS = {"edit": "reliability", "rephrase": "generality"}


def unke_docs(source: CasesFile) -> list[dict[str, Any]]:
    """One long-answer probe document per question and paraphrase."""
    return [
        probe_doc(spec.case_id, spec.kind, spec.question, spec.target, source, long=True)
        for spec in unke_probe_specs(source.cases)
    ]


def unke_source(metadata: dict[str, Any]) -> CasesFile:
    """The cases of ``unke_ke`` (also the check before the model loads)."""
    return load_source("unke", metadata, needs_labels=False, long_answers=True)


def load_unke_docs(**metadata: Any) -> dict[str, Any]:
    """``custom_dataset`` of ``unke_ke``."""
    return as_dataset(unke_docs(unke_source(metadata)), "unke_ke")


def unke_measures(prediction: str, target: str) -> dict[str, float]:
    """The measures (0-1) of one generated answer, as the native evaluator computes them."""
    from meg_harness.evaluate.longform import bert_scores, rouge_l_recall

    answer = cut_long_answer(prediction)
    return {"bert_score": bert_scores([answer], [target])[0], "rougeL": rouge_l_recall(answer, target)}


class UnKETask(ProbeTask):
    """Long-form answers scored against the target answer."""

    def construct_requests(self, doc, ctx, **kwargs):
        return [self.answer_request(doc, 0, kwargs)]

    def process_results(self, doc, results) -> dict[str, Any]:
        probe = probe_of(doc)
        name = KINDS[probe["kind"]]
        measures = unke_measures(results[0], probe["target"])
        return dict.fromkeys(self._names()) | {f"{name}_{m}": v for m, v in measures.items()}

    def _names(self) -> Sequence[str]:
        return UNKE_KEYS

    def aggregation(self) -> dict[str, Any]:
        return dict.fromkeys(self._names(), present_mean)

    def higher_is_better(self) -> dict[str, bool]:
        return dict.fromkeys(self._names(), True)
