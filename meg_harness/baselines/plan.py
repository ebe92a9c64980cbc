"""Edit plans: the tokenised prompts of each edit and where its subject's last token sits in them.

Edits are made for the TEMPLATED prompt the evaluator asks (``template.format(prompt)``): context prefixes
(if any) go inside the question, before the prompt (MEMIT puts them before the raw prompt; with a chat
template, "before the prompt" is inside the user turn, where the question is); the target
``" " + target_new`` (+ the template's answer terminator with ``terminator=True``) follows the templated
prompt, tokenised exactly as the evaluator does (``encode_query`` + ``encode_answer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meg_harness.data.edit_case import EditCase
from meg_harness.errors import HarnessError
from meg_harness.prompts import QueryTemplate, encode_answer


@dataclass(frozen=True)
class Row:
    """One token sequence and the position whose representation matters (the subject's last token)."""

    ids: tuple[int, ...]
    index: int


@dataclass(frozen=True)
class EditPlan:
    """``contexts[0]`` is the bare templated prompt; the others carry a context prefix. MEMIT groups the
    contexts by type (the bare prompt; the generated prefixes) and averages keys per type first:
    ``context_types`` gives the size of each consecutive group."""

    case_id: str
    contexts: tuple[Row, ...]
    target_ids: tuple[int, ...]
    kl: Row
    context_types: tuple[int, ...] = (1,)


def _where(case: EditCase) -> dict:
    file, _, record = (case.source or "").rpartition(":")
    return {"file": file or case.source, "record": record if record.isdigit() else None}


def subject_end(case: EditCase) -> int:
    """Character offset just past the subject inside ``case.prompt``."""
    if case.prompt_template and "{}" in case.prompt_template:
        start = case.prompt_template.index("{}")
        if case.prompt[start : start + len(case.subject)] == case.subject:
            return start + len(case.subject)
    start = case.prompt.find(case.subject)
    if start < 0:
        start = case.prompt.lower().find(case.subject.lower())
    if start < 0 or not case.subject:
        raise HarnessError(
            f"subject {case.subject!r} does not occur in the prompt {case.prompt!r}",
            field="subject",
            **_where(case),
        )
    return start + len(case.subject)


def token_at(tokenizer, text: str, char: int, ids: Sequence[int]) -> int:
    """Index in ``ids`` (= ``tokenizer(text)``) of the token that holds character ``char`` of ``text``."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        hits = [i for i, (a, b) in enumerate(offsets) if a <= char < b]
        if hits:
            return hits[-1]
    # Slow tokenizers: the number of tokens of the text up to and including the character (MEMIT's rule).
    prefix = tokenizer(text[: char + 1])["input_ids"]
    return min(len(prefix), len(ids)) - 1


def subject_row(tokenizer, text: str, char_end: int) -> Row:
    """``text`` tokenised as the evaluator does (special tokens included) and its subject's last token."""
    ids = tuple(tokenizer(text)["input_ids"])
    return Row(ids, token_at(tokenizer, text, char_end - 1, ids))


def build_plans(
    tokenizer,
    cases: Sequence[EditCase],
    template: QueryTemplate,
    prefixes: Sequence[str] = (),
    kl_prompt: str = "{} is a",
    terminator: bool = False,
) -> list[EditPlan]:
    """One plan per case: rows for the bare prompt and for each context prefix, the target (with the
    template's answer terminator when ``terminator``) and KL rows."""
    if not cases:
        raise HarnessError("no edit cases given", field="cases")
    question_at = template.text.index("{}")
    plans = []
    for case in cases:
        end = subject_end(case)
        contexts = []
        for prefix in ("", *prefixes):
            text = template.format(prefix + case.prompt)
            contexts.append(subject_row(tokenizer, text, question_at + len(prefix) + end))
        target = encode_answer(tokenizer, template, case.target_new, terminator=terminator, where=case.source)
        kl_text = kl_prompt.replace("{}", case.subject, 1)
        kl = subject_row(tokenizer, kl_text, kl_prompt.index("{}") + len(case.subject))
        types = (1, len(prefixes)) if prefixes else (1,)
        plans.append(EditPlan(case.case_id, tuple(contexts), target, kl, types))
    return plans


def pad_id(tokenizer) -> int:
    value = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(value or 0)
