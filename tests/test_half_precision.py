"""Every method fits and evaluates in bfloat16 and float16 on a tiny model on the CPU.

Per method and half dtype: the model is loaded in that dtype (``load_model(dtype=...)``, as a run config's
``dtype`` does), edited and scored by the Evaluator. Checked: nothing non-finite (update, neurons, metrics);
the weights stay in the dtype and a weight edit is undone bit-exactly; the edit lowers the targets' NLL (a
weight edit by at least half as much as in float32); and the numerics stay in fp32/fp64 whatever the model
dtype: layer statistics are fp32/fp64, the MEMIT / PMET / AlphaEdit solves run in fp64 (MALMEN's in its
``solve_dtype``), and every optimiser (z vectors, FT's master weights, MeG's neurons and generator, MALMEN's
hypernetwork) steps fp32 tensors only. Last, a run config with ``dtype: float16`` goes through the runner.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from test_baselines_malmen import HELD_OUT, TRAIN
from test_baselines_malmen import editor as malmen_editor
from test_baselines_support import (
    HPARAMS,
    TEMPLATE,
    counterfact_records,
    deep_model,
    identical,
    nll,
    snapshot,
)
from test_meg_editor import tiny_hparams

import meg_harness.meg.editor as meg_editor_module
from meg_harness.baselines.delta import DeltaEdited
from meg_harness.baselines.malmen_train import DTYPES as MALMEN_SOLVE_DTYPES
from meg_harness.cli import main
from meg_harness.editing.base import Edited, Editor
from meg_harness.editing.registry import get_editor_class
from meg_harness.evaluate.evaluator import Evaluator
from meg_harness.evaluate.protocol import METRIC_KEYS
from meg_harness.meg.model import MegEdited
from meg_harness.meg.neuron import NeuronEdited
from meg_harness.models import load_model
from meg_harness.models.loading import model_fingerprint

HALF = ("bfloat16", "float16")
LOCATE = ("memit", "pmet", "alphaedit")
# the tiny model per method: GPT-2 (Conv1D weights, stored transposed) for two, Llama for the rest
ARCH = {
    "memit": "gpt2",
    "malmen": "gpt2",
    "ft": "llama",
    "pmet": "llama",
    "alphaedit": "llama",
    "meg": "llama",
}
CASES = HELD_OUT[:4]  # with rephrases and locality probes, so that every metric is defined
FP32 = (torch.float32, torch.float64)


@pytest.fixture(scope="module")
def half_model(tmp_path_factory) -> Callable[[str, str], tuple]:
    """``(model, tokenizer)`` of the baseline tests' deep tiny ``arch`` model (saved once), loaded fresh
    in ``dtype`` by :func:`load_model`."""
    folders: dict[str, Path] = {}

    def load(arch: str, dtype: str) -> tuple:
        if arch not in folders:
            model, tok = deep_model(arch)
            folders[arch] = tmp_path_factory.mktemp(f"deep-{arch}")
            model.save_pretrained(folders[arch])
            tok.save_pretrained(folders[arch])
        return load_model(str(folders[arch]), dtype=dtype)

    return load


@dataclass
class Numerics:
    """What a fit computed: the dtypes of every ``torch.linalg.solve`` (A, B) and of every tensor an
    optimiser was built over."""

    solves: list[tuple[torch.dtype, torch.dtype]] = field(default_factory=list)
    optimised: list[torch.dtype] = field(default_factory=list)


@pytest.fixture
def numerics(monkeypatch) -> Iterator[Numerics]:
    """Record every ``torch.linalg.solve`` and every optimiser construction during the test."""
    seen = Numerics()
    solve = torch.linalg.solve

    def recording_solve(a, b, *args, **kwargs):
        seen.solves.append((a.dtype, b.dtype))
        return solve(a, b, *args, **kwargs)

    init = torch.optim.Optimizer.__init__

    def recording_init(self, params, defaults):
        init(self, params, defaults)
        seen.optimised += [p.dtype for group in self.param_groups for p in group["params"]]

    monkeypatch.setattr(torch.linalg, "solve", recording_solve)
    monkeypatch.setattr(torch.optim.Optimizer, "__init__", recording_init)
    yield seen


def finite(tensor: torch.Tensor) -> bool:
    return bool(tensor.isfinite().all())


def dtypes(model) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters()}


def evaluate(edited: Edited, labels: dict) -> dict:
    """The protocol's metrics of ``edited`` on CASES; every metric is finite and a percentage."""
    metrics, _ = Evaluator(edited.tokenizer, TEMPLATE, batch_size=4, progress=False).evaluate(
        edited, CASES, labels
    )
    for key in (*METRIC_KEYS, "score"):
        assert math.isfinite(metrics[key]) and 0.0 <= metrics[key] <= 100.0, (key, metrics[key])
    return metrics


