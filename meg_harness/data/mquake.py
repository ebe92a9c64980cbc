"""MQuAKE (original schema): multi-hop cases, each with several single-hop rewrites."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from meg_harness.data._validate import Record, check_unique_ids, find_subject, make_template, records
from meg_harness.data.edit_case import EditCase, MultiHop


def load_mquake(path: Path) -> list[EditCase]:
    """One EditCase per case. Its own fields describe the FIRST rewrite (prompt = the rewrite's question);
    ``extra["edits"]`` lists ALL rewrites as ``{prompt, cloze, subject, target_new, target_true}`` and
    ``multi_hop`` holds the multi-hop questions with the answers before and after the edits.
    ``prompt_template`` is the question with the subject replaced by ``{}`` (None when the subject does
    not occur in the question)."""
    cases = [_case(rec) for rec in records(path)]
    check_unique_ids(cases, path)
    return cases


def _edit(rec: Record, item: Any, i: int) -> dict[str, Any]:
    pre = f"requested_rewrite[{i}]."
    if not isinstance(item, dict):
        raise rec.error("expected a JSON object", pre[:-1])
    cloze_template = rec.text("prompt", item, pre)
    if "{}" not in cloze_template:
        raise rec.error(
            f"the prompt template {cloze_template!r} has no '{{}}' placeholder for the subject",
            pre + "prompt",
        )
    subject = rec.text("subject", item, pre)
    try:
        cloze = cloze_template.format(subject)
    except (IndexError, KeyError, ValueError) as exc:
        raise rec.error(f"the prompt template cannot be filled ({exc})", pre + "prompt") from None
    return {
        "prompt": rec.text("question", item, pre),
        "cloze": cloze,
        "cloze_template": cloze_template,
        "subject": subject,
        "target_new": rec.text("str", rec.obj("target_new", item, pre), pre + "target_new.", target=True),
        "target_true": rec.text("str", rec.obj("target_true", item, pre), pre + "target_true.", target=True),
        "relation_id": item.get("relation_id"),
    }


def _case(rec: Record) -> EditCase:
    rewrites = rec.value("requested_rewrite")
    if not isinstance(rewrites, list) or not rewrites:
        raise rec.error("expected a non-empty list of rewrites", "requested_rewrite")
    edits = [_edit(rec, item, i) for i, item in enumerate(rewrites)]
    multi_hop = MultiHop(
        questions=tuple(rec.texts("questions")),
        new_answer=rec.text("new_answer", target=True),
        new_answer_aliases=tuple(rec.optional_texts("new_answer_alias")),
        answer=rec.text("answer", target=True),
        answer_aliases=tuple(rec.optional_texts("answer_alias")),
    )
    extra: dict[str, Any] = {"index": rec.index, "edits": edits}
    for key in ("single_hops", "new_single_hops"):
        if key in rec.data:
            extra[key] = rec.data[key]
    first = edits[0]
    return EditCase(
        case_id=rec.case_id("case_id"),
        prompt=first["prompt"],
        subject=first["subject"],
        target_new=first["target_new"],
        target_true=first["target_true"],
        prompt_template=_question_template(first),
        multi_hop=multi_hop,
        source=rec.source,
        extra=extra,
    )


def _question_template(edit: dict[str, Any]) -> str | None:
    span = find_subject(edit["prompt"], edit["subject"])
    return None if span is None else make_template(edit["prompt"], span)


def flatten_mquake_edits(cases: list[EditCase]) -> list[EditCase]:
    """One EditCase per single-hop rewrite (case_id ``"{case_id}-{i}"``), for editing.

    ``extra`` keeps the parent's ``index`` (so index ranges still select by case), ``parent_case_id``,
    ``edit_index``, ``cloze`` and ``cloze_template``."""
    flat = []
    for case in cases:
        for i, edit in enumerate(case.extra.get("edits", ())):
            extra = {
                "index": case.extra.get("index"),
                "parent_case_id": case.case_id,
                "edit_index": i,
                "cloze": edit["cloze"],
                "cloze_template": edit.get("cloze_template"),
                "relation_id": edit.get("relation_id"),
            }
            flat.append(
                replace(
                    case,
                    case_id=f"{case.case_id}-{i}",
                    prompt=edit["prompt"],
                    subject=edit["subject"],
                    target_new=edit["target_new"],
                    target_true=edit["target_true"],
                    prompt_template=_question_template(edit),
                    multi_hop=None,
                    extra=extra,
                )
            )
    return flat
