"""The batched evaluator equals a slow token-by-token reference, with and without per-row edits."""

from __future__ import annotations

import contextlib
import zlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from meg_harness.data.edit_case import EditCase, LocalityProbe
from meg_harness.editing.base import Edited
from meg_harness.evaluate.evaluator import Evaluator
from meg_harness.evaluate.protocol import ag_match
from meg_harness.evaluate.scoring import Probe, greedy_answers, teacher_forced_accuracy
from meg_harness.prompts import encode_query, encode_target, get_template
from tests.reference_eval import reference_generate, reference_greedy_tokens, reference_tf

SHORT = "Who?"
LONG = " ".join(["What is the name of the city that is the capital of the country"] * 6) + "?"
QUESTIONS = [
    SHORT,
    "Where is Paris?",
    LONG,
    "The capital of France is",
    "Name it",
    LONG[:120] + "?",
    "What language do they speak in Spain",
    "x",
]
TARGETS = [
    "Paris",
    "France",
    "Rome and Berlin",
    "London",
    "a",
    "the capital city of the country",
    "Spanish",
    "yes",
]


def _load(path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


class RowShift(Edited):
    """A toy per-query edit: row b's input embeddings are shifted by a vector chosen from its question."""

    def __init__(self, model, tokenizer, scale: float = 3.0):
        super().__init__(model, tokenizer)
        self.width = model.get_input_embeddings().weight.shape[1]
        self.scale = scale

    def vector(self, question: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(question.encode()))
        return self.scale * torch.randn(self.width, generator=generator)

    @contextlib.contextmanager
    def rows(self, questions):
        shift = torch.stack([self.vector(q) for q in questions])  # [batch, width]

        def hook(module, inputs, output):
            assert output.shape[0] == shift.shape[0], "batch rows must match the questions"
            return output + shift[:, None, :]

        handle = self.model.get_input_embeddings().register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def _reference(edited, probes, single_rows):
    """Reference values, each probe alone (batch of one) inside its own row context."""
    tf, text = [], []
    for probe in probes:
        context = edited.rows([probe.question]) if single_rows else contextlib.nullcontext()
        with context:
            tf.append(reference_tf(edited.model, list(probe.query_ids), list(probe.target_ids)))
            text.append(reference_generate(edited.model, edited.tokenizer, list(probe.query_ids)))
    return tf, text


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("per_row", [False, True], ids=["static", "per-row-hook"])
def test_batched_equals_reference(tiny_model_dir, arch, per_row):
    model, tokenizer = _load(tiny_model_dir(arch))
    template = get_template("gptj")
    probes = [
        Probe(q, encode_query(tokenizer, template, q), encode_target(tokenizer, t))
        for q, t in zip(QUESTIONS, TARGETS)
    ]
    lengths = sorted(len(p.query_ids) for p in probes)
    assert lengths[-1] > 4 * lengths[0], "prompts must have very different lengths"
    edited = RowShift(model, tokenizer) if per_row else Edited(model, tokenizer)
    # Half the targets: the model's own 2 greedy tokens + 2 text-target tokens, so TF takes values
    # strictly between 0 and 1 as well as the 0s of random text targets.
    for i in range(0, len(probes), 2):
        with edited.rows([probes[i].question]) if per_row else contextlib.nullcontext():
            own = reference_greedy_tokens(model, list(probes[i].query_ids), 2)
        probes[i] = Probe(probes[i].question, probes[i].query_ids, tuple(own) + probes[i].target_ids[:2])
    ref_tf, ref_text = _reference(edited, probes, per_row)
    assert any(0 < v < 1 for v in ref_tf) and 0.0 in ref_tf
    for batch_size in (1, 8):
        tf = teacher_forced_accuracy(edited, probes, batch_size=batch_size)
        answers = greedy_answers(edited, probes, batch_size=batch_size)
        assert tf == pytest.approx(ref_tf, abs=0), f"TF differs at batch size {batch_size}"
        assert [a.text for a in answers] == ref_text, f"AG text differs at batch size {batch_size}"
        assert [ag_match(a.text, t) for a, t in zip(answers, TARGETS)] == [
            ag_match(r, t) for r, t in zip(ref_text, TARGETS)
        ]


def test_per_row_hook_changes_outputs(tiny_model_dir):
    """The toy per-row edit is not a no-op: otherwise the per-row test above would prove nothing."""
    model, tokenizer = _load(tiny_model_dir("llama"))
    template = get_template("gptj")
    probes = [
        Probe(q, encode_query(tokenizer, template, q), encode_target(tokenizer, t))
        for q, t in zip(QUESTIONS, TARGETS)
    ]
    plain = [a.text for a in greedy_answers(Edited(model, tokenizer), probes, batch_size=8)]
    shifted = [a.text for a in greedy_answers(RowShift(model, tokenizer), probes, batch_size=8)]
    assert plain != shifted


def _cases():
    return [
        EditCase(
            str(i),
            q,
            q.split()[0],
            t,
            rephrases=(q + " now",),
            locality=(LocalityProbe(QUESTIONS[(i + 3) % len(QUESTIONS)]),),
        )
        for i, (q, t) in enumerate(zip(QUESTIONS, TARGETS))
    ]


def test_unedited_model_has_perfect_locality(tiny_model_dir, tmp_path):
    model, tokenizer = _load(tiny_model_dir("gpt2"))
    evaluator = Evaluator(tokenizer, get_template("gptj"), batch_size=4, cache_dir=tmp_path, progress=False)
    unedited = Edited(model, tokenizer)
    labels = evaluator.locality_labels(unedited, _cases(), "fp")
    metrics, items = evaluator.evaluate(unedited, _cases(), labels)
    assert metrics["locality_ag"] == 100.0 and metrics["locality_tf"] == 100.0
    assert metrics["counts"] == {"cases": 8, "edit": 8, "rephrase": 8, "locality": 8}
    assert len(items) == 24 and {i["kind"] for i in items} == {"edit", "rephrase", "locality"}
    edit_items = [i for i in items if i["kind"] == "edit"]
    assert metrics["reliability_ag"] == 100.0 * sum(i["ag"] for i in edit_items) / 8


def test_locality_labels_are_cached(tiny_model_dir, tmp_path):
    model, tokenizer = _load(tiny_model_dir("gpt2"))
    evaluator = Evaluator(tokenizer, get_template("gptj"), cache_dir=tmp_path, progress=False)
    first = evaluator.locality_labels(Edited(model, tokenizer), _cases(), "fp")
    assert len(list((tmp_path / "unedited_answers").glob("*.json"))) == 1

    class Exploding(Edited):
        @contextlib.contextmanager
        def rows(self, questions):
            raise AssertionError("the cache must answer without running the model")
            yield

    second = evaluator.locality_labels(Exploding(model, tokenizer), _cases(), "fp")
    assert second == first


def test_locality_detects_a_changed_model(tiny_model_dir, tmp_path):
    """Locality is scored against the UNEDITED answers: a per-row edit lowers it below 100."""
    model, tokenizer = _load(tiny_model_dir("llama"))
    evaluator = Evaluator(tokenizer, get_template("gptj"), cache_dir=tmp_path, progress=False)
    labels = evaluator.locality_labels(Edited(model, tokenizer), _cases(), "fp")
    metrics, _ = evaluator.evaluate(RowShift(model, tokenizer, scale=10.0), _cases(), labels)
    assert metrics["locality_tf"] < 100.0
