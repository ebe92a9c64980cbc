"""Value (z) optimisation: for each edit, the vector(s) that, added at the subject's last token of the last
edited layer, make the model produce ``" " + target_new`` after the templated prompt (MEMIT's compute_z).

Loss per edit = ``nll_factor * NLL(target | prompt rows) + kl_factor * KL(p || p_init on the KL prompt)
+ v_weight_decay * sum_site ||delta|| / ||init||^2``; Adam with ``v_lr``; after each step a delta is
clamped to ``clamp_norm_factor * ||init||``; an edit stops once its loss is below ``v_loss_stop``.

The layers below the last edited layer are frozen and come before every delta, and so are the positions
before each row's subject in every layer: both are computed once per chunk, and each step runs only the rows'
suffixes (from the subject on) from that layer upward, attending to the kept keys and values
(:class:`~meg_harness.models.layer_cache.SplitRows`; checked against a full forward on the first step; a
family where they differ uses full forwards).

Batched over edits: each row of a batch belongs to one edit and receives only that edit's delta, and the
loss is a sum of per-edit losses, so an edit's gradient (and Adam, which is element-wise) is the same as
when optimised alone. Finished edits leave the batch and keep their delta.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from meg_harness.baselines.params import LocateHParams
from meg_harness.baselines.plan import EditPlan, pad_id
from meg_harness.cache import atomic_path
from meg_harness.models.layer_cache import LayerCachedLM, SplitRows, right_pad_ids, target_index
from meg_harness.models.nethook import TraceDict, model_device
from meg_harness.ranks import map_shared


@dataclass
class ValueResult:
    """Per site ``[n_edits, d]`` float32 initial outputs and targets (init + delta), plus diagnostics.

    ``observed`` (only when asked for) holds each site's output under the final deltas of every site: it
    differs from the target where one site's delta changes another's input (the FFN after the attention
    in a sequential block)."""

    init: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    nll: list[float] = field(default_factory=list)  # last measured mean NLL per target token
    steps: list[int] = field(default_factory=list)
    observed: dict[str, torch.Tensor] = field(default_factory=dict)
    chunks: int = 1  # chunks of edits optimised together (not saved: a file holds one)
    chunks_read: int = 0  # of them, read back from the cache instead of optimised in this process

    def save(self, path: Path) -> None:
        """Write to ``path`` atomically (safetensors; diagnostics in the metadata)."""
        tensors = {f"init/{k}": v for k, v in self.init.items()}
        tensors.update({f"target/{k}": v for k, v in self.targets.items()})
        tensors.update({f"observed/{k}": v for k, v in self.observed.items()})
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={"nll": json.dumps(self.nll), "steps": json.dumps(self.steps)})

    @classmethod
    def concat(cls, parts: Sequence[ValueResult]) -> ValueResult:
        """The results of consecutive chunks of edits as one."""
        sites = parts[0].init
        return cls(
            {s: torch.cat([p.init[s] for p in parts]) for s in sites},
            {s: torch.cat([p.targets[s] for p in parts]) for s in sites},
            [x for p in parts for x in p.nll],
            [x for p in parts for x in p.steps],
            {s: torch.cat([p.observed[s] for p in parts]) for s in parts[0].observed},
            chunks=sum(p.chunks for p in parts),
            chunks_read=sum(p.chunks_read for p in parts),
        )

    @classmethod
    def load(cls, path: Path) -> ValueResult:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            result = cls({}, {}, json.loads(meta["nll"]), json.loads(meta["steps"]))
            kinds = {"init": result.init, "target": result.targets, "observed": result.observed}
            for name in handle.keys():
                kind, site = name.split("/", 1)
                kinds[kind][site] = handle.get_tensor(name)
        return result


@dataclass
class _Batch:
    """The ``R`` rows of a chunk of ``n`` edits, padded once to width ``W``: per edit its context rows
    (prompt + target), then its KL row. A step selects the rows of the edits still active."""

    ids: torch.Tensor  # (R, W)
    mask: torch.Tensor  # (R, W)
    lengths: torch.Tensor  # (R,)
    edit: torch.Tensor  # (R,) local edit index of each row
    look: torch.Tensor  # (R,) subject last-token position of each row
    is_kl: torch.Tensor  # (R,) bool
    label_row: torch.Tensor  # (L,) one entry per target token of a context row: its row,
    label_pos: torch.Tensor  # (L,) the position whose prediction it is,
    label_id: torch.Tensor  # (L,) and the token id
    n_rows_per_edit: int  # context rows per edit
    target_len: torch.Tensor  # (n,)
    bare_row: torch.Tensor  # (n,) each edit's bare-prompt row (its first)


def _batch(plans: Sequence[EditPlan], pad: int, device: torch.device) -> _Batch:
    seqs, edit, look, is_kl = [], [], [], []
    context_rows, starts, labels = [], [], []  # the context rows' target tokens
    for e, plan in enumerate(plans):
        for row in plan.contexts:
            context_rows.append(len(seqs)), starts.append(len(row.ids) - 1), labels.append(plan.target_ids)
            seqs.append(row.ids + plan.target_ids)
            edit.append(e), look.append(row.index), is_kl.append(False)
        seqs.append(plan.kl.ids)
        edit.append(e), look.append(plan.kl.index), is_kl.append(True)
    ids, mask = right_pad_ids(seqs, pad, device)
    label_row, label_pos, label_id = target_index(starts, labels, device, rows=context_rows)

    def t(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype, device=device)

    n_rows_per_edit = len(plans[0].contexts)
    return _Batch(
        ids,
        mask,
        t([len(s) for s in seqs]),
        t(edit),
        t(look),
        t(is_kl, torch.bool),
        label_row,
        label_pos,
        label_id,
        n_rows_per_edit,
        t([len(p.target_ids) for p in plans]),
        torch.arange(len(plans), device=device) * (n_rows_per_edit + 1),
    )


@dataclass
class _Step:
    """The ``R'`` rows of the ``A`` edits active at one step (in batch order, cut to their width ``W'``)
    and where the loss reads the logits: at the ``N`` target tokens of their context rows, then at the
    subject of each KL row (``N + A`` reads)."""

    rows: torch.Tensor  # (R',) batch rows of the active edits
    ids: torch.Tensor  # (R', W')
    mask: torch.Tensor  # (R', W')
    row_edit: torch.Tensor  # (R',) local edit of each row
    row_look: torch.Tensor  # (R',) subject position of each row
    edits: torch.Tensor  # (A,) the active edits
    bare_rows: torch.Tensor  # (A,) their bare-prompt rows, as indices into ``rows``
    bare_look: torch.Tensor  # (A,) the subject position in those rows
    label_edit: torch.Tensor  # (N,) the edit of each target token
    label_id: torch.Tensor  # (N,) its id
    kl_edit: torch.Tensor  # (A,) the edit of each KL row
    at_rows: torch.Tensor  # (N + A,) the reads: indices into ``rows``
    at_positions: torch.Tensor  # (N + A,) and positions
    at_suffix_positions: torch.Tensor  # (N + A,) the positions counted from the row's subject


def _step_rows(b: _Batch, active: torch.Tensor) -> _Step:
    """The rows and read positions of the edits in ``active`` ``(n,)``."""
    rows = active[b.edit].nonzero().squeeze(1)  # (R',)
    width = int(b.lengths[rows].max())
    local = torch.full((len(b.edit),), -1, dtype=torch.long, device=rows.device)  # (R,) batch row -> in rows
    local[rows] = torch.arange(len(rows), device=rows.device)
    edits = active.nonzero().squeeze(1)  # (A,)
    keep = local[b.label_row] >= 0  # (L,) target tokens of active edits
    kl_rows = rows[b.is_kl[rows]]  # (A,) batch rows
    at_rows = torch.cat([local[b.label_row[keep]], local[kl_rows]])  # (N + A,)
    at_positions = torch.cat([b.label_pos[keep], b.look[kl_rows]])  # (N + A,)
    return _Step(
        rows=rows,
        ids=b.ids[rows, :width],
        mask=b.mask[rows, :width],
        row_edit=b.edit[rows],
        row_look=b.look[rows],
        edits=edits,
        bare_rows=local[b.bare_row[edits]],
        bare_look=b.look[b.bare_row[edits]],
        label_edit=b.edit[b.label_row[keep]],
        label_id=b.label_id[keep],
        kl_edit=b.edit[kl_rows],
        at_rows=at_rows,
        at_positions=at_positions,
        at_suffix_positions=at_positions - b.look[rows][at_rows],
    )


def logits_at(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """float32 next-token logits ``[len(rows), vocab]`` at ``(rows[i], positions[i])`` only: the LM head is
    applied to the selected final hidden states, not to every position (memory and time)."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return _softcapped(model, model.get_output_embeddings()(hidden[rows, positions]))


