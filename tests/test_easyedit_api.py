"""The EasyEdit-style API: HyperParams, BaseEditor.batch_edit, apply_meg_to_model's persistent per-row
routing, and registration with a (stand-in) easyeditor package. Tiny models only."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
import yaml

from meg_harness import easyedit
from meg_harness.data import load_cases
from meg_harness.easyedit import (
    BaseEditor,
    HyperParams,
    RowRouting,
    apply_meg_to_model,
    as_hparams,
    prepare_requests,
    question_from_text,
    register_with_easyedit,
    request_to_case,
    summary_metrics,
)
from meg_harness.editing.base import Edited
from meg_harness.errors import HarnessError
from meg_harness.meg.hparams import MEGHyperParams
from meg_harness.meg.model import MegEdited
from meg_harness.prompts import get_template

TEMPLATE = get_template("gptj")
FT = {"alg_name": "FT", "layers": [1], "epochs": 30, "batch_size": 4, "lr": 0.3}


def meg_hparams(encoder_dir: str, threshold: float = 0.1) -> dict:
    """A tiny, fast MeG configuration (few generator steps: the neurons need not be accurate here)."""
    return {
        "alg_name": "MEG",
        "layer": 1,
        "encoder": {"name": encoder_dir, "tuning": "frozen"},
        "familiarity": {"hidden": 64, "n_blocks": 2, "lr": 0.01, "max_epochs": 300, "threshold": threshold},
        "collect": {"lr": 0.1, "max_steps": 20, "check_every": 4, "batch_size": 4, "shard_size": 4},
        "generator": {"kind": "mlp", "hidden": 128, "depth": 2},
        "diffusion": {"ddim_steps": 5},
        "train": {
            "lr": 3e-3,
            "batch_size": 32,
            "max_steps": 150,
            "eval_every": 150,
            "eval_ddim_steps": 5,
            "ema_decay": 0.9,
            "ema_warmup": False,
            "success_l2": 0.0,
        },
    }


@pytest.fixture(scope="module")
def cases():
    return load_cases("counterfact", None)[:3]


def requests_of(cases) -> list[dict]:
    """EasyEdit request dicts for EditCases."""
    return prepare_requests(
        [c.prompt for c in cases],
        [c.target_new for c in cases],
        ground_truth=[c.target_true for c in cases],
        subject=[c.subject for c in cases],
        rephrase_prompts=[list(c.rephrases) for c in cases],
        locality_inputs={
            "neighborhood": {
                "prompt": [c.locality[0].prompt for c in cases],
                "ground_truth": [c.locality[0].gold for c in cases],
            }
        },
    )


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(model, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- hyper-parameters ----------------------------------------------------------------------------------------
def test_from_hparams_reads_memit_ft_and_meg_yaml(tmp_path, encoder_dir):
    memit = tmp_path / "memit.yaml"
    memit.write_text("alg_name: MEMIT\nmodel_name: tiny\nlayers: [1]\nmom2_update_weight: 1e4\ndevice: 0\n")
    hp = HyperParams.from_hparams(memit)
    assert (hp.method, hp.alg_name, hp.layers, hp["model_name"]) == ("memit", "MEMIT", [1], "tiny")
    assert hp.mom2_update_weight == 10000.0  # EasyEdit's scientific-notation strings become floats
    assert not hasattr(hp, "batch_size") and "device" not in hp.editor_hparams()
    assert hp.to_dict()["layers"] == [1]

    ft = tmp_path / "ft"  # EasyEdit appends .yaml to a path without suffix
    ft.with_suffix(".yaml").write_text(yaml.safe_dump(FT))
    assert HyperParams.from_hparams(ft).method == "ft"

    meg = tmp_path / "meg.yaml"
    meg.write_text(yaml.safe_dump(meg_hparams(encoder_dir)))
    hp = HyperParams.from_hparams(meg)
    assert hp.method == "meg" and hp.layer == 1 and hp.familiarity["threshold"] == 0.1
    # MEGHyperParams is accepted wherever a HyperParams is
    typed = MEGHyperParams.from_hparams(meg)
    assert as_hparams(typed).method == "meg"
    assert BaseEditor.from_hparams(typed).alg_name == "MEG"
    assert BaseEditor.from_hparams(str(meg)).method == "meg"


def test_bad_alg_name_names_file_and_field(tmp_path):
    missing = tmp_path / "missing.yaml"
    missing.write_text("layers: [1]\n")
    with pytest.raises(HarnessError) as error:
        HyperParams.from_hparams(missing)
    assert error.value.field == "alg_name" and str(missing) in str(error.value)
    assert "\n" not in str(error.value)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("alg_name: ROMEO\n")
    with pytest.raises(HarnessError, match="unknown alg_name 'ROMEO'") as error:
        HyperParams.from_hparams(unknown)
    assert error.value.field == "alg_name" and error.value.file == str(unknown)
    typo = tmp_path / "typo.yaml"
    typo.write_text("alg_name: FT\nlayerz: [1]\n")
    with pytest.raises(HarnessError) as error:
        HyperParams.from_hparams(typo)
    assert error.value.field == "layerz" and error.value.file == str(typo)


# -- requests ---------------------------------------------------------------------------------------------
def test_requests_take_easyedit_shapes():
    requests = prepare_requests(
        ["The capital of France is", "Berlin is in"],
        ["Rome", "Japan"],
        subject=["France", "Berlin"],
        rephrase_prompts=["France's capital is", ["Berlin lies in", "Berlin can be found in"]],
        locality_inputs={"neighborhood": {"prompt": ["Madrid is in", None], "ground_truth": ["Spain", None]}},
    )
    assert requests[0]["locality"] == {"neighborhood": {"prompt": "Madrid is in", "ground_truth": "Spain"}}
    assert requests[1]["locality"] == {} and requests[1]["ground_truth"] == "<|endoftext|>"
    first, second = (request_to_case(i, r) for i, r in enumerate(requests))
    assert first.rephrases == ("France's capital is",) and first.prompt_template == "The capital of {} is"
    assert second.rephrases == ("Berlin lies in", "Berlin can be found in") and second.target_true is None
    assert first.locality[0].prompt == "Madrid is in" and first.extra["locality_keys"] == ["neighborhood"]
    with pytest.raises(HarnessError) as error:
        prepare_requests(["a", "b"], ["x"])
    assert error.value.field == "target_new"
    with pytest.raises(HarnessError) as error:
        request_to_case(3, {"prompt": "Who?", "target_new": {"str": " "}})
    assert (error.value.field, error.value.record) == ("target_new", 3)


def test_question_recovery_rule():
    text = TEMPLATE.format("Who wrote Hamlet?")
    assert question_from_text(text, TEMPLATE) == "Who wrote Hamlet?"
    assert (
        question_from_text("<s>" + text + " Shakespeare\n", TEMPLATE, special=["<s>"]) == "Who wrote Hamlet?"
    )
    known = ["Munich is a city in", "Munich is a city in the country of"]
    raw = "Munich is a city in the country of Italy"
    assert question_from_text(raw, get_template("plain"), known=known) == known[1]
    assert question_from_text("  Unseen question  ", TEMPLATE, known=known) == "Unseen question"


def test_rows_are_recovered_from_left_and_right_padding(tiny_models):
    model, tok = tiny_models("llama")
    routing = RowRouting(Edited(model, tok), TEMPLATE)
    questions = ["Who wrote Hamlet?", "What is the capital of the country of France?"]
    sequences = [tok(TEMPLATE.format(q) + " Paris")["input_ids"] for q in questions]
    width = max(map(len, sequences))
    for side in ("left", "right"):
        ids = torch.full((2, width), tok.pad_token_id)
        mask = torch.zeros((2, width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            ids[row, span], mask[row, span] = torch.tensor(seq), 1
        assert routing.questions(ids, mask) == questions


# -- BaseEditor.batch_edit -----------------------------------------------------------------------------------
def test_batch_edit_with_ft_reports_pre_and_post(tiny_models, tmp_path):
    model, tok = tiny_models("llama")
    cases = load_cases("counterfact", None)[:4]
    before = weights(model)
    editor = BaseEditor.from_hparams(HyperParams.from_dict(FT), cache_dir=tmp_path)
    request = requests_of(cases)
    metrics, edited_model, restore = editor.batch_edit(
        [r["prompt"] for r in request],
        [r["target_new"] for r in request],
        ground_truth=[r["ground_truth"] for r in request],
        subject=[c.subject for c in cases],
        rephrase_prompts=[list(c.rephrases) for c in cases],
        locality_inputs={
            "neighborhood": {
                "prompt": [[p.prompt for p in c.locality] for c in cases],
                "ground_truth": [[p.gold for p in c.locality] for c in cases],
            }
        },
        model=model,
        tok=tok,
        template=TEMPLATE,
    )
    try:
        assert edited_model is model and len(metrics) == 4
        first = metrics[0]
        assert first["case_id"] == 0 and first["requested_rewrite"]["target_new"] == cases[0].target_new
        assert first["time"] > 0
        for stage in ("pre", "post"):
            entry = first[stage]
            assert len(entry["rewrite_acc"]) == 1 and len(entry["rewrite_ag"]) == 1
            assert len(entry["rephrase_acc"]) == len(cases[0].rephrases)
            assert len(entry["locality"]["neighborhood_acc"]) == len(cases[0].locality)
        assert first["pre"]["locality"]["neighborhood_ag"] == [1.0] * len(cases[0].locality)
        pre, post = summary_metrics(metrics, "pre"), summary_metrics(metrics)
        assert post["rewrite_acc"] > pre["rewrite_acc"], (pre, post)
        assert set(post) >= {"rewrite_acc", "rewrite_ag", "rephrase_acc", "rephrase_ag", "locality"}
        assert not same_weights(model, before) and set(restore) and all(k in before for k in restore)
    finally:
        restore()
    assert same_weights(model, before)
    restore()  # idempotent


def test_sequential_and_keep_original_weight(tiny_models, tmp_path):
    model, tok = tiny_models("llama")
    before = weights(model)
    editor = BaseEditor(FT, model=model, tok=tok, template=TEMPLATE, cache_dir=tmp_path)
    metrics, _, restore = editor.batch_edit(
        ["The capital of France is", "Berlin is a city in"], ["Rome", "Japan"], sequential_edit=True
    )
    assert len(metrics) == 2 and "locality" in metrics[0]["post"] and not same_weights(model, before)
    restore()
    assert same_weights(model, before)
    _, _, restore = editor.batch_edit(["The capital of France is"], ["Rome"], keep_original_weight=True)
    assert same_weights(model, before) and restore.done


def test_apply_to_model_returns_easyedit_weights_copy(tiny_models, tmp_path):
    model, tok = tiny_models("llama")
    before = weights(model)
    requests = [{"prompt": "The capital of France is", "target_new": {"str": "Rome"}, "subject": "France"}]
    with pytest.raises(HarnessError) as error:
        easyedit.apply_to_model("memit", model, tok, requests, FT)
    assert error.value.field == "alg_name"
    edited_model, weights_copy = easyedit.apply_to_model(
        "ft", model, tok, requests, FT, template=TEMPLATE, cache_dir=tmp_path, return_orig_weights=True
    )
    assert edited_model is model and not same_weights(model, before)
    with torch.no_grad():  # EasyEdit's own restore loop over weights_copy
        for name, original in weights_copy.items():
            model.get_parameter(name)[...] = original
    assert same_weights(model, before)
    weights_copy()
    assert same_weights(model, before)


# -- apply_meg_to_model: persistent per-row routing ----------------------------------------------------------
@pytest.fixture(scope="module")
def meg_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("meg-cache")


@pytest.fixture(scope="module")
def applied_once(tiny_models, encoder_dir, cases, meg_cache):
    model, tok = tiny_models("llama")
    hparams = MEGHyperParams.from_dict(meg_hparams(encoder_dir))
    edited_model, restore = apply_meg_to_model(
        model, tok, requests_of(cases), hparams, template=TEMPLATE, cache_dir=meg_cache
    )
    assert edited_model is model and dict(restore) == {}
    yield model, restore
    restore()


@pytest.fixture
def applied(applied_once):
    """The MeG-edited model with its routing installed (tests may detach it to compute references)."""
    model, restore = applied_once
    if not restore.routing.installed:
        restore.routing.install()
    return model, restore


def batch(tok, texts: list[str], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    sequences = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, sequences))
    ids = torch.full((len(texts), width), tok.pad_token_id)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span], mask[row, span] = torch.tensor(seq), 1
    return ids, mask


@torch.no_grad()
def test_plain_calls_are_routed_per_row(applied, cases, tiny_models):
    model, restore = applied
    _, tok = tiny_models("llama")
    questions = [cases[0].prompt, "Who wrote the tiny unrelated question?", cases[1].rephrases[0]]
    # the edit prompt is familiar with the fitted threshold
    assert restore.edited.routed(questions[:1]) == [True]
    # a threshold between the batch's entropies routes some rows and not others, whatever the tiny encoder
    meg = restore.edited.meg
    entropy = meg.familiarity.entropy(meg.encoder.encode(questions).to(meg.device)).cpu()
    assert float(entropy.max() - entropy.min()) > 1e-4
    threshold = float(entropy.max() + entropy.min()) / 2
    edited = MegEdited(model, tok, dataclasses.replace(meg, threshold=threshold), TEMPLATE)
    routing = RowRouting(edited, TEMPLATE).install()  # replaces the fixture's routing
    assert not restore.routing.installed
    ids, mask = batch(tok, [TEMPLATE.format(q) for q in questions], "right")
    hooked = model(input_ids=ids, attention_mask=mask).logits
    routing.remove()
    plain = model(input_ids=ids, attention_mask=mask).logits
    with edited.rows(questions):
        reference = model(input_ids=ids, attention_mask=mask).logits
    routed = edited.routed(questions)
    assert set(routed) == {True, False}
    assert torch.equal(hooked, reference)  # the hooks recovered every row's question
    for row, flag in enumerate(routed):
        # a routed row is modified; a row routed away gets exactly the unedited logits
        assert torch.equal(hooked[row], plain[row]) is not flag, (row, flag)


@torch.no_grad()
def test_raw_easyedit_prompts_route_on_the_known_request_prompt(applied, cases, tiny_models):
    model, restore = applied
    _, tok = tiny_models("llama")
    ids, mask = batch(tok, [cases[0].prompt + " " + cases[0].target_new])
    hooked = model(input_ids=ids, attention_mask=mask).logits
    restore.routing.remove()
    with restore.edited.rows([cases[0].prompt]):
        reference = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(hooked, reference)


@torch.no_grad()
def test_generate_matches_a_greedy_loop_under_rows(applied, cases, tiny_models):
    model, restore = applied
    _, tok = tiny_models("llama")
    questions = [cases[0].prompt, "Who wrote the tiny unrelated question?"]
    ids, mask = batch(tok, [TEMPLATE.format(q) for q in questions], "left")
    generated = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
    )[:, ids.shape[1] :]
    assert restore.routing.last_questions == questions  # decode steps reused the prefill's questions
    restore.routing.remove()
    tokens, attention, steps = ids, mask, []
    with restore.edited.rows(questions):
        for _ in range(generated.shape[1]):
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=tokens, attention_mask=attention, position_ids=positions).logits
            step = logits[:, -1].argmax(-1, keepdim=True)
            steps.append(step)
            tokens = torch.cat([tokens, step], 1)
            attention = torch.cat([attention, torch.ones_like(step)], 1)
    assert torch.equal(generated, torch.cat(steps, 1))


@torch.no_grad()
def test_calls_the_routing_cannot_serve_fail_cleanly(applied, tiny_models):
    model, restore = applied
    _, tok = tiny_models("llama")
    with pytest.raises(HarnessError, match="needs input_ids") as error:
        model(inputs_embeds=torch.zeros(1, 3, model.config.hidden_size))
    assert error.value.field == "input_ids"
    fresh = RowRouting(restore.edited, TEMPLATE).install()
    ids, _ = batch(tok, ["Who wrote it?"])
    cache = model(input_ids=ids, use_cache=True).past_key_values
    fresh.last_questions = None
    with pytest.raises(HarnessError, match="without a prefill") as error:
        model(input_ids=ids[:, -1:], past_key_values=cache)
    assert error.value.field == "past_key_values"
    assert fresh._open == []  # every forward left its rows() context, failed ones included
    fresh.remove()


@torch.no_grad()
def test_restore_makes_the_model_bit_identical(applied, cases, tiny_models):
    model, restore = applied
    _, tok = tiny_models("llama")
    ids, mask = batch(tok, [TEMPLATE.format(cases[0].prompt), TEMPLATE.format("Who wrote it?")], "left")
    hooked = model(input_ids=ids, attention_mask=mask).logits
    restore()
    assert not easyedit.detach_routing(model)
    base = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(hooked[0], base[0])
    restore.routing.install()
    restore()
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)


@torch.no_grad()
def test_threshold_zero_routes_nothing(applied, tiny_models, encoder_dir, cases, meg_cache):
    model, restore = applied
    _, tok = tiny_models("llama")
    ids, mask = batch(tok, [TEMPLATE.format(cases[0].prompt), TEMPLATE.format("Who wrote it?")], "left")
    restore.routing.remove()
    base = model(input_ids=ids, attention_mask=mask).logits
    restore.routing.install()
    hparams = HyperParams.from_dict(meg_hparams(encoder_dir, threshold=0.0))  # H < 0 never holds
    # the fixture's routing is replaced, not stacked (neuron and generator come from the cache)
    edited_model, never = apply_meg_to_model(
        model, tok, requests_of(cases), hparams, template=TEMPLATE, cache_dir=meg_cache
    )
    assert not restore.routing.installed and never.routing.installed
    assert torch.equal(edited_model(input_ids=ids, attention_mask=mask).logits, base)
    never()
    assert not easyedit.detach_routing(model)


# -- registration --------------------------------------------------------------------------------------------
def test_register_with_easyedit(monkeypatch):
    package = types.ModuleType("easyeditor")
    util = types.ModuleType("easyeditor.util")
    alg_dict = types.ModuleType("easyeditor.util.alg_dict")
    alg_dict.ALG_DICT = {"MEMIT": object()}
    package.util, util.alg_dict = util, alg_dict
    for name, module in (
        ("easyeditor", package),
        ("easyeditor.util", util),
        ("easyeditor.util.alg_dict", alg_dict),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    assert register_with_easyedit() is True
    assert alg_dict.ALG_DICT["MEG"] is apply_meg_to_model and "MEMIT" in alg_dict.ALG_DICT
    assert package.MEGHyperParams is MEGHyperParams


def test_register_without_easyedit(monkeypatch):
    for name in ("easyeditor", "easyeditor.util", "easyeditor.util.alg_dict"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails with ImportError
    assert register_with_easyedit() is False
