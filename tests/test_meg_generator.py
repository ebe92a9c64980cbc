"""MeG's weight generators, the diffusers-based diffusion process and generator training."""

from __future__ import annotations

import math

import pytest
import torch

from meg_harness.errors import HarnessError
from meg_harness.meg.diffusion import DiffusionConfig, WeightNormalizer, ddim_sample, v_prediction_loss
from meg_harness.meg.generator import GeneratorConfig, build_generator, parameter_count
from meg_harness.meg.train_generator import (
    TrainConfig,
    continue_shorter_run,
    l2_report,
    learning_rate,
    train_generator,
)

SMALL_DIT = {"kind": "dit", "patch_size": 10, "hidden": 32, "depth": 2, "heads": 2}
SMALL_MLP = {"kind": "mlp", "hidden": 64, "depth": 2}
# short checkpointed runs (never an early success) for the resume tests
CHECKPOINTED = dict(
    lr=1e-3, batch_size=8, eval_every=10, eval_ddim_steps=5, checkpoint_every=10, success_l2=0.0
)
# fast memorisation of a few pairs (no EMA warm-up, no early success)
MEMORISE = dict(lr=3e-3, batch_size=64, eval_ddim_steps=20, ema_decay=0.9, ema_warmup=False, success_l2=0.0)


def test_dit_pads_patches_and_starts_at_zero_output():
    config = GeneratorConfig.from_mapping(SMALL_DIT, vector_dim=33, cond_dim=8)
    assert config.num_patches == 4  # 33 values -> 4 patches of 10 (7 zeros of padding)
    dit = build_generator(config)
    x, t, c = torch.randn(3, 33), torch.tensor([0, 10, 999]), torch.randn(3, 8)
    out = dit(x, t, c)
    assert out.shape == (3, 33)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero + zeroed output layer: the DiT's init


def test_generator_config_errors_name_the_field():
    with pytest.raises(HarnessError) as error:
        GeneratorConfig.from_mapping({"preset": "DiT-XXL"}, vector_dim=4, cond_dim=4)
    assert error.value.field == "generator.preset"
    with pytest.raises(HarnessError) as error:
        GeneratorConfig.from_mapping({"hidden": 30, "heads": 4}, vector_dim=4, cond_dim=4)
    assert error.value.field == "generator.heads"  # named with its section


