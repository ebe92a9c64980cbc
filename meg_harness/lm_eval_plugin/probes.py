"""What task documents tell the models (light: no torch, no lm_eval).

A short-answer document of a meg-harness task carries ``doc[PROBE_KEY] = {"question", "template",
"kind", "target", "target_ids", "max_new_tokens"}``: for its requests the ``meg``/``edited`` models run
the native protocol code (:mod:`meg_harness.evaluate.scoring`) on exactly the native token ids and route
on ``question``. Other documents may carry ``doc[QUESTION_KEY]``: the question their requests route on
(the requests themselves go through HFLM as usual).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PROBE_KEY = "meg_harness"
QUESTION_KEY = "meg_harness_question"
TF_TAG = "meg-harness-tf"  # third element of a loglikelihood response that carries a TF value


def probe_of(doc: Any) -> Mapping[str, Any] | None:
    """The probe description of a task document, or ``None`` for any other document."""
    if isinstance(doc, Mapping):
        probe = doc.get(PROBE_KEY)
        if isinstance(probe, Mapping) and "question" in probe:
            return probe
    return None


def routing_question(doc: Any) -> str | None:
    """The question a document's requests route on, when the document says."""
    probe = probe_of(doc)
    if probe is not None:
        return str(probe["question"])
    if isinstance(doc, Mapping) and isinstance(doc.get(QUESTION_KEY), str):
        return doc[QUESTION_KEY]
    return None


def tf_response(tf: float) -> tuple[float, bool, str]:
    """A loglikelihood response carrying the teacher-forced token accuracy of one probe."""
    return (float(tf), tf == 1.0, TF_TAG)


def tf_value(response: Any, task: str) -> float:
    """The TF value of a response; a clear error when the model is not a meg-harness model."""
    if isinstance(response, (tuple, list)) and len(response) == 3 and response[2] == TF_TAG:
        return float(response[0])
    from meg_harness.errors import HarnessError

    raise HarnessError(
        f"task {task} needs a meg-harness lm-eval model, which scores teacher forcing token by token as the "
        "native protocol does: use `--model edited` (no `delta=`: the unedited model) or `--model meg`, "
        "not `--model hf`",
        field="model",
    )
