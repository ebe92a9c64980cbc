"""The dynamic neuron hook: layout, per-row neurons, zero/inactive rows, gradients, generation."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from meg_harness.errors import HarnessError
from meg_harness.meg.neuron import DynamicNeuron, NeuronBatch, NeuronEdited, ffn_has_bias
from meg_harness.models import TINY_ARCHS

LAYER = 1


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


def random_neurons(model, n: int, seed: int = 0, scale: float = 0.5) -> NeuronBatch:
    neuron = DynamicNeuron(model, LAYER)
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(n, neuron.hidden, generator=g) * scale
    value = torch.randn(n, neuron.hidden, generator=g) * scale
    bias = torch.randn(n, generator=g) if neuron.has_bias else None
    return NeuronBatch(key, bias, value)


def batch_ids(n: int = 3, width: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 700, (n, width), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("hidden", "has_bias", "width"), [(2560, True, 5121), (4096, True, 8193), (4096, False, 8192)]
)
def test_flatten_layout_and_roundtrip(hidden, has_bias, width):
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(3, generator=g) if has_bias else None
    batch = NeuronBatch(torch.randn(3, hidden, generator=g), bias, torch.randn(3, hidden, generator=g))
    flat = batch.flatten()
    assert flat.shape == (3, width)
    assert torch.equal(flat[:, :hidden], batch.key) and torch.equal(flat[:, -hidden:], batch.value)
    if has_bias:
        assert torch.equal(flat[:, hidden], batch.bias)
    back = NeuronBatch.unflatten(flat, hidden, has_bias)
    assert torch.equal(back.flatten(), flat) and (back.bias is None) == (not has_bias)
    with pytest.raises(ValueError):
        NeuronBatch.unflatten(flat, hidden, not has_bias)


def test_bias_follows_the_ffn(models):
    assert ffn_has_bias(models("gpt2")[0], LAYER) and ffn_has_bias(models("phi")[0], LAYER)
    assert not ffn_has_bias(models("llama")[0], LAYER)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_zero_or_inactive_neurons_leave_logits_bit_identical(models, arch):
    model, _ = models(arch)
    ids = batch_ids()
    with torch.no_grad():
        plain = model(ids).logits
        neuron = DynamicNeuron(model, LAYER)
        zero = NeuronBatch.zeros(3, neuron.hidden, neuron.has_bias)
        with neuron.attach(zero):
            assert torch.equal(model(ids).logits, plain)
        hot = random_neurons(model, 3)
        hot.key[1] = float("nan")  # an inactive row is skipped, never multiplied by zero
        active = torch.tensor([True, False, True])
        with neuron.attach(hot, active):
            edited = model(ids).logits
        with neuron.attach(hot, torch.zeros(3, dtype=torch.bool)):
            assert torch.equal(model(ids).logits, plain)
    assert torch.equal(edited[1], plain[1])
    assert not torch.allclose(edited[0], plain[0]) and not torch.allclose(edited[2], plain[2])
    assert len(neuron.module._forward_hooks) == 0  # detached afterwards


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_batched_rows_equal_one_at_a_time(models, arch):
    model, _ = models(arch)
    ids, neurons, neuron = batch_ids(4), random_neurons(model, 4), DynamicNeuron(model, LAYER)
    with torch.no_grad():
        with neuron.attach(neurons):
            together = model(ids).logits
        for b in range(4):
            with neuron.attach(neurons.select([b])):
                alone = model(ids[b : b + 1]).logits
            torch.testing.assert_close(together[b : b + 1], alone, atol=1e-5, rtol=1e-5)


def test_neuron_output_matches_the_adapter(models):
    model, _ = models("gpt2")
    neuron, neurons = DynamicNeuron(model, LAYER), random_neurons(model, 2)
    x = torch.randn(2, 5, neuron.hidden)
    got = neuron.contribution(x, neurons)
    for b in range(2):
        want = neuron.adapter.neuron_output(model, LAYER, x[b], *neurons.row(b))
        torch.testing.assert_close(got[b], want)


def test_only_the_neuron_gets_gradients(models):
    model, _ = models("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    neuron = DynamicNeuron(model, LAYER)
    base = random_neurons(model, 2)
    key, value = base.key.clone().requires_grad_(True), base.value.clone().requires_grad_(True)
    with neuron.attach(NeuronBatch(key, None, value)):
        model(batch_ids(2)).logits.logsumexp(-1).sum().backward()
    assert key.grad is not None and value.grad is not None and key.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_mismatched_neurons_are_rejected(models):
    model, _ = models("llama")
    neuron = DynamicNeuron(model, LAYER)
    with pytest.raises(HarnessError), neuron.attach(NeuronBatch.zeros(2, neuron.hidden + 1, False)):
        pass
    with pytest.raises(HarnessError), neuron.attach(random_neurons(model, 2)), torch.no_grad():
        model(batch_ids(3))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_with_neuron_equals_stepwise_forward(models, arch):
    model, tokenizer = models(arch)
    ids, neurons, neuron = (
        batch_ids(2, 6, seed=3),
        random_neurons(model, 2, seed=4),
        DynamicNeuron(model, LAYER),
    )
    n_new = 8
    config = GenerationConfig(
        max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    with torch.no_grad(), neuron.attach(neurons):
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        stepwise = ids
        for _ in range(n_new):
            nxt = model(stepwise).logits[:, -1].argmax(-1, keepdim=True)
            stepwise = torch.cat([stepwise, nxt], dim=1)
    assert torch.equal(generated, stepwise)
    with torch.no_grad():  # and the neuron changed something
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    assert not torch.equal(plain, generated)


def test_neuron_edited_routes_by_question(models):
    model, tokenizer = models("phi")
    neurons = random_neurons(model, 1)
    edited = NeuronEdited(model, tokenizer, {"q-known": neurons.row(0)}, LAYER)
    ids = batch_ids(2)
    neuron = DynamicNeuron(model, LAYER)
    with torch.no_grad():
        plain = model(ids).logits
        with edited.rows(["q-known", "q-unknown"]):
            out = model(ids).logits
        with neuron.attach(neurons):
            direct = model(ids[:1]).logits
    assert edited.routed(["q-known", "q-unknown"]) == [True, False]
    assert torch.equal(out[1], plain[1])
    torch.testing.assert_close(out[:1], direct, atol=1e-5, rtol=1e-5)
