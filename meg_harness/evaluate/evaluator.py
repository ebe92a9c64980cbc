"""The Evaluators: turn EditCases into probes, score an edited model, write nothing themselves.

:class:`Evaluator` is the editing protocol (ZsRE, CounterFact: the six metrics and Score);
:class:`MQuAKEEvaluator` and :class:`UnKEEvaluator` score MQuAKE's rewrite and multi-hop questions and
UnKEBench's long answers; :func:`evaluator_for` picks the one of a dataset. The lm-eval tasks
``mquake_ke`` / ``unke_ke`` build their documents from the same probe specs and score them with the same
functions, so both give the same numbers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meg_harness.cache import JsonCache, content_hash
from meg_harness.data.edit_case import EditCase
from meg_harness.editing.base import Edited
from meg_harness.errors import HarnessError
from meg_harness.evaluate.protocol import (
    ag_match,
    ag_prefix_match,
    summarize,
    summarize_mquake,
    summarize_unke,
)
from meg_harness.evaluate.scoring import (
    MAX_NEW_TOKENS,
    Generation,
    Probe,
    greedy_answers,
    teacher_forced_accuracy,
)
from meg_harness.prompts import (
    ANSWER_CUTS,
    LONG_ANSWER_CUTS,
    LONG_MAX_NEW_TOKENS,
    QueryTemplate,
    context_length,
    cut_long_answer,
    encode_query,
    encode_target,
    split_source,
)


@dataclass(frozen=True)
class ProbeSpec:
    """What one item of items.jsonl is about, before scoring."""

    case_id: str
    kind: str  # edit | rephrase | locality (MQuAKE: edit | multi_hop)
    question: str
    target: str | None  # None for locality: the label is the unedited model's answer
    source: str | None
    aliases: tuple[str, ...] = ()  # other accepted answers (MQuAKE's multi-hop answer aliases)


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


def mquake_probe_specs(cases: Sequence[EditCase]) -> list[ProbeSpec]:
    """Per case: every single-hop rewrite question (kind ``edit``, target its ``target_new``), then every
    multi-hop question (kind ``multi_hop``, target the new answer, its aliases accepted too)."""
    specs: list[ProbeSpec] = []
    for case in cases:
        edits = case.extra.get("edits") or [{"prompt": case.prompt, "target_new": case.target_new}]
        specs += [ProbeSpec(case.case_id, "edit", e["prompt"], e["target_new"], case.source) for e in edits]
        if case.multi_hop is not None:
            hop = case.multi_hop
            specs += [
                ProbeSpec(case.case_id, "multi_hop", q, hop.new_answer, case.source, hop.new_answer_aliases)
                for q in hop.questions
            ]
    return specs


def unke_probe_specs(cases: Sequence[EditCase]) -> list[ProbeSpec]:
    """Per case: the question (kind ``edit``) and every paraphrase (kind ``rephrase``), target the long
    answer."""
    specs: list[ProbeSpec] = []
    for case in cases:
        target = case.long_answer or case.target_new
        specs.append(ProbeSpec(case.case_id, "edit", case.prompt, target, case.source))
        specs += [ProbeSpec(case.case_id, "rephrase", q, target, case.source) for q in case.rephrases]
    return specs


class Evaluator:
    """Scores any Edited model on the same probes with the same rules (ARCHITECTURE.md, "The evaluation
    protocol")."""

    label = "generation (AG)"
    cuts: tuple[str, ...] = ANSWER_CUTS

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

    def specs(self, cases: Sequence[EditCase]) -> list[ProbeSpec]:
        """The probes of ``cases``, in the order items.jsonl lists them."""
        return probe_specs(cases)

    # -- validation -------------------------------------------------------------------------------
    def check_inputs(self, model, cases: Sequence[EditCase]) -> None:
        """Raise a HarnessError before any work if a target is empty or a prompt exceeds the context."""
        limit = context_length(model)
        for spec in self.specs(cases):
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
        if not unique:  # MQuAKE, UnKE: no locality probes
            return {}
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
        specs = self.specs(cases)
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
        generations = self._generate(edited, probes, self.label)
        generated = time.perf_counter()
        routed = self._routed(edited, probes)
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
                    "routed": routed[index],
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
        return teacher_forced_accuracy(
            edited, probes, self.batch_size, progress="teacher forcing (TF)" if self.progress else None
        )

    def _generate(self, edited: Edited, probes: Sequence[Probe], label: str) -> list[Generation]:
        """Greedy answers, longest prompts first (with a progress bar)."""
        return greedy_answers(
            edited,
            probes,
            self.batch_size,
            self.max_new_tokens,
            cuts=self.cuts,
            progress=label if self.progress else None,
        )

    def _routed(self, edited: Edited, probes: Sequence[Probe]) -> list[bool | None]:
        routed = edited.routed([p.question for p in probes])
        return [None] * len(probes) if routed is None else [bool(r) for r in routed]

    def _answers(
        self, edited: Edited, cases: Sequence[EditCase]
    ) -> tuple[list[ProbeSpec], list[Generation], list[bool | None], float]:
        """Greedy answers to every probe of ``cases`` (MQuAKE, UnKE); the seconds they took."""
        started = time.perf_counter()
        specs = self.specs(cases)
        probes = [Probe(s.question, encode_query(self.tokenizer, self.template, s.question)) for s in specs]
        generations = self._generate(edited, probes, self.label)
        return specs, generations, self._routed(edited, probes), time.perf_counter() - started


class MQuAKEEvaluator(Evaluator):
    """MQuAKE: greedy short answers (as AG) to every rewrite question and multi-hop question; edit-wise,
    instance-wise and multi-hop accuracy (:func:`summarize_mquake`). No locality probes."""

    label = "generation (MQuAKE)"

    def specs(self, cases: Sequence[EditCase]) -> list[ProbeSpec]:
        return mquake_probe_specs(cases)

    def evaluate(
        self, edited: Edited, cases: Sequence[EditCase], labels: dict[str, Generation]
    ) -> tuple[dict, list[dict]]:
        specs, generations, routed, seconds = self._answers(edited, cases)
        items = []
        for spec, gen, was_routed in zip(specs, generations, routed):
            accepted = [spec.target, *spec.aliases]
            items.append(
                {
                    "case_id": spec.case_id,
                    "kind": spec.kind,
                    "prompt": spec.question,
                    "target": spec.target,
                    "aliases": list(spec.aliases),
                    "prediction": gen.text,
                    "ag": any(ag_match(gen.text, t) for t in accepted),
                    "ag_prefix": any(ag_prefix_match(gen.text, t) for t in accepted),
                    "routed": was_routed,
                }
            )
        metrics = summarize_mquake(items)
        kinds = ("edit", "multi_hop")
        metrics["counts"] = {"cases": len(cases), **{k: sum(s.kind == k for s in specs) for k in kinds}}
        metrics["timings"] = {"generation_s": seconds}
        return metrics, items


class UnKEEvaluator(Evaluator):
    """UnKEBench: a long greedy answer (up to :data:`LONG_MAX_NEW_TOKENS` tokens, to EOS or a blank line) to
    the question and its paraphrase, against the target answer: UnKE's Bert Score and ROUGE-L recall
    (:mod:`meg_harness.evaluate.longform`, :func:`summarize_unke`). No locality probes."""

    label = "generation (UnKE long answers)"
    cuts = LONG_ANSWER_CUTS

    def __init__(self, tokenizer, template: QueryTemplate, **kwargs) -> None:
        kwargs.setdefault("max_new_tokens", LONG_MAX_NEW_TOKENS)
        super().__init__(tokenizer, template, **kwargs)

    def specs(self, cases: Sequence[EditCase]) -> list[ProbeSpec]:
        return unke_probe_specs(cases)

    def evaluate(
        self, edited: Edited, cases: Sequence[EditCase], labels: dict[str, Generation]
    ) -> tuple[dict, list[dict]]:
        from meg_harness.evaluate.longform import bert_scores, rouge_l_recall

        specs, generations, routed, seconds = self._answers(edited, cases)
        answers = [cut_long_answer(g.text) for g in generations]
        scored = time.perf_counter()
        similarities = bert_scores(answers, [s.target for s in specs])
        items = [
            {
                "case_id": spec.case_id,
                "kind": spec.kind,
                "prompt": spec.question,
                "target": spec.target,
                "prediction": answer,
                "bert_score": similarity,
                "rougeL": rouge_l_recall(answer, spec.target),
                "routed": was_routed,
            }
            for spec, answer, similarity, was_routed in zip(specs, answers, similarities, routed)
        ]
        metrics = summarize_unke(items)
        kinds = ("edit", "rephrase")
        metrics["counts"] = {"cases": len(cases), **{k: sum(s.kind == k for s in specs) for k in kinds}}
        metrics["timings"] = {"generation_s": seconds, "scoring_s": time.perf_counter() - scored}
        return metrics, items


EVALUATORS: dict[str, type[Evaluator]] = {"mquake": MQuAKEEvaluator, "unke": UnKEEvaluator}


def evaluator_for(dataset: str, tokenizer, template: QueryTemplate, **kwargs) -> Evaluator:
    """The Evaluator of ``dataset``: MQuAKE's, UnKE's, else the editing protocol's."""
    return EVALUATORS.get(dataset, Evaluator)(tokenizer, template, **kwargs)


def long_answers(dataset: str) -> bool:
    """Whether ``dataset``'s answers are long texts (the query template's long-answer form is used)."""
    return dataset == "unke"
