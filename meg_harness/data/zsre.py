"""ZsRE in the MEND/EasyEdit format: ``{subject, src, pred, rephrase, alt, answers[], loc, loc_ans, ...}``."""

from __future__ import annotations

from pathlib import Path

from meg_harness.data._validate import Record, check_unique_ids, records, subject_template
from meg_harness.data.edit_case import EditCase, LocalityProbe
from meg_harness.errors import HarnessError

ZSRE_TARGETS = ("answers", "alt")
_NQ_PREFIX = "nq question:"


def nq_question(loc: str) -> str:
    """``"nq question: who sang x"`` -> ``"Who sang x?"``: prefix dropped, first letter upper-cased,
    ``?`` added when missing."""
    text = loc.strip()
    if text.lower().startswith(_NQ_PREFIX):
        text = text[len(_NQ_PREFIX) :].strip()
    if text and not text.endswith("?"):
        text += "?"
    return text[:1].upper() + text[1:]


def check_zsre_target(zsre_target: str) -> None:
    """HarnessError unless ``zsre_target`` is ``"answers"`` or ``"alt"``."""
    if zsre_target not in ZSRE_TARGETS:
        raise HarnessError(
            f"unknown ZsRE target {zsre_target!r}; use one of {list(ZSRE_TARGETS)}", field="zsre_target"
        )


def load_zsre(path: Path, zsre_target: str = "answers") -> list[EditCase]:
    """One EditCase per record: prompt = ``src``; the target is ``answers[0]`` (MeG protocol) or ``alt``
    (EasyEdit). With ``answers``, ``target_true`` is None (the model's wrong guess ``pred`` is kept in
    ``extra``); with ``alt``, ``target_true`` = ``answers[0]``. case_id = ``id``/``case_id`` or the index."""
    check_zsre_target(zsre_target)
    cases = [_case(rec, zsre_target) for rec in records(path)]
    check_unique_ids(cases, path)
    return cases


def _case(rec: Record, zsre_target: str) -> EditCase:
    subject = rec.text("subject")
    prompt = rec.text("src")
    template = subject_template(rec, prompt, subject, field="src")
    answers = rec.texts("answers")
    if zsre_target == "alt":
        target_new, target_true = rec.text("alt", target=True), answers[0]
    else:
        target_new, target_true = answers[0], None
    rephrases = rec.texts("rephrase", allow_str=True)
    loc = nq_question(rec.text("loc"))
    if not loc:
        raise rec.error("is empty after removing the 'nq question:' prefix", "loc")
    extra = {"index": rec.index, "answers": answers, "pred": rec.get("pred"), "alt": rec.get("alt")}
    for key in ("cond", "portability"):
        if key in rec.data:
            extra[key] = rec.data[key]
    cid = rec.case_id("case_id") if "case_id" in rec.data else rec.case_id("id")
    return EditCase(
        case_id=cid,
        prompt=prompt,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        rephrases=tuple(rephrases),
        locality=(LocalityProbe(loc, rec.text("loc_ans")),),
        prompt_template=template,
        source=rec.source,
        extra=extra,
    )
