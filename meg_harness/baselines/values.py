"""Value (z) optimisation: for each edit, the vector(s) that, added at the subject's last token of the last
edited layer, make the model produce ``" " + target_new`` after the templated prompt (MEMIT's compute_z).

Loss per edit = ``nll_factor * NLL(target | prompt rows) + kl_factor * KL(p || p_init on the KL prompt)
+ v_weight_decay * sum_site ||delta|| / ||init||^2``; Adam with ``v_lr``; after each step a delta is
clamped to ``clamp_norm_factor * ||init||``; an edit stops once its loss is below ``v_loss_stop``.

The layers below the last edited layer are frozen and come before every delta: their output is computed
once per chunk and each step runs the model from that layer upward (checked against a full forward on the
first step; a family where they differ uses full forwards).

Batched over edits: each row of a batch belongs to one edit and receives only that edit's delta, and the
loss is a sum of per-edit losses, so an edit's gradient (and Adam, which is element-wise) is the same as
when optimised alone. Finished edits leave the batch and keep their delta.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from meg_harness.baselines.nethook import Trace, model_device
from meg_harness.baselines.params import LocateHParams
from meg_harness.baselines.plan import EditPlan, pad_id
from meg_harness.models.layer_cache import LayerCachedLM, right_pad_ids


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

    def save(self, path: Path) -> None:
        """Write to ``path`` atomically (safetensors; diagnostics in the metadata)."""
        tensors = {f"init/{k}": v for k, v in self.init.items()}
        tensors.update({f"target/{k}": v for k, v in self.targets.items()})
        tensors.update({f"observed/{k}": v for k, v in self.observed.items()})
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"nll": json.dumps(self.nll), "steps": json.dumps(self.steps)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

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
    """The rows of a chunk of edits, padded once; a step selects the rows of the active edits."""

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    edit: torch.Tensor  # local edit index of each row
    look: torch.Tensor  # subject last-token position of each row
    is_kl: torch.Tensor
    label_row: torch.Tensor  # one entry per target token: its row,
    label_pos: torch.Tensor  # the position whose prediction it is,
    label_id: torch.Tensor  # and the token id
    n_rows_per_edit: int
    target_len: torch.Tensor  # per edit


def _batch(plans: Sequence[EditPlan], pad: int, device: torch.device) -> _Batch:
    seqs, edit, look, is_kl, lrow, lpos, lid = [], [], [], [], [], [], []
    for e, plan in enumerate(plans):
        for row in plan.contexts:
            r = len(seqs)
            seqs.append(row.ids + plan.target_ids)
            edit.append(e), look.append(row.index), is_kl.append(False)
            for j, token in enumerate(plan.target_ids):
                lrow.append(r), lpos.append(len(row.ids) - 1 + j), lid.append(token)
        seqs.append(plan.kl.ids)
        edit.append(e), look.append(plan.kl.index), is_kl.append(True)
    ids, mask = right_pad_ids(seqs, pad, device)

    def t(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype, device=device)

    return _Batch(
        ids,
        mask,
        t([len(s) for s in seqs]),
        t(edit),
        t(look),
        t(is_kl, torch.bool),
        t(lrow),
        t(lpos),
        t(lid),
        len(plans[0].contexts),
        t([len(p.target_ids) for p in plans]),
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
    parts = []
    chunks = range(0, len(plans), hp.z_batch_size)
    for start in tqdm(chunks, desc="z optimisation", disable=not progress, leave=False):
        chunk = plans[start : start + hp.z_batch_size]
        path = cache(chunk) if cache else None
        if path is not None and path.is_file():
            parts.append(ValueResult.load(path))
            continue
        batch = _batch(chunk, pad_id(tokenizer), device)
        parts.append(_optimise_chunk(lm, batch, len(chunk), sites, hp, nll_factor, relax_on_argmax))
        if not record_observed:
            parts[-1].observed = {}
        if path is not None:
            parts[-1].save(path)
    return ValueResult.concat(parts)


def _optimise_chunk(
    lm: LayerCachedLM, b: _Batch, n: int, sites, hp: LocateHParams, nll_factor, relax
) -> ValueResult:
    deltas: dict[str, torch.Tensor] = {}
    init: dict[str, torch.Tensor] = {}
    final: dict[str, torch.Tensor] = {}
    observed: dict[str, torch.Tensor] = {}  # each site's output at the bare prompt's subject, this step
    final_observed: dict[str, torch.Tensor] = {}
    active = torch.ones(n, dtype=torch.bool, device=b.ids.device)
    factor = torch.full((n,), float(nll_factor), device=b.ids.device)
    kl_init = None
    nll_last = torch.zeros(n)
    steps = [0] * n
    first_row = torch.arange(n, device=b.ids.device) * (b.n_rows_per_edit + 1)  # bare-prompt row of edit e
    opt = None
    model = lm.model
    states = lm.layer_inputs(b.ids, b.mask)  # the layers below are frozen and come before every delta
    layer_cached = None
    for it in range(hp.v_num_grad_steps):
        rows = active[b.edit].nonzero().squeeze(1)
        width = int(b.lengths[rows].max())
        r_edit, r_look = b.edit[rows], b.look[rows]

        # rows of this step are a subset in order; map original row ids to positions in ``rows``
        local = torch.full((len(b.edit),), -1, dtype=torch.long, device=rows.device)
        local[rows] = torch.arange(len(rows), device=rows.device)
        bare_edits = active.nonzero().squeeze(1)
        bare_rows = local[first_row[bare_edits]]

        def edit_output(
            name: str,
            out: torch.Tensor,
            rows=rows,
            r_edit=r_edit,
            r_look=r_look,
            bare_edits=bare_edits,
            bare_rows=bare_rows,
        ) -> torch.Tensor:
            if name not in init:  # first pass: every edit is active and every delta is zero
                init[name] = out[first_row, b.look[first_row]].detach().float()
                deltas[name] = torch.zeros_like(init[name], requires_grad=True)
            add = torch.zeros_like(out)
            add[torch.arange(len(rows), device=out.device), r_look] = deltas[name][r_edit].to(out.dtype)
            edited = out + add
            observed.setdefault(name, init[name].clone())[bare_edits] = (
                edited[bare_rows, b.look[first_row[bare_edits]]].detach().float()
            )
            return edited

        keep = local[b.label_row] >= 0
        lr_, lp_, li_ = local[b.label_row[keep]], b.label_pos[keep], b.label_id[keep]
        kl_rows = rows[b.is_kl[rows]]
        ids, mask = b.ids[rows, :width], b.mask[rows, :width]
        at_rows, at_positions = torch.cat([lr_, local[kl_rows]]), torch.cat([lp_, b.look[kl_rows]])
        if layer_cached is None:
            with Trace(model, sites, edit_output=edit_output):  # checked with zero deltas
                layer_cached = lm.agrees_with_full_forward(ids, mask, at_rows, at_positions)
        with torch.enable_grad(), Trace(model, sites, edit_output=edit_output):
            if layer_cached:
                logits = _softcapped(model, lm.logits(states[rows, :width], mask, at_rows, at_positions))
            else:
                logits = logits_at(model, ids, mask, at_rows, at_positions)
            if opt is None:
                opt = torch.optim.Adam([deltas[s] for s in sites], lr=hp.v_lr)
            logp = torch.log_softmax(logits[: len(lr_)], -1)
            token_lp = logp.gather(1, li_[:, None]).squeeze(1)
            label_edit = b.edit[b.label_row[keep]]
            per_edit_nll = torch.zeros(n, device=logp.device).index_add(0, label_edit, -token_lp)
            per_edit_nll = per_edit_nll / (b.target_len * b.n_rows_per_edit)
            is_argmax = logp.argmax(-1) == li_
            misses = torch.zeros(n, device=logp.device).index_add(0, label_edit, (~is_argmax).float())
            all_argmax = misses == 0

            kl_logp = torch.log_softmax(logits[len(lr_) :], -1)
            if kl_init is None:
                kl_init = kl_logp.detach()
            kl_ref = kl_init[active.nonzero().squeeze(1)]
            kl = torch.zeros(n, device=logp.device)
            kl[b.edit[kl_rows]] = (kl_logp.exp() * (kl_logp - kl_ref)).sum(-1)

            decay = torch.zeros(n, device=logp.device)
            for s in sites:
                decay = decay + deltas[s].norm(dim=1) / init[s].norm(dim=1) ** 2
            loss = factor * per_edit_nll + hp.kl_factor * kl + hp.v_weight_decay * decay

            nll_last[active.cpu()] = per_edit_nll.detach().cpu()[active.cpu()]
            done = active & (loss.detach() < hp.v_loss_stop)
            if relax:
                factor = torch.where(all_argmax, 0.1 * nll_factor, float(nll_factor))
                done |= active & all_argmax & (kl.detach() <= 0.01)
            if it == hp.v_num_grad_steps - 1:
                done = active.clone()
            for e in done.nonzero().squeeze(1).tolist():
                steps[e] = it
            for s in sites:
                final.setdefault(s, torch.zeros_like(init[s]))
                final[s][done] = deltas[s].detach()[done]
                final_observed.setdefault(s, torch.zeros_like(init[s]))[done] = observed[s][done]
            active = active & ~done
            if not bool(active.any()):
                break
            opt.zero_grad()
            loss[active].sum().backward()
        opt.step()
        with torch.no_grad():
            for s in sites:
                deltas[s][~active] = final[s][~active]  # finished edits keep their delta (Adam momentum)
                limit = hp.clamp_norm_factor * init[s].norm(dim=1, keepdim=True)
                norm = deltas[s].norm(dim=1, keepdim=True)
                deltas[s].copy_(torch.where(norm > limit, deltas[s] * limit / norm, deltas[s]))
    targets = {s: init[s] + final[s] for s in sites}
    return ValueResult(init, targets, nll_last.tolist(), steps, final_observed)