def weight_editor(method: str, tmp_path: Path) -> Editor:
    if method == "malmen":
        return malmen_editor(tmp_path / "malmen", TRAIN, n_epochs=1)
    instance = get_editor_class(method)(HPARAMS[method])
    instance.progress = False
    return instance


@pytest.fixture(scope="module")
def fp32_drop(half_model, tmp_path_factory) -> Callable[[str], float]:
    """How much the same edit lowers the targets' mean NLL on the float32 model (computed once per method)."""
    drops: dict[str, float] = {}

    def get(method: str) -> float:
        if method not in drops:
            model, tok = half_model(ARCH[method], "float32")
            nll_before = nll(model, tok, CASES)
            edited = weight_editor(method, tmp_path_factory.mktemp(f"fp32-{method}")).fit(
                model, tok, CASES, TEMPLATE
            )
            drops[method] = float(nll_before.mean() - nll(model, tok, CASES).mean())
            edited.restore()
        return drops[method]

    return get


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["ft", *LOCATE, "malmen"])
def test_weight_editing_method_in_half_precision(method, dtype, half_model, numerics, fp32_drop, tmp_path):
    model, tok = half_model(ARCH[method], dtype)
    torch_dtype = getattr(torch, dtype)
    assert dtypes(model) == {torch_dtype}
    before, nll_before = snapshot(model), nll(model, tok, CASES)
    evaluator = Evaluator(tok, TEMPLATE, batch_size=4, progress=False)
    unedited = Edited(model, tok)
    labels = evaluator.locality_labels(unedited, CASES, model_fingerprint(model))
    metrics_before = evaluate(unedited, labels)

    instance = weight_editor(method, tmp_path)
    edited = instance.fit(model, tok, CASES, TEMPLATE)
    assert isinstance(edited, DeltaEdited) and len(edited.delta)
    for name, update in edited.delta.updates.items():
        assert update.dtype == torch_dtype and finite(update) and float(update.float().norm()) > 0, name
    assert dtypes(model) == {torch_dtype} and all(finite(p) for p in model.parameters())
    nll_after = nll(model, tok, CASES)
    assert finite(nll_after)
    assert float(nll_after.mean()) < float(nll_before.mean()) - 0.1, (nll_before, nll_after)
    metrics = evaluate(edited, labels)
    # FT and MALMEN make the targets the argmax; the locate methods' few z steps on a random model do not
    strong = 30.0 if method in ("ft", "malmen") else 0.0
    assert metrics["reliability_tf"] >= metrics_before["reliability_tf"] + strong, (metrics_before, metrics)

    # fp32 / fp64 numerics whatever the model dtype
    assert numerics.optimised and set(numerics.optimised) == {torch.float32}, numerics.optimised
    if method in LOCATE:
        assert all(math.isfinite(v) for v in edited.info["z_nll"])
        stats = instance.statistics(model, tok, edited.info["layers"])  # cached by the fit
        for moment in stats.values():
            assert moment.total.dtype in FP32 and finite(moment.total) and moment.count > 0
        assert len(numerics.solves) == len(edited.info["layers"])
        assert set(numerics.solves) == {(torch.float64, torch.float64)}
    elif method == "malmen":
        solve_dtype = MALMEN_SOLVE_DTYPES[instance.hp.solve_dtype]
        assert numerics.solves and set(numerics.solves) == {(solve_dtype, solve_dtype)}
        net = instance.trained.net
        assert all(p.dtype == torch.float32 for p in net.parameters())
        for shift_net in net.nets.values():  # the key/gradient normaliser's running statistics
            assert not shift_net.norm.empty and shift_net.norm.m2.dtype == torch.float64
            assert finite(shift_net.norm.mean) and finite(shift_net.norm.m2)
    else:
        assert not numerics.solves

    edited.restore()
    assert identical(model, before)
    assert dtypes(model) == {torch_dtype}
    # as effective as in float32 (measured after the spies' checks: the reference fit is not recorded)
    drop, reference = float(nll_before.mean() - nll_after.mean()), fp32_drop(method)
    assert reference > 0.1 and drop > 0.5 * reference, (drop, reference)


