"""FT, MEMIT, PMET, AlphaEdit on tiny models: targets become likelier, MEMIT's normal equations hold,
AlphaEdit preserves the statistics' keys, restore is bit-exact, artifacts round-trip, hparams files load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from test_baselines_support import CASES, HPARAMS, TEMPLATE, deep_model, identical, nll, snapshot

from meg_harness.baselines.alphaedit import AlphaEdit, AlphaEditHParams, alphaedit_update, null_space
from meg_harness.baselines.ft import FTHParams
from meg_harness.baselines.memit import MEMIT, memit_update
from meg_harness.baselines.params import LocateHParams, from_mapping
from meg_harness.baselines.plan import build_plans
from meg_harness.baselines.pmet import PMETHParams
from meg_harness.data.edit_case import EditCase
from meg_harness.editing.registry import get_editor_class, list_methods
from meg_harness.errors import HarnessError
from meg_harness.models.adapters import get_adapter

METHODS = ("ft", "memit", "pmet", "alphaedit")
HPARAMS_DIR = Path(__file__).resolve().parents[1] / "hparams"


def editor(method: str, **overrides):
    instance = get_editor_class(method)({**HPARAMS[method], **overrides})
    instance.progress = False
    return instance


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_each_method_raises_the_targets_probability_and_restores_bit_exactly(method, arch):
    model, tok = deep_model(arch)
    before, nll_before = snapshot(model), nll(model, tok)
    edited = editor(method).fit(model, tok, CASES, TEMPLATE)
    nll_after = nll(model, tok)
    assert float(nll_after.mean()) < float(nll_before.mean()) - 0.1, (nll_before, nll_after)
    assert int((nll_after < nll_before).sum()) >= 3
    assert not identical(model, before)
    edited.restore()
    assert identical(model, before)


@pytest.mark.parametrize("arch", ["gptj", "phi"])
def test_memit_edits_gptj_and_phi(arch):
    model, tok = deep_model(arch)
    before, nll_before = snapshot(model), nll(model, tok)
    edited = editor("memit").fit(model, tok, CASES, TEMPLATE)
    assert float(nll(model, tok).mean()) < float(nll_before.mean()) - 0.1
    edited.restore()
    assert identical(model, before)


class RecordingMEMIT(MEMIT):
    """MEMIT that keeps what each layer's solve saw."""

    name = "memit"

    def solve(self, layer, keys, resid, stats):
        self.seen = getattr(self, "seen", {})
        self.seen[layer] = (keys, resid, stats.moment().double())
        return super().solve(layer, keys, resid, stats)


def test_memit_update_satisfies_its_normal_equations():
    model, tok = deep_model("gpt2")
    memit = RecordingMEMIT(HPARAMS["memit"])
    memit.progress = False
    edited = memit.fit(model, tok, CASES, TEMPLATE)
    assert sorted(memit.seen) == [1, 2]
    for layer, (keys, resid, c0) in memit.seen.items():
        # the update actually applied (float32, GPT-2's Conv1D stores it transposed)
        dw = edited.delta.updates[f"transformer.h.{layer}.mlp.c_proj.weight"].double().T
        lhs = dw @ (memit.hp.mom2_update_weight * c0 + keys @ keys.T)
        rhs = resid @ keys.T
        assert float((lhs - rhs).norm() / rhs.norm()) <= 1e-4
    edited.restore()


def _preserved_ratio(dw: torch.Tensor, w: torch.Tensor, c0: torch.Tensor) -> float:
    """||dW K0|| / ||W K0|| over the statistics' keys K0 (C0 = K0 K0^T / count = S S with S = C0^(1/2))."""
    values, vectors = torch.linalg.eigh(c0)
    root = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    return float((dw @ root).norm() / (w @ root).norm())


