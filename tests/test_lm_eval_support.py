"""Helpers of the lm-eval plugin tests (no tests here): a tiny lm-eval model, a toy per-row edit."""

from __future__ import annotations

import contextlib
import zlib
from importlib import resources
from pathlib import Path

import torch

from meg_harness.editing.base import Edited

TASKS_PATH = Path(str(resources.files("meg_harness") / "tasks"))


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
