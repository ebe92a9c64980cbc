"""The Evaluator: turns EditCases into probes, scores an edited model, writes nothing itself."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from meg_harness.cache import JsonCache, content_hash
from meg_harness.data.edit_case import EditCase
from meg_harness.editing.base import Edited
from meg_harness.errors import HarnessError
from meg_harness.evaluate.protocol import ag_match, ag_prefix_match, summarize
from meg_harness.evaluate.scoring import (
    MAX_NEW_TOKENS,
    Generation,
    Probe,
    greedy_answers,
    teacher_forced_accuracy,
)
from meg_harness.prompts import QueryTemplate, context_length, encode_query, encode_target, split_source


@dataclass(frozen=True)
class ProbeSpec:
    """What one item of items.jsonl is about, before scoring."""

    case_id: str
    kind: str  # edit | rephrase | locality
    question: str
    target: str | None  # None for locality: the label is the unedited model's answer
    source: str | None


def probe_specs(cases: Sequence[EditCase]) -> list[ProbeSpec]:
    """Reliability (edit prompt), Generality (every rephrase), Locality (every unrelated prompt)."""
    specs: list[ProbeSpec] = []
    for case in cases:
        specs.append(ProbeSpec(case.case_id, "edit", case.prompt, case.target_new, case.source))
        specs += [
            ProbeSpec(case.case_id, "rephrase", q, case.target_new, case.source) for q in case.rephrases
        ]
        specs += [ProbeSpec(case.case_id, "locality", p.prompt, None, case.source) for p in case.locality]
    return specs


class Evaluator:
    """Scores any Edited model on the same probes with the same rules (ARCHITECTURE.md, "The evaluation
    protocol")."""

    def __init__(
        self,
        tokenizer,
        template: QueryTemplate,
        *,
        batch_size: int = 16,
        max_new_tokens: int = MAX_NEW_TOKENS,
        cache_dir: Path | None = None,
        progress: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.cache = JsonCache(cache_dir, "unedited_answers")
        self.progress = progress

    # -- validation -------------------------------------------------------------------------------
    def check_inputs(self, model, cases: Sequence[EditCase]) -> None:
        """Raise a HarnessError before any work if a target is empty or a prompt exceeds the context."""
        limit = context_length(model)
        for spec in probe_specs(cases):
            length = len(encode_query(self.tokenizer, self.template, spec.question)) + self.max_new_tokens
            if spec.target is not None:
                length += len(encode_target(self.tokenizer, spec.target, where=spec.source))
            if limit is not None and length > limit:
                file, record = split_source(spec.source)
                raise HarnessError(
                    f"prompt of case {spec.case_id} ({spec.kind}) needs {length} tokens with its answer, "
                    f"more than the model's context of {limit}",
                    file=file,
                    record=record,
                    field="prompt" if spec.kind == "edit" else spec.kind,
                )

    # -- unedited answers (locality labels) ------------------------------------------------------
    def locality_labels(
        self, unedited: Edited, cases: Sequence[EditCase], fingerprint: str
    ) -> dict[str, Generation]:
        """Greedy answers of the UNEDITED model to every locality prompt, cached on disk by
        (model fingerprint, template, prompts) hash. Call before any edit is applied."""
        unique = sorted({p.prompt for case in cases for p in case.locality})
        key = content_hash(
            "unedited-answers/v1", fingerprint, self.template.text, self.max_new_tokens, unique
        )
        cached = self.cache.get(key)
        if cached is None:
            probes = [Probe(q, encode_query(self.tokenizer, self.template, q)) for q in unique]
            generations = self._generate(unedited, probes, "unedited answers")
            cached = {q: [g.text, list(g.answer_ids)] for q, g in zip(unique, generations)}
            self.cache.put(key, cached)
        return {q: Generation(text, tuple(ids)) for q, (text, ids) in cached.items()}

    # -- scoring ----------------------------------------------------------------------------------
    def evaluate(
        self, edited: Edited, cases: Sequence[EditCase], labels: dict[str, Generation]
    ) -> tuple[dict, list[dict]]:
        """Score ``edited`` on ``cases``; ``labels`` are :meth:`locality_labels` of the unedited model.

        Returns (metrics, items): the six metrics in percent, Score, counts and timings; one item per probe.
        """
        started = time.perf_counter()
        specs = probe_specs(cases)
        probes, targets = [], []
        for spec in specs:
            query_ids = encode_query(self.tokenizer, self.template, spec.question)
            if spec.target is not None:
                target_ids, target = (
                    encode_target(self.tokenizer, spec.target, where=spec.source),
                    spec.target,
                )
            else:
                target_ids, target = labels[spec.question].answer_ids, labels[spec.question].text
            probes.append(Probe(spec.question, query_ids, target_ids))
            targets.append(target)
        tf = self._teacher_force(edited, probes)
        forced = time.perf_counter()
        generations = self._generate(edited, probes, "generation (AG)")
        generated = time.perf_counter()
        routed = edited.routed([p.question for p in probes])
        items = []
        for index, (spec, target, tf_value, gen) in enumerate(zip(specs, targets, tf, generations)):
            items.append(
                {
                    "case_id": spec.case_id,
                    "kind": spec.kind,
                    "prompt": spec.question,
                    "target": target,
                    "prediction": gen.text,
                    "tf": tf_value,
                    "ag": ag_match(gen.text, target),
                    "ag_prefix": ag_prefix_match(gen.text, target),
                    "routed": None if routed is None else bool(routed[index]),
                }
            )
        metrics = summarize(items)
        counts = {kind: sum(1 for s in specs if s.kind == kind) for kind in ("edit", "rephrase", "locality")}
        metrics["counts"] = {"cases": len(cases), **counts}
        metrics["ag_prefix"] = {
            kind: 100.0 * sum(i["ag_prefix"] for i in items if i["kind"] == kind) / max(1, counts[kind])
            for kind in ("edit", "rephrase")
        }
        metrics["timings"] = {"teacher_forcing_s": forced - started, "generation_s": generated - forced}
        return metrics, items

    def _teacher_force(self, edited: Edited, probes: Sequence[Probe]) -> list[float]:
        return teacher_forced_accuracy(edited, probes, self.batch_size)

    def _generate(self, edited: Edited, probes: Sequence[Probe], label: str) -> list[Generation]:
        """Greedy answers in chunks (for a progress bar), longest prompts first across all chunks."""
        order = sorted(range(len(probes)), key=lambda i: (-len(probes[i].query_ids), i))
        results: list[Generation | None] = [None] * len(probes)
        chunk = self.batch_size * 8
        with tqdm(total=len(probes), desc=label, disable=not self.progress, leave=False) as bar:
            for start in range(0, len(order), chunk):
                part = order[start : start + chunk]
                answers = greedy_answers(
                    edited, [probes[i] for i in part], self.batch_size, self.max_new_tokens
                )
                for i, answer in zip(part, answers):
                    results[i] = answer
                bar.update(len(part))
        return results  # type: ignore[return-value]
