"""MALMEN's hyper-parameters, the LM-side passes and the meta-training loop (checkpointed, resumable, cached).

One meta-training step on ``train_n_edits`` training facts, with the hypernetwork and the LM decoupled as in
the paper (memory does not grow with the number of edits beyond the cached keys and gradients):

1. LM forward/backward on the edit rows (templated prompt + answer), ``batch_size`` edits at a time: cache
   each edited layer's keys and value gradients at the answer tokens; no graph is kept.
2. Hypernetwork (no graph): value shifts ``D``; per layer one ridge solve ``delta W(D, lambda)`` (a small
   graph in ``D`` and ``lambda`` only).
3. ``delta W`` added to the edited layers' outputs by hooks (``y += x delta W``, the weights are not
   touched); generalisation loss (a rephrase + answer) and ``loc_coef`` x KL(unedited || edited) on an
   unrelated prompt, backpropagated to ``d L / d delta W``.
4. ``d L / d D`` and ``d L / d lambda`` through the solve, then through the hypernetwork in chunks of
   ``editor_batch_size`` tokens (its forward is recomputed per chunk); Adam step with gradient clipping.

Answers are ``" " + target`` (the evaluator's convention) followed by the template's terminator when
``terminator`` is set (as MeG's neuron collection: greedy decoding then stops after the answer).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from meg_harness.baselines.malmen_net import MalmenHypernet, ridge_update
from meg_harness.baselines.params import LAYERS
from meg_harness.baselines.plan import pad_id
from meg_harness.budget import WallClock, stopped
from meg_harness.cache import atomic_write_text, content_hash
from meg_harness.data.edit_case import EditCase
from meg_harness.errors import HarnessError
from meg_harness.models.layer_cache import right_pad_ids, target_index
from meg_harness.models.loading import model_fingerprint
from meg_harness.models.nethook import TraceDict, frozen, model_device
from meg_harness.prompts import QueryTemplate, encode_answer, encode_query, encode_target
from meg_harness.settings import NON_NEGATIVE, POSITIVE, Rule, Settings, one_of
from meg_harness.tensorfile import save_tensors

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
STATE_FILE = "state.json"
CHECKPOINT_FORMAT = "meg-harness/malmen-checkpoint/v1"
CACHE_VERSION = "malmen/v1"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Hyper-parameters that do not change what training computes (budgets, bookkeeping, where data is read).
NOT_HASHED = frozenset({"max_minutes", "checkpoint_every", "train_path", "train_range", "train_dataset"})


@dataclass(frozen=True)
class MalmenHParams(Settings):
    """Defaults: the reference code's GPT-J configuration (config/editor/malmen.yaml, model/gpt-j.yaml,
    data/zsre.yaml)."""

    layers: tuple[int, ...] = (22, 23, 24, 25, 26, 27)  # FFN output linears (adapter rewrite module)
    rank: int = 1920
    n_blocks: int = 2
    lr: float = 1e-6  # initial per-layer step size of the shifts
    meta_lr: float = 1e-5
    loc_coef: float = 1.0
    max_grad_norm: float = 1.0
    token: str = "ans"  # cache keys/gradients at the answer tokens ("ans") or at every token ("all")
    batch_size: int = 32  # edits per LM forward/backward
    editor_batch_size: int = 1024  # tokens per hypernetwork call
    train_n_edits: int = 512  # training facts per meta-training step
    n_epochs: int = 1
    max_steps: int | None = None  # step budget (None: n_epochs over the training data)
    max_minutes: float | None = None  # wall-clock limit of ONE call, not a budget: a step that would end past
    # it is not started, the checkpoint is saved and TrainingStopped raised (no result); the next call resumes
    checkpoint_every: int = 20  # steps between checkpoints
    train_dataset: str = "zsre"
    train_path: str | None = None  # required: training facts disjoint from the evaluated edits
    train_range: tuple[int, int] | None = None  # [start, end) of the training file
    zsre_target: str = "answers"
    terminator: bool = True  # append the template's answer terminator to every target
    solve_dtype: str = "float32"
    seed: int = 0

    CHECKS: ClassVar[Mapping[str, Rule]] = {
        "layers": LAYERS,
        "rank": POSITIVE,
        "n_blocks": POSITIVE,
        "lr": POSITIVE,
        "meta_lr": POSITIVE,
        "loc_coef": NON_NEGATIVE,
        "max_grad_norm": POSITIVE,
        "token": one_of("ans", "all"),
        "batch_size": POSITIVE,
        "editor_batch_size": POSITIVE,
        "train_n_edits": POSITIVE,
        "n_epochs": NON_NEGATIVE,
        "max_steps": NON_NEGATIVE,
        "max_minutes": POSITIVE,
        "checkpoint_every": POSITIVE,
        "train_dataset": one_of("zsre", "counterfact", "mquake", "unke"),
        "train_range": Rule("[start, end) with 0 <= start < end", lambda r: 0 <= r[0] < r[1]),
        "zsre_target": one_of("answers", "alt"),
        "solve_dtype": one_of(*DTYPES),
    }

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        data["train_range"] = list(self.train_range) if self.train_range else None
        return data


# -- rows -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """``ids`` = templated question + answer but its last token; position ``start + j`` predicts
    ``labels[j]``. Without labels (a locality prompt with no gold answer) only ``start`` is used."""

    ids: tuple[int, ...]
    start: int
    labels: tuple[int, ...]

    @property
    def n_pred(self) -> int:
        return max(1, len(self.labels))


def answer_ids(
    tokenizer, template: QueryTemplate, target: str, hp: MalmenHParams, where: str | None
) -> tuple:
    """``" " + target`` (+ the template's terminator) as the evaluator tokenises it."""
    return encode_answer(tokenizer, template, target, terminator=hp.terminator, where=where)


def make_example(tokenizer, template: QueryTemplate, question: str, labels: tuple[int, ...]) -> Example:
    query = encode_query(tokenizer, template, question)
    return Example(query + labels[:-1], len(query) - 1, labels)


def edit_examples(tokenizer, template: QueryTemplate, cases: Sequence[EditCase], hp: MalmenHParams) -> list:
    return [
        make_example(
            tokenizer, template, c.prompt, answer_ids(tokenizer, template, c.target_new, hp, c.source)
        )
        for c in cases
    ]


@dataclass
class _Rows:
    ids: torch.Tensor
    mask: torch.Tensor
    cap_rows: torch.Tensor  # where keys / value gradients are cached
    cap_pos: torch.Tensor
    lab_rows: torch.Tensor  # prediction positions: row, position, label id (-1: none), example
    lab_pos: torch.Tensor
    lab_ids: torch.Tensor
    lab_example: torch.Tensor


def _rows(examples: Sequence[Example], pad: int, device: torch.device, token: str = "ans") -> _Rows:
    ids, mask = right_pad_ids([e.ids for e in examples], pad, device)
    # one prediction position per label; an example without labels predicts one unknown token (-1)
    rows, positions, labels = target_index(
        [e.start for e in examples], [e.labels or (-1,) for e in examples], device
    )
    if token == "all":
        cap_rows, cap_pos = mask.nonzero(as_tuple=True)
    else:
        cap_rows, cap_pos = rows, positions
    return _Rows(ids, mask, cap_rows, cap_pos, rows, positions, labels, rows)


def _logits(model: nn.Module, r: _Rows) -> torch.Tensor:
    """float32 logits at the prediction positions only (the LM head is applied to those rows)."""
    hidden = model.base_model(input_ids=r.ids, attention_mask=r.mask, use_cache=False).last_hidden_state
    picked = hidden[r.lab_rows.to(hidden.device), r.lab_pos.to(hidden.device)]
    logits = model.get_output_embeddings()(picked).float().to(r.ids.device)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- step 1: keys and value gradients ----------------------------------------------------------------


class _Capture(TraceDict):
    """Keeps each module's input (keys) and the gradient of its output (value gradients) at the cached
    positions ``(rows, pos)``. A zero scalar that requires grad is added to every hooked output, so a backward
    on a frozen model reaches the hooked modules and stops below the lowest one."""

    def __init__(self, model: nn.Module, modules: Sequence[str], rows: torch.Tensor, pos: torch.Tensor):
        self.rows, self.pos = rows, pos
        self.grads: dict[str, torch.Tensor] = {}
        self.zero = torch.zeros((), device=rows.device, requires_grad=True)
        super().__init__(model, modules, retain_input=True, edit_output=self._watch_grad)

    def _watch_grad(self, name: str, output: torch.Tensor, _input: torch.Tensor) -> torch.Tensor:
        def keep_grad(grad: torch.Tensor) -> None:
            at = self.rows.to(grad.device), self.pos.to(grad.device)
            self.grads[name] = grad[at].detach().float().to(self.rows.device)

        output = output + self.zero.to(output.device, output.dtype)
        output.register_hook(keep_grad)
        return output

    def keys_of(self, name: str) -> torch.Tensor:
        """``name``'s input at the cached positions, float32 ``[N, d_in]``."""
        x = self[name].input
        return x[self.rows.to(x.device), self.pos.to(x.device)].float().to(self.rows.device)


def cache_keys_and_grads(
    model: nn.Module, tokenizer, examples: Sequence[Example], modules: Sequence[str], hp: MalmenHParams
) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Per module: keys ``[N, d_in]`` and value gradients ``[N, d_out]`` (float32, on the model's device)
    of the loss ``sum_edits mean_tokens NLL`` (so an edit's gradients do not depend on its batch), and the
    mean NLL per edit before editing."""
    device, pad = model_device(model), pad_id(tokenizer)
    keys: list[list[torch.Tensor]] = [[] for _ in modules]
    grads: list[list[torch.Tensor]] = [[] for _ in modules]
    nll_sum = 0.0
    for chunk in _chunks(examples, hp.batch_size):
        r = _rows(chunk, pad, device, hp.token)
        with torch.enable_grad(), _Capture(model, modules, r.cap_rows, r.cap_pos) as cap:
            logp = torch.log_softmax(_logits(model, r), -1)
            nll = -logp.gather(1, r.lab_ids[:, None]).squeeze(1)
            counts = torch.bincount(r.lab_example, minlength=len(chunk)).float()
            per_edit = torch.zeros(len(chunk), device=device).index_add(0, r.lab_example, nll) / counts
            per_edit.sum().backward()
        nll_sum += float(per_edit.detach().sum())
        for i, name in enumerate(modules):
            keys[i].append(cap.keys_of(name))
            grads[i].append(cap.grads[name])
    return [torch.cat(k) for k in keys], [torch.cat(g) for g in grads], nll_sum / max(1, len(examples))


# -- step 3: losses on the edited model ----------------------------------------------------------------


class DeltaHooks(TraceDict):
    """Adds ``x @ delta_W`` (key-major ``[d_in, d_out]``, float32) to each module's output."""

    def __init__(self, model: nn.Module, modules: Sequence[str], deltas: Sequence[torch.Tensor]) -> None:
        self.deltas = dict(zip(modules, deltas, strict=True))
        super().__init__(model, modules, edit_output=self._add)

    def _add(self, name: str, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dw = self.deltas[name]
        return output + (x.to(dw.dtype) @ dw.to(x.device)).to(output.dtype)


def generalisation_loss(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    modules: Sequence[str],
    deltas: Sequence[torch.Tensor],
    batch_size: int,
    backward: bool = True,
) -> float:
    """Mean NLL over all answer tokens of the edited model (``deltas`` hooked in); backpropagated into the
    deltas' ``.grad`` when ``backward``."""
    device, pad = model_device(model), pad_id(tokenizer)
    total = sum(e.n_pred for e in examples)
    value = 0.0
    for chunk in _chunks(examples, batch_size):
        r = _rows(chunk, pad, device)
        with torch.set_grad_enabled(backward), DeltaHooks(model, modules, deltas):
            logp = torch.log_softmax(_logits(model, r), -1)
            loss = -logp.gather(1, r.lab_ids[:, None]).sum() / total
            if backward:
                loss.backward()
        value += float(loss.detach())
    return value


def locality_loss(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    modules: Sequence[str],
    deltas: Sequence[torch.Tensor],
    batch_size: int,
    coef: float,
    backward: bool = True,
) -> float:
    """Mean KL(unedited || edited) over the prediction positions of unrelated prompts; ``coef`` x it is
    backpropagated into the deltas when ``backward``."""
    if not examples:
        return 0.0
    device, pad = model_device(model), pad_id(tokenizer)
    total = sum(e.n_pred for e in examples)
    value = 0.0
    for chunk in _chunks(examples, batch_size):
        r = _rows(chunk, pad, device)
        with torch.no_grad():
            ref = torch.log_softmax(_logits(model, r), -1)
        with torch.set_grad_enabled(backward), DeltaHooks(model, modules, deltas):
            logp = torch.log_softmax(_logits(model, r), -1)
            kl = (ref.exp() * (ref - logp)).sum() / total
            if backward:
                (coef * kl).backward()
        value += float(kl.detach())
    return value


# -- one meta-training step ---------------------------------------------------------------------------


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(content_hash(*parts)[:15], 16))


def step_examples(
    tokenizer, template: QueryTemplate, cases: Sequence[EditCase], hp: MalmenHParams, step: int
) -> tuple[list[Example], list[Example], list[Example]]:
    """Edit, generalisation (one rephrase per fact, seeded by step; the prompt when it has none) and
    locality rows (one unrelated prompt per fact that has one, with its gold answer when known)."""
    g = _generator(hp.seed, step, "pick")
    edits, gens, locs = [], [], []
    for case in cases:
        answer = answer_ids(tokenizer, template, case.target_new, hp, case.source)
        edits.append(make_example(tokenizer, template, case.prompt, answer))
        question = case.prompt
        if case.rephrases:
            question = case.rephrases[int(torch.randint(len(case.rephrases), (1,), generator=g))]
        gens.append(make_example(tokenizer, template, question, answer))
        if case.locality:
            probe = case.locality[int(torch.randint(len(case.locality), (1,), generator=g))]
            gold = () if not probe.gold else encode_target(tokenizer, probe.gold, where=case.source)
            locs.append(make_example(tokenizer, template, probe.prompt, tuple(gold)))
    return edits, gens, locs


def meta_step(
    model: nn.Module,
    tokenizer,
    template: QueryTemplate,
    net: MalmenHypernet,
    opt: torch.optim.Optimizer,
    modules: Sequence[str],
    cases: Sequence[EditCase],
    hp: MalmenHParams,
    step: int,
) -> dict[str, float]:
    """One meta-training step (steps 1-4 above); returns the losses it measured."""
    edits, gens, locs = step_examples(tokenizer, template, cases, hp, step)
    keys, grads, edit_nll = cache_keys_and_grads(model, tokenizer, edits, modules, hp)
    for i in range(len(modules)):
        net.update_norm(i, keys[i], grads[i])
    dtype = DTYPES[hp.solve_dtype]
    shifts, solved, leaves = [], [], []
    for i in range(len(modules)):
        with torch.no_grad():
            d = net.shifts(i, keys[i], grads[i], hp.editor_batch_size)
        d.requires_grad_(True)
        with torch.enable_grad():
            dw = ridge_update(keys[i], d, net.log_lambda(i), dtype)
        shifts.append(d), solved.append(dw), leaves.append(dw.detach().requires_grad_(True))
    gen = generalisation_loss(model, tokenizer, gens, modules, leaves, hp.batch_size)
    loc = locality_loss(model, tokenizer, locs, modules, leaves, hp.batch_size, hp.loc_coef)
    opt.zero_grad(set_to_none=True)
    for i in range(len(modules)):
        if leaves[i].grad is None:
            continue
        torch.autograd.backward(solved[i], leaves[i].grad)  # -> d L / d D, d L / d lambda
        grad_d = shifts[i].grad
        net_i, index = net.slot(i)
        for s in range(0, keys[i].shape[0], hp.editor_batch_size):
            e = s + hp.editor_batch_size
            with torch.enable_grad():
                (net_i.shifts(keys[i][s:e], grads[i][s:e], index) * grad_d[s:e]).sum().backward()
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), hp.max_grad_norm)
    skipped = not (math.isfinite(float(norm)) and math.isfinite(gen) and math.isfinite(loc))
    if skipped:  # a non-finite loss or gradient would corrupt Adam's moments: leave the step out
        log.warning("MALMEN meta-step %d skipped: non-finite loss or gradient", step + 1)
        opt.zero_grad(set_to_none=True)
    else:
        opt.step()
    stats = {"edit_nll": edit_nll, "gen_loss": gen, "loc_loss": loc, "grad_norm": float(norm)}
    return {**stats, "skipped": float(skipped)}


# -- checkpoints ----------------------------------------------------------------------------------------


def save_checkpoint(folder: Path, net: MalmenHypernet, opt: torch.optim.Optimizer, state: dict) -> None:
    """``checkpoint.safetensors`` (hypernetwork + optimizer tensors, the state in its metadata), written
    atomically; ``state.json`` mirrors the state for people (the checkpoint's copy is authoritative)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    opt_state = opt.state_dict()
    for index, entries in opt_state["state"].items():
        for name, value in entries.items():
            tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "state": json.dumps(state),
        "param_groups": json.dumps(opt_state["param_groups"]),
    }
    save_tensors(tensors, folder / CHECKPOINT_FILE, metadata)
    atomic_write_text(folder / STATE_FILE, json.dumps(state, indent=2) + "\n")


def load_checkpoint(
    folder: Path, net: MalmenHypernet, opt: torch.optim.Optimizer | None = None
) -> dict | None:
    """Load the checkpoint into ``net`` (and ``opt``); its state, or None when there is none / it is
    unreadable (training then starts over)."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"not a {CHECKPOINT_FORMAT} file")
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        device = next(net.parameters()).device
        net.load_state_dict({k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("net.")})
        if opt is not None:
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                if key.startswith("opt."):
                    _, index, name = key.split(".", 2)
                    state.setdefault(int(index), {})[name] = value
            opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        return json.loads(meta["state"])
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        log.warning("ignoring unreadable MALMEN checkpoint %s: %s", path, error)
        return None


# -- the training loop ----------------------------------------------------------------------------------


def module_shapes(model: nn.Module, modules: Sequence[str], conv1d: bool) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of each edited module (Linear weights are ``[out, in]``, Conv1D ``[in, out]``)."""
    shapes = []
    for name in modules:
        w = model.get_submodule(name).weight
        shapes.append((int(w.shape[0]), int(w.shape[1])) if conv1d else (int(w.shape[1]), int(w.shape[0])))
    return shapes


def build_hypernet(
    shapes: Sequence[tuple[int, int]], hp: MalmenHParams, device: torch.device
) -> MalmenHypernet:
    """The hypernetwork, initialised from ``hp.seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hp.seed)
        net = MalmenHypernet(shapes, hp.rank, hp.n_blocks, hp.lr)
    return net.to(device)


