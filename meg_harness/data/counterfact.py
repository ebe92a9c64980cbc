"""CounterFact in both formats, detected per file from its first record.

* flattened (EasyEdit): ``{case_id, prompt, subject, target_new, ground_truth, rephrase_prompt,
  locality_prompt, locality_ground_truth}`` (the prompt/rephrase/locality fields may be strings or lists);
* original ROME/MEMIT (``counterfact.json``, ``multi_counterfact.json``): ``{case_id,
  requested_rewrite{prompt with "{}", subject, target_new{str}, target_true{str}}, paraphrase_prompts[],
  neighborhood_prompts[], ...}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meg_harness.data._validate import Record, check_text, check_unique_ids, records, subject_template
from meg_harness.data.edit_case import EditCase, LocalityProbe


def load_counterfact(path: Path) -> list[EditCase]:
    """EditCases of a CounterFact file in either format."""
    recs = records(path)
    rome = "requested_rewrite" in recs[0].data
    cases = [_rome_case(rec) if rome else _flat_case(rec) for rec in recs]
    check_unique_ids(cases, path)
    return cases


def _rome_case(rec: Record) -> EditCase:
    rewrite = rec.value("requested_rewrite")
    if isinstance(rewrite, list) and len(rewrite) == 1:
        rewrite = rewrite[0]
    if not isinstance(rewrite, dict):
        raise rec.error("expected one JSON object (a single rewrite)", "requested_rewrite")
    pre = "requested_rewrite."
    template = rec.text("prompt", rewrite, pre)
    subject = rec.text("subject", rewrite, pre)
    if "{}" not in template:
        raise rec.error(
            f"the prompt template {template!r} has no '{{}}' placeholder for the subject", pre + "prompt"
        )
    try:
        prompt = template.format(subject)
    except (IndexError, KeyError, ValueError) as exc:
        raise rec.error(
            f"the prompt template {template!r} cannot be filled ({exc})", pre + "prompt"
        ) from None
    target_new = rec.text("str", rec.obj("target_new", rewrite, pre), pre + "target_new.", target=True)
    target_true = rec.text("str", rec.obj("target_true", rewrite, pre), pre + "target_true.", target=True)
    rephrases = rec.texts("paraphrase_prompts", allow_empty=True)
    locality = tuple(
        _neighbour(rec, item, i, target_true) for i, item in enumerate(_list(rec, "neighborhood_prompts"))
    )
    extra: dict[str, Any] = {"index": rec.index}
    for key in ("relation_id", "pararel_idx"):
        value = rewrite.get(key, rec.get(key))
        if value is not None:
            extra[key] = value
    return EditCase(
        case_id=rec.case_id("case_id"),
        prompt=prompt,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        rephrases=tuple(rephrases),
        locality=locality,
        prompt_template=template,
        source=rec.source,
        extra=extra,
    )


def _list(rec: Record, key: str) -> list[Any]:
    value = rec.value(key)
    if not isinstance(value, list):
        raise rec.error("expected a list", key)
    return value


def _neighbour(rec: Record, item: Any, i: int, target_true: str) -> LocalityProbe:
    """A neighbourhood prompt: a string (gold = target_true) or ``{prompt, target}``."""
    field = f"neighborhood_prompts[{i}]"
    if isinstance(item, dict):
        prompt = rec.text("prompt", item, field + ".")
        gold = item.get("target")
        gold = check_text(rec, gold, field + ".target") if gold is not None else target_true
        return LocalityProbe(prompt, gold)
    return LocalityProbe(check_text(rec, item, field), target_true)


def _flat_case(rec: Record) -> EditCase:
    subject = rec.text("subject")
    prompt = rec.text("prompt")
    template = subject_template(rec, prompt, subject)
    target_new = rec.text("target_new", target=True)
    target_true = rec.text("ground_truth", target=True)
    rephrases = rec.texts("rephrase_prompt", allow_str=True, allow_empty=True)
    loc_prompts = rec.texts("locality_prompt", allow_str=True, allow_empty=True)
    golds = _flat_golds(rec, len(loc_prompts))
    locality = [LocalityProbe(p, g) for p, g in zip(loc_prompts, golds)]
    return EditCase(
        case_id=rec.case_id("case_id"),
        prompt=prompt,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        rephrases=tuple(rephrases),
        locality=tuple(locality),
        prompt_template=template,
        source=rec.source,
        extra={"index": rec.index},
    )


def _flat_golds(rec: Record, n: int) -> list[str | None]:
    """``locality_ground_truth``: one string for all locality prompts, or a list of the same length."""
    value = rec.get("locality_ground_truth")
    if value is None:
        return [None] * n
    if isinstance(value, str):
        return [check_text(rec, value, "locality_ground_truth")] * n
    golds = rec.texts("locality_ground_truth", allow_empty=True)
    if len(golds) != n:
        raise rec.error(f"has {len(golds)} answers for {n} locality prompts", "locality_ground_truth")
    return list(golds)
