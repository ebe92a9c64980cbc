"""lm-eval's knowledge-editing tasks give the native evaluator's six numbers and Score, exactly."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

pytest.importorskip("lm_eval")

from meg_harness.data import load_cases  # noqa: E402
from meg_harness.editing.base import Edited  # noqa: E402
from meg_harness.errors import HarnessError  # noqa: E402
from meg_harness.evaluate.evaluator import Evaluator  # noqa: E402
from meg_harness.evaluate.protocol import ALL_METRIC_KEYS  # noqa: E402
from meg_harness.lm_eval_plugin.ke import ke_score, load_ke_docs  # noqa: E402
from meg_harness.lm_eval_plugin.mquake import all_per_case, any_per_case, mquake_docs  # noqa: E402
from meg_harness.lm_eval_plugin.probes import tf_value  # noqa: E402
from meg_harness.prompts import get_template  # noqa: E402
from meg_harness.store import read_cases_file, write_cases_file  # noqa: E402
from tests.test_lm_eval_support import TASKS_PATH, RowShift, evaluate_tasks, tiny_lm  # noqa: E402

TEMPLATE = get_template("gptj")


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return tiny_lm(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def cases_file(lm, tmp_path_factory):
    """Three demo CounterFact cases and the unedited tiny model's locality answers; one target is the
    model's own answer so that TF/AG are not all zero."""
    cases = load_cases("counterfact")[:3]
    evaluator = Evaluator(lm.tokenizer, TEMPLATE, batch_size=4, progress=False)
    labels = evaluator.locality_labels(Edited(lm.model, lm.tokenizer), cases, "tiny")
    first = cases[0].locality[0].prompt
    cases[1] = replace(cases[1], prompt=first, target_new=labels[first].text.strip())
    path = tmp_path_factory.mktemp("ke") / "cases.json"
    write_cases_file(path, "counterfact", cases, TEMPLATE, labels)
    return path, cases, labels


def _native(lm, edited, cases_file) -> dict:
    _, cases, labels = cases_file
    metrics, _ = Evaluator(lm.tokenizer, TEMPLATE, batch_size=lm.batch_size, progress=False).evaluate(
        edited, cases, labels
    )
    return metrics


def _assert_same(results: dict, native: dict, task: str = "counterfact_ke") -> None:
    for key in ALL_METRIC_KEYS:
        assert results[task][f"{key},none"] * 100 == pytest.approx(native[key], abs=1e-9), key


@pytest.mark.parametrize("per_row", [False, True], ids=["unedited", "per-row-edit"])
def test_counterfact_ke_equals_native(lm, cases_file, per_row):
    lm.edited = RowShift(lm.model, lm.tokenizer) if per_row else Edited(lm.model, lm.tokenizer)
    try:
        results = evaluate_tasks(lm, ["counterfact_ke", "counterfact_ke_generality_tf"], cases=cases_file[0])
        native = _native(lm, lm.edited, cases_file)
    finally:
        lm.edited = Edited(lm.model, lm.tokenizer)
    _assert_same(results, native)
    assert results["counterfact_ke_generality_tf"]["generality_tf,none"] * 100 == pytest.approx(
        native["generality_tf"], abs=1e-9
    )
    if not per_row:
        assert native["locality_ag"] == 100.0 and native["reliability_ag"] > 0  # a non-trivial check


def test_native_scoring_shows_progress_bars(lm, cases_file, capsys):
    """lm-eval's own bars cover only the requests HFLM runs; the native path shows its own."""
    evaluate_tasks(lm, ["counterfact_ke"], cases=cases_file[0])
    err = capsys.readouterr().err
    assert "meg-harness teacher forcing" in err and "meg-harness greedy answers" in err


def test_cases_file_round_trip(cases_file):
    path, cases, labels = cases_file
    source = read_cases_file(path)
    assert source.cases == cases and source.template == TEMPLATE
    assert {q: (t, tuple(i)) for q, (t, i) in source.labels.items()} == {
        q: (g.text, g.answer_ids) for q, g in labels.items()
    }
    docs = load_ke_docs("counterfact", cases=str(path))["test"]
    assert len(docs) == sum(1 + len(c.rephrases) + len(c.locality) for c in cases)
    with pytest.raises(HarnessError, match="dataset 'counterfact'"):
        load_ke_docs("zsre", cases=str(path))


def test_missing_cases_are_a_clear_error():
    with pytest.raises(HarnessError, match="--metadata cases=FILE"):
        load_ke_docs("counterfact", pretrained="x")
    with pytest.raises(HarnessError, match="--model edited"):
        tf_value((-1.5, False), "counterfact_ke")  # a plain `hf` response


def test_score_is_the_native_harmonic_mean():
    items = [("edit", 1.0, True), ("edit", 0.5, False), ("rephrase", 1.0, True), ("locality", 0.25, True)]
    expected = 1 / ((1 / 0.75 + 1 / 0.5 + 1 + 1 + 1 / 0.25 + 1) / 6)
    assert ke_score(items) == pytest.approx(expected)
    assert ke_score(items + [("locality", 0.0, False)]) == pytest.approx(
        1 / ((1 / 0.75 + 2 + 2 + 1 / 0.125 + 2) / 6)
    )
    assert math.isclose(ke_score([("edit", 0.0, False)]), 0.0)


def test_mquake_documents_and_aggregates():
    from meg_harness.data.edit_case import EditCase, MultiHop
    from meg_harness.store import CasesFile

    case = EditCase(
        "7",
        "Q1?",
        "s",
        "A1",
        multi_hop=MultiHop(("M1?", "M2?"), "N", ("N2",)),
        extra={"edits": [{"prompt": "Q1?", "target_new": "A1"}, {"prompt": "Q2?", "target_new": "A2"}]},
    )
    docs = mquake_docs(CasesFile("mquake", TEMPLATE, [case], {}))
    assert [(d["meg_harness"]["kind"], d["meg_harness"]["question"]) for d in docs] == [
        ("edit", "Q1?"),
        ("edit", "Q2?"),
        ("multi_hop", "M1?"),
        ("multi_hop", "M2?"),
    ]
    assert docs[2]["aliases"] == ["N2"] and docs[0]["query"] == TEMPLATE.format("Q1?")
    items = [("a", True), ("a", False), ("b", True)]
    assert all_per_case(items) == 0.5 and any_per_case(items) == 1.0


def test_task_yamls_are_indexed():
    from lm_eval.tasks import TaskManager

    names = set(TaskManager(include_path=str(TASKS_PATH), include_defaults=False).all_tasks)
    for dataset in ("counterfact", "zsre"):
        assert f"{dataset}_ke" in names
        for kind in ("reliability", "generality", "locality"):
            assert {f"{dataset}_ke_{kind}_tf", f"{dataset}_ke_{kind}_ag"} <= names
    assert {"mquake_ke", "unke_ke"} <= names
    for bench in ("bbh", "gsm8k", "mmlu", "rte", "sst2"):
        assert {f"{bench}_meg", f"{bench}_meg_local"} <= names