def test_v_prediction_loss_uses_the_v_target():
    """With a model that outputs the true velocity the loss is 0; the target is sqrt(a) eps - sqrt(1-a) x0."""
    config = DiffusionConfig()
    scheduler = config.train_scheduler()
    x0 = torch.randn(5, 12)
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (5,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    alpha = scheduler.alphas_cumprod[t].unsqueeze(1)
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0

    class Oracle(torch.nn.Module):
        def forward(self, x, steps, cond):
            assert torch.allclose(x, x_t, atol=1e-5)
            assert torch.equal(steps, t)
            return velocity

    loss = v_prediction_loss(Oracle(), x0, torch.zeros(5, 2), scheduler, torch.Generator().manual_seed(3))
    assert float(loss) < 1e-10


@pytest.mark.parametrize("steps", [1000, 50, 10])
def test_ddim_with_an_exact_velocity_model_recovers_the_data(steps):
    """DDIM (v-prediction, eta 0, no clipping) from any noise lands on x0 when the model's v is exact."""
    config = DiffusionConfig()
    alphas = config.train_scheduler().alphas_cumprod
    x0 = torch.randn(4, 9) * 3.0  # beyond [-1, 1]: clip_sample would destroy it

    class Exact(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, cond):
            a = alphas[t].unsqueeze(1)
            noise = (x - a.sqrt() * x0) / (1 - a).sqrt()
            return a.sqrt() * noise - (1 - a).sqrt() * x0

    out = ddim_sample(Exact(), torch.zeros(4, 2), 9, config, steps=steps, seed=1)
    assert torch.allclose(out, x0, atol=1e-3)


def test_normalizer_round_trips_and_keeps_constant_dimensions_finite():
    vectors = torch.randn(6, 5) * torch.tensor([1.0, 10.0, 0.1, 2.0, 0.0]) + 3
    normalizer = WeightNormalizer.fit(vectors)
    z = normalizer.normalize(vectors)
    assert torch.allclose(z[:, :4].mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(z[:, :4].std(0, unbiased=False), torch.ones(4), atol=1e-4)
    assert torch.equal(z[:, 4], torch.zeros(6))  # a constant dimension: std 1, value 0
    assert torch.allclose(normalizer.denormalize(z), vectors, atol=1e-5)


def test_l2_report_is_mean_plus_std_of_row_distances():
    generated = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    report = l2_report(generated, torch.zeros(2, 2))
    assert report["l2_mean"] == pytest.approx(2.5)
    assert report["l2_std"] == pytest.approx(2.5)
    assert report["l2_mean_plus_std"] == pytest.approx(5.0)


def _pairs(n=4, dim=21, cond_dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, cond_dim, generator=gen), torch.randn(n, dim, generator=gen)


@pytest.mark.parametrize("spec", [SMALL_MLP, SMALL_DIT], ids=["mlp", "dit"])
def test_training_memorises_the_pairs(spec):
    cond, targets = _pairs()
    config = GeneratorConfig.from_mapping(spec, vector_dim=targets.shape[1], cond_dim=cond.shape[1])
    diffusion = DiffusionConfig(ddim_steps=20)
    before = l2_report(ddim_sample(build_generator(config), cond, 21, diffusion), targets)["l2_mean"]
    train = TrainConfig(max_steps=400, eval_every=400, **MEMORISE)
    ema, result = train_generator(build_generator(config), cond, targets, diffusion, train, progress=False)
    after = result.evaluations[-1]["l2_mean"]
    assert result.steps == 400
    assert result.losses[-1] < 0.5 * 1.0  # v-loss starts near E||v||^2 = 1 per dimension
    assert after < 0.5 * before, (before, after)


def test_condition_noise_brings_samples_for_nearby_conditions_to_the_pair_target():
    gen = torch.Generator().manual_seed(0)
    cond, targets = torch.randn(8, 16, generator=gen), torch.randn(8, 21, generator=gen)
    # "paraphrases": each condition moved by ~25% of its norm (random directions)
    nearby = cond + 0.25 * cond.norm(dim=1, keepdim=True) / 4 * torch.randn(cond.shape, generator=gen)
    config = GeneratorConfig.from_mapping(SMALL_MLP, vector_dim=21, cond_dim=16)
    diffusion = DiffusionConfig(ddim_steps=20)
    distance = {}
    for cond_noise in (0.0, 0.3):
        train = TrainConfig(max_steps=600, eval_every=600, cond_noise=cond_noise, **MEMORISE)
        ema, _ = train_generator(build_generator(config), cond, targets, diffusion, train, progress=False)
        distance[cond_noise] = l2_report(ddim_sample(ema, nearby, 21, diffusion), targets)["l2_mean"]
    assert distance[0.3] < 0.8 * distance[0.0], distance  # measured: 0.64 against 1.01 at 10 steps
    with pytest.raises(HarnessError, match="cond_noise"):
        TrainConfig(cond_noise=-0.1)


def _train_checkpointed(folder, max_steps, lr_decay_steps=0, lineage=None):
    """A short run of the small MLP on :func:`_pairs`, checkpointed in ``folder`` (None: not); with
    ``lineage``, the folder is first seeded by :func:`continue_shorter_run` as the editor does."""
    cond, targets = _pairs()
    config = GeneratorConfig.from_mapping(SMALL_MLP, vector_dim=21, cond_dim=6)
    settings = TrainConfig(max_steps=max_steps, lr_decay_steps=lr_decay_steps, **CHECKPOINTED)
    if lineage is not None:
        continue_shorter_run(folder, lineage, settings)
    return train_generator(
        build_generator(config),
        cond,
        targets,
        DiffusionConfig(ddim_steps=5),
        settings,
        checkpoint_dir=folder,
        progress=False,
    )


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_checkpoint_resume_matches_an_uninterrupted_run(tmp_path):
    whole, _ = _train_checkpointed(None, 30)
    _, first = _train_checkpointed(tmp_path / "ckpt", 20)
    resumed, result = _train_checkpointed(tmp_path / "ckpt", 30)
    assert result.resumed_from == 20 and result.steps == 30
    # the first run's time up to its last checkpoint, read back
    assert first.resumed_s == 0.0 and 0.0 < result.resumed_s <= first.wall_s
    _assert_same_weights(whole, resumed)


def test_raising_max_steps_continues_the_longest_shorter_run_of_the_same_lineage(tmp_path):
    whole, _ = _train_checkpointed(None, 30)
    assert continue_shorter_run(tmp_path / "short", "L", TrainConfig(max_steps=20, **CHECKPOINTED)) == 0
    _train_checkpointed(tmp_path / "short", 20)
    assert continue_shorter_run(tmp_path / "other", "M", TrainConfig(max_steps=30, **CHECKPOINTED)) == 0
    assert continue_shorter_run(tmp_path / "shorter", "L", TrainConfig(max_steps=15, **CHECKPOINTED)) == 0
    assert continue_shorter_run(tmp_path / "long", "L", TrainConfig(max_steps=30, **CHECKPOINTED)) == 20
    continued, result = _train_checkpointed(tmp_path / "long", 30)
    assert result.resumed_from == 20 and result.steps == 30
    _assert_same_weights(whole, continued)


def test_an_lr_decay_continues_the_constant_lr_run_and_is_not_continued_past_its_constant_span(tmp_path):
    whole, _ = _train_checkpointed(None, 30, lr_decay_steps=10)
    _train_checkpointed(tmp_path / "constant20", 20, lineage="L")
    continued, result = _train_checkpointed(tmp_path / "decayed30", 30, lr_decay_steps=10, lineage="L")
    assert result.resumed_from == 20 and result.steps == 30
    _assert_same_weights(whole, continued)
    # the decayed run's checkpoint (step 30) is past its constant span (20): a longer constant run restarts
    # from the constant run's step 20, and a decay from step 10 shares only 10 constant steps with either
    assert continue_shorter_run(tmp_path / "constant40", "L", TrainConfig(max_steps=40, **CHECKPOINTED)) == 20
    early_decay = TrainConfig(max_steps=30, lr_decay_steps=20, **CHECKPOINTED)
    assert continue_shorter_run(tmp_path / "decayed30from10", "L", early_decay) == 0


def test_learning_rate_is_constant_then_falls_linearly_over_the_decay_steps():
    config = TrainConfig(lr=1.0, max_steps=10, lr_decay_steps=4)
    assert [learning_rate(config, step) for step in range(10)] == [1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert {learning_rate(TrainConfig(lr=0.5, max_steps=10), step) for step in range(10)} == {0.5}
    for bad in (11, -1, 2.5):
        with pytest.raises(HarnessError, match="lr_decay_steps"):
            TrainConfig(max_steps=10, lr_decay_steps=bad)


def test_lr_decay_fits_the_pairs_closer_than_a_constant_lr_for_the_same_steps():
    cond, targets = _pairs(n=8)
    config = GeneratorConfig.from_mapping(SMALL_MLP, vector_dim=21, cond_dim=6)
    diffusion = DiffusionConfig(ddim_steps=20)
    distance = {}
    for lr_decay_steps in (0, 200):
        train = TrainConfig(max_steps=400, eval_every=400, lr_decay_steps=lr_decay_steps, **MEMORISE)
        _, result = train_generator(build_generator(config), cond, targets, diffusion, train, progress=False)
        distance[lr_decay_steps] = result.evaluations[-1]["l2_mean"]
    assert distance[200] < 0.8 * distance[0], distance  # measured: 0.33 against 0.47


# Paper configurations (A.3): DiT-B/100-value patches over each model's neuron vector, conditioned on
# BERT-base's 768-wide [CLS]. Neuron widths come from the adapters on config-only (meta-device) models.
PAPER_MODELS = {
    "phi-2": (
        "PhiConfig",
        dict(
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=32,
            num_attention_heads=32,
            vocab_size=51200,
        ),
        29,
        5121,
    ),
    "gpt-j-6b": (
        "GPTJConfig",
        dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400),
        9,
        8193,
    ),
    "llama3-8b": (
        "LlamaConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
        ),
        14,
        8192,
    ),
}


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_paper_configurations_build_from_config(name, capsys):
    import transformers

    from meg_harness.meg.hparams import MEGHyperParams
    from meg_harness.meg.neuron import ffn_has_bias
    from meg_harness.models.adapters import get_adapter

    config_class, values, layer, width = PAPER_MODELS[name]
    hp = MEGHyperParams.from_hparams(f"hparams/MEG/{name}.yaml")
    assert hp.layer == layer
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**values))
    adapter = get_adapter(model)
    vector_dim = 2 * adapter.hidden_size(model) + int(ffn_has_bias(model, hp.layer, adapter))
    assert vector_dim == width
    config = GeneratorConfig.from_mapping(hp.generator, vector_dim=vector_dim, cond_dim=768)
    assert (config.hidden, config.depth, config.heads, config.patch_size) == (768, 12, 12, 100)
    with torch.device("meta"):
        dit = build_generator(config)
    count = parameter_count(dit)
    with capsys.disabled():
        print(
            f"\n{name}: neuron width {vector_dim}, {config.num_patches} patches, "
            f"DiT-B {count / 1e6:.1f}M params"
        )
    assert 100e6 < count < 200e6
    assert math.ceil(width / 100) == config.num_patches