def test_alphaedit_update_preserves_the_keys_where_memit_does_not():
    # Keys like a real layer's: most energy in a 40-dim subspace of 64 dims, the rest ~1e-6.
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(64, 40, generator=g, dtype=torch.float64)

    def keys(n):
        return basis @ torch.randn(40, n, generator=g, dtype=torch.float64) + 1e-3 * torch.randn(
            64, n, generator=g, dtype=torch.float64
        )

    k0, k = keys(4000), keys(32)  # preserved keys; the edits' keys, from the same distribution
    c0 = k0 @ k0.T / k0.shape[1]
    w = torch.randn(48, 64, generator=g, dtype=torch.float64)
    resid = torch.randn(48, 32, generator=g, dtype=torch.float64)
    space = null_space(c0, 1e-4)
    assert space.rank == 24
    updates = {
        "memit": memit_update(k, resid, c0, 1.0),
        "alphaedit": alphaedit_update(k, resid, space.projector, 1.0),
    }
    ratio = {m: float((dw @ k0).norm() / (w @ k0).norm()) for m, dw in updates.items()}
    assert ratio["alphaedit"] < 1e-5 and ratio["memit"] > 1e-2, ratio


def test_alphaedit_fit_leaves_the_statistics_keys_outputs_unchanged():
    # Statistics over 10 short samples (160 tokens < 256 key dimensions, float64): the preserved keys span
    # a proper subspace and AlphaEdit projects onto its exact null space.
    model, tok = deep_model("gpt2")
    weights, nll_before = snapshot(model), nll(model, tok)
    instance = editor("alphaedit", mom2_n_samples=10, mom2_max_length=16, mom2_dtype="float64")
    instance.hp = dataclasses.replace(instance.hp, nullspace_threshold=1e-6)
    edited = instance.fit(model, tok, CASES, TEMPLATE)
    assert float(nll(model, tok).mean()) < float(nll_before.mean()) - 0.1
    stats = instance.statistics(model, tok, [1, 2])  # cached: computed on the unedited model
    for layer in (1, 2):
        assert 0 < instance.projector(layer, stats[layer]).rank < 256
        name = f"transformer.h.{layer}.mlp.c_proj.weight"
        dw, w = edited.delta.updates[name].double().T, weights[name].double().T
        assert float(dw.norm()) > 1e-2
        assert _preserved_ratio(dw, w, stats[layer].moment().double()) < 1e-5
    edited.restore()


def test_null_space_projector_belongs_to_one_editor_and_layer():
    c0 = torch.diag(torch.tensor([5.0, 1.0, 1e-3, 1e-4], dtype=torch.float64))
    space = null_space(c0, 1e-2, key=("m", 3))
    assert space.rank == 2 and space.key == ("m", 3)
    torch.testing.assert_close(space.projector.double(), torch.diag(torch.tensor([0.0, 0, 1, 1]).double()))
    a, b = AlphaEdit(HPARAMS["alphaedit"]), AlphaEdit(HPARAMS["alphaedit"])
    assert a._projectors is not b._projectors
    import meg_harness.baselines.alphaedit as module

    state = [
        k for k, v in vars(module).items() if not k.startswith("__") and isinstance(v, (dict, torch.Tensor))
    ]
    assert not state, "no module-level projector caches"


@pytest.mark.parametrize("method", METHODS)
def test_artifact_roundtrip_reproduces_the_edit_bit_exactly(method, tmp_path):
    model, tok = deep_model("llama")
    before = snapshot(model)
    instance = editor(method)
    edited = instance.fit(model, tok, CASES[:2], TEMPLATE)
    after = snapshot(model)
    instance.save(edited, tmp_path / "artifact")
    assert (tmp_path / "artifact" / "delta.safetensors").is_file()
    assert (tmp_path / "artifact" / "edit.json").is_file()
    edited.restore()
    assert identical(model, before)
    loaded = get_editor_class(method).load(tmp_path / "artifact", model, tok)
    assert identical(model, after)
    loaded.restore()
    assert identical(model, before)
    other, _ = deep_model("gpt2")
    with pytest.raises(HarnessError, match="does not fit"):
        get_editor_class(method).load(tmp_path / "artifact", other, tok)


