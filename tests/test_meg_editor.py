"""The ``meg`` method end to end on a tiny model: fit, per-row generation, routing, the artifact."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from meg_harness.data import load_cases
from meg_harness.editing.base import Edited
from meg_harness.editing.registry import get_editor_class
from meg_harness.errors import HarnessError
from meg_harness.evaluate.evaluator import Evaluator
from meg_harness.meg.encoder import make_tiny_text_encoder
from meg_harness.meg.hparams import MEGHyperParams
from meg_harness.meg.model import MegEdited
from meg_harness.models.loading import model_fingerprint
from meg_harness.prompts import get_template

TEMPLATE = get_template("gptj")


def tiny_hparams(encoder_dir: str, **overrides) -> dict:
    hparams = {
        "alg_name": "MEG",
        "layer": 1,
        "encoder": {"name": encoder_dir, "tuning": "frozen"},
        "familiarity": {"hidden": 64, "n_blocks": 2, "max_epochs": 400, "threshold": 0.5, "lr": 0.01},
        "collect": {"lr": 0.1, "max_steps": 100, "check_every": 4, "batch_size": 6, "shard_size": 6},
        "generator": {"kind": "dit", "hidden": 64, "depth": 2, "heads": 2, "patch_size": 16},
        "diffusion": {"ddim_steps": 10},
        "train": {
            "lr": 2e-3,
            "batch_size": 32,
            "max_steps": 1500,
            "eval_every": 1500,
            "eval_ddim_steps": 10,
            "ema_decay": 0.99,
            "ema_warmup": False,
            "success_l2": 0.0,
        },
    }
    for key, value in overrides.items():
        hparams[key] = {**hparams.get(key, {}), **value} if isinstance(value, dict) else value
    return hparams


@pytest.fixture(scope="module")
def cases():
    return load_cases("counterfact", None)[:6]


@pytest.fixture(scope="module")
def fitted(tiny_models, encoder_dir, cases, tmp_path_factory):
    model, tokenizer = tiny_models("llama")
    editor = get_editor_class("meg")(tiny_hparams(encoder_dir))
    editor.cache_dir = tmp_path_factory.mktemp("cache")
    edited = editor.fit(model, tokenizer, cases, TEMPLATE)
    return editor, edited


def test_hparams_validation_names_the_field(encoder_dir):
    with pytest.raises(HarnessError) as error:
        MEGHyperParams.from_dict(tiny_hparams(encoder_dir, familiarity={"thresold": 0.2}))
    assert error.value.field == "familiarity.thresold"
    with pytest.raises(HarnessError) as error:
        MEGHyperParams.from_dict({**tiny_hparams(encoder_dir), "layer": "twelve"})
    assert error.value.field == "layer"
    with pytest.raises(HarnessError, match="non-negative") as error:
        MEGHyperParams.from_dict(tiny_hparams(encoder_dir, familiarity={"negatives": -5}))
    assert error.value.field == "familiarity.negatives"
    with pytest.raises(HarnessError, match="at least 2") as error:
        MEGHyperParams.from_dict(tiny_hparams(encoder_dir, familiarity={"num_classes": 1}))
    assert error.value.field == "familiarity.num_classes"


def test_hparams_base_file_with_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("alg_name: MEG\nlayer: 3\nfamiliarity: {threshold: 0.2, hidden: 32}\n")
    hp = MEGHyperParams.from_dict({"base": str(base), "familiarity": {"enabled": False}})
    assert (hp.layer, hp.familiarity.threshold, hp.familiarity.hidden, hp.familiarity.enabled) == (
        3,
        0.2,
        32,
        False,
    )


def test_fit_edits_and_reports(fitted, cases, tiny_models):
    editor, edited = fitted
    model, tokenizer = tiny_models("llama")
    assert isinstance(edited, MegEdited)
    # measured on this fixture: a random 2-layer model's logits are nearly flat, and no edit's neuron at
    # layer 1 makes the greedy answer exact within the 100-step budget (each runs all 100 steps); the
    # generator still learns the collected neurons, which lifts TF (below). A collection that succeeds
    # changes these numbers.
    assert edited.info["collection"] == {
        "success_rate": 0.0,
        "mean_steps": 100.0,
        "mode": "layer-cached",
        "reused": 0,
    }
    assert edited.info["generator"]["steps"] == 1500
    assert [(r["stage"], r["read"], r["total"]) for r in edited.info["reused"]] == [
        ("neurons", 0, len(cases)),
        ("generator steps", 0, 1500),
    ]  # a fresh cache: nothing read back
    assert edited.info["generator"]["evaluations"][-1]["l2_mean"] < 2.0  # normalised; a row's norm is ~11
    evaluator = Evaluator(tokenizer, TEMPLATE, batch_size=4)
    unedited = Edited(model, tokenizer)
    labels = evaluator.locality_labels(unedited, cases, model_fingerprint(model))
    before, _ = evaluator.evaluate(unedited, cases, labels)
    after, _ = evaluator.evaluate(edited, cases, labels)
    assert after["reliability_tf"] > before["reliability_tf"] + 30.0, (before, after)
    assert edited.routed([c.prompt for c in cases]) == [True] * len(cases)  # every edit prompt is familiar


def test_rows_are_independent_of_batch_composition(fitted, cases):
    _, edited = fitted
    questions = [c.prompt for c in cases[:3]] + ["Who wrote the tiny unrelated question?"]
    together, active = edited.batch_for(questions)
    fresh = MegEdited(edited.model, edited.tokenizer, edited.meg)
    for b, question in enumerate(questions):
        alone, alone_active = fresh.batch_for([question])
        assert bool(alone_active[0]) == bool(active[b])
        # same noise and condition per query; only BLAS batching may differ in the last bits
        assert torch.allclose(alone.key[0], together.key[b], atol=1e-5)
        assert torch.allclose(alone.value[0], together.value[b], atol=1e-5)


def test_routed_away_rows_are_bit_identical(fitted, tiny_models, cases):
    _, edited = fitted
    model, tokenizer = tiny_models("llama")
    never = MegEdited(model, tokenizer, edited.meg)
    never.meg = type(edited.meg)(**{**edited.meg.__dict__, "threshold": 0.0})  # H < 0 never holds
    ids = tokenizer([cases[0].prompt], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model(ids).logits
        with never.rows([cases[0].prompt]):
            hooked = model(ids).logits
        with edited.rows([cases[0].prompt]):
            routed = model(ids).logits
    assert torch.equal(plain, hooked)
    assert not torch.equal(plain, routed)


def test_no_familiarity_ablation_routes_everything(tiny_models, encoder_dir, cases, tmp_path):
    model, tokenizer = tiny_models("llama")
    editor = get_editor_class("meg")(
        tiny_hparams(encoder_dir, familiarity={"enabled": False}, train={"max_steps": 20})
    )
    editor.cache_dir = tmp_path
    edited = editor.fit(model, tokenizer, cases[:2], TEMPLATE)
    assert edited.meg.familiarity is None
    assert edited.routed(["anything at all", cases[0].prompt]) == [True, True]


def _pseudo_irrelevant_file(path: Path) -> list[dict]:
    """Four CounterFact-style records about the tiny test, unrelated to the ``cases`` fixture."""
    unrelated = [
        {
            "case_id": i,
            "prompt": f"The {w} of the tiny test is",
            "target_new": "x",
            "subject": w,
            "ground_truth": "y",
            "rephrase_prompt": f"Tiny test {w}?",
            "locality_prompt": "q",
            "locality_ground_truth": "a",
        }
        for i, w in enumerate(["colour", "owner", "maker", "home"])
    ]
    path.write_text(json.dumps(unrelated))
    return unrelated


def test_familiarity_negatives_are_drawn_from_the_pseudo_irrelevant_source(
    tiny_models, encoder_dir, cases, tmp_path
):
    source = tmp_path / "pseudo.json"
    unrelated = _pseudo_irrelevant_file(source)
    model, tokenizer = tiny_models("llama")
    hparams = tiny_hparams(
        encoder_dir,
        familiarity={"negatives": 4},
        augment={"source": str(source)},
        train={"max_steps": 20},
    )
    editor = get_editor_class("meg")(hparams)
    editor.cache_dir = tmp_path / "cache"
    edited = editor.fit(model, tokenizer, cases[:3], TEMPLATE)
    net = edited.meg.familiarity
    assert edited.info["familiarity"]["negatives"] == 4  # every record of the source
    irrelevant = net.entropy(edited.meg.encoder.encode([r["prompt"] for r in unrelated]))
    edits = net.entropy(edited.meg.encoder.encode([c.prompt for c in cases[:3]]))
    assert float(irrelevant.min()) > float(edits.max())  # trained toward log K, the edits toward 0


def test_data_augmentation_trains_irrelevant_prompts_to_the_zero_neuron(tiny_models, cases, tmp_path):
    source = tmp_path / "pseudo.json"
    unrelated = _pseudo_irrelevant_file(source)
    # An encoder whose [CLS] embeddings tell these prompts apart (cosine <= 0.9; the shared fixture's are
    # ~0.99 alike, which leaves the outcome to floating-point luck on other CPUs).
    distinct_encoder = tmp_path / "encoder"
    make_tiny_text_encoder(init_range=0.3).save(distinct_encoder)
    model, tokenizer = tiny_models("llama")
    hparams = tiny_hparams(str(distinct_encoder), augment={"enabled": True, "n": 3, "source": str(source)})
    editor = get_editor_class("meg")(hparams)
    editor.cache_dir = tmp_path / "cache"
    edited = editor.fit(model, tokenizer, cases[:3], TEMPLATE)
    assert edited.info["augment_prompts"] == 3
    meg = edited.meg
    zero = meg.normalizer.normalize(torch.zeros(1, meg.generator_config.vector_dim))
    assert edited.info["generator"]["evaluations"][-1]["l2_mean"] < 0.3 * float(
        zero.norm()
    )  # zeros learnt too
    prompt = unrelated[0]["prompt"]
    generated = meg.generate([prompt], meg.encoder.encode([prompt])).flatten()
    collected_scale = float(
        meg.generate([cases[0].prompt], meg.encoder.encode([cases[0].prompt])).flatten().norm()
    )
    assert float(generated.norm()) < 0.5 * collected_scale  # an irrelevant prompt gets a (near-)zero neuron


def test_save_then_load_in_a_fresh_process_gives_identical_metrics(fitted, tiny_model_dir, cases, tmp_path):
    editor, edited = fitted
    artifact = tmp_path / "artifact"
    editor.save(edited, artifact)
    assert {"editor.json", "config.json", "generator.safetensors", "normalizer.safetensors"} <= {
        p.name for p in artifact.iterdir()
    }
    model, tokenizer = edited.model, edited.tokenizer
    evaluator = Evaluator(tokenizer, TEMPLATE, batch_size=4, cache_dir=tmp_path / "labels")
    labels = evaluator.locality_labels(Edited(model, tokenizer), cases, model_fingerprint(model))
    metrics, _ = evaluator.evaluate(edited, cases, labels)
    script = textwrap.dedent(
        f"""
        import json, torch
        torch.set_num_threads(1)
        from meg_harness.data import load_cases
        from meg_harness.editing.base import Edited
        from meg_harness.editing.registry import get_editor_class
        from meg_harness.evaluate.evaluator import Evaluator
        from meg_harness.models import load_model
        from meg_harness.models.loading import model_fingerprint
        model, tok = load_model({str(tiny_model_dir("llama"))!r})
        edited = get_editor_class("meg").load({str(artifact)!r}, model, tok)
        cases = load_cases("counterfact", None)[:6]
        ev = Evaluator(tok, edited.template, batch_size=4, cache_dir={str(tmp_path / "labels2")!r})
        labels = ev.locality_labels(Edited(model, tok), cases, model_fingerprint(model))
        metrics, _ = ev.evaluate(edited, cases, labels)
        print(json.dumps({{k: v for k, v in metrics.items() if k.endswith(("_tf", "_ag")) or k == "score"}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    reloaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert reloaded == {k: metrics[k] for k in reloaded}
    assert len(reloaded) == 7
