"""Tiny random causal LMs (2 layers, width 64) with an offline-trained byte-level BPE tokenizer, for tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from meg_harness.errors import HarnessError

VOCAB_SIZE = 768
N_POSITIONS = 1024  # lm-eval's HFLM asserts max_length - max_gen_toks(256) > 0
BOS = EOS = "<|endoftext|>"
PAD = "<pad>"

# arch -> config keyword arguments (vocab size and special-token ids are filled in)
_ARCH_CONFIGS: dict[str, Callable[[], dict]] = {
    "gpt2": lambda: dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=N_POSITIONS),
    "gptj": lambda: dict(
        model_type="gptj",
        n_embd=64,
        n_layer=2,
        n_head=4,
        rotary_dim=8,
        n_positions=N_POSITIONS,
        tie_word_embeddings=False,
    ),
    "llama": lambda: dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=N_POSITIONS,
        tie_word_embeddings=True,
    ),
    "phi": lambda: dict(
        model_type="phi",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=N_POSITIONS,
        partial_rotary_factor=0.5,
        tie_word_embeddings=False,
    ),
}
TINY_ARCHS: tuple[str, ...] = tuple(_ARCH_CONFIGS)


def tiny_corpus() -> str:
    """The small English corpus shipped with the package (capitals, countries, languages, questions)."""
    return resources.files("meg_harness.models").joinpath("tiny_corpus.txt").read_text(encoding="utf-8")


def make_tiny_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A GPT-2-style byte-level BPE tokenizer (no prefix space) trained offline on :func:`tiny_corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus().splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=PAD,
        model_max_length=N_POSITIONS,
    )


def make_tiny_model(out_dir: str | os.PathLike, arch: str = "llama", seed: int = 0) -> Path:
    """Build a random tiny ``arch`` model + tokenizer in ``out_dir`` (deterministic given ``seed``).

    It loads with :func:`meg_harness.models.load_model` and ``AutoModelForCausalLM.from_pretrained``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in _ARCH_CONFIGS:
        known = ", ".join(TINY_ARCHS)
        raise HarnessError(f"unknown tiny-model arch {arch!r}; use one of {known}", field="arch")
    tokenizer = make_tiny_tokenizer()
    kw = _ARCH_CONFIGS[arch]()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    config = AutoConfig.for_model(kw.pop("model_type"), vocab_size=len(tokenizer), **ids, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = pad
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.is_dir():  # keep the directory (and anything else in it); replace our files one by one
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
        elif out.exists():
            raise HarnessError(f"{out} exists and is not a directory", file=out)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
