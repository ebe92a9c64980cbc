"""Knowledge-weight collection: layer-cached forwards, optimisation, the sharded cache and kill -9 resume."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from meg_harness.data import load_cases
from meg_harness.errors import HarnessError
from meg_harness.meg.collect import CollectHParams, collect_neurons, init_neuron
from meg_harness.meg.neuron import DynamicNeuron, NeuronBatch
from meg_harness.models import TINY_ARCHS, load_model
from meg_harness.models.layer_cache import LayerCachedLM
from meg_harness.prompts import encode_query, encode_target, get_template

TEMPLATE = get_template("gptj")
FAST = {"layer": 1, "lr": 0.05, "max_steps": 12, "check_every": 4, "batch_size": 3, "shard_size": 3}


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


@pytest.fixture(scope="module")
def cases():
    return load_cases("counterfact", None)[:6]


def target_logprob(model, tokenizer, case, neuron: DynamicNeuron, neurons: NeuronBatch) -> float:
    query = encode_query(tokenizer, TEMPLATE, case.prompt)
    answer = encode_target(tokenizer, case.target_new) + tuple(tokenizer("\n")["input_ids"])
    ids = torch.tensor([query + answer])
    with torch.no_grad(), neuron.attach(neurons):
        logp = model(ids).logits[0, len(query) - 1 : -1].log_softmax(-1)
    return logp.gather(1, torch.tensor(answer)[:, None]).sum().item()


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("layer", [0, 1])
def test_layer_cached_forward_equals_full_forward(models, arch, layer):
    model, _ = models(arch)
    lm, neuron = LayerCachedLM(model, layer), DynamicNeuron(model, layer)
    ids = torch.randint(5, 700, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(3, generator=g) if neuron.has_bias else None
    neurons = NeuronBatch(
        torch.randn(3, neuron.hidden, generator=g), bias, torch.randn(3, neuron.hidden, generator=g)
    )
    with torch.no_grad(), neuron.attach(neurons):
        full = lm.full_logits(ids, mask)
        cached = lm.logits(lm.layer_inputs(ids, mask), mask)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], atol=1e-5, rtol=1e-5)
    assert len(lm.adapter.layers(model)) == model.config.num_hidden_layers  # restored


def test_init_is_seeded_per_edit():
    hp = CollectHParams(init_std=0.1)
    a, b = init_neuron("case-7", 16, True, hp), init_neuron("case-7", 16, True, hp)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], init_neuron("case-8", 16, True, hp)[0])
    assert float(a[1]) == 0.0 and init_neuron("c", 16, False, hp)[1] is None


def test_hparams_validation():
    assert CollectHParams.from_mapping({"lr": 0.1}).lr == 0.1
    with pytest.raises(HarnessError, match="unknown"):
        CollectHParams.from_mapping({"learning_rate": 0.1})
    with pytest.raises(HarnessError):
        CollectHParams(optimizer="lbfgs")
    with pytest.raises(HarnessError):
        CollectHParams(max_steps=0)


def test_shipped_hparams_yamls_load():
    root = Path(__file__).resolve().parents[1] / "hparams" / "MEG"
    assert CollectHParams.from_yaml(root / "collect-smollm2-135m.yaml") == CollectHParams()  # the defaults
    layers = {f.name: CollectHParams.from_yaml(f).layer for f in root.glob("collect-*.yaml")}
    assert {layers[f"collect-{m}.yaml"] for m in ("phi-2", "gpt-j-6b", "llama3-8b")} == {29, 9, 14}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_collection_raises_target_probability(models, cases, arch, tmp_path):
    model, tokenizer = models(arch)
    hp = dict(FAST, lr=0.02, max_steps=20, check_every=5)
    result = collect_neurons(model, tokenizer, cases[:4], TEMPLATE, hp, cache_dir=tmp_path, progress=False)
    assert result.case_ids == [c.case_id for c in cases[:4]] and len(result.neurons) == 4
    assert all(isinstance(s, bool) for s in result.success) and result.mode == "layer-cached"
    assert all(1 <= s <= 20 for s in result.steps)
    assert result.success_rate == sum(result.success) / 4
    neuron = DynamicNeuron(model, 1)
    init = NeuronBatch.stack(
        [init_neuron(c.case_id, neuron.hidden, neuron.has_bias, CollectHParams(**hp)) for c in cases[:4]]
    )
    for b, case in enumerate(cases[:4]):
        before = target_logprob(model, tokenizer, case, neuron, init.select([b]))
        after = target_logprob(model, tokenizer, case, neuron, result.neurons.select([b]))
        assert after > before + 0.5, (case.case_id, before, after)
    assert all(p.requires_grad for p in model.parameters())  # the model's state is restored


def test_cache_reuse_and_full_forward_fallback(models, cases, tmp_path, monkeypatch, caplog):
    model, tokenizer = models("phi")
    first = collect_neurons(model, tokenizer, cases, TEMPLATE, FAST, cache_dir=tmp_path, progress=False)
    assert len(list(first.cache_path.glob("shard-*.safetensors"))) == 2
    again = collect_neurons(model, tokenizer, cases, TEMPLATE, FAST, cache_dir=tmp_path, progress=False)
    assert again.reused == 6 and torch.equal(again.neurons.flatten(), first.neurons.flatten())
    assert (again.success, again.steps) == (first.success, first.steps)
    # a family whose layer-cached run does not match the full model falls back, with a logged reason
    original = LayerCachedLM.logits
    monkeypatch.setattr(LayerCachedLM, "logits", lambda self, *a, **k: original(self, *a, **k) + 1.0)
    with caplog.at_level(logging.WARNING, logger="meg_harness.meg.collect"):
        fallback = collect_neurons(
            model, tokenizer, cases[:2], TEMPLATE, FAST, use_cache=False, progress=False
        )
    assert fallback.mode == "full" and "full forwards" in caplog.text
    torch.testing.assert_close(fallback.neurons.flatten(), first.neurons.flatten()[:2], atol=1e-4, rtol=1e-4)


RUNNER = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    import meg_harness.meg.collect as collect
    from meg_harness.data import load_cases
    from meg_harness.prompts import get_template
    from meg_harness.models import load_model
    write = collect._write_shard
    def slow_write(*args):
        write(*args)
        time.sleep(0.5)
    collect._write_shard = slow_write
    model, tok = load_model(sys.argv[1])
    hp = eval(sys.argv[3])
    collect.collect_neurons(model, tok, load_cases("counterfact", None)[:12], get_template("gptj"), hp,
                            cache_dir=sys.argv[2], progress=False)
    """
)