@pytest.mark.parametrize("dtype", HALF)
def test_meg_in_half_precision(dtype, half_model, numerics, encoder_dir, tmp_path, monkeypatch):
    model, tok = half_model(ARCH["meg"], dtype)
    torch_dtype = getattr(torch, dtype)
    before, nll_before = snapshot(model), nll(model, tok, CASES)
    evaluator = Evaluator(tok, TEMPLATE, batch_size=4, progress=False)
    unedited = Edited(model, tok)
    labels = evaluator.locality_labels(unedited, CASES, model_fingerprint(model))
    metrics_before = evaluate(unedited, labels)

    collected = []
    collect = meg_editor_module.collect_neurons

    def recording_collect(*args, **kwargs):
        collected.append(collect(*args, **kwargs))
        return collected[-1]

    monkeypatch.setattr(meg_editor_module, "collect_neurons", recording_collect)
    hparams = tiny_hparams(
        encoder_dir, train={"max_steps": 100, "eval_every": 100}, collect={"max_steps": 60}
    )
    instance = get_editor_class("meg")(hparams)
    instance.cache_dir = tmp_path / "cache"
    edited = instance.fit(model, tok, CASES, TEMPLATE)
    assert isinstance(edited, MegEdited)
    assert identical(model, before) and dtypes(model) == {torch_dtype}  # MeG never changes a weight
    prompts = [c.prompt for c in CASES]

    # the neuron optimisation: fp32 neurons, finite losses, and the collected neurons raise the targets
    (collection,) = collected
    neurons = collection.neurons
    assert neurons.key.dtype == neurons.value.dtype == torch.float32
    assert finite(neurons.flatten()) and all(math.isfinite(x) for x in collection.losses)
    rows = dict(zip(prompts, map(neurons.row, range(len(prompts)))))
    with_collected = NeuronEdited(model, tok, rows, collection.layer)
    with with_collected.rows(prompts):
        nll_collected = nll(model, tok, CASES)
    assert float(nll_collected.mean()) < float(nll_before.mean()) - 2.0, (nll_before, nll_collected)

    # the generated neurons: fp32, finite, and they lower the targets' NLL too
    generated, routed = edited.batch_for(prompts)
    assert bool(routed.all()) and generated.key.dtype == torch.float32 and finite(generated.flatten())
    with edited.rows(prompts):
        nll_after = nll(model, tok, CASES)
    assert finite(nll_after)
    assert float(nll_after.mean()) < float(nll_before.mean()) - 0.5, (nll_before, nll_after)
    metrics = evaluate(edited, labels)
    assert metrics["reliability_tf"] >= metrics_before["reliability_tf"], (metrics_before, metrics)
    assert numerics.optimised and set(numerics.optimised) == {torch.float32}, numerics.optimised
    edited.restore()
    assert identical(model, before)


def test_run_config_dtype_edits_and_scores_in_half_precision(tmp_path):
    """``dtype: float16`` in a run config: the runner loads the model in half precision, and FT and MEMIT
    fit, score (finite metrics) and save float16 deltas."""
    model, tok = deep_model("gpt2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    records = counterfact_records(CASES)
    (tmp_path / "cf.json").write_text(json.dumps(records))
    methods = ["ft", "memit"]
    config = {
        "model": str(tmp_path / "model"),
        "dataset": "counterfact",
        "data_path": str(tmp_path / "cf.json"),
        "n_edits": len(CASES),
        "methods": methods,
        "hparams": {m: HPARAMS[m] for m in methods},
        "dtype": "float16",
        "batch_size": 4,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out")]) == 0
    for method in methods:
        seed_dir = tmp_path / "out" / method / "seed0"
        metrics = json.loads((seed_dir / "metrics.json").read_text())
        assert metrics["counts"]["cases"] == len(CASES)
        for key in (*METRIC_KEYS, "score"):
            assert math.isfinite(metrics[key]), (method, key, metrics[key])
        if method == "ft":
            assert metrics["reliability_tf"] > 30.0, metrics
        with safe_open(str(seed_dir / "artifact" / "delta.safetensors"), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                assert tensor.dtype == torch.float16 and finite(tensor), (method, name)
