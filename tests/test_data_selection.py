"""select_cases (range, one per subject, seeded sample) and filter_unknown_facts (paper A.9)."""

from __future__ import annotations

import pytest

from meg_harness.data import EditCase, filter_unknown_facts, load_cases, normalize_answer, select_cases
from meg_harness.errors import HarnessError


def _cases(subjects: list[str]) -> list[EditCase]:
    return [
        EditCase(case_id=f"c{i}", prompt=f"{s} is in", subject=s, target_new=f"T{i}", extra={"index": i})
        for i, s in enumerate(subjects)
    ]


SUBJECTS = ["A", "B", "a", "C", "D", "b", "E", "F", "G", "H"]


def test_all_cases_one_per_subject_keeps_first():
    chosen = select_cases(_cases(SUBJECTS), None)
    assert [c.case_id for c in chosen] == ["c0", "c1", "c3", "c4", "c6", "c7", "c8", "c9"]
    assert len(select_cases(_cases(SUBJECTS), None, one_per_subject=False)) == 10


def test_empty_subjects_are_not_merged():
    assert len(select_cases(_cases(["", "", "X"]), None)) == 3


def test_index_range_uses_index_in_file():
    cases = _cases(SUBJECTS)
    chosen = select_cases(cases, None, index_range=(2, 6))
    assert [c.case_id for c in chosen] == ["c2", "c3", "c4", "c5"]  # 'a' kept: 'A' is outside the range
    # a filtered list still selects by the index in the file
    assert [c.case_id for c in select_cases(cases[5:], None, index_range=(6, 8))] == ["c6", "c7"]


def test_sample_is_seeded_deterministic_and_in_file_order():
    cases = _cases([f"s{i}" for i in range(50)])
    first = select_cases(cases, 10, seed=3)
    assert first == select_cases(cases, 10, seed=3)
    assert len(first) == 10
    positions = [int(c.case_id[1:]) for c in first]
    assert positions == sorted(positions)
    assert [c.case_id for c in select_cases(cases, 10, seed=4)] != [c.case_id for c in first]
    assert select_cases(cases, 50, seed=9) == cases


def test_n_edits_too_large():
    with pytest.raises(HarnessError) as info:
        select_cases(_cases(SUBJECTS), 9)
    message = str(info.value)
    assert "field 'n_edits'" in message and "9" in message and "only 8 cases are available" in message
    with pytest.raises(HarnessError, match="only 2 cases are available in range"):
        select_cases(_cases(SUBJECTS), 3, index_range=(0, 2))


@pytest.mark.parametrize("n_edits", [0, -1, 2.5, True])
def test_bad_n_edits(n_edits):
    with pytest.raises(HarnessError, match="field 'n_edits'"):
        select_cases(_cases(SUBJECTS), n_edits)


@pytest.mark.parametrize("index_range", [(5, 5), (-1, 3), (3, 1), (1,), ("a", "b")])
def test_bad_range(index_range):
    with pytest.raises(HarnessError, match="field 'range'"):
        select_cases(_cases(SUBJECTS), None, index_range=index_range)


def test_select_on_demo_data():
    cases = load_cases("counterfact")
    chosen = select_cases(cases, 16, seed=0, index_range=(0, 80))
    assert len(chosen) == 16 and all(c.extra["index"] < 80 for c in chosen)


def test_normalize_answer():
    assert normalize_answer("  Paris. ") == "paris"
    assert normalize_answer("U.S..") == "u.s."
    assert normalize_answer("STRASSE") == normalize_answer("straße")


def test_filter_unknown_facts():
    cases = _cases(["A", "B", "C", "D"])
    calls = []

    def answer_fn(prompts: list[str]) -> list[str]:
        calls.append(list(prompts))
        return [" t0.", "something else", "T2", ""]

    kept = filter_unknown_facts(cases, answer_fn)
    assert [c.case_id for c in kept] == ["c1", "c3"]
    assert calls == [[c.prompt for c in cases]]
    assert filter_unknown_facts([], answer_fn) == []


def test_filter_unknown_facts_length_mismatch():
    with pytest.raises(ValueError, match="1 answers for 2 prompts"):
        filter_unknown_facts(_cases(["A", "B"]), lambda prompts: ["x"])
