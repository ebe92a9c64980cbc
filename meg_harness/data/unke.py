"""UnKEBench: ``{id, question, para_question, answer (long text), sub_question[], sub_answer[]}``."""

from __future__ import annotations

import re
from pathlib import Path

from meg_harness.data._validate import Record, check_unique_ids, records, subject_template
from meg_harness.data.edit_case import EditCase

_QUESTION_WORDS = {
    "what",
    "who",
    "whom",
    "whose",
    "which",
    "where",
    "when",
    "why",
    "how",
    "is",
    "are",
    "was",
    "were",
    "do",
    "does",
    "did",
    "can",
    "could",
    "has",
    "have",
    "had",
    "in",
    "on",
    "according",
    "describe",
    "explain",
    "name",
    "the",
    "a",
    "an",
    "tell",
    "list",
    "give",
}
_JOINERS = {"of", "de", "da", "van", "von", "der", "den", "la", "le", "del", "di", "du", "al", "bin", "y"}
_TITLES = {"dr", "mr", "mrs", "ms", "sir", "prof", "professor", "lord", "lady", "saint", "st"}
_TOKEN = re.compile(r"[A-Za-z0-9À-ÿ][\w.'’\-À-ÿ]*|\S")


def guess_subject(question: str, para_question: str = "") -> str:
    """Best-effort subject of a free-form question (UnKEBench has no subject field).

    Candidates are runs of capitalised words (joined by particles like "of"/"van"; a leading question
    word and titles like "Dr." dropped); those that also occur in the paraphrase are preferred; of them
    the first multi-word run, else the longest single word. Returns ``""`` when there is no candidate."""
    runs: list[str] = []
    current: list[str] = []
    tokens = _TOKEN.findall(question)
    for i, token in enumerate(tokens):
        word = re.sub(r"(['’]s|['’])$", "", token)
        capitalised = word[:1].isupper() and not (i == 0 and word.lower() in _QUESTION_WORDS)
        if capitalised:
            current.append(word)
            if word != token:  # a possessive ends the name
                runs.append(" ".join(current))
                current = []
        elif current and token.lower() in _JOINERS and i + 1 < len(tokens) and tokens[i + 1][:1].isupper():
            current.append(token)
        else:
            if current:
                runs.append(" ".join(current))
            current = []
    if current:
        runs.append(" ".join(current))
    runs = [r.strip(" .,;:?!") for r in runs if r.strip(" .,;:?!")]
    runs = [r for r in runs if r in question]
    if not runs:
        return ""
    runs = [r for r in (_drop_title(r) for r in runs) if r]
    runs = [r for r in runs if r.lower() in para_question.lower()] or runs
    names = [r for r in runs if " " in r]
    return names[0] if names else max(runs, key=len, default="")


def _drop_title(run: str) -> str:
    words = run.split()
    while words and words[0].rstrip(".").lower() in _TITLES:
        words = words[1:]
    return " ".join(words)


def load_unke(path: Path) -> list[EditCase]:
    """One EditCase per record: prompt = ``question``, target_new = long_answer = ``answer``, rephrases =
    ``(para_question,)``, ``extra`` = sub_question/sub_answer. ``subject`` is guessed (see
    :func:`guess_subject`) and may be ``""``; ``prompt_template`` is None then."""
    cases = [_case(rec) for rec in records(path)]
    check_unique_ids(cases, path, field="id")
    return cases


def _case(rec: Record) -> EditCase:
    question = rec.text("question")
    para = rec.text("para_question")
    answer = rec.text("answer", target=True)
    sub_q = rec.texts("sub_question", allow_empty=True) if rec.get("sub_question") is not None else []
    sub_a = rec.texts("sub_answer", allow_empty=True) if rec.get("sub_answer") is not None else []
    if len(sub_q) != len(sub_a):
        raise rec.error(f"has {len(sub_a)} answers for {len(sub_q)} sub-questions", "sub_answer")
    subject = guess_subject(question, para)
    template = subject_template(rec, question, subject, "question", required=False) if subject else None
    return EditCase(
        case_id=rec.case_id("id"),
        prompt=question,
        subject=subject,
        target_new=answer,
        rephrases=(para,),
        prompt_template=template,
        long_answer=answer,
        source=rec.source,
        extra={"index": rec.index, "sub_question": sub_q, "sub_answer": sub_a},
    )
