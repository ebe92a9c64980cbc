"""The protocol's pure rules against hand-computed values."""

import math

import pytest

from meg_harness.evaluate.protocol import ag_match, ag_prefix_match, harmonic_mean, summarize
from meg_harness.prompts import cut_answer, normalize_answer


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        (" Paris.\nQ: next", "paris"),
        (" Paris", "paris"),
        ("  New York City..", "new york city."),
        (" a\\b", "a"),
        ("\nParis", ""),
        (" Rome .", "rome"),
    ],
)
def test_normalize_answer(generated, expected):
    assert normalize_answer(generated) == expected


def test_cut_answer_keeps_text_before_first_newline():
    assert cut_answer(" Manila, Philippines\nmore") == " Manila, Philippines"


def test_ag_is_exact_match_and_prefix_is_secondary():
    assert ag_match(" Manila.\n", "Manila")
    assert not ag_match(" Manila, Philippines", "Manila")
    assert ag_prefix_match(" Manila, Philippines", "Manila")
    assert not ag_prefix_match(" Man", "Manila")


def test_harmonic_mean_hand_computed():
    assert harmonic_mean([50.0, 100.0]) == pytest.approx(2 / (1 / 50 + 1 / 100))  # 66.666...
    assert harmonic_mean([100.0] * 6) == 100.0
    assert harmonic_mean([0.0, 100.0]) == 0.0


def test_summarize_hand_computed():
    items = [
        {"kind": "edit", "tf": 1.0, "ag": True},
        {"kind": "edit", "tf": 0.5, "ag": False},
        {"kind": "rephrase", "tf": 0.25, "ag": False},
        {"kind": "rephrase", "tf": 0.75, "ag": True},
        {"kind": "rephrase", "tf": 1.0, "ag": True},
        {"kind": "locality", "tf": 1.0, "ag": True},
    ]
    m = summarize(items)
    assert m["reliability_ag"] == 50.0
    assert m["reliability_tf"] == 75.0
    assert m["generality_ag"] == pytest.approx(200 / 3)
    assert m["generality_tf"] == pytest.approx(200 / 3)
    assert m["locality_ag"] == 100.0 and m["locality_tf"] == 100.0
    six = [50.0, 75.0, 200 / 3, 200 / 3, 100.0, 100.0]
    assert m["score"] == pytest.approx(6 / sum(1 / v for v in six))
    assert math.isclose(m["score"], 72.0, rel_tol=1e-12)
