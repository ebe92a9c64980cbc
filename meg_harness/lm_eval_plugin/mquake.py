"""The MQuAKE lm-eval task (``mquake_ke``): edit-wise, instance-wise and multi-hop accuracy.

One short-answer probe document per single-hop rewrite question (answered with its ``target_new``) and per
multi-hop question (answered with ``new_answer`` or one of its aliases), in the order of the native
:func:`~meg_harness.evaluate.evaluator.mquake_probe_specs`, all run by the native greedy decoding and
compared as AG compares; the metrics are the native :class:`~meg_harness.evaluate.evaluator.MQuAKEEvaluator`'s
(as fractions). Per case: instance-wise = every rewrite answered; multi-hop = any of its multi-hop
questions answered. Cases from ``--metadata cases=FILE`` (an export of dataset mquake, or the
``lm_eval_cases.json`` a run writes into each artifact) or ``data_path=MQuAKE.json`` (all its cases;
``template=`` defaults to the model family's).
"""

from __future__ import annotations

from typing import Any

from meg_harness.evaluate.evaluator import mquake_probe_specs
from meg_harness.evaluate.protocol import ag_match, all_per_case, any_per_case
from meg_harness.lm_eval_plugin.ke import ProbeTask, as_dataset, load_source, present_mean, probe_doc
from meg_harness.lm_eval_plugin.probes import probe_of
from meg_harness.store import CasesFile

__all__ = ["MQuAKETask", "all_per_case", "any_per_case", "load_mquake_docs", "mquake_docs"]


def mquake_docs(source: CasesFile) -> list[dict[str, Any]]:
    """Rewrite questions (kind ``edit``) then multi-hop questions (kind ``multi_hop``), case by case."""
    return [
        probe_doc(spec.case_id, spec.kind, spec.question, spec.target, source, aliases=list(spec.aliases))
        for spec in mquake_probe_specs(source.cases)
    ]


def mquake_source(metadata: dict[str, Any]) -> CasesFile:
    """The cases of ``mquake_ke`` (also the check before the model loads)."""
    return load_source("mquake", metadata, needs_labels=False)


def load_mquake_docs(**metadata: Any) -> dict[str, Any]:
    """``custom_dataset`` of ``mquake_ke``."""
    return as_dataset(mquake_docs(mquake_source(metadata)), "mquake_ke")


class MQuAKETask(ProbeTask):
    """Greedy short answers to rewrite and multi-hop questions."""

    METRICS = {"edit_wise": present_mean, "instance_wise": all_per_case, "multi_hop": any_per_case}

    def construct_requests(self, doc, ctx, **kwargs):
        return [self.answer_request(doc, 0, kwargs)]

    def process_results(self, doc, results) -> dict[str, Any]:
        probe = probe_of(doc)
        hit = any(ag_match(results[0], target) for target in [probe["target"], *doc["aliases"]])
        if probe["kind"] == "edit":
            return {"edit_wise": float(hit), "instance_wise": (doc["case_id"], hit), "multi_hop": None}
        return {"edit_wise": None, "instance_wise": None, "multi_hop": (doc["case_id"], hit)}

    def aggregation(self) -> dict[str, Any]:
        return dict(self.METRICS)

    def higher_is_better(self) -> dict[str, bool]:
        return dict.fromkeys(self.METRICS, True)
