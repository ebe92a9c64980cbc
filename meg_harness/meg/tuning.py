"""Tuning the text encoder on pseudo-knowledge pairs (paper 4.1a, eq. 5; Table 4's MSE variant; A.6.2 MQuAKE).

A pair is ``(original, paraphrase)``: the original expression x_e of a pseudo-edit and an equivalent
expression x_eq of it (a rephrase, or for MQuAKE a multi-hop question built on the atomic edit).
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from meg_harness.cache import content_hash, default_cache_dir
from meg_harness.data.edit_case import EditCase
from meg_harness.errors import HarnessError
from meg_harness.meg.encoder import ENCODER_META, TextEncoder

Pair = tuple[str, str]
LOSSES = ("infonce", "mse", "frozen")
# The paper gives no temperature; 0.05 is SimCSE's (Gao et al., 2021) for cosine-similarity InfoNCE on BERT.
DEFAULT_TAU = 0.05
DEFAULT_LR = 2e-5  # the usual BERT fine-tuning rate (Devlin et al., 2019); the paper gives none
CACHE_VERSION = "text-encoder-tuning/v1"


def infonce_loss(
    queries: torch.Tensor, keys: torch.Tensor, tau: float = DEFAULT_TAU, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 5: ``-1/B sum_i log softmax_j(cos(q_i, k_j) / tau)[i]``, one-directional as in the paper.

    ``queries`` are the equivalent expressions x_eq, ``keys`` the originals x_e (row i's positive is key i,
    the other keys in the batch are its negatives). ``exclude[i, j]`` (bool, ``[B, B]``, False on the
    diagonal) removes key j from row i's denominator: a duplicate of the positive is no negative.
    """
    logits = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T / tau
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def mse_loss(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Table 4's "MSE-Tuned BERT": mean squared error between the two [CLS] embeddings of each pair."""
    return F.mse_loss(queries, keys)


def exclusion_mask(pairs: Sequence[Pair]) -> torch.Tensor:
    """``[B, B]`` bool: off-diagonal (i, j) whose original or paraphrase text equals pair i's, i.e. key j is
    another copy of row i's positive (CounterFact: one prompt, several rephrases) or another atomic fact of
    the same multi-hop question (MQuAKE)."""

    def ids(texts: list[str]) -> torch.Tensor:
        index: dict[str, int] = {}
        return torch.tensor([index.setdefault(t, len(index)) for t in texts])

    originals, paraphrases = ids([p[0] for p in pairs]), ids([p[1] for p in pairs])
    same = (originals[:, None] == originals[None, :]) | (paraphrases[:, None] == paraphrases[None, :])
    return same & ~torch.eye(len(pairs), dtype=torch.bool)


def pairs_from_cases(cases: Iterable[EditCase]) -> list[Pair]:
    """``(prompt, rephrase)`` for every rephrase of every case (pseudo-knowledge: use a TRAIN file disjoint
    from the edits, e.g. counterfact-train.json or the ZsRE train file). Repeated and trivial pairs are
    dropped."""
    pairs: list[Pair] = []
    for case in cases:
        pairs.extend((case.prompt, rephrase) for rephrase in case.rephrases)
    return _clean(pairs)


def pairs_from_mquake(cases: Iterable[EditCase]) -> list[Pair]:
    """A.6.2: ``(atomic edit question, multi-hop question)`` for each multi-hop question of a case and each
    of its atomic edits (``extra["edits"][k]["prompt"]``): multi-hop questions aligned with their facts."""
    pairs: list[Pair] = []
    for case in cases:
        edits = case.extra.get("edits")
        if case.multi_hop is None or not edits:
            raise HarnessError(
                "not an MQuAKE case (needs multi_hop questions and extra['edits'])",
                file=case.source,
                record=case.case_id,
            )
        for question in case.multi_hop.questions:
            pairs.extend((edit["prompt"], question) for edit in edits)
    return _clean(pairs)


def _clean(pairs: Iterable[Pair]) -> list[Pair]:
    seen: set[Pair] = set()
    out: list[Pair] = []
    for original, paraphrase in pairs:
        if (
            not original.strip()
            or not paraphrase.strip()
            or original == paraphrase
            or (original, paraphrase) in seen
        ):
            continue
        seen.add((original, paraphrase))
        out.append((original, paraphrase))
    return out


def tune_encoder(
    encoder: TextEncoder,
    pairs: Sequence[Pair],
    *,
    loss: str = "infonce",
    tau: float = DEFAULT_TAU,
    lr: float = DEFAULT_LR,
    epochs: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    max_pairs: int | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> TextEncoder:
    """A tuned copy of ``encoder`` (``loss="frozen"`` returns ``encoder`` itself).

    AdamW (weight decay 0.01, gradient-norm clip 1.0, constant ``lr``) over shuffled batches of ``batch_size``
    pairs; ``max_pairs`` keeps a seeded random subset. The result is cached under
    ``<cache>/encoders/<hash>/`` keyed by the base encoder's weights, the pairs and the hyper-parameters
    (written to a temporary folder, then renamed); a later identical call loads it (``from_cache`` True).
    """
    if loss not in LOSSES:
        raise HarnessError(f"unknown encoder tuning loss {loss!r}; expected one of {', '.join(LOSSES)}")
    if loss == "frozen":
        return encoder
    pairs = _validated(pairs)
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = random.Random(seed).sample(pairs, max_pairs)
    if loss == "infonce" and len(pairs) < 2:
        raise HarnessError("InfoNCE tuning needs at least 2 pairs (in-batch negatives)")
    if epochs < 1 or batch_size < 2 or lr <= 0 or tau <= 0:
        raise HarnessError(
            f"bad tuning hyper-parameters: epochs={epochs} batch_size={batch_size} lr={lr} tau={tau}"
        )
    hparams = {
        "loss": loss,
        "tau": tau if loss == "infonce" else None,
        "lr": lr,
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
    }
    final = None
    if use_cache:
        key = content_hash(CACHE_VERSION, encoder.fingerprint(), [list(p) for p in pairs], hparams)
        final = Path(cache_dir or default_cache_dir()) / "encoders" / key
        if (final / ENCODER_META).is_file():
            cached = TextEncoder.from_pretrained(final).to(encoder.device)
            cached.from_cache = True
            return cached
    tuned = _train(encoder, pairs, hparams, progress)
    tuned.name = f"{encoder.name}+{loss}"
    tuned.info = {"base": encoder.name, "n_pairs": len(pairs), **hparams, **tuned.info}
    if final is not None:
        _store(tuned, final)
    return tuned


def _validated(pairs: Sequence[Pair]) -> list[Pair]:
    out = []
    for i, pair in enumerate(pairs):
        if (
            not isinstance(pair, (tuple, list))
            or len(pair) != 2
            or not all(isinstance(t, str) and t.strip() for t in pair)
        ):
            raise HarnessError("a tuning pair must be two non-empty strings (original, paraphrase)", record=i)
        out.append((pair[0], pair[1]))
    if not out:
        raise HarnessError("no (original, paraphrase) pairs to tune the text encoder on")
    return out


def _train(encoder: TextEncoder, pairs: list[Pair], hp: dict, progress: bool) -> TextEncoder:
    """The optimisation loop (seeded: shuffling and dropout are reproducible on CPU)."""
    from tqdm.auto import tqdm

    tuned = copy.deepcopy(encoder)
    tuned.from_cache = False
    device = tuned.device
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=hp["lr"], weight_decay=0.01)
    generator = torch.Generator().manual_seed(hp["seed"])
    n_batches = -(-len(pairs) // hp["batch_size"])
    epoch_losses: list[float] = []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(hp["seed"])
        tuned.train()
        bar = tqdm(total=hp["epochs"] * n_batches, desc=f"tune encoder ({hp['loss']})", disable=not progress)
        for _ in range(hp["epochs"]):
            order = torch.randperm(len(pairs), generator=generator).tolist()
            total, count = 0.0, 0
            for start in range(0, len(order), hp["batch_size"]):
                batch = [pairs[i] for i in order[start : start + hp["batch_size"]]]
                bar.update(1)
                if len(batch) < 2 and hp["loss"] == "infonce":
                    continue
                value = _batch_loss(tuned, batch, hp)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                torch.nn.utils.clip_grad_norm_(tuned.parameters(), 1.0)
                optimizer.step()
                total, count = total + float(value.detach()), count + 1
                bar.set_postfix(loss=f"{float(value.detach()):.4f}")
            epoch_losses.append(total / max(count, 1))
        bar.close()
    tuned.eval()
    tuned.info = {"epoch_losses": epoch_losses}
    return tuned


def _batch_loss(encoder: TextEncoder, batch: list[Pair], hp: dict) -> torch.Tensor:
    embeddings = encoder([p[0] for p in batch] + [p[1] for p in batch])
    keys, queries = embeddings[: len(batch)], embeddings[len(batch) :]
    if hp["loss"] == "mse":
        return mse_loss(queries, keys)
    return infonce_loss(queries, keys, hp["tau"], exclusion_mask(batch).to(embeddings.device))


def _store(encoder: TextEncoder, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        encoder.save(tmp)
        os.rename(tmp, final)
    except OSError:
        if not (final / ENCODER_META).is_file():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def pair_loss(
    encoder: TextEncoder, pairs: Sequence[Pair], *, tau: float = DEFAULT_TAU, batch_size: int = 64
) -> float:
    """Mean InfoNCE loss (eq. 5, eval mode) over consecutive batches of ``pairs``: a tuning diagnostic."""
    pairs = _validated(pairs)
    keys = encoder.encode([p[0] for p in pairs], batch_size)
    queries = encoder.encode([p[1] for p in pairs], batch_size)
    losses = []
    for start in range(0, len(pairs), batch_size):
        sl = slice(start, start + batch_size)
        if len(pairs[sl]) >= 2:
            losses.append(float(infonce_loss(queries[sl], keys[sl], tau, exclusion_mask(pairs[sl]))))
    return sum(losses) / len(losses)
