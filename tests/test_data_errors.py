"""Malformed input at the loader's API: names outside the run config's checks raise HarnessError naming the
field. Malformed files and records, through `meg-harness run`, are cases of tests/test_bad_inputs.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from meg_harness.data import load_cases
from meg_harness.errors import HarnessError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"


def test_unknown_dataset_and_target():
    with pytest.raises(HarnessError, match=r"field 'dataset': unknown dataset 'wikibio'"):
        load_cases("wikibio", FIXTURES / "zsre.json")
    with pytest.raises(HarnessError, match=r"field 'zsre_target'"):
        load_cases("zsre", FIXTURES / "zsre.json", zsre_target="pred")
