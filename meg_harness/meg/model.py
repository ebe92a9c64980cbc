"""MeG at inference (paper 4.2): query -> encoder -> familiarity entropy -> (DDIM -> neuron) or nothing.

:class:`MegModel` holds the trained parts and turns a batch of questions into per-row neurons;
:class:`MegEdited` is the :class:`~meg_harness.editing.base.Edited` the evaluator (and the lm-eval ``meg``
model) uses: inside ``rows(questions)`` row b carries the neuron generated for ``questions[b]``.

The DDIM start noise of a query is seeded by the query's text, so a query's neuron does not depend on which
other queries share its batch, and a saved-and-reloaded artifact generates the same neurons.

The artifact (``save_pretrained`` / ``from_pretrained``)::

    config.json              base model, layer, template, threshold, DDIM steps, shapes, versions
    encoder/                 the (tuned) text encoder (transformers folder)
    familiarity/             the familiarity network (absent in the no-FN ablation)
    generator.safetensors    the EMA generator weights; generator config in config.json
    normalizer.safetensors   per-dimension mean/std of the neuron vectors
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meg_harness.cache import atomic_write_text
from meg_harness.editing.base import Edited
from meg_harness.errors import HarnessError
from meg_harness.meg.diffusion import DiffusionConfig, WeightNormalizer, ddim_sample
from meg_harness.meg.encoder import TextEncoder
from meg_harness.meg.familiarity import FamiliarityNetwork
from meg_harness.meg.generator import GeneratorConfig, build_generator
from meg_harness.meg.neuron import DynamicNeuron, NeuronBatch
from meg_harness.prompts import QueryTemplate

ARTIFACT_FORMAT = "meg-harness/meg-artifact/v1"
CONFIG_FILE = "config.json"
GENERATOR_FILE = "generator.safetensors"
NORMALIZER_FILE = "normalizer.safetensors"
ROUTING_MODES = ("auto", "all", "none")
"""``auto``: the familiarity network decides (every query without one); ``all``: every query gets a generated
neuron (the no-FN ablation at inference); ``none``: no query does (the base model)."""


def query_seed(seed: int, question: str) -> int:
    """The DDIM start-noise seed of one query."""
    return int(hashlib.sha256(f"{seed}:{question}".encode()).hexdigest()[:15], 16)


def query_noise(questions: Sequence[str], dim: int, seed: int) -> torch.Tensor:
    """``[len(questions), dim]`` standard normal noise, row b seeded by ``questions[b]`` (CPU, float32)."""
    rows = [torch.randn(dim, generator=torch.Generator().manual_seed(query_seed(seed, q))) for q in questions]
    return torch.stack(rows) if rows else torch.empty(0, dim)


@dataclass
class MegModel:
    """The trained MeG components and the facts needed to apply them to the base LM."""

    encoder: TextEncoder
    familiarity: FamiliarityNetwork | None  # None: every query is routed (the no-FN ablation)
    generator: nn.Module
    generator_config: GeneratorConfig
    normalizer: WeightNormalizer
    diffusion: DiffusionConfig
    layer: int
    hidden: int
    has_bias: bool
    threshold: float
    seed: int = 0
    extra: dict[str, Any] | None = None  # provenance saved in config.json (hparams, base model, template)
    routing: str = "auto"  # one of ROUTING_MODES; an inference setting, not saved in the artifact

    def __post_init__(self) -> None:
        check_routing(self.routing)

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def to(self, device: torch.device | str) -> MegModel:
        self.encoder.to(device)
        if self.familiarity is not None:
            self.familiarity.to(device)
        self.generator.to(device)
        self.normalizer.to(device)
        return self

    def configure(self, *, routing: str | None = None, ddim_steps: int | None = None) -> MegModel:
        """Set the routing mode and/or the DDIM step count used for sampling (in place)."""
        if routing is not None:
            self.routing = check_routing(routing)
        if ddim_steps is not None:
            self.diffusion = dataclasses.replace(self.diffusion, ddim_steps=int(ddim_steps))
        return self

    def describe(self) -> dict[str, Any]:
        """The settings that decide what this model generates (for run reports)."""
        extra = self.extra or {}
        return {
            "layer": self.layer,
            "threshold": self.threshold,
            "ddim_steps": self.diffusion.ddim_steps,
            "familiarity": self.familiarity is not None,
            "routing": self.routing,
            "base_model": extra.get("base_model"),
            "n_edits": extra.get("n_edits"),
            "generator": self.generator_config.kind,
            "seed": self.seed,
        }

    @torch.no_grad()
    def route(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(routed mask ``[n]``, entropy ``[n]`` or None without a familiarity network).

        ``routing`` overrides the familiarity network's decision (``all``, ``none``); the entropies are still
        reported when there is a network.
        """
        entropy = None if self.familiarity is None else self.familiarity.entropy(embeddings).cpu()
        if self.routing == "none":
            return torch.zeros(len(embeddings), dtype=torch.bool), entropy
        if self.routing == "all" or entropy is None:
            return torch.ones(len(embeddings), dtype=torch.bool), entropy
        return entropy < self.threshold, entropy

    @torch.no_grad()
    def generate(
        self, questions: Sequence[str], embeddings: torch.Tensor, steps: int | None = None
    ) -> NeuronBatch:
        """Neurons for ``questions`` (raw weights), sampled in one DDIM batch from their encodings."""
        dim = self.generator_config.vector_dim
        noise = query_noise(questions, dim, self.seed)
        normalized = ddim_sample(self.generator, embeddings, dim, self.diffusion, steps=steps, noise=noise)
        vectors = self.normalizer.denormalize(normalized.to(self.normalizer.mean.device))
        return NeuronBatch.unflatten(vectors, self.hidden, self.has_bias)

    @torch.no_grad()
    def neurons_for(
        self, questions: Sequence[str], steps: int | None = None
    ) -> tuple[NeuronBatch, torch.Tensor, torch.Tensor | None]:
        """Per-row neurons (zeros where routed away), the routed mask, and the entropies (None when
        ``routing`` is ``none``: nothing is encoded)."""
        if self.routing == "none":
            zeros = NeuronBatch.zeros(len(questions), self.hidden, self.has_bias, device=self.device)
            return zeros, torch.zeros(len(questions), dtype=torch.bool), None
        embeddings = self.encoder.encode(list(questions)).to(self.device)
        routed, entropy = self.route(embeddings)
        batch = NeuronBatch.zeros(len(questions), self.hidden, self.has_bias, device=self.device)
        index = routed.nonzero().squeeze(1)
        if len(index):
            chosen = [questions[i] for i in index.tolist()]
            made = self.generate(chosen, embeddings[index.to(self.device)], steps)
            batch.key[index] = made.key.to(batch.key)
            batch.value[index] = made.value.to(batch.value)
            if batch.bias is not None and made.bias is not None:
                batch.bias[index] = made.bias.to(batch.bias)
        return batch, routed, entropy

    # -- the artifact ---------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the artifact (see the module docstring)."""
        from safetensors.torch import save_file

        from meg_harness.provenance import versions

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.encoder.save(directory / "encoder")
        if self.familiarity is not None:
            self.familiarity.save(directory / "familiarity")
        state = {k: v.detach().cpu().contiguous() for k, v in self.generator.state_dict().items()}
        save_file(state, str(directory / GENERATOR_FILE))
        save_file(
            {k: v.cpu().contiguous() for k, v in self.normalizer.state_dict().items()},
            str(directory / NORMALIZER_FILE),
        )
        config = {
            "format": ARTIFACT_FORMAT,
            "layer": self.layer,
            "hidden": self.hidden,
            "has_bias": self.has_bias,
            "threshold": self.threshold,
            "familiarity": self.familiarity is not None,
            "ddim_steps": self.diffusion.ddim_steps,
            "diffusion": self.diffusion.to_dict(),
            "generator": self.generator_config.to_dict(),
            "seed": self.seed,
            "versions": versions(),
            **(self.extra or {}),
        }
        atomic_write_text(
            directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"
        )
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu") -> MegModel:
        """Load an artifact onto ``device`` (CPU or CUDA; the artifact itself is device-free); ``routing``
        is ``auto`` (set others with :meth:`configure`)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        path = directory / CONFIG_FILE
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise HarnessError(f"not a readable MeG artifact config: {error}", file=path) from None
        if config.get("format") != ARTIFACT_FORMAT:
            raise HarnessError(
                f"not a MeG artifact (format {config.get('format')!r})", file=path, field="format"
            )
        for name in (GENERATOR_FILE, NORMALIZER_FILE):
            if not (directory / name).is_file():
                raise HarnessError(f"the MeG artifact lacks {name}", file=directory)
        generator_config = GeneratorConfig(**config["generator"])
        generator = build_generator(generator_config)
        generator.load_state_dict(load_file(str(directory / GENERATOR_FILE)))
        normalizer = WeightNormalizer(generator_config.vector_dim)
        normalizer.load_state_dict(load_file(str(directory / NORMALIZER_FILE)))
        familiarity = FamiliarityNetwork.load(directory / "familiarity") if config["familiarity"] else None
        known = {
            "format",
            "layer",
            "hidden",
            "has_bias",
            "threshold",
            "familiarity",
            "ddim_steps",
            "diffusion",
            "generator",
            "seed",
            "versions",
        }
        model = cls(
            encoder=TextEncoder.from_pretrained(directory / "encoder"),
            familiarity=familiarity,
            generator=generator.eval(),
            generator_config=generator_config,
            normalizer=normalizer,
            diffusion=DiffusionConfig(**{**config["diffusion"], "ddim_steps": config["ddim_steps"]}),
            layer=int(config["layer"]),
            hidden=int(config["hidden"]),
            has_bias=bool(config["has_bias"]),
            threshold=float(config["threshold"]),
            seed=int(config.get("seed", 0)),
            extra={k: v for k, v in config.items() if k not in known},
        )
        return model.to(device)


def check_routing(routing: str) -> str:
    """``routing`` if it is one of :data:`ROUTING_MODES`, else a :class:`HarnessError`."""
    if routing not in ROUTING_MODES:
        raise HarnessError(f"routing must be one of {ROUTING_MODES}, got {routing!r}", field="route")
    return routing


class MegEdited(Edited):
    """The base LM with MeG's dynamic neuron: each batch row gets the neuron generated for its question.

    Neurons are generated once per distinct question and remembered by this object (TF and AG scoring ask
    for the same questions); ``stats`` counts queries, routed queries and generation time.
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, meg: MegModel, template: QueryTemplate | None = None
    ) -> None:
        super().__init__(model, tokenizer)
        self.meg = meg
        self.template = template
        self.neuron = DynamicNeuron(model, meg.layer)
        if (self.neuron.hidden, self.neuron.has_bias) != (meg.hidden, meg.has_bias):
            raise HarnessError(
                f"the MeG artifact's neurons (width {meg.hidden}, bias {meg.has_bias}) do not fit layer "
                f"{meg.layer} of this model (width {self.neuron.hidden}, bias {self.neuron.has_bias})",
                field="meg_path",
            )
        self._known: dict[str, tuple[torch.Tensor, bool]] = {}  # question -> (flat neuron vector, routed)
        self.stats = {"queries": 0, "routed": 0, "generate_s": 0.0}

    def configure(self, *, routing: str | None = None, ddim_steps: int | None = None) -> MegEdited:
        """Change the routing mode and/or DDIM steps (see :meth:`MegModel.configure`); forgets the neurons
        generated so far and resets ``stats``."""
        self.meg.configure(routing=routing, ddim_steps=ddim_steps)
        self._known.clear()
        self.stats = {"queries": 0, "routed": 0, "generate_s": 0.0}
        return self

    def _prepare(self, questions: Sequence[str]) -> None:
        import time

        new = list(dict.fromkeys(q for q in questions if q not in self._known))
        if not new:
            return
        started = time.perf_counter()
        batch, routed, _ = self.meg.neurons_for(new)
        self.stats["generate_s"] += time.perf_counter() - started
        self.stats["queries"] += len(new)
        self.stats["routed"] += int(routed.sum())
        flat = batch.flatten().cpu()
        for q, vector, flag in zip(new, flat, routed.tolist()):
            self._known[q] = (vector, bool(flag))

    def batch_for(self, questions: Sequence[str]) -> tuple[NeuronBatch, torch.Tensor]:
        self._prepare(questions)
        vectors = torch.stack([self._known[q][0] for q in questions])
        active = torch.tensor([self._known[q][1] for q in questions], dtype=torch.bool)
        device = self.neuron.module_device
        return NeuronBatch.unflatten(vectors, self.meg.hidden, self.meg.has_bias).to(device), active

    @contextlib.contextmanager
    def rows(self, questions: Sequence[str]) -> Iterator[None]:
        if not any(self.routed(questions)):  # every row routed away: the base model, no hook at all
            yield
            return
        batch, active = self.batch_for(questions)
        with self.neuron.attach(batch, active):
            yield

    def routed(self, questions: Sequence[str]) -> list[bool]:
        self._prepare(questions)
        return [self._known[q][1] for q in questions]