def total_steps(n_train: int, hp: MalmenHParams) -> int:
    per_epoch = n_train // hp.train_n_edits
    if per_epoch == 0 and (hp.n_epochs > 0 and hp.max_steps != 0):
        raise HarnessError(
            f"train_n_edits ({hp.train_n_edits}) exceeds the {n_train} training facts",
            field="hparams.train_n_edits",
        )
    total = hp.n_epochs * per_epoch
    return total if hp.max_steps is None else min(total, hp.max_steps)


def step_cases(cases: Sequence[EditCase], hp: MalmenHParams, step: int) -> list[EditCase]:
    """The facts of ``step``: epoch ``e`` visits the training set in a permutation seeded by (seed, e)
    (the last incomplete batch is dropped), so any step is reproducible without saved RNG state."""
    per_epoch = len(cases) // hp.train_n_edits
    epoch, batch = divmod(step, per_epoch)
    order = torch.randperm(len(cases), generator=_generator(hp.seed, epoch, "epoch")).tolist()
    return [cases[i] for i in order[batch * hp.train_n_edits : (batch + 1) * hp.train_n_edits]]


def training_key(
    model: nn.Module,
    modules: Sequence[str],
    template: QueryTemplate,
    hp: MalmenHParams,
    cases: Sequence[EditCase],
    fingerprint: str | None = None,
) -> str:
    """Content hash of what the trained hypernetwork depends on (model, modules, template, hparams but the
    budgets, training facts)."""
    facts = [
        (c.case_id, c.prompt, c.target_new, list(c.rephrases), [(p.prompt, p.gold) for p in c.locality])
        for c in cases
    ]
    params = {k: v for k, v in hp.to_dict().items() if k not in NOT_HASHED}
    return content_hash(
        CACHE_VERSION,
        fingerprint or model_fingerprint(model),
        list(modules),
        template.text,
        template.terminator,
        params,
        facts,
    )


