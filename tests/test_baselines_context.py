"""MEMIT's context templates and the answer terminator: keys averaged per context type (the bare prompt
weighs as much as all prefixes together), prefixes seeded and cached, targets ending in the terminator."""

from __future__ import annotations

import pytest
import torch
from test_baselines_support import CASES, HPARAMS, TEMPLATE, deep_model

from meg_harness.baselines import prefixes as prefixes_module
from meg_harness.baselines.ft import FT, _examples
from meg_harness.baselines.keys import edit_keys
from meg_harness.baselines.plan import build_plans
from meg_harness.baselines.prefixes import cached_prefixes
from meg_harness.models.adapters import get_adapter
from meg_harness.prompts import encode_target

PREFIXES = ["Because the river was cold. ", "I went home. ", "You know it. "]


def _key_of(model, tok, module_name: str, text: str, index: int) -> torch.Tensor:
    """The module's input at token ``index`` of ``text``, read with a plain forward pre-hook."""
    captured = {}
    module = model.get_submodule(module_name)
    handle = module.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([tok(text)["input_ids"]]))
    finally:
        handle.remove()
    return captured["x"][0, index].float()


def test_edit_keys_average_per_context_type_as_memit_compute_ks():
    model, tok = deep_model("gpt2")
    module = get_adapter(model).rewrite_module_tmp.format(1)
    plans = build_plans(tok, CASES[:2], TEMPLATE, PREFIXES)
    assert plans[0].context_types == (1, 3)

    keys = edit_keys(model, tok, plans, module)

    for plan, case, got in zip(plans, CASES, keys):
        per_context = []
        for prefix, row in zip(["", *PREFIXES], plan.contexts):
            text = TEMPLATE.format(prefix + case.prompt)
            per_context.append(_key_of(model, tok, module, text, row.index))
        bare, prefixed = per_context[0], torch.stack(per_context[1:])
        by_type = (bare + prefixed.mean(0)) / 2  # = 1/2 bare + 1/6 each prefix
        assert torch.allclose(got, by_type, atol=1e-5)
        even = torch.stack(per_context).mean(0)  # the old, even weighting: 1/4 each
        assert not torch.allclose(got, even, atol=1e-3)


def test_edit_keys_without_prefixes_are_the_bare_prompts_keys():
    model, tok = deep_model("gpt2")
    module = get_adapter(model).rewrite_module_tmp.format(1)
    plans = build_plans(tok, CASES[:2], TEMPLATE)
    keys = edit_keys(model, tok, plans, module)
    for plan, case, got in zip(plans, CASES, keys):
        expected = _key_of(model, tok, module, TEMPLATE.format(case.prompt), plan.contexts[0].index)
        assert torch.allclose(got, expected, atol=1e-5)


def test_prefixes_are_seeded_cached_and_memit_long(monkeypatch):
    model, tok = deep_model("gpt2")
    starts = ["The", "Therefore", "Because", "I", "You"]
    forwards = []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    first = cached_prefixes(model, tok, 5, 6, seed=0, fingerprint="fp")
    handle.remove()
    assert len(first) == 5 and all(p.endswith(". ") for p in first)
    assert all(p.startswith(start) for p, start in zip(first, starts))
    # 6 tokens in all: the start word's and the sampled ones (MEMIT's max_out_len), one forward per sample
    assert len(forwards) == sum(max(1, 6 - len(tok(start)["input_ids"])) for start in starts)

    def fail(*_args, **_kwargs):
        raise AssertionError("generated again instead of read from the cache")

    monkeypatch.setattr(prefixes_module, "generate_prefixes", fail)
    assert cached_prefixes(model, tok, 5, 6, seed=0, fingerprint="fp") == first
    assert cached_prefixes(model, tok, 0, 6, seed=0, fingerprint="fp") == []
    monkeypatch.undo()
    other_seed = cached_prefixes(model, tok, 5, 6, seed=1, fingerprint="fp")
    assert other_seed != first


@pytest.mark.parametrize("terminator", [False, True])
def test_plan_targets_end_with_the_templates_terminator_when_asked(terminator):
    _, tok = deep_model("gpt2")
    plan = build_plans(tok, CASES[:1], TEMPLATE, terminator=terminator)[0]
    target = encode_target(tok, CASES[0].target_new)
    newline = tuple(tok(TEMPLATE.terminator, add_special_tokens=False)["input_ids"])
    assert plan.target_ids == (target + newline if terminator else target)


def _terminator_logprob(model, tok) -> float:
    """Mean log-probability of the terminator right after each case's answer."""
    newline = tok(TEMPLATE.terminator, add_special_tokens=False)["input_ids"][0]
    total = 0.0
    with torch.no_grad():
        for seq, _ in _examples(tok, CASES, TEMPLATE, terminator=False):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            total += float(torch.log_softmax(logits, -1)[newline])
    return total / len(CASES)


def test_ft_with_terminator_makes_the_answer_end_there():
    results = {}
    for terminator in (False, True):
        model, tok = deep_model("gpt2")
        ft = FT({**HPARAMS["ft"], "terminator": terminator})
        ft.progress = False
        ft.fit(model, tok, CASES, TEMPLATE)
        results[terminator] = _terminator_logprob(model, tok)
    assert results[True] > results[False] + 1.0, results
