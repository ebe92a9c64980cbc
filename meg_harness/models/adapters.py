"""Architecture adapters: where each model family keeps its FFN, and how one FFN neuron is laid out.

A MeG neuron added at layer L contributes ``act(x . k + b) * v`` to the output of ``mlp(model, L)``, where
``x`` is the FFN's input (the normed hidden state), ``act`` the FFN's activation, ``k``/``b`` a key row and
bias, and ``v`` a value column. For plain FFNs (GPT-2, GPT-J, Phi) this is exactly one more hidden unit.
For gated FFNs (Llama, Qwen2, Mistral, Gemma-3) the neuron has no gate, as in the official MeG code for
Llama-3: one key vector with the MLP's activation and one ``down_proj`` column.

Selection is by ``config.model_type`` through :data:`ADAPTERS`; nothing else in the package branches on
model names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from meg_harness.errors import HarnessError
from meg_harness.models.nethook import Trace

# Tokens whose presence in a tokenizer's vocabulary selects a chat template (checked in order).
CHAT_MARKERS: tuple[tuple[str, str], ...] = (
    ("<|im_start|>", "chatml"),
    ("<|start_header_id|>", "llama3"),
)


LONG_SUFFIX = "_long"  # = meg_harness.prompts.LONG_SUFFIX (models and prompts do not import each other)


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module names and neuron layout of one model family.

    Module-name templates are ROME/MEMIT style: ``layer_module_tmp.format(L)`` names layer L. ``key_proj`` is
    the FFN's input projection (for gated FFNs the ``up_proj``: its rows have the key's shape and scale),
    ``value_proj`` the output projection (= ``rewrite_module_tmp``), ``gate_proj`` the gate (gated only).
    ``rewrite_is_conv1d``: GPT-2's Conv1D stores weights as ``[in, out]``, transposed from ``nn.Linear``.
    """

    family: str
    layer_module_tmp: str
    mlp_attr: str
    attn_attr: str
    key_proj: str
    value_proj: str
    act_attr: str
    embed_module: str
    final_norm: str
    lm_head: str = "lm_head"
    gate_proj: str | None = None
    rewrite_is_conv1d: bool = False
    fallback_template: str = "gptj"
    chat_markers: tuple[tuple[str, str], ...] = CHAT_MARKERS
    text_config_attr: str | None = None  # multimodal configs nest the LM's config (gemma3: text_config)
    # Absolute position embeddings the decoder adds to ``inputs_embeds`` (GPT-2: wpe); None for rotary models.
    position_embedding_module: str | None = None

    # -- module-name templates ------------------------------------------------------------------------
    @property
    def layers_module(self) -> str:
        """Name of the ModuleList of decoder layers."""
        return self.layer_module_tmp.rsplit(".", 1)[0]

    @property
    def mlp_module_tmp(self) -> str:
        return f"{self.layer_module_tmp}.{self.mlp_attr}"

    @property
    def attn_module_tmp(self) -> str:
        return f"{self.layer_module_tmp}.{self.attn_attr}"

    @property
    def rewrite_module_tmp(self) -> str:
        """The FFN output projection (c_proj / fc_out / fc2 / down_proj): what locate-then-edit rewrites."""
        return f"{self.mlp_module_tmp}.{self.value_proj}"

    @property
    def key_module_tmp(self) -> str:
        return f"{self.mlp_module_tmp}.{self.key_proj}"

    @property
    def gated(self) -> bool:
        return self.gate_proj is not None

    # -- config ---------------------------------------------------------------------------------------
    def text_config(self, model_or_config: nn.Module | object) -> object:
        """The language model's config (the nested text config for multimodal models)."""
        config = getattr(model_or_config, "config", model_or_config)
        return getattr(config, self.text_config_attr) if self.text_config_attr else config

    def hidden_size(self, model: nn.Module) -> int:
        cfg = self.text_config(model)
        return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def intermediate_size(self, model: nn.Module, layer: int) -> int:
        return int(self.neuron_key_weight(model, layer).shape[0])

    # -- modules --------------------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_module)

    def _layer_index(self, model: nn.Module, layer: int) -> int:
        n = self.num_layers(model)
        if not -n <= layer < n:
            raise HarnessError(f"layer {layer} out of range: the {self.family} model has {n}", field="layer")
        return layer % n

    def mlp(self, model: nn.Module, layer: int) -> nn.Module:
        """The FFN of ``layer``: input = normed hidden state, output joins the residual stream."""
        return model.get_submodule(self.mlp_module_tmp.format(self._layer_index(model, layer)))

    def activation(self, model: nn.Module, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return getattr(self.mlp(model, layer), self.act_attr)

    def _proj(self, model: nn.Module, layer: int, name: str) -> nn.Module:
        return getattr(self.mlp(model, layer), name)

    # -- neuron layout --------------------------------------------------------------------------------
    def neuron_key_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """Input-projection rows ``[intermediate, hidden]`` (a view; for gated FFNs: ``up_proj`` rows)."""
        w = self._proj(model, layer, self.key_proj).weight
        return w.t() if self.rewrite_is_conv1d else w

    def neuron_key_bias(self, model: nn.Module, layer: int) -> torch.Tensor | None:
        """Input-projection bias ``[intermediate]``, or None when the FFN has none (Llama)."""
        return getattr(self._proj(model, layer, self.key_proj), "bias", None)

    def neuron_gate_weight(self, model: nn.Module, layer: int) -> torch.Tensor | None:
        """Gate rows ``[intermediate, hidden]`` for gated FFNs, else None."""
        return self._proj(model, layer, self.gate_proj).weight if self.gate_proj else None

    def neuron_value_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """Output-projection columns ``[hidden, intermediate]`` (a view)."""
        w = self._proj(model, layer, self.value_proj).weight
        return w.t() if self.rewrite_is_conv1d else w

    def neuron_output(
        self,
        model: nn.Module,
        layer: int,
        x: torch.Tensor,
        key: torch.Tensor,
        bias: torch.Tensor | float | None,
        value: torch.Tensor,
    ) -> torch.Tensor:
        """``act(x . key + bias) * value`` for FFN inputs ``x [..., hidden]``: one neuron's contribution."""
        pre = x @ key if bias is None else x @ key + bias
        return self.activation(model, layer)(pre).unsqueeze(-1) * value

    def add_neuron(
        self,
        model: nn.Module,
        layer: int,
        key: torch.Tensor,
        bias: torch.Tensor | float | None,
        value: torch.Tensor,
    ) -> Trace:
        """Add one neuron at every position (a forward hook on the FFN); ``handle.remove()`` undoes it."""

        def add(_name: str, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return output + self.neuron_output(model, layer, x, key, bias, value).to(output.dtype)

        return Trace(self.mlp(model, layer), edit_output=add)

    # -- templates ------------------------------------------------------------------------------------
    def default_template(
        self, model: nn.Module | None = None, tokenizer: object | None = None, *, long_answers: bool = False
    ) -> str:
        """Query-template name: a chat template when the tokenizer has its markers, else the family's; with
        ``long_answers`` its long-answer form ``<name>_long`` (no "less than 5 words"; UnKEBench), which
        :data:`meg_harness.prompts.TEMPLATES` holds for every name an adapter gives."""
        name = self.fallback_template
        if tokenizer is not None:
            vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
            name = next((chat for marker, chat in self.chat_markers if marker in vocab), name)
        return name + LONG_SUFFIX if long_answers else name


def _decoder(family: str, prefix: str, fallback: str, **kw: object) -> ArchitectureAdapter:
    """A Llama-style (``model.layers``) adapter with a gated MLP."""
    defaults = dict(
        layer_module_tmp=f"{prefix}layers.{{}}",
        mlp_attr="mlp",
        attn_attr="self_attn",
        key_proj="up_proj",
        gate_proj="gate_proj",
        value_proj="down_proj",
        act_attr="act_fn",
        embed_module=f"{prefix}embed_tokens",
        final_norm=f"{prefix}norm",
        fallback_template=fallback,
    )
    defaults.update(kw)
    return ArchitectureAdapter(family=family, **defaults)


GPT2 = ArchitectureAdapter(
    family="gpt2",
    layer_module_tmp="transformer.h.{}",
    mlp_attr="mlp",
    attn_attr="attn",
    key_proj="c_fc",
    value_proj="c_proj",
    act_attr="act",
    embed_module="transformer.wte",
    final_norm="transformer.ln_f",
    rewrite_is_conv1d=True,
    fallback_template="gptj",
    position_embedding_module="transformer.wpe",
)
GPTJ = ArchitectureAdapter(
    family="gptj",
    layer_module_tmp="transformer.h.{}",
    mlp_attr="mlp",
    attn_attr="attn",
    key_proj="fc_in",
    value_proj="fc_out",
    act_attr="act",
    embed_module="transformer.wte",
    final_norm="transformer.ln_f",
    fallback_template="gptj",
)
PHI = ArchitectureAdapter(
    family="phi",
    layer_module_tmp="model.layers.{}",
    mlp_attr="mlp",
    attn_attr="self_attn",
    key_proj="fc1",
    value_proj="fc2",
    act_attr="activation_fn",
    embed_module="model.embed_tokens",
    final_norm="model.final_layernorm",
    fallback_template="phi2",
)
LLAMA = _decoder("llama", "model.", "gptj")
QWEN2 = _decoder("qwen2", "model.", "chatml")
MISTRAL = _decoder("mistral", "model.", "gptj")
# Gemma-3's FFN output passes through post_feedforward_layernorm before the residual add; the neuron is
# still added to the FFN output (= one more FFN unit). Multimodal gemma3 nests the LM in model.language_model.
GEMMA3_TEXT = _decoder("gemma3_text", "model.", "gptj")
GEMMA3 = _decoder("gemma3", "model.language_model.", "gptj", text_config_attr="text_config")

ADAPTERS: dict[str, ArchitectureAdapter] = {
    "gpt2": GPT2,
    "gptj": GPTJ,
    "phi": PHI,
    "llama": LLAMA,
    "qwen2": QWEN2,
    "qwen3": _decoder("qwen3", "model.", "chatml"),
    "mistral": MISTRAL,
    "gemma3_text": GEMMA3_TEXT,
    "gemma3": GEMMA3,
}


def get_adapter(model_or_config: nn.Module | object) -> ArchitectureAdapter:
    """The adapter for a model or config, chosen by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise HarnessError(
            f"unsupported architecture (model_type {model_type!r}); supported: {', '.join(sorted(ADAPTERS))}",
            field="model",
        )
    return ADAPTERS[model_type]