@dataclass
class TrainResult:
    net: MalmenHypernet
    state: dict  # step, total_steps, done, history[...], elapsed_s, key
    folder: Path
    resumed_steps: int = 0  # meta-steps read back from the checkpoint (done by earlier processes)
    resumed_s: float = 0.0  # their seconds


def meta_train(
    model: nn.Module,
    tokenizer,
    template: QueryTemplate,
    hp: MalmenHParams,
    train_cases: Sequence[EditCase],
    modules: Sequence[str],
    conv1d: bool,
    cache_root: Path,
    *,
    progress: bool = True,
    fingerprint: str | None = None,
) -> TrainResult:
    """Load the hypernetwork cached for this (model, hparams, training data), training or resuming it first
    when its steps are not all done.

    The result is always that of all ``total_steps`` steps. ``max_minutes`` only limits this call: when it
    would be overrun, the checkpoint is saved and :class:`TrainingStopped` raised (the next call resumes)."""
    key = training_key(model, modules, template, hp, train_cases, fingerprint)
    folder = Path(cache_root) / "malmen" / key[:24]
    device = model_device(model)
    net = build_hypernet(module_shapes(model, modules, conv1d), hp, device)
    opt = torch.optim.Adam(net.parameters(), lr=hp.meta_lr)
    total = total_steps(len(train_cases), hp)
    state = load_checkpoint(folder, net, opt)
    resumed = (state["step"], state.get("elapsed_s", 0.0)) if state is not None else (0, 0.0)
    if state is None:
        state = {
            "key": key,
            "step": 0,
            "total_steps": total,
            "done": total == 0,
            "history": [],
            "elapsed_s": 0.0,
        }
    if state["step"] >= total:
        state["done"] = True
        return TrainResult(net, state, folder, *resumed)
    clock = WallClock(hp.max_minutes)
    started = time.monotonic()
    last_saved = state["step"]
    bar = tqdm(total=total, initial=state["step"], desc="MALMEN meta-training", disable=not progress)
    try:
        with frozen(model):
            for step in range(state["step"], total):
                stats = meta_step(
                    model, tokenizer, template, net, opt, modules, step_cases(train_cases, hp, step), hp, step
                )
                state["step"] = step + 1
                state["history"].append({"step": step + 1, **{k: round(v, 6) for k, v in stats.items()}})
                bar.update(1)
                bar.set_postfix(gen=f"{stats['gen_loss']:.3f}", loc=f"{stats['loc_loss']:.3f}")
                clock.step_done()
                over_time = state["step"] < total and clock.next_step_overruns()
                if state["step"] - last_saved >= hp.checkpoint_every or state["step"] == total or over_time:
                    state["done"] = state["step"] >= total
                    state["elapsed_s"] = state.get("elapsed_s", 0.0) + time.monotonic() - started
                    started = time.monotonic()
                    save_checkpoint(folder, net, opt, state)
                    last_saved = state["step"]
                if over_time:
                    raise stopped(
                        "MALMEN meta-training",
                        hp.max_minutes,
                        state["step"],
                        total,
                        folder,
                        "hparams.max_minutes",
                    )
    finally:
        bar.close()
    return TrainResult(net, state, folder, *resumed)


