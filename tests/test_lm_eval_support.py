"""Helpers of the lm-eval plugin tests (a tiny lm-eval model, a toy per-row edit, our tasks), tested."""

from __future__ import annotations

import contextlib
import zlib
from pathlib import Path

import pytest
import torch

from meg_harness.editing.base import Edited
from meg_harness.shipped import tasks_root

TASKS_PATH = tasks_root()  # what `meg-harness tasks-path` prints


class RowShift(Edited):
    """A toy per-query edit: row b's input embeddings are shifted by a vector seeded by its question."""

    def __init__(self, model, tokenizer, scale: float = 3.0) -> None:
        super().__init__(model, tokenizer)
        self.width = model.get_input_embeddings().weight.shape[1]
        self.scale = scale
        self.calls: list[list[str]] = []

    def vector(self, question: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(question.encode()))
        return self.scale * torch.randn(self.width, generator=generator)

    @contextlib.contextmanager
    def rows(self, questions):
        self.calls.append(list(questions))
        shift = torch.stack([self.vector(q) for q in questions])

        def hook(module, inputs, output):
            assert output.shape[0] == shift.shape[0], "batch rows must match the questions"
            return output + shift[:, None, :]

        handle = self.model.get_input_embeddings().register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def tiny_lm(path: Path, batch_size: int = 4, **kwargs):
    """The ``edited`` lm-eval model (no delta) on a tiny model, float32 on the CPU."""
    from meg_harness.lm_eval_plugin.models import EditedLM

    return EditedLM(pretrained=str(path), batch_size=batch_size, device="cpu", **kwargs)


def evaluate_tasks(lm, tasks: list[str], limit: int | None = None, **metadata) -> dict:
    """``simple_evaluate`` of our tasks only (lm-eval's built-in index is not built: it is slow)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_PATH), include_defaults=False, metadata=metadata)
    output = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, metadata=metadata, limit=limit, bootstrap_iters=0
    )
    return output["results"]


# -- tests of these helpers -------------------------------------------------------------------------------


def test_row_shift_moves_each_row_by_its_own_vector_and_unhooks(tiny_models):
    model, tokenizer = tiny_models("llama")
    edited = RowShift(model, tokenizer)
    questions = ["Where is Paris?", "Who wrote Hamlet?"]
    assert torch.equal(edited.vector(questions[0]), RowShift(model, tokenizer).vector(questions[0]))
    assert not torch.allclose(edited.vector(questions[0]), edited.vector(questions[1]))
    ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
    embed = model.get_input_embeddings()
    with torch.no_grad():
        plain = embed(ids)
        with edited.rows(questions):
            shifted = embed(ids)
        after = embed(ids)
    for row, question in enumerate(questions):
        assert torch.allclose(shifted[row] - plain[row], edited.vector(question).expand(3, -1), atol=1e-6)
    assert torch.equal(after, plain)  # the hook is gone after the block
    assert edited.calls == [questions]
    with pytest.raises(AssertionError, match="batch rows must match"), edited.rows(questions[:1]):
        embed(ids)
    assert torch.equal(embed(ids), plain)  # removed after an error too


def test_tasks_path_holds_our_tasks_and_tiny_lm_builds(tiny_model_dir):
    pytest.importorskip("lm_eval")
    names = {p.stem for p in TASKS_PATH.rglob("*.yaml")}
    assert {"counterfact_ke", "zsre_ke", "mquake_ke", "unke_ke", "sst2_meg_local"} <= names
    lm = tiny_lm(tiny_model_dir("llama"), batch_size=3)
    assert lm.batch_size == 3 and lm.edited.model is lm.model
