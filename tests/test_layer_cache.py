"""The suffix forward of :class:`LayerCachedLM`: rows split at per-row positions, the past kept as keys and
values, give the full forward's logits and gradients at the suffix positions."""

import pytest
import torch
from test_baselines_support import deep_model

from meg_harness.models.layer_cache import LayerCachedLM, right_pad_ids
from meg_harness.models.nethook import Trace
from meg_harness.models.tiny import TINY_ARCHS

SEQS = [
    [7, 12, 30, 41, 9, 22, 18, 5, 33],
    [40, 8, 8, 19, 27, 31, 6, 50, 12, 44, 17, 23, 9, 10],
    [11, 5, 6, 29, 3, 14],
]
SPLIT = torch.tensor([3, 9, 1])  # row 1's past is the longest: rows 0 and 2 are left-padded in it
ROWS = torch.tensor([0, 1, 2])
READ_ROWS, READ_AT = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 5, 4, 0, 4])  # suffix positions


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_suffix_logits_and_gradients_equal_the_full_forward(arch):
    model, _ = deep_model(arch)
    lm = LayerCachedLM(model, 2)
    ids, mask = right_pad_ids(SEQS, 0)
    delta = torch.randn(len(SEQS), model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    site = lm.adapter.mlp_module_tmp.format(2)

    def run(suffixes: bool) -> tuple[torch.Tensor, torch.Tensor]:
        d = (0.1 * delta).requires_grad_(True)

        def add(_name, out, _input):  # the delta at each row's split position, as the z optimisation adds it
            at = torch.zeros_like(SPLIT) if suffixes else SPLIT
            return out + torch.zeros_like(out).index_put((ROWS, at), d)

        split = lm.split_rows(lm.layer_inputs(ids, mask), mask.sum(1), SPLIT) if suffixes else None
        with Trace(model, site, edit_output=add):
            if suffixes:
                logits = lm.split_logits(split, ROWS, READ_ROWS, READ_AT)
            else:
                logits = lm.full_logits(ids, mask, READ_ROWS, SPLIT[READ_ROWS] + READ_AT)
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), d.grad

    (full, full_grad), (cached, cached_grad) = run(False), run(True)
    assert full.abs().max() > 0.1 and full_grad.abs().max() > 1e-3  # logits and gradients are not trivial
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached_grad, full_grad, atol=1e-5, rtol=1e-4)
    assert len(lm.adapter.layers(model)) == model.config.num_hidden_layers  # restored


def test_rows_split_at_their_first_position_have_no_past():
    model, _ = deep_model("llama")
    lm = LayerCachedLM(model, 2)
    ids, mask = right_pad_ids(SEQS, 0)
    split = torch.zeros(len(SEQS), dtype=torch.long)  # e.g. a one-token subject that starts the prompt
    rows_split = lm.split_rows(lm.layer_inputs(ids, mask), mask.sum(1), split)
    cached = lm.split_logits(rows_split, ROWS, READ_ROWS, READ_AT)
    full = lm.full_logits(ids, mask, READ_ROWS, READ_AT)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
