"""Batched model calls of the protocol: teacher-forced token accuracy and greedy short answers.

Both run inside ``edited.rows(questions)`` so that a per-query method (MeG) gives each batch row its
own modification. Items are processed longest-first (less padding) and returned in input order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from meg_harness.editing.base import Edited
from meg_harness.prompts import ANSWER_CUTS, MAX_NEW_TOKENS
from meg_harness.ranks import map_shared


@dataclass(frozen=True)
class Probe:
    """One scored prompt: ``question`` is what per-query methods route on, ``query_ids`` the templated
    prompt's tokens, ``target_ids`` the tokens teacher forcing checks (may be empty for AG-only probes)."""

    question: str
    query_ids: tuple[int, ...]
    target_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Generation:
    """A greedy answer: the decoded text (special tokens skipped) and the answer's token ids (those
    before the cut; the first generated token when the cut comes first)."""

    text: str
    answer_ids: tuple[int, ...]


def _batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


def _longest_first(lengths: Sequence[int]) -> list[int]:
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _bar(batches: list[list[int]], label: str | None) -> tqdm:
    """A progress bar counting the batches' items (a silent one when ``label`` is None)."""
    return tqdm(total=sum(map(len, batches)), desc=label, leave=False, disable=label is None)


@torch.no_grad()
def teacher_forced_accuracy(
    edited: Edited, probes: Sequence[Probe], batch_size: int = 16, progress: str | None = None
) -> list[float]:
    """Per probe: the fraction of target tokens that are the argmax at the previous position, from ONE
    forward pass over ``query + target`` (right-padded batch). ``progress``: a progress bar's label."""
    model, pad_id = edited.model, edited.tokenizer.pad_token_id
    device = _device(model)
    sequences = [p.query_ids + p.target_ids for p in probes]
    scores = [0.0] * len(probes)
    batches = list(_batches(_longest_first([len(s) for s in sequences]), batch_size))

    def score(batch: list[int]) -> list[tuple[int, float]]:
        width = max(len(sequences[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            attention[row, : len(sequences[i])] = 1
        with edited.rows([probes[i].question for i in batch]):
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        predicted = logits.argmax(-1).cpu()
        scored = []
        for row, i in enumerate(batch):
            start, n = len(probes[i].query_ids), len(probes[i].target_ids)
            hits = predicted[row, start - 1 : start - 1 + n] == torch.tensor(probes[i].target_ids)
            scored.append((i, int(hits.sum()) / n))
        bar.update(len(batch))
        return scored

    with _bar(batches, progress) as bar:  # batches spread over the ranks of a multi-process run
        for i, value in itertools.chain.from_iterable(map_shared(batches, score)):
            scores[i] = value
    return scores


class _AnswerComplete(StoppingCriteria):
    """Stop each row once its generated text contains an answer cut (newline or backslash)."""

    def __init__(self, tokenizer, prompt_width: int, cuts: Sequence[str] = ANSWER_CUTS) -> None:
        self.tokenizer, self.prompt_width, self.cuts = tokenizer, prompt_width, tuple(cuts)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        return torch.tensor([any(c in t for c in self.cuts) for t in texts], device=input_ids.device)


def _greedy_config(model, pad_id: int, max_new_tokens: int) -> GenerationConfig:
    """Plain greedy decoding, whatever the model's own generation_config says (repetition penalties...)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos
    )


def _answer_ids(tokenizer, generated: Sequence[int], cuts: Sequence[str] = ANSWER_CUTS) -> tuple[int, ...]:
    """Generated tokens strictly before the one that ends the answer (a cut character or EOS)."""
    stop_ids = set(tokenizer.all_special_ids)
    kept: list[int] = []
    for token in generated:
        if token in stop_ids:
            break
        if cuts:
            text = tokenizer.decode([*kept, token], skip_special_tokens=True)
            if any(c in text for c in cuts):
                break
        kept.append(token)
    return tuple(kept) if kept else tuple(generated[:1])


@torch.no_grad()
def greedy_answers(
    edited: Edited,
    probes: Sequence[Probe],
    batch_size: int = 16,
    max_new_tokens: int = MAX_NEW_TOKENS,
    cuts: Sequence[str] = ANSWER_CUTS,
    progress: str | None = None,
) -> list[Generation]:
    """Greedy decoding of at most ``max_new_tokens`` from each query (left-padded batches); a row stops at
    EOS or once its text contains one of ``cuts``. ``progress``: a progress bar's label."""
    model, tokenizer = edited.model, edited.tokenizer
    device, pad_id = _device(model), tokenizer.pad_token_id
    results: list[Generation | None] = [None] * len(probes)
    batches = list(_batches(_longest_first([len(p.query_ids) for p in probes]), batch_size))

    def decode(batch: list[int]) -> list[tuple[int, Generation]]:
        width = max(len(probes[i].query_ids) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = probes[i].query_ids
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        with edited.rows([probes[i].question for i in batch]):
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=_greedy_config(model, pad_id, max_new_tokens),
                stopping_criteria=StoppingCriteriaList(
                    [_AnswerComplete(tokenizer, width, cuts)] if cuts else []
                ),
            )
        decoded = []
        for row, i in enumerate(batch):
            generated = output[row, width:].tolist()
            text = tokenizer.decode(generated, skip_special_tokens=True)
            decoded.append((i, Generation(text, _answer_ids(tokenizer, generated, cuts))))
        bar.update(len(batch))
        return decoded

    with _bar(batches, progress) as bar:  # batches spread over the ranks of a multi-process run
        for i, generation in itertools.chain.from_iterable(map_shared(batches, decode)):
            results[i] = generation
    return results  # type: ignore[return-value]