def test_subject_last_token_is_located_inside_the_templated_prompt():
    _, tok = deep_model("gpt2")
    case = EditCase("x", "Where does Angela Merkel live?", "Angela Merkel", "Paris")
    plan = build_plans(tok, [case], TEMPLATE, ["Some text. "])[0]
    for row in plan.contexts:
        text = tok.decode(row.ids[: row.index + 1])
        assert text.endswith("Merkel") and text.startswith("Q: Answer")
    assert tok.decode(plan.kl.ids[: plan.kl.index + 1]) == "Angela Merkel"
    assert tok.decode(plan.target_ids) == " Paris"
    with pytest.raises(HarnessError, match="does not occur"):
        build_plans(tok, [EditCase("y", "Who is he?", "Merkel", "Paris")], TEMPLATE)


def test_bad_hparams_are_reported():
    with pytest.raises(HarnessError, match="'ffn_target': must be one of delta, observed, block, got 'attn'"):
        editor("pmet", ffn_target="attn")
    with pytest.raises(HarnessError, match="'residual_at': must be one of ffn, layer, got 'attn'"):
        editor("pmet", residual_at="attn")
    with pytest.raises(HarnessError, match="unknown memit hparam"):
        get_editor_class("memit")({"layerz": [1]})
    model, tok = deep_model("gpt2")
    with pytest.raises(HarnessError, match="below the model's last layer"):
        editor("memit", layers=[2, 3]).fit(model, tok, CASES, TEMPLATE)
    with pytest.raises(HarnessError, match="out of range"):
        editor("memit", layers=[7]).fit(model, tok, CASES, TEMPLATE)
    assert set(METHODS) <= set(list_methods())


HPARAM_CLASSES = {"FT": FTHParams, "MEMIT": LocateHParams, "PMET": PMETHParams, "AlphaEdit": AlphaEditHParams}


@pytest.mark.parametrize("family", sorted(HPARAM_CLASSES))
def test_shipped_hparams_files_load(family):
    files = sorted((HPARAMS_DIR / family).glob("*.yaml"))
    assert {f.stem for f in files} >= {"gpt-j-6b", "llama3-8b", "phi-2", "smollm2-135m"}
    for path in files:
        data = yaml.safe_load(path.read_text())
        hp = from_mapping(HPARAM_CLASSES[family], data, family)
        assert hp.layers and all(layer >= 0 for layer in hp.layers)


