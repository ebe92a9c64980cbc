"""The MQuAKE lm-eval task (``mquake_ke``): edit-wise, instance-wise and multi-hop accuracy.

One short-answer probe document per single-hop rewrite question (answered with its ``target_new``) and per
multi-hop question (answered with ``new_answer`` or one of its aliases), all run by the native greedy
decoding and compared as AG compares. Per case: instance-wise = every rewrite answered; multi-hop = any
of its multi-hop questions answered. Cases from ``--metadata cases=FILE`` (an export of dataset mquake)
or ``data_path=MQuAKE.json template=NAME``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from meg_harness.evaluate.protocol import ag_match
from meg_harness.lm_eval_plugin.ke import ProbeTask, as_dataset, load_source, present_mean, probe_doc
from meg_harness.lm_eval_plugin.probes import probe_of
from meg_harness.store import CasesFile


def mquake_docs(source: CasesFile) -> list[dict[str, Any]]:
    """Rewrite questions (kind ``edit``) then multi-hop questions (kind ``multi_hop``), case by case."""
    docs = []
    for case in source.cases:
        edits = case.extra.get("edits") or [{"prompt": case.prompt, "target_new": case.target_new}]
        for edit in edits:
            docs.append(
                probe_doc(case.case_id, "edit", edit["prompt"], edit["target_new"], source, aliases=[])
            )
        if case.multi_hop is not None:
            aliases = list(case.multi_hop.new_answer_aliases)
            for question in case.multi_hop.questions:
                target = case.multi_hop.new_answer
                docs.append(probe_doc(case.case_id, "multi_hop", question, target, source, aliases=aliases))
    return docs


def load_mquake_docs(**metadata: Any) -> dict[str, Any]:
    """``custom_dataset`` of ``mquake_ke``."""
    return as_dataset(mquake_docs(load_source("mquake", metadata, needs_labels=False)), "mquake_ke")


def all_per_case(items: Sequence[tuple[str, bool]]) -> float:
    """Fraction of cases whose items are all true (``None`` items: other documents, skipped)."""
    cases: dict[str, bool] = defaultdict(lambda: True)
    for case_id, hit in filter(None, items):
        cases[case_id] = cases[case_id] and bool(hit)
    return sum(cases.values()) / len(cases) if cases else float("nan")


def any_per_case(items: Sequence[tuple[str, bool]]) -> float:
    """Fraction of cases with at least one true item (``None`` items skipped)."""
    cases: dict[str, bool] = defaultdict(bool)
    for case_id, hit in filter(None, items):
        cases[case_id] = cases[case_id] or bool(hit)
    return sum(cases.values()) / len(cases) if cases else float("nan")


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
