"""The ``meg`` method: the four MeG stages behind the Editor interface (paper 4.1-4.2).

``fit``: (1) text encoder, tuned on pseudo-knowledge pairs disjoint from the edits (cached); (2) familiarity
network on the edit prompts' embeddings (with ``familiarity.negatives``, also on pseudo-irrelevant prompts');
(3) one neuron per edit by knowledge-weight collection (cached, resumable); (4) the weight generator on
(embedding -> normalised neuron) pairs (cached, resumable). The result is a
:class:`~meg_harness.meg.model.MegEdited`; ``save`` writes the MeG artifact, ``load`` reads it back.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meg_harness.cache import content_hash, default_cache_dir
from meg_harness.data.edit_case import EditCase
from meg_harness.editing.base import Edited, Editor, reused_work
from meg_harness.editing.registry import register_method
from meg_harness.errors import HarnessError
from meg_harness.meg.collect import collect_neurons
from meg_harness.meg.diffusion import WeightNormalizer
from meg_harness.meg.encoder import TextEncoder, load_text_encoder
from meg_harness.meg.familiarity import train_familiarity
from meg_harness.meg.generator import GeneratorConfig, build_generator, parameter_count
from meg_harness.meg.hparams import EncoderSettings, MEGHyperParams
from meg_harness.meg.model import MegEdited, MegModel
from meg_harness.meg.train_generator import LENGTH_SETTINGS, continue_shorter_run, train_generator
from meg_harness.models.adapters import get_adapter
from meg_harness.models.loading import model_fingerprint
from meg_harness.prompts import QueryTemplate
from meg_harness.ranks import world

GENERATOR_CACHE_VERSION = "meg-generator/v1"
# Training settings added after the cache format was fixed: they enter the cache key only when they differ
# from these (their defaults), so generators cached before them stay valid.
TRAIN_SETTINGS_ADDED_LATER = {"cond_noise": 0.0, "lr_decay_steps": 0}


def _tensor_digest(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _require_pairs(settings: EncoderSettings) -> None:
    if settings.tuning != "frozen" and settings.pairs is None:
        raise HarnessError(
            f"encoder tuning {settings.tuning!r} needs pseudo-knowledge pairs: set encoder.pairs to a data "
            "file disjoint from the edits (e.g. counterfact-train.json), or encoder.tuning: frozen",
            field="encoder.pairs",
        )


def _looks_like_path(name: str) -> bool:
    """A filesystem path rather than an alias (``minilm``) or a hub id (``owner/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _is_local(source: str) -> bool:
    """A data source that is a local file (not a URL, ``hf://`` or ``download``)."""
    return "://" not in source and source.lower() != "download"


def _source_cases(path: str, data_format: str) -> list[EditCase]:
    from meg_harness.data import load_cases

    return load_cases(data_format, path)


def encoder_pairs(hp: MEGHyperParams) -> list[tuple[str, str]]:
    """The pseudo-knowledge pairs of the encoder section (from its ``pairs`` file)."""
    from meg_harness.meg.tuning import pairs_from_cases, pairs_from_mquake

    settings = hp.encoder
    _require_pairs(settings)
    cases = _source_cases(settings.pairs, settings.pairs_format)
    return pairs_from_mquake(cases) if settings.pairs_format == "mquake" else pairs_from_cases(cases)


def irrelevant_prompts(hp: MEGHyperParams, cases: list[EditCase], n: int) -> list[str]:
    """A.3's pseudo-irrelevant prompts: ``n`` prompts of the augment source absent from the edits."""
    import random

    source = hp.augment.source or hp.encoder.pairs
    if source is None:
        raise HarnessError(
            "pseudo-irrelevant prompts (augment, familiarity.negatives) need augment.source (or "
            "encoder.pairs) to draw from",
            field="augment.source",
        )
    data_format = hp.augment.source_format or hp.encoder.pairs_format
    edited = {c.prompt for c in cases} | {r for c in cases for r in c.rephrases}
    prompts = sorted({c.prompt for c in _source_cases(source, data_format)} - edited)
    return random.Random(hp.seed).sample(prompts, min(n, len(prompts)))


@register_method
class MegEditor(Editor):
    """MeG (Massive editing via dynamic weight Generation)."""

    name = "meg"

    def __init__(self, hparams: dict[str, Any] | None = None) -> None:
        super().__init__(hparams)
        self.hp = MEGHyperParams.from_dict(self.hparams)

    def params(self) -> MEGHyperParams:
        return self.hp

    def preflight(self, model: Any) -> None:
        """The layer against the model; the encoder and the data files the stages read, before any work."""
        n = get_adapter(model).num_layers(model)
        if not 0 <= self.hp.layer < n:
            raise HarnessError(f"layer {self.hp.layer} out of range: the model has {n} layers", field="layer")
        encoder = self.hp.encoder
        _require_pairs(encoder)
        if _looks_like_path(encoder.name) and not Path(encoder.name).is_dir():
            raise HarnessError(f"no encoder folder {encoder.name!r}", field="encoder.name")
        sources = {"encoder.pairs": encoder.pairs if encoder.tuning != "frozen" else None}
        if self.hp.augment.enabled or self.hp.familiarity.negatives:
            sources["augment.source"] = self.hp.augment.source or encoder.pairs
        for name, source in sources.items():
            if source is not None and _is_local(source) and not Path(source).is_file():
                raise HarnessError(f"no such data file {source!r}", field=name)

    def fit(self, model: Any, tokenizer: Any, cases, template: QueryTemplate) -> Edited:
        hp = self.params()
        cases = list(cases)
        device = next(model.parameters()).device
        info: dict[str, Any] = {}
        started = time.perf_counter()
        encoder = self.text_encoder(hp).to(device)
        info["encoder_s"] = time.perf_counter() - started

        clock = time.perf_counter()
        prompts = [case.prompt for case in cases]
        embeddings = encoder.encode(prompts).to(device)
        familiarity = None
        if hp.familiarity.enabled:
            f = hp.familiarity
            negatives = None
            if f.negatives:
                negatives = encoder.encode(irrelevant_prompts(hp, cases, f.negatives)).to(device)
            familiarity = train_familiarity(
                embeddings,
                seed=hp.seed,
                progress=False,
                hidden=f.hidden,
                n_blocks=f.n_blocks,
                num_classes=f.num_classes,
                lr=f.lr,
                max_epochs=f.max_epochs,
                loss_tol=f.loss_tol,
                negatives=negatives,
                negative_weight=f.negative_weight,
            )
            info["familiarity"] = familiarity.train_info
        info["familiarity_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        collection = collect_neurons(model, tokenizer, cases, template, hp.collect, cache_dir=self.cache_dir)
        info["collection"] = {
            "success_rate": 100.0 * collection.success_rate,
            "mean_steps": sum(collection.steps) / len(collection.steps),
            "mode": collection.mode,
            "reused": collection.reused,
        }
        info["collection_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        targets = collection.neurons.flatten().float().cpu()
        cond = embeddings.float().cpu()
        if hp.augment.enabled:
            extra = irrelevant_prompts(hp, cases, hp.augment.n)
            cond = torch.cat([cond, encoder.encode(extra).float().cpu()])
            targets = torch.cat([targets, torch.zeros(len(extra), targets.shape[1])])
            info["augment_prompts"] = len(extra)
        generator, generator_config, normalizer, report = self.generator(hp, cond, targets, device)
        info["generator"] = report
        info["generator_s"] = time.perf_counter() - clock
        info["reused"] = [
            reused_work("neurons", collection.reused, len(cases)),
            reused_work("generator steps", report["resumed_from"], report["steps"], report["resumed_s"]),
        ]

        adapter = get_adapter(model)
        meg = MegModel(
            encoder=encoder,
            familiarity=familiarity,
            generator=generator,
            generator_config=generator_config,
            normalizer=normalizer,
            diffusion=hp.diffusion,
            layer=collection.layer,
            hidden=adapter.hidden_size(model),
            has_bias=bool(collection.neurons.has_bias),
            threshold=hp.familiarity.threshold,
            seed=hp.seed,
            extra={
                "base_model": getattr(model.config, "_name_or_path", ""),
                "base_fingerprint": model_fingerprint(model),
                "template": {"name": template.name, "text": template.text, "terminator": template.terminator},
                "hparams": hp.to_dict(),
                "n_edits": len(cases),
            },
        ).to(device)
        edited = MegEdited(model, tokenizer, meg, template)
        edited.info = info
        return edited

    def text_encoder(self, hp: MEGHyperParams) -> TextEncoder:
        """Stage 1: the base encoder, tuned on the pairs unless ``encoder.tuning`` is ``frozen``."""
        from meg_harness.meg.tuning import tune_encoder

        settings = hp.encoder
        encoder = load_text_encoder(settings.name)
        if settings.tuning == "frozen":
            return encoder
        return tune_encoder(
            encoder,
            encoder_pairs(hp),
            loss=settings.tuning,
            tau=settings.tau,
            lr=settings.lr,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            seed=hp.seed,
            max_pairs=settings.max_pairs,
            cache_dir=self.cache_dir,
        )

    def generator(
        self, hp: MEGHyperParams, cond: torch.Tensor, targets: torch.Tensor, device: torch.device
    ) -> tuple[nn.Module, GeneratorConfig, WeightNormalizer, dict[str, Any]]:
        """Stage 4: train (or read back from the cache) the generator on ``cond -> targets`` (raw neurons)."""
        config = GeneratorConfig.from_mapping(
            hp.generator, vector_dim=targets.shape[1], cond_dim=cond.shape[1]
        )
        normalizer = WeightNormalizer.fit(targets)
        processes = world()[1]  # data-parallel training (a launcher's ranks) draws other batches
        shape = (
            GENERATOR_CACHE_VERSION,
            _tensor_digest(cond, targets),
            config.to_dict(),
            hp.diffusion.to_dict(),
            *([{"processes": processes}] if processes > 1 else []),  # one process: the keys as before
        )
        train = {
            k: v
            for k, v in hp.train.to_dict().items()
            if k != "max_minutes"
            and not (k in TRAIN_SETTINGS_ADDED_LATER and v == TRAIN_SETTINGS_ADDED_LATER[k])
        }
        key = content_hash(*shape, train)
        lineage = content_hash(*shape, {k: v for k, v in train.items() if k not in LENGTH_SETTINGS})
        folder = Path(self.cache_dir or default_cache_dir()) / "generators" / key[:32]
        continue_shorter_run(folder, lineage, hp.train)
        generator = build_generator(config, seed=hp.train.seed).to(device)
        ema, result = train_generator(
            generator,
            cond.to(device),
            normalizer.normalize(targets).to(device),
            hp.diffusion,
            hp.train,
            checkpoint_dir=folder,
        )
        report = {"parameters": parameter_count(ema), **result.to_dict(), "cache": str(folder)}
        return ema, config, normalizer.to(device), report

    def save(self, edited: Edited, directory: Path) -> None:
        super().save(edited, directory)
        if not isinstance(edited, MegEdited):
            raise HarnessError("the meg editor can only save what its fit returned")
        edited.meg.save_pretrained(directory)
        (Path(directory) / "fit.json").write_text(json.dumps(edited.info, indent=2, default=str) + "\n")

    @classmethod
    def load(cls, directory: Path, model: Any, tokenizer: Any) -> Edited:
        from meg_harness.prompts import QueryTemplate

        meg = MegModel.from_pretrained(directory, device=next(model.parameters()).device)
        spec = (meg.extra or {}).get("template")
        template = QueryTemplate(spec["name"], spec["text"], spec.get("terminator", "\n")) if spec else None
        return MegEdited(model, tokenizer, meg, template)