def _softcapped(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """float32 logits, with the model's final soft-capping (Gemma-2) where it has one."""
    logits = logits.float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def optimise_values(
    model: nn.Module,
    tokenizer,
    plans: Sequence[EditPlan],
    sites: Sequence[str],
    hp: LocateHParams,
    *,
    layer: int,
    nll_factor: float = 1.0,
    relax_on_argmax: bool = False,
    record_observed: bool = False,
    cache: Callable[[Sequence[EditPlan]], Path] | None = None,
    progress: bool = True,
) -> ValueResult:
    """Optimise one delta per edit and site (module outputs at layer ``layer``, the last edited one), in
    chunks of ``hp.z_batch_size`` edits optimised jointly.

    ``relax_on_argmax`` (PMET): once every target token is the argmax, the NLL weight drops to a tenth,
    and the edit stops when its KL term is at most 0.01. ``cache(chunk)`` names the file a chunk's result
    is kept in: a finished chunk is loaded, not recomputed (an interrupted run resumes).
    ``record_observed`` fills :attr:`ValueResult.observed`.
    """
    device = model_device(model)
    lm = LayerCachedLM(model, layer)
    chunks = [plans[start : start + hp.z_batch_size] for start in range(0, len(plans), hp.z_batch_size)]

    def optimise(chunk: Sequence[EditPlan]) -> ValueResult:
        path = cache(chunk) if cache else None
        if path is not None and path.is_file():
            result = ValueResult.load(path)
            result.chunks_read = 1
        else:
            batch = _batch(chunk, pad_id(tokenizer), device)
            result = _optimise_chunk(lm, batch, len(chunk), sites, hp, nll_factor, relax_on_argmax)
            if not record_observed:
                result.observed = {}
            if path is not None:
                result.save(path)
        bar.update(1)
        return result

    with tqdm(total=len(chunks), desc="z optimisation", disable=not progress, leave=False) as bar:
        parts = map_shared(chunks, optimise)  # chunks spread over the ranks of a multi-process run
    return ValueResult.concat(parts)


class _Deltas:
    """The optimised deltas, one ``(n, D)`` float32 tensor per site, and the ``edit_output`` of a
    :class:`TraceDict` over the sites that adds them: an edit's delta goes to the site's output at the subject
    of each of its rows (of :attr:`step`). The first call per site (step 0: every edit active, every delta
    zero) records :attr:`init`, the site's output at each bare prompt's subject; each call records
    :attr:`observed`, that output with the deltas added. With :attr:`suffixes` the outputs are of the rows'
    suffixes, which start at the subject."""

    def __init__(self, b: _Batch) -> None:
        self.bare_row = b.bare_row  # (n,)
        self.step: _Step | None = None
        self.suffixes = False
        self.init: dict[str, torch.Tensor] = {}  # (n, D)
        self.delta: dict[str, torch.Tensor] = {}  # (n, D), requires grad
        self.observed: dict[str, torch.Tensor] = {}  # (n, D), of this step
        self.final: dict[str, torch.Tensor] = {}  # (n, D), of finished edits
        self.final_observed: dict[str, torch.Tensor] = {}  # (n, D), of finished edits

    def __call__(self, name: str, out: torch.Tensor, _input: torch.Tensor) -> torch.Tensor:
        step = self.step  # out: (R', W', D)
        row_look, bare_look = step.row_look, step.bare_look
        if self.suffixes:
            row_look, bare_look = torch.zeros_like(row_look), torch.zeros_like(bare_look)
        if name not in self.init:  # step 0: every edit is active
            self.init[name] = out[step.bare_rows, bare_look].detach().float()  # (n, D)
            self.delta[name] = torch.zeros_like(self.init[name], requires_grad=True)
        add = torch.zeros_like(out)  # (R', W', D)
        subject = torch.arange(len(step.rows), device=out.device), row_look
        add[subject] = self.delta[name][step.row_edit].to(out.dtype)  # (R', D) at the subjects
        edited = out + add  # (R', W', D)
        observed = self.observed.setdefault(name, self.init[name].clone())
        observed[step.edits] = edited[step.bare_rows, bare_look].detach().float()  # (A, D)
        return edited

    def decay(self, sites: Sequence[str]) -> torch.Tensor:
        """``sum_site ||delta|| / ||init||^2`` per edit, ``(n,)``."""
        decay = torch.zeros(len(self.bare_row), device=self.bare_row.device)
        for s in sites:
            decay = decay + self.delta[s].norm(dim=1) / self.init[s].norm(dim=1) ** 2
        return decay

    def finish(self, done: torch.Tensor, sites: Sequence[str]) -> None:
        """Keep the delta (and observed output) of the edits in ``done`` ``(n,)``."""
        for s in sites:
            self.final.setdefault(s, torch.zeros_like(self.init[s]))[done] = self.delta[s].detach()[done]
            self.final_observed.setdefault(s, torch.zeros_like(self.init[s]))[done] = self.observed[s][done]

    @torch.no_grad()
    def project(self, active: torch.Tensor, clamp_norm_factor: float, sites: Sequence[str]) -> None:
        """After an optimiser step: finished edits get their kept delta back (Adam momentum moved it), and
        every delta is clamped to ``clamp_norm_factor * ||init||``."""
        for s in sites:
            delta = self.delta[s]  # (n, D)
            delta[~active] = self.final[s][~active]
            limit = clamp_norm_factor * self.init[s].norm(dim=1, keepdim=True)  # (n, 1)
            norm = delta.norm(dim=1, keepdim=True)  # (n, 1)
            delta.copy_(torch.where(norm > limit, delta * limit / norm, delta))


class _Objective:
    """The per-edit loss terms ``(n,)`` of a step from its logits ``(N + A, V)``: the mean NLL of the target
    tokens, whether every target token is the argmax, and the KL of each KL row's next-token distribution
    from the one at step 0."""

    def __init__(self, b: _Batch) -> None:
        self.b = b
        self.kl_init: torch.Tensor | None = None  # (n, V) log-probabilities at step 0

    def __call__(self, logits: torch.Tensor, step: _Step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, n_labels = len(self.b.target_len), len(step.label_id)
        logp = torch.log_softmax(logits[:n_labels], -1)  # (N, V)
        token_lp = logp.gather(1, step.label_id[:, None]).squeeze(1)  # (N,)
        nll = torch.zeros(n, device=logp.device).index_add(0, step.label_edit, -token_lp)  # (n,)
        nll = nll / (self.b.target_len * self.b.n_rows_per_edit)
        is_argmax = logp.argmax(-1) == step.label_id  # (N,)
        misses = torch.zeros(n, device=logp.device).index_add(0, step.label_edit, (~is_argmax).float())

        kl_logp = torch.log_softmax(logits[n_labels:], -1)  # (A, V)
        if self.kl_init is None:
            self.kl_init = kl_logp.detach()
        kl_ref = self.kl_init[step.edits]  # (A, V)
        kl = torch.zeros(n, device=logp.device)
        kl[step.kl_edit] = (kl_logp.exp() * (kl_logp - kl_ref)).sum(-1)
        return nll, misses == 0, kl


def _step_logits(
    lm: LayerCachedLM, rows_split: SplitRows, step: _Step, deltas: _Deltas, suffixes: bool
) -> torch.Tensor:
    """float32 logits ``(N + A, V)`` at the step's reads (with the site hooks in place): from the rows'
    suffixes and their kept past, or by full forwards."""
    deltas.suffixes = suffixes
    if suffixes:
        logits = lm.split_logits(rows_split, step.rows, step.at_rows, step.at_suffix_positions)
        return _softcapped(lm.model, logits)
    return logits_at(lm.model, step.ids, step.mask, step.at_rows, step.at_positions)


@torch.no_grad()
def suffixes_agree(lm: LayerCachedLM, rows_split: SplitRows, step: _Step, deltas: _Deltas) -> bool:
    """Whether the suffix logits equal a full forward's at the step's reads (under the hooks in place)."""
    full = _step_logits(lm, rows_split, step, deltas, suffixes=False)
    return lm.agree(_step_logits(lm, rows_split, step, deltas, suffixes=True), full, "suffix")


def _optimise_chunk(
    lm: LayerCachedLM,
    b: _Batch,
    n: int,
    sites: Sequence[str],
    hp: LocateHParams,
    nll_factor: float,
    relax: bool,
) -> ValueResult:
    """Optimise the deltas of the chunk's ``n`` edits jointly (one Adam over every site); an edit leaves
    the batch once finished and keeps its delta."""
    model, device = lm.model, b.ids.device
    deltas, objective = _Deltas(b), _Objective(b)
    active = torch.ones(n, dtype=torch.bool, device=device)  # (n,)
    factor = torch.full((n,), float(nll_factor), device=device)  # (n,) weight of the NLL term
    nll_last = torch.zeros(n)
    steps = [0] * n
    opt = None
    # the layers below and the positions before each subject are frozen and come before every delta
    rows_split = lm.split_rows(lm.layer_inputs(b.ids, b.mask), b.lengths, b.look)
    suffixes = None
    for it in range(hp.v_num_grad_steps):
        step = deltas.step = _step_rows(b, active)
        if suffixes is None:
            with TraceDict(model, sites, edit_output=deltas):  # checked with zero deltas
                suffixes = suffixes_agree(lm, rows_split, step, deltas)
        with torch.enable_grad(), TraceDict(model, sites, edit_output=deltas):
            logits = _step_logits(lm, rows_split, step, deltas, suffixes)  # (N + A, V)
            if opt is None:
                opt = torch.optim.Adam([deltas.delta[s] for s in sites], lr=hp.v_lr)
            nll, all_argmax, kl = objective(logits, step)  # (n,) each
            decay = deltas.decay(sites)  # (n,)
            loss = factor * nll + hp.kl_factor * kl + hp.v_weight_decay * decay  # (n,)

            nll_last[active.cpu()] = nll.detach().cpu()[active.cpu()]
            done = active & (loss.detach() < hp.v_loss_stop)
            if relax:
                factor = torch.where(all_argmax, 0.1 * nll_factor, float(nll_factor))
                done |= active & all_argmax & (kl.detach() <= 0.01)
            if it == hp.v_num_grad_steps - 1:
                done = active.clone()
            for e in done.nonzero().squeeze(1).tolist():
                steps[e] = it
            deltas.finish(done, sites)
            active = active & ~done
            if not bool(active.any()):
                break
            opt.zero_grad()
            loss[active].sum().backward()
        opt.step()
        deltas.project(active, hp.clamp_norm_factor, sites)
    targets = {s: deltas.init[s] + deltas.final[s] for s in sites}
    return ValueResult(deltas.init, targets, nll_last.tolist(), steps, deltas.final_observed)
