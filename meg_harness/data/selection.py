"""Choosing the cases of an experiment: index range, one case per subject, a seeded sample; A.9 filter."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from meg_harness.data.edit_case import EditCase
from meg_harness.errors import HarnessError
from meg_harness.prompts import normalize_answer


def file_index(case: EditCase, position: int) -> int:
    """The case's index in its file (``extra["index"]``), else its position in the list."""
    index = case.extra.get("index")
    return index if isinstance(index, int) else position


def select_cases(
    cases: Sequence[EditCase],
    n_edits: int | None,
    seed: int = 0,
    index_range: tuple[int, int] | None = None,
    one_per_subject: bool = True,
) -> list[EditCase]:
    """Cases for one experiment, in file order.

    1. ``index_range=(start, end)`` keeps cases whose index in the file is in ``[start, end)`` (an ``end``
       past the last case's index is an error);
    2. ``one_per_subject`` keeps the first case of each subject (case-insensitive; empty subjects are
       never merged), so that no two edits rewrite the same subject;
    3. ``n_edits`` draws a ``random.Random(seed)`` sample of that size (None = all), returned in file order.
    """
    pool = list(enumerate(cases))
    if index_range is not None:
        start, end = _check_range(index_range)
        n_records = max((file_index(c, pos) for pos, c in pool), default=-1) + 1
        if end > n_records:  # clipping would hide a typo (or the wrong file)
            source = cases[0].source.rpartition(":")[0] if cases and cases[0].source else None
            raise HarnessError(
                f"range [{start}, {end}) goes past the end of the data ({n_records} records)",
                file=source,
                field="range",
            )
        pool = [(pos, c) for pos, c in pool if start <= file_index(c, pos) < end]
    if one_per_subject:
        seen: set[str] = set()
        unique = []
        for pos, case in pool:
            key = case.subject.strip().casefold()
            if key and key in seen:
                continue
            seen.add(key)
            unique.append((pos, case))
        pool = unique
    if n_edits is None:
        return [c for _, c in pool]
    if isinstance(n_edits, bool) or not isinstance(n_edits, int) or n_edits < 1:
        raise HarnessError(f"must be a positive integer or null, got {n_edits!r}", field="n_edits")
    if n_edits > len(pool):
        what = " after keeping one case per subject" if one_per_subject else ""
        where = f" in range {list(index_range)}" if index_range is not None else ""
        raise HarnessError(
            f"asks for {n_edits} edits but only {len(pool)} cases are available{where}{what}", field="n_edits"
        )
    chosen = sorted(random.Random(seed).sample(range(len(pool)), n_edits))
    return [pool[i][1] for i in chosen]


def _check_range(index_range: Sequence[int]) -> tuple[int, int]:
    try:
        start, end = index_range
    except (TypeError, ValueError):
        raise HarnessError(f"expected [start, end), got {index_range!r}", field="range") from None
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end))
    if not ok or start < 0 or end <= start:
        raise HarnessError(f"expected integers 0 <= start < end, got {list(index_range)!r}", field="range")
    return start, end


def filter_unknown_facts(
    cases: Sequence[EditCase], answer_fn: Callable[[list[str]], list[str]]
) -> list[EditCase]:
    """Paper A.9 (ZsRE): keep the cases the unedited model does NOT already answer with ``target_new``
    (compared as AG compares: cut at the first newline, strip, one trailing period dropped, casefold).

    ``answer_fn`` maps a list of prompts to the model's answers (same order and length)."""
    cases = list(cases)
    if not cases:
        return []
    answers = list(answer_fn([c.prompt for c in cases]))
    if len(answers) != len(cases):
        raise ValueError(f"answer_fn returned {len(answers)} answers for {len(cases)} prompts")
    return [c for c, a in zip(cases, answers) if normalize_answer(a or "") != normalize_answer(c.target_new)]
