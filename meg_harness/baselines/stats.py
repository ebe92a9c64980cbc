"""Second-moment statistics ``C = E[k k^T]`` of the keys entering a layer's rewrite module (the FFN output
projection), over the tokens of corpus samples.

Streaming: samples are read lazily and processed ``mom2_batch_size`` at a time, each truncated to
``mom2_max_length`` tokens, so memory is bounded by the batch, not by ``mom2_n_samples``. All requested
layers are accumulated in one pass (the forward stops after the deepest one). Each layer's result is cached
as ``<cache>/layer_stats/<hash>.safetensors`` keyed by (model, tokenizer, module, corpus, start, n,
max length, dtype); a sum and a count are stored, so statistics of disjoint parts combine into their average.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from meg_harness.baselines.corpus import corpus_id, iter_corpus
from meg_harness.baselines.params import StatsHParams
from meg_harness.baselines.plan import pad_id
from meg_harness.cache import atomic_path, content_hash, default_cache_dir, exclusive
from meg_harness.errors import HarnessError
from meg_harness.models.adapters import get_adapter
from meg_harness.models.layer_cache import right_pad_ids
from meg_harness.models.loading import model_fingerprint
from meg_harness.models.nethook import TraceDict, model_device

log = logging.getLogger(__name__)

CACHE_VERSION = "layer-stats/v1"
STAT_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class SecondMoment:
    """Running ``sum k k^T`` over ``count`` key vectors (from ``samples`` corpus samples)."""

    total: torch.Tensor
    count: int = 0
    samples: int = 0

    @classmethod
    def zeros(cls, dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> SecondMoment:
        return cls(torch.zeros(dim, dim, dtype=dtype, device=device))

    def update(self, keys: torch.Tensor) -> None:
        """Add key vectors ``[n, d]``."""
        keys = keys.to(self.total.dtype)
        self.total.addmm_(keys.T, keys)
        self.count += keys.shape[0]

    def merge(self, other: SecondMoment) -> SecondMoment:
        """The statistics of both parts together (their count-weighted average)."""
        total = self.total + other.total.to(self.total.device, self.total.dtype)
        return SecondMoment(total, self.count + other.count, self.samples + other.samples)

    def moment(self) -> torch.Tensor:
        """``E[k k^T]``."""
        if self.count == 0:
            raise HarnessError("no key vectors were collected (empty corpus?)", field="mom2_dataset")
        return self.total / self.count

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            meta = {"count": str(self.count), "samples": str(self.samples)}
            save_file({"total": self.total.detach().cpu().contiguous()}, tmp, metadata=meta)

    @classmethod
    def load(cls, path: Path) -> SecondMoment:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            return cls(handle.get_tensor("total"), int(meta["count"]), int(meta["samples"]))


def tokenizer_id(tokenizer) -> str:
    """A content hash of the vocabulary (tokens decide which keys the statistics see)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return content_hash(type(tokenizer).__name__, vocab)[:16]


def stats_key(
    fingerprint: str, tok_id: str, module: str, hp: StatsHParams, start: int, corpus: str | None = None
) -> str:
    return content_hash(
        CACHE_VERSION,
        fingerprint,
        tok_id,
        module,
        corpus or corpus_id(hp.mom2_dataset),
        start,
        hp.mom2_n_samples,
        hp.mom2_max_length,
        hp.mom2_dtype,
    )


def layer_second_moments(
    model: nn.Module,
    tokenizer,
    layers: Sequence[int],
    hp: StatsHParams,
    *,
    start: int = 0,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    fingerprint: str | None = None,
    progress: bool = True,
) -> dict[int, SecondMoment]:
    """Second moments of the rewrite-module keys of each layer over corpus samples ``[start, start+n)``."""
    if hp.mom2_dtype not in STAT_DTYPES:
        raise HarnessError(f"mom2_dtype must be one of {sorted(STAT_DTYPES)}", field="hparams.mom2_dtype")
    adapter = get_adapter(model)
    modules = {layer: adapter.rewrite_module_tmp.format(layer) for layer in layers}
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = folder / "layer_stats"
    paths: dict[int, Path] = {}
    if use_cache:
        fingerprint = fingerprint or model_fingerprint(model)
        tok, corpus = tokenizer_id(tokenizer), corpus_id(hp.mom2_dataset)
        for layer, module in modules.items():
            paths[layer] = (
                folder / f"{stats_key(fingerprint, tok, module, hp, start, corpus)[:32]}.safetensors"
            )
    found = {layer: SecondMoment.load(p) for layer, p in paths.items() if p.is_file()}
    missing = [layer for layer in modules if layer not in found]
    if missing:
        # with a cache, a run computing the same statistics is waited for, and its result read
        lock = exclusive(paths[missing[0]].with_suffix(".lock")) if use_cache else contextlib.nullcontext()
        with lock:
            found |= {
                layer: SecondMoment.load(p)
                for layer, p in paths.items()
                if layer not in found and p.is_file()
            }
            missing = [layer for layer in modules if layer not in found]
            modules_left = {layer: modules[layer] for layer in missing}
            computed = _accumulate(model, tokenizer, modules_left, hp, start, progress) if missing else {}
            for layer, stat in computed.items():
                if use_cache:
                    stat.save(paths[layer])
                found[layer] = stat
    return {layer: found[layer] for layer in layers}


@torch.no_grad()
def _accumulate(model, tokenizer, modules: dict[int, str], hp: StatsHParams, start: int, progress: bool):
    device = model_device(model)
    dtype = STAT_DTYPES[hp.mom2_dtype]
    stats: dict[int, SecondMoment] = {}
    names = [modules[layer] for layer in sorted(modules)]  # the deepest last: the forward stops after it
    samples = iter_corpus(hp.mom2_dataset, start)
    bar = tqdm(total=hp.mom2_n_samples, desc=f"layer stats {sorted(modules)}", disable=not progress)
    seen = 0
    while seen < hp.mom2_n_samples:
        texts = [t for _, t in zip(range(min(hp.mom2_batch_size, hp.mom2_n_samples - seen)), samples)]
        if not texts:
            log.warning("corpus %s has only %d samples (%d asked)", hp.mom2_dataset, seen, hp.mom2_n_samples)
            break
        encoded = [tokenizer(t, truncation=True, max_length=hp.mom2_max_length)["input_ids"] for t in texts]
        ids, mask = right_pad_ids(encoded, pad_id(tokenizer), device)
        with TraceDict(model, names, retain_input=True, stop=True) as trace:
            model(input_ids=ids, attention_mask=mask)
        keep = mask.bool()
        for layer, module in modules.items():
            keys = trace[module].input[keep]
            if layer not in stats:
                stats[layer] = SecondMoment.zeros(keys.shape[-1], dtype, device)
            stats[layer].update(keys)
        seen += len(texts)
        bar.update(len(texts))
    bar.close()
    if not stats:
        raise HarnessError(f"corpus {hp.mom2_dataset!r} yielded no samples", field="hparams.mom2_dataset")
    for stat in stats.values():
        stat.samples = seen
        stat.total = stat.total.cpu()
    return stats
