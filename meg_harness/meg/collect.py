"""Knowledge-weight collection (paper 4.1 c.1): one neuron per edit, optimised so the frozen LM answers it.

For each EditCase only its neuron is trained, so that the LM, given ``template.format(case.prompt)``, produces
``" " + target_new + template.terminator`` (the terminator makes greedy decoding stop after the answer).

Fast by design:

* many edits per batch, each row with its own neuron and its own optimiser; right-padded rows, the loss is
  the mean over each row's answer tokens summed over rows, so rows do not interact;
* the layers below L are frozen and their input never changes: the hidden states entering layer L are
  computed once per edit, and every step runs the decoder from layer L upward only (its layer list
  truncated, ``inputs_embeds`` = the cached state; absolute position embeddings are zeroed). This is checked
  against a full forward on the first batch; a family where it does not hold falls back to full forwards;
* an edit stops as soon as its greedy answer (the protocol's AG rule, via the template) matches the target,
  checked every ``check_every`` steps; finished rows are refilled with pending edits.

Results are cached by content hash under ``<cache>/neurons/<hash>/`` in shards of ``shard_size`` edits.
A shard is always computed from the same edits in the same batches (each shard starts from an empty batch),
so a resumed run reproduces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from meg_harness.cache import atomic_path, atomic_write_text, content_hash, default_cache_dir
from meg_harness.data.edit_case import EditCase
from meg_harness.errors import HarnessError
from meg_harness.evaluate.protocol import ag_match
from meg_harness.evaluate.scoring import Probe, greedy_answers
from meg_harness.meg.neuron import DynamicNeuron, NeuronBatch, NeuronEdited, NeuronTuple
from meg_harness.models.adapters import ArchitectureAdapter, get_adapter
from meg_harness.models.layer_cache import LayerCachedLM, right_pad_ids, target_index
from meg_harness.models.loading import model_fingerprint
from meg_harness.models.nethook import frozen
from meg_harness.prompts import MAX_NEW_TOKENS, QueryTemplate, context_length, encode_answer, encode_query
from meg_harness.ranks import map_shared
from meg_harness.settings import NON_NEGATIVE, POSITIVE, Rule, Settings, one_of, settings_from_mapping

log = logging.getLogger(__name__)

CACHE_VERSION = "meg-neurons/v1"
OPTIMIZERS = ("adam", "sgd")
METADATA_KEYS = ("alg_name", "model_name")
VERIFY_ROWS = 4  # rows of the first batch checked against a full forward (padding included when > 1)


@dataclass(frozen=True)
class CollectHParams(Settings):
    """Hyper-parameters of knowledge-weight collection.

    Defaults: SmolLM2-135M at layer 12, tuned on CounterFact dev edits (hparams/MEG/collect-smollm2-135m.yaml
    says why each value). ``value_lr_scale``: the value vector's lr is ``lr * value_lr_scale``.

    ``precheck``: run the greedy check only for rows whose teacher-forced argmax already yields every
    answer token, terminator included (rows at ``max_steps`` are always checked): no hopeless generate calls.
    ``layer_cache``: run steps from layer L upward on cached hidden states (False: full forwards).
    """

    layer: int = 12
    optimizer: str = "adam"
    lr: float = 0.05
    max_steps: int = 100
    check_every: int = 1
    batch_size: int = 32
    shard_size: int = 64
    init_std: float = 0.05
    seed: int = 0
    max_new_tokens: int = MAX_NEW_TOKENS
    precheck: bool = True
    layer_cache: bool = True
    value_lr_scale: float = 5.0

    CHECKS: ClassVar[Mapping[str, Rule]] = {
        "optimizer": one_of(*OPTIMIZERS),
        "lr": POSITIVE,
        "max_steps": POSITIVE,
        "check_every": POSITIVE,
        "batch_size": POSITIVE,
        "shard_size": POSITIVE,
        "init_std": NON_NEGATIVE,
        "max_new_tokens": POSITIVE,
        "value_lr_scale": NON_NEGATIVE,
    }

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | CollectHParams | None) -> CollectHParams:
        """From a dict (e.g. a YAML's contents); unknown keys are an error."""
        if isinstance(mapping, CollectHParams):
            return mapping
        return settings_from_mapping(cls, mapping, "collection setting")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> CollectHParams:
        """From an hparams YAML (``hparams/MEG/collect-*.yaml``); EasyEdit metadata keys are ignored."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as error:
            raise HarnessError(f"cannot read collection hparams: {error}", file=path) from None
        if not isinstance(data, dict):
            raise HarnessError("an hparams file must be a YAML mapping", file=path)
        try:
            return cls.from_mapping({k: v for k, v in data.items() if k not in METADATA_KEYS})
        except HarnessError as error:
            raise HarnessError(error.reason, file=path, field=error.field) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CollectionResult:
    """Collected neurons in case order, with per-edit success (greedy answer == target) and steps used."""

    case_ids: list[str]
    neurons: NeuronBatch
    success: list[bool]
    steps: list[int]
    losses: list[float]
    wall_s: float
    layer: int
    mode: str  # "layer-cached" | "full"
    cache_path: Path | None = None
    reused: int = 0  # edits read back from the cache

    @property
    def success_rate(self) -> float:
        return sum(self.success) / len(self.success) if self.success else math.nan


# -- preparation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Edit:
    case_id: str
    target: str
    query_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # target tokens + terminator tokens

    @property
    def input_ids(self) -> tuple[int, ...]:
        """What the model reads: the query and the answer but its last token."""
        return self.query_ids + self.answer_ids[:-1]


def _prepare(
    model, tokenizer, cases: Sequence[EditCase], template: QueryTemplate, hp: CollectHParams
) -> list[_Edit]:
    limit = context_length(model)
    edits = []
    for case in cases:
        answer_ids = encode_answer(tokenizer, template, case.target_new, terminator=True, where=case.source)
        query_ids = encode_query(tokenizer, template, case.prompt)
        edit = _Edit(case.case_id, case.target_new, query_ids, answer_ids)
        needed = len(query_ids) + max(len(edit.answer_ids), hp.max_new_tokens)
        if limit is not None and needed > limit:
            file, _, record = (case.source or "").rpartition(":")
            raise HarnessError(
                f"prompt of case {case.case_id} needs {needed} tokens with its answer, more than the "
                f"model's context of {limit}",
                file=file or None,
                record=record or None,
                field="prompt",
            )
        edits.append(edit)
    return edits


def edit_seed(seed: int, case_id: str) -> int:
    """The per-edit seed: results do not depend on which edits share a batch."""
    return int(hashlib.sha256(f"{seed}:{case_id}".encode()).hexdigest()[:15], 16)


def init_neuron(
    case_id: str, hidden: int, has_bias: bool, hp: CollectHParams, device: torch.device | str = "cpu"
) -> NeuronTuple:
    """Key and value ~ N(0, init_std^2) seeded by (seed, case_id); bias 0 (None without an FFN bias)."""
    generator = torch.Generator().manual_seed(edit_seed(hp.seed, case_id))
    key = torch.randn(hidden, generator=generator) * hp.init_std
    value = torch.randn(hidden, generator=generator) * hp.init_std
    bias = torch.zeros(()) if has_bias else None
    return key.to(device), None if bias is None else bias.to(device), value.to(device)


# -- forwards ---------------------------------------------------------------------------------------


# -- optimisation -----------------------------------------------------------------------------------


@dataclass
class _Row:
    """One edit being optimised: its own parameters and optimiser (fresh state for every edit)."""

    index: int  # position in the shard
    edit: _Edit
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    layer_input: torch.Tensor | None = None  # [T, H] hidden states entering layer L
    steps: int = 0
    loss: float = math.nan
    answer_exact: bool = False  # the last step's teacher-forced argmax gave every answer token

    def neuron(self) -> NeuronTuple:
        key, *rest = self.params
        return (key, rest[0], rest[1]) if len(rest) == 2 else (key, None, rest[0])


@dataclass
class _ShardResult:
    neurons: NeuronBatch
    success: list[bool]
    steps: list[int]
    losses: list[float]


@dataclass
class _Collector:
    model: nn.Module
    tokenizer: Any
    hp: CollectHParams
    adapter: ArchitectureAdapter
    layer_cached: bool
    verified: bool = False
    neuron: DynamicNeuron = field(init=False)
    lm: LayerCachedLM = field(init=False)
    checker: NeuronEdited = field(init=False)

    def __post_init__(self) -> None:
        self.neuron = DynamicNeuron(self.model, self.hp.layer, self.adapter)
        self.lm = LayerCachedLM(self.model, self.hp.layer, self.adapter)
        self.checker = NeuronEdited(self.model, self.tokenizer, {}, self.hp.layer, self.adapter)
        self.device = next(self.model.parameters()).device
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # rows
    def new_row(self, index: int, edit: _Edit) -> _Row:
        neuron = init_neuron(edit.case_id, self.neuron.hidden, self.neuron.has_bias, self.hp, self.device)
        params = [t.clone().requires_grad_(True) for t in neuron if t is not None]
        opt_cls = torch.optim.Adam if self.hp.optimizer == "adam" else torch.optim.SGD
        groups = [{"params": params[:-1]}, {"params": params[-1:], "lr": self.hp.lr * self.hp.value_lr_scale}]
        return _Row(index, edit, params, opt_cls(groups, lr=self.hp.lr))

    def cache_inputs(self, rows: Sequence[_Row]) -> None:
        ids, mask = right_pad_ids([r.edit.input_ids for r in rows], self.pad_id, self.device)
        states = self.lm.layer_inputs(ids, mask)
        for b, row in enumerate(rows):
            row.layer_input = states[b, : len(row.edit.input_ids)].clone()

    # one optimisation step
    def _answer_index(self, rows: Sequence[_Row]) -> tuple[torch.Tensor, ...]:
        """(row, position, target id) of every answer token ``[N]`` and its weight 1 / answer length."""
        answers = [r.edit.answer_ids for r in rows]
        index = target_index([len(r.edit.query_ids) - 1 for r in rows], answers, self.device)
        weights = [1.0 / len(answer) for answer in answers for _ in answer]
        return (*index, torch.tensor(weights, device=self.device))

    def _logits(self, rows: Sequence[_Row], b_idx: torch.Tensor, p_idx: torch.Tensor, layer_cached: bool):
        ids, mask = right_pad_ids([r.edit.input_ids for r in rows], self.pad_id, self.device)
        if not layer_cached:
            return self.lm.full_logits(ids, mask, b_idx, p_idx)
        width = ids.shape[1]
        states = torch.stack([F.pad(r.layer_input, (0, 0, 0, width - r.layer_input.shape[0])) for r in rows])
        return self.lm.logits(states, mask, b_idx, p_idx)

    def _verify(self, rows: Sequence[_Row]) -> None:
        """Once per run, on the first few rows: the layer-cached logits must match a full forward, else use
        full forwards."""
        self.verified = True
        rows = rows[:VERIFY_ROWS]
        b_idx, p_idx, _, _ = self._answer_index(rows)
        ids, mask = right_pad_ids([r.edit.input_ids for r in rows], self.pad_id, self.device)
        with self.neuron.attach(NeuronBatch.stack([r.neuron() for r in rows])):
            self.layer_cached = self.lm.agrees_with_full_forward(ids, mask, b_idx, p_idx)

    def step(self, rows: Sequence[_Row]) -> None:
        if self.layer_cached and not self.verified:
            self._verify(rows)
        b_idx, p_idx, targets, weights = self._answer_index(rows)
        with self.neuron.attach(NeuronBatch.stack([r.neuron() for r in rows])):
            logits = self._logits(rows, b_idx, p_idx, self.layer_cached)
        token_loss = F.cross_entropy(logits.float(), targets, reduction="none") * weights
        token_loss.sum().backward()
        for row in rows:
            row.optimizer.step()
            row.optimizer.zero_grad(set_to_none=True)
            row.steps += 1
        with torch.no_grad():
            row_loss = torch.zeros(len(rows), device=self.device).index_add_(0, b_idx, token_loss.detach())
            wrong = (logits.argmax(-1) != targets).float()
            row_wrong = torch.zeros(len(rows), device=self.device).index_add_(0, b_idx, wrong)
        for row, loss, n_wrong in zip(rows, row_loss.tolist(), row_wrong.tolist()):
            row.loss, row.answer_exact = loss, n_wrong == 0

    # greedy check (the protocol's AG rule)
    def check(self, rows: Sequence[_Row]) -> list[bool]:
        if not rows:
            return []
        keys = [f"#{r.index}" for r in rows]
        self.checker.neurons = {
            k: tuple(t.detach() if t is not None else None for t in r.neuron()) for k, r in zip(keys, rows)
        }
        probes = [Probe(k, r.edit.query_ids) for k, r in zip(keys, rows)]
        answers = greedy_answers(
            self.checker, probes, batch_size=len(probes), max_new_tokens=self.hp.max_new_tokens
        )
        self.checker.neurons = {}
        return [ag_match(a.text, r.edit.target) for a, r in zip(answers, rows)]

    def due(self, row: _Row) -> bool:
        at_end = row.steps >= self.hp.max_steps
        scheduled = row.steps % self.hp.check_every == 0
        return at_end or (scheduled and (row.answer_exact or not self.hp.precheck))

    def collect(self, edits: Sequence[_Edit], bar: tqdm) -> _ShardResult:
        """Optimise one shard's edits: a full batch while edits are pending, finished rows refilled."""
        pending = deque(enumerate(edits))
        active: list[_Row] = []
        done: dict[int, tuple[NeuronTuple, bool, int, float]] = {}
        while pending or active:
            fresh = []
            while pending and len(active) < self.hp.batch_size:
                fresh.append(self.new_row(*pending.popleft()))
            active += fresh
            if fresh and self.layer_cached:
                self.cache_inputs(fresh)
            self.step(active)
            due = [r for r in active if self.due(r)]
            passed = dict(zip((r.index for r in due), self.check(due)))
            still = []
            for row in active:
                ok = passed.get(row.index)
                if ok or (ok is not None and row.steps >= self.hp.max_steps):
                    neuron = tuple(t.detach().clone() if t is not None else None for t in row.neuron())
                    done[row.index] = (neuron, bool(ok), row.steps, row.loss)
                    bar.update(1)
                else:
                    still.append(row)
            active = still
        order = [done[i] for i in range(len(edits))]
        return _ShardResult(
            NeuronBatch.stack([d[0] for d in order]),
            [d[1] for d in order],
            [d[2] for d in order],
            [d[3] for d in order],
        )


# -- cache ------------------------------------------------------------------------------------------


def _shard_paths(folder: Path, index: int) -> tuple[Path, Path]:
    return folder / f"shard-{index:05d}.safetensors", folder / f"shard-{index:05d}.json"


def _write_shard(folder: Path, index: int, case_ids: Sequence[str], result: _ShardResult) -> None:
    """Tensors first, then the json that marks the shard complete; each written atomically (atomic_path)."""
    from safetensors.torch import save_file

    tensors_path, meta_path = _shard_paths(folder, index)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"key": result.neurons.key, "value": result.neurons.value}
    if result.neurons.bias is not None:
        tensors["bias"] = result.neurons.bias
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(tensors_path) as tmp:
        save_file(tensors, tmp)
    meta = {
        "case_ids": list(case_ids),
        "success": result.success,
        "steps": result.steps,
        "losses": result.losses,
    }
    atomic_write_text(meta_path, json.dumps(meta))