def test_runner_fits_scores_and_saves_each_baseline(tmp_path):
    import json

    from meg_harness.cli import main

    model, tok = deep_model("gpt2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    records = [
        {
            "case_id": i,
            "requested_rewrite": {
                "prompt": "The capital of {} is",
                "subject": country,
                "target_new": {"str": new},
                "target_true": {"str": true},
            },
            "paraphrase_prompts": [f"{country}'s capital city is"],
            "neighborhood_prompts": ["The capital of Chile is"],
        }
        for i, (country, true, new) in enumerate([("France", "Paris", "Rome"), ("Spain", "Madrid", "Lisbon")])
    ]
    (tmp_path / "cf.json").write_text(json.dumps(records))
    config = {
        "model": str(tmp_path / "model"),
        "dataset": "counterfact",
        "data_path": str(tmp_path / "cf.json"),
        "n_edits": 2,
        "seeds": [0],
        "methods": list(METHODS),
        "hparams": {m: HPARAMS[m] for m in METHODS},
        "batch_size": 4,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out")]) == 0
    for method in METHODS:
        seed_dir = tmp_path / "out" / method / "seed0"
        metrics = json.loads((seed_dir / "metrics.json").read_text())
        assert metrics["counts"]["cases"] == 2 and metrics["method"] == method
        assert (seed_dir / "artifact" / "delta.safetensors").is_file()
        info = json.loads((seed_dir / "artifact" / "edit.json").read_text())
        assert info["method"] == method and info["tensors"]


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama", "phi"])
def test_logits_at_selected_positions_match_the_full_forward(arch):
    from meg_harness.baselines.values import logits_at

    model, tok = deep_model(arch)
    ids = torch.tensor([tok("The capital of France is Paris")["input_ids"]] * 2)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    rows, positions = torch.tensor([0, 1, 0]), torch.tensor([1, 3, ids.shape[1] - 1])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits[rows, positions].float()
        torch.testing.assert_close(logits_at(model, ids, mask, rows, positions), full)


def test_value_targets_are_cached_across_update_settings(monkeypatch):
    import meg_harness.baselines.values as values

    model, tok = deep_model("llama")
    before = snapshot(model)
    first = editor("memit").fit(model, tok, CASES[:2], TEMPLATE)
    first.restore()
    calls = []
    original = values._optimise_chunk
    monkeypatch.setattr(values, "_optimise_chunk", lambda *a, **k: calls.append(1) or original(*a, **k))
    second = editor("memit", mom2_update_weight=100, layers=[0, 2]).fit(model, tok, CASES[:2], TEMPLATE)
    assert not calls  # same last layer and z settings: targets reused from the cache
    assert second.info["z_nll"] == first.info["z_nll"]
    read = {"stage": "z chunks", "total": 1, "seconds": None}  # 2 edits, one chunk
    assert (first.info["reused"], second.info["reused"]) == ([{**read, "read": 0}], [{**read, "read": 1}])
    second.restore()
    editor("memit", v_lr=0.2).fit(model, tok, CASES[:2], TEMPLATE).restore()
    assert calls == [1]
    assert identical(model, before)


def _targets(model, tok, z_batch_size: int, cache=None, method: str = "pmet"):
    from meg_harness.baselines.values import optimise_values

    ed = editor(method, z_batch_size=z_batch_size)
    plans = build_plans(tok, CASES[:3], TEMPLATE, [], ed.hp.kl_prompt)
    sites = ed.value_sites(get_adapter(model), 2)
    opts = ed.value_options()
    return optimise_values(model, tok, plans, sites, ed.hp, layer=2, cache=cache, progress=False, **opts)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_value_optimisation_batched_on_suffixes_equals_one_edit_at_a_time_on_full_forwards(arch, monkeypatch):
    import meg_harness.baselines.values as values

    model, tok = deep_model(arch)
    checked = []
    original = values.suffixes_agree
    monkeypatch.setattr(values, "suffixes_agree", lambda *a: checked.append(original(*a)) or checked[-1])
    batched = _targets(model, tok, z_batch_size=3)
    assert checked == [True]  # the batched run took the suffix path
    monkeypatch.setattr(values, "suffixes_agree", lambda *a, **k: False)
    alone = _targets(model, tok, z_batch_size=1)
    assert batched.steps == alone.steps and len(batched.steps) == 3
    for site, target in alone.targets.items():
        moved = (target - alone.init[site]).norm(dim=1)
        assert bool((moved > 0).all())  # the deltas are not trivially zero
        torch.testing.assert_close(batched.targets[site], target, rtol=1e-4, atol=1e-4)


def test_value_optimisation_resumes_from_finished_chunks(tmp_path, monkeypatch):
    import meg_harness.baselines.values as values

    model, tok = deep_model("llama")

    def cache(chunk):
        return tmp_path / f"{chunk[0].case_id}.safetensors"

    full = _targets(model, tok, z_batch_size=2, cache=cache, method="memit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.safetensors", "2.safetensors"]
    (tmp_path / "2.safetensors").unlink()  # as if killed during the second chunk
    calls = []
    original = values._optimise_chunk
    monkeypatch.setattr(values, "_optimise_chunk", lambda *a, **k: calls.append(a[2]) or original(*a, **k))
    resumed = _targets(model, tok, z_batch_size=2, cache=cache, method="memit")
    assert calls == [1]  # only the one edit of the unfinished chunk is optimised again
    assert (full.chunks, full.chunks_read, resumed.chunks, resumed.chunks_read) == (2, 0, 2, 1)
    for site, target in full.targets.items():
        torch.testing.assert_close(resumed.targets[site], target, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gptj"])
def test_pmet_observed_ffn_output_is_the_ffn_output_under_both_optimised_deltas(arch):
    """``observed`` = the FFN output at the subject with both final deltas added (an independent forward). In
    a sequential block (llama) the attention delta shifts the FFN input, so it differs from init + delta; in
    GPT-J's parallel block it does not."""
    from meg_harness.baselines.values import optimise_values
    from meg_harness.models.nethook import TraceDict

    model, tok = deep_model(arch)
    ed = editor("pmet", ffn_target="observed")
    plans = build_plans(tok, CASES[:3], TEMPLATE, [], ed.hp.kl_prompt)
    adapter = get_adapter(model)
    ffn, attn = ed.value_sites(adapter, 2)
    opts = ed.value_options()
    values = optimise_values(model, tok, plans, [ffn, attn], ed.hp, layer=2, progress=False, **opts)
    assert set(values.observed) == {ffn, attn}
    for e, plan in enumerate(plans):
        row = plan.contexts[0]

        def add_delta(name, out, _input, e=e, row=row):
            out = out.clone()
            out[0, row.index] += (values.targets[name][e] - values.init[name][e]).to(out.dtype)
            return out

        trace = TraceDict(model, [ffn, attn], retain_output=True, edit_output=add_delta)
        with torch.no_grad(), trace:
            model(input_ids=torch.tensor([row.ids]))
        expected = trace[ffn].output[0, row.index].float()
        torch.testing.assert_close(values.observed[ffn][e], expected, rtol=1e-4, atol=1e-4)
    shift = (values.observed[ffn] - values.targets[ffn]).norm(dim=1)
    moved = (values.targets[ffn] - values.init[ffn]).norm(dim=1)
    if arch == "llama":
        assert bool((shift > 0.05 * moved).all()), (shift, moved)
    else:
        assert float(shift.max()) < 1e-4
    torch.testing.assert_close(values.observed[attn], values.targets[attn], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "ffn_target, residual_at", [("delta", "ffn"), ("observed", "ffn"), ("block", "ffn"), ("block", "layer")]
)
def test_pmet_ffn_targets_each_edit_a_sequential_block_model(ffn_target, residual_at):
    model, tok = deep_model("llama")
    nll_before = nll(model, tok)
    edited = editor("pmet", ffn_target=ffn_target, residual_at=residual_at).fit(model, tok, CASES, TEMPLATE)
    nll_after = nll(model, tok)
    edited.restore()
    assert float(nll_after.mean()) < float(nll_before.mean()) - 0.1, (nll_before, nll_after)


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama", "phi"])
def test_ft_layer_cached_nll_and_gradients_equal_the_full_forwards(arch):
    from meg_harness.baselines.ft import _examples, cached_target_nll, target_nll
    from meg_harness.models.layer_cache import LayerCachedLM

    model, tok = deep_model(arch)
    examples = _examples(tok, CASES, TEMPLATE, terminator=False)
    lm = LayerCachedLM(model, 2)
    states = lm.layer_inputs_per_row([seq for seq, _ in examples], tok.pad_token_id, batch_size=3)
    weight = next(get_adapter(model).layers(model)[2].mlp.parameters())
    results = []
    for cached in (False, True):
        weight.grad = None
        loss = cached_target_nll(lm, states, examples) if cached else target_nll(model, tok, examples)
        loss.mean().backward()
        results.append((loss.detach(), weight.grad.clone()))
    (full_loss, full_grad), (cached_loss, cached_grad) = results
    torch.testing.assert_close(cached_loss, full_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached_grad, full_grad, rtol=1e-4, atol=1e-6)
    assert float(full_grad.norm()) > 0
