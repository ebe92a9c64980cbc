"""Helpers of the baseline tests (deeper tiny models, edit cases, target NLL) and the tests of these helpers.

Locate-then-edit needs layers above the last edited one, and a random model with the default init
(std 0.02) has nearly flat logits; these models have 4 layers and init std 0.2.
"""

from __future__ import annotations

import copy
import functools

import torch

from meg_harness.baselines.ft import _examples, target_nll
from meg_harness.data.edit_case import EditCase
from meg_harness.prompts import get_template

TEMPLATE = get_template("gptj")
CASES = [
    EditCase("0", "The capital of France is", "France", "Rome", prompt_template="The capital of {} is"),
    EditCase("1", "Paris is located in", "Paris", "Spain"),
    EditCase("2", "The language of Germany is", "Germany", "Finnish"),
    EditCase("3", "Berlin is a city in", "Berlin", "Japan"),
]
STATS = dict(mom2_n_samples=60, mom2_max_length=48, mom2_batch_size=16)
LOCATE = dict(layers=[1, 2], v_num_grad_steps=15, context_prefixes=1, context_prefix_length=4, **STATS)
HPARAMS = {
    "memit": dict(LOCATE, mom2_update_weight=10),
    "pmet": dict(LOCATE, mom2_update_weight=10, kl_factor=0.0625),
    "alphaedit": dict(LOCATE, nullspace_threshold=2.0, L2=1),
    "ft": dict(layers=[1], epochs=10, batch_size=4, lr=0.3),
}


@functools.cache
def _deep(arch: str, layers: int, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from meg_harness.models.tiny import _ARCH_CONFIGS, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    kw = _ARCH_CONFIGS[arch]()
    kw["n_layer" if arch in ("gpt2", "gptj") else "num_hidden_layers"] = layers
    ids = dict(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = AutoConfig.for_model(
        kw.pop("model_type"), vocab_size=len(tok), initializer_range=0.2, **ids, **kw
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), tok


def deep_model(arch: str = "gpt2", layers: int = 4, seed: int = 0):
    """A fresh copy of a random ``arch`` model with ``layers`` layers, and its tokenizer."""
    model, tok = _deep(arch, layers, seed)
    return copy.deepcopy(model), tok


@torch.no_grad()
def nll(model, tok, cases=CASES) -> torch.Tensor:
    """Mean NLL of each case's target tokens after its templated prompt."""
    return target_nll(model, tok, _examples(tok, cases, TEMPLATE, terminator=False))


def counterfact_records(cases, first_id: int = 0) -> list[dict]:
    """``cases`` as records of a flattened CounterFact file (what a run config's ``data_path`` reads), with
    case ids from ``first_id``."""
    return [
        {
            "case_id": first_id + i,
            "prompt": c.prompt,
            "subject": c.subject,
            "target_new": c.target_new,
            "ground_truth": "Paris",
            "rephrase_prompt": c.rephrases[0],
            "locality_prompt": c.locality[0].prompt,
            "locality_ground_truth": "French",
        }
        for i, c in enumerate(cases)
    ]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def identical(model, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- tests of these helpers -------------------------------------------------------------------------------


def test_deep_models_are_fresh_copies_with_spread_logits():
    model, tok = deep_model("gpt2", layers=4)
    assert model.config.n_layer == 4 and not model.training
    before = snapshot(model)
    assert identical(model, before)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not identical(model, before)
    again, _ = deep_model("gpt2", layers=4)  # the cached original is untouched by the change above
    assert identical(again, before)
    ids = tok([c.prompt for c in CASES[:2]], return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        spread = again(ids).logits.std().item()
        flat = _deep.__wrapped__("gpt2", 4, 0)[0]  # the same model with init std 0.2 ...
        for module in flat.modules():  # ... scaled back to the default init's 0.02
            for parameter in module.parameters(recurse=False):
                if parameter.dim() > 1:
                    parameter.mul_(0.1)
        flat_spread = flat(ids).logits.std().item()
    assert spread > 10 * flat_spread, (spread, flat_spread)


def test_nll_per_case_and_counterfact_records_load_back(tmp_path):
    import json

    from meg_harness.data import load_cases
    from meg_harness.data.edit_case import LocalityProbe

    model, tok = deep_model("gpt2")
    losses = nll(model, tok)
    assert losses.shape == (len(CASES),) and torch.isfinite(losses).all() and (losses > 0).all()
    assert torch.allclose(nll(model, tok, CASES[:1]), losses[:1])  # per case: a batch changes nothing
    cases = [
        EditCase(
            str(i),
            c.prompt,
            c.subject,
            c.target_new,
            rephrases=(f"{c.prompt} indeed",),
            locality=(LocalityProbe("The capital of Chile is"),),
        )
        for i, c in enumerate(CASES)
    ]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(counterfact_records(cases)))
    loaded = load_cases("counterfact", str(path))
    assert [(c.prompt, c.subject, c.target_new, c.target_true) for c in loaded] == [
        (c.prompt, c.subject, c.target_new, "Paris") for c in cases
    ]
    assert [c.rephrases for c in loaded] == [c.rephrases for c in cases]
    assert [[p.prompt for p in c.locality] for c in loaded] == [["The capital of Chile is"]] * len(cases)
