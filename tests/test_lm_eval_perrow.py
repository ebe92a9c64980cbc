"""PerRowHFLM routes every row of HFLM's padded, reordered batches on its own question; the models load
saved edits."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from meg_harness.editing.base import Edited  # noqa: E402
from meg_harness.errors import HarnessError  # noqa: E402
from meg_harness.prompts import get_template  # noqa: E402
from tests.test_lm_eval_support import RowShift, tiny_lm  # noqa: E402

QUESTIONS = [
    "Who?",
    "Where is Paris?",
    "What language do they speak in Spain",
    "x",
    "Name the capital of Italy",
]
PAIRS = [  # shared contexts, continuations of several lengths: HFLM groups, sorts and pads them
    (q, c) for q in QUESTIONS for c in (" Paris", " the capital city of France", " yes")
]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return tiny_lm(tiny_model_dir("llama"), template="gptj")


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i, metadata=("t", i, 1)) for i, a in enumerate(args)]


def _alone(lm, method: str, requests: list[Instance]) -> list:
    """Each request in a batch of its own (no padding, no grouping)."""
    previous, lm.batch_size_per_gpu = lm.batch_size_per_gpu, 1
    try:
        return [getattr(lm, method)([r])[0] for r in requests]
    finally:
        lm.batch_size_per_gpu = previous


def test_loglikelihood_rows_are_routed_on_their_own_questions(lm):
    template = get_template("gptj")
    args = [(template.format(q), c) for q, c in PAIRS]
    lm.edited = RowShift(lm.model, lm.tokenizer)
    try:
        batched = lm.loglikelihood(_requests("loglikelihood", args))
        assert all(len(q) == 4 for q in lm.edited.calls[:1]) and len(lm.edited.calls) > 1
        assert {q for call in lm.edited.calls for q in call} == set(QUESTIONS)  # template stripped
        alone = _alone(lm, "loglikelihood", _requests("loglikelihood", args))
        lm.edited = Edited(lm.model, lm.tokenizer)
        unedited = lm.loglikelihood(_requests("loglikelihood", args))
    finally:
        lm.edited = Edited(lm.model, lm.tokenizer)
    for (ll, greedy), (ll_alone, greedy_alone) in zip(batched, alone):
        assert ll == pytest.approx(ll_alone, abs=1e-4) and greedy == greedy_alone
    assert max(abs(a[0] - b[0]) for a, b in zip(batched, unedited)) > 0.1  # the edit does change the rows


def test_generation_rows_are_routed_on_their_own_questions(lm):
    until = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    args = [(f"Question: {q}\nAnswer:", dict(until)) for q in QUESTIONS]
    lm.edited = RowShift(lm.model, lm.tokenizer)
    try:
        batched = lm.generate_until(_requests("generate_until", args))
        assert {q for call in lm.edited.calls for q in call} == {a[0] for a in args}  # no template match
        alone = _alone(lm, "generate_until", _requests("generate_until", args))
    finally:
        lm.edited = Edited(lm.model, lm.tokenizer)
    assert batched == alone


def test_documents_name_the_routing_question(lm):
    doc = {"meg_harness_question": "the raw question"}
    lm.edited = RowShift(lm.model, lm.tokenizer)
    try:
        lm.loglikelihood(
            [Instance("loglikelihood", doc, ("some long prompt", " yes"), 0, metadata=("t", 0, 1))]
        )
    finally:
        calls, lm.edited = lm.edited.calls, Edited(lm.model, lm.tokenizer)
    assert calls == [["the raw question"]]


def test_indistinguishable_rows_are_an_error(lm):
    lm._put(lm._row_stripped, b"k", "a")
    assert lm._question(None, [5, 6]) == lm.tok_decode([5, 6])
    from meg_harness.lm_eval_plugin.perrow import _digest

    lm._put(lm._row_stripped, _digest([5, 6]), "first")
    lm._put(lm._row_stripped, _digest([5, 6]), "second")
    try:
        with pytest.raises(HarnessError, match="batch_size 1"):
            lm._row_question([5, 6, 0, 0])
    finally:
        lm._row_stripped.clear()


def test_edited_model_applies_a_saved_delta(tiny_model_dir, tmp_path):
    from meg_harness.baselines.delta import DeltaEdited, WeightDelta, save_delta_artifact

    base = tiny_lm(tiny_model_dir("gpt2"))
    name, param = next((n, p) for n, p in base.model.named_parameters() if p.ndim == 2)
    update = torch.full_like(param, 0.01)
    delta = WeightDelta()
    delta.updates[name] = update
    save_delta_artifact(DeltaEdited(base.model, base.tokenizer, delta), tmp_path / "plain", "ft", None)
    edited = tiny_lm(tiny_model_dir("gpt2"), delta=str(tmp_path / "plain"))
    assert torch.equal(edited.model.get_parameter(name), param.detach() + update)

    (tmp_path / "plain" / "editor.json").write_text(json.dumps({"method": "ft", "hparams": {}}))
    again = tiny_lm(tiny_model_dir("gpt2"), delta=str(tmp_path / "plain"))
    assert torch.equal(again.model.get_parameter(name), param.detach() + update)


def test_meg_model_errors_point_to_meg_harness_run(tiny_model_dir, tmp_path):
    from meg_harness.lm_eval_plugin.models import MegLM, load_edited

    with pytest.raises(HarnessError, match="meg_path"):
        MegLM(pretrained=str(tiny_model_dir("llama")), device="cpu")
    with pytest.raises(HarnessError, match="meg-harness run"):
        load_edited(tmp_path, None, None)
    (tmp_path / "editor.json").write_text(json.dumps({"method": "ft"}))
    with pytest.raises(HarnessError, match="--model edited"):
        load_edited(tmp_path, None, None)
    if not _meg_loader_registered():  # until MeG's Editor implements load()
        (tmp_path / "editor.json").write_text(json.dumps({"method": "meg"}))
        with pytest.raises(HarnessError, match="cannot load MeG artifacts yet"):
            load_edited(tmp_path, None, None)


def _meg_loader_registered() -> bool:
    from meg_harness.editing.base import Editor
    from meg_harness.editing.registry import get_editor_class

    try:
        return get_editor_class("meg").load.__func__ is not Editor.load.__func__
    except HarnessError:
        return False