def test_kill9_resume_is_bit_identical(tiny_model_dir, tmp_path):
    model_dir = str(tiny_model_dir("phi"))  # an FFN with a bias: key, bias and value are all compared
    hp = dict(FAST, batch_size=2, shard_size=2, max_steps=8)
    killed_cache = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, model_dir, str(killed_cache), repr(hp)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not list(killed_cache.glob("neurons/*/shard-*.json")):
            assert proc.poll() is None, "collection subprocess ended before writing a shard"
            assert time.monotonic() < deadline, "no shard written within 60 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    written = len(list(killed_cache.glob("neurons/*/shard-*.json")))
    assert 1 <= written < 6  # killed part-way

    model, tokenizer = load_model(model_dir)  # one thread, as in the subprocess (module fixture)
    cases = load_cases("counterfact", None)[:12]
    resumed = collect_neurons(model, tokenizer, cases, TEMPLATE, hp, cache_dir=killed_cache, progress=False)
    fresh = collect_neurons(
        model, tokenizer, cases, TEMPLATE, hp, cache_dir=tmp_path / "fresh", progress=False
    )
    assert resumed.reused == 2 * written and fresh.reused == 0
    assert torch.equal(resumed.neurons.key, fresh.neurons.key)
    assert torch.equal(resumed.neurons.value, fresh.neurons.value)
    assert resumed.neurons.bias is not None and torch.equal(resumed.neurons.bias, fresh.neurons.bias)
    assert (resumed.success, resumed.steps, resumed.losses) == (fresh.success, fresh.steps, fresh.losses)


@pytest.mark.slow
def test_smollm2_demo_edits():
    from meg_harness.models import get_adapter

    model, tokenizer = load_model("smollm2-135m")
    template = get_template(get_adapter(model).default_template(model, tokenizer))
    cases = load_cases("counterfact", None)[:16]
    result = collect_neurons(model, tokenizer, cases, template, use_cache=False, progress=False)
    rate, wall = result.success_rate, result.wall_s
    print(f"smollm2-135m, 16 demo edits: success {rate:.1%}, steps {result.steps}, {wall:.0f}s")
    assert result.success_rate >= 0.75