def compute_deltas(
    model: nn.Module,
    tokenizer,
    template: QueryTemplate,
    net: MalmenHypernet,
    modules: Sequence[str],
    cases: Sequence[EditCase],
    hp: MalmenHParams,
) -> tuple[list[torch.Tensor], float]:
    """Key-major updates ``[d_in, d_out]`` of all modules for all ``cases`` at once (one ridge solve per
    layer over every edit's shifts) and the edits' mean NLL before editing.

    A hypernetwork whose normaliser has seen nothing (untrained) normalises with these edits' statistics.
    """
    examples = edit_examples(tokenizer, template, cases, hp)
    with frozen(model):
        keys, grads, nll = cache_keys_and_grads(model, tokenizer, examples, modules, hp)
    empty = {i for i in range(len(modules)) if net.slot(i)[0].norm.empty}
    for i in sorted(empty):
        net.update_norm(i, keys[i], grads[i])
    deltas = []
    with torch.no_grad():
        for i in range(len(modules)):
            d = net.shifts(i, keys[i], grads[i], hp.editor_batch_size)
            deltas.append(ridge_update(keys[i], d, net.log_lambda(i), DTYPES[hp.solve_dtype]))
    del keys, grads
    return deltas, nll


def meta_eval(
    model: nn.Module,
    tokenizer,
    template: QueryTemplate,
    net: MalmenHypernet,
    modules: Sequence[str],
    cases: Sequence[EditCase],
    hp: MalmenHParams,
    step: int = 0,
) -> dict[str, float]:
    """The meta-training losses of editing ``cases`` with ``net`` (no update of anything but an empty
    normaliser): post-edit NLL of the edit rows, generalisation loss, locality KL, and their objective
    ``gen_loss + loc_coef * loc_loss``."""
    edits, gens, locs = step_examples(tokenizer, template, cases, hp, step)
    deltas, _ = compute_deltas(model, tokenizer, template, net, modules, cases, hp)
    with frozen(model):
        out = {
            "edit_loss": generalisation_loss(model, tokenizer, edits, modules, deltas, hp.batch_size, False),
            "gen_loss": generalisation_loss(model, tokenizer, gens, modules, deltas, hp.batch_size, False),
            "loc_loss": locality_loss(model, tokenizer, locs, modules, deltas, hp.batch_size, 0.0, False),
        }
    out["objective"] = out["gen_loss"] + hp.loc_coef * out["loc_loss"]
    return out