def _read_shard(folder: Path, index: int, case_ids: Sequence[str], device) -> _ShardResult | None:
    from safetensors.torch import load_file

    tensors_path, meta_path = _shard_paths(folder, index)
    if not (tensors_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tensors = load_file(str(tensors_path))
    except (OSError, ValueError, RuntimeError) as exc:  # a damaged entry is recomputed
        log.warning("ignoring unreadable neuron shard %s: %s", tensors_path, exc)
        return None
    if meta.get("case_ids") != list(case_ids):
        return None
    neurons = NeuronBatch(tensors["key"], tensors.get("bias"), tensors["value"]).to(device)
    return _ShardResult(neurons, list(meta["success"]), list(meta["steps"]), list(meta["losses"]))


def cache_key(
    model: nn.Module, cases: Sequence[EditCase], template: QueryTemplate, hp: CollectHParams
) -> str:
    """Content hash of what the collected neurons depend on."""
    facts = [(c.case_id, c.prompt, c.target_new) for c in cases]
    return content_hash(
        CACHE_VERSION, model_fingerprint(model), template.text, template.terminator, hp.to_dict(), facts
    )


# -- entry point ------------------------------------------------------------------------------------


def collect_neurons(
    model: nn.Module,
    tokenizer,
    cases: Sequence[EditCase],
    template: QueryTemplate,
    hparams: Mapping[str, Any] | CollectHParams | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    use_cache: bool = True,
) -> CollectionResult:
    """Collect one neuron per case (in case order); every edit is kept, with its success flag and steps.

    ``cache_dir`` is meg-harness's cache root (default ``$MEG_HARNESS_CACHE``); shards already there are
    reused and only the remaining edits are collected. ``use_cache=False`` neither reads nor writes it.
    """
    started = time.perf_counter()
    hp = CollectHParams.from_mapping(hparams)
    if not cases:
        raise HarnessError("no edit cases to collect neurons for", field="cases")
    adapter = get_adapter(model)
    edits = _prepare(model, tokenizer, cases, template, hp)
    folder = None
    if use_cache:
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        folder = root / "neurons" / cache_key(model, cases, template, hp)[:24]
    shards = [range(i, min(i + hp.shard_size, len(edits))) for i in range(0, len(edits), hp.shard_size)]
    with frozen(model), tqdm(total=len(edits), desc="collecting neurons", disable=not progress) as bar:
        collector = _Collector(model, tokenizer, hp, adapter, layer_cached=hp.layer_cache)
        done: list[bool] = []

        def shard_result(j: int) -> tuple[_ShardResult, bool]:
            """Shard ``j``'s neurons and whether they were read back from the cache."""
            ids = [edits[i].case_id for i in shards[j]]
            result = _read_shard(folder, j, ids, collector.device) if folder else None
            read = result is not None
            if read:
                bar.update(len(ids))
            else:
                result = collector.collect([edits[i] for i in shards[j]], bar)
                if folder:
                    _write_shard(folder, j, ids, result)
            done.extend(result.success)
            bar.set_postfix(success=f"{sum(done)}/{len(done)}")
            return result, read

        # shards spread over the ranks of a multi-process run, gathered onto the model's device
        gathered = map_shared(range(len(shards)), shard_result, device=collector.device)
    results = [result for result, _ in gathered]
    reused = sum(len(shards[j]) for j, (_, was_read) in enumerate(gathered) if was_read)
    return CollectionResult(
        case_ids=[e.case_id for e in edits],
        neurons=NeuronBatch.cat([r.neurons for r in results]),
        success=[s for r in results for s in r.success],
        steps=[s for r in results for s in r.steps],
        losses=[s for r in results for s in r.losses],
        wall_s=time.perf_counter() - started,
        layer=collector.neuron.layer,
        mode="layer-cached" if collector.layer_cached else "full",
        cache_path=folder,
        reused=reused,
    )
