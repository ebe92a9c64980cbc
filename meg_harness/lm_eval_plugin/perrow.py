"""PerRowHFLM: lm-eval's HFLM with every model call inside ``edited.rows(questions)``.

Per-query methods (MeG) modify each batch row according to that row's raw question. HFLM's hooks
``_model_call`` (all loglikelihood batches) and ``_model_generate`` (all generation batches) receive only
token tensors, so each row's question is recovered exactly, without decoding:

* generation: HFLM encodes every batch with one ``tok_batch_encode(contexts)`` call right before
  ``_model_generate``; the override remembers those context strings (row order = call order).
* loglikelihood: rows are ``(context + continuation)[-(max_length + 1):][:-1]`` right-padded with 0 and
  sorted/grouped by HFLM's Collator. ``_loglikelihood_tokens`` registers a digest of every request's row
  tokens; ``_model_call`` looks each row up, first as it is (exact when unpadded), then with trailing 0s
  removed. Two requests whose rows differ only by trailing token-0s but that route on different
  questions cannot be told apart in a padded batch: that raises an error asking for ``batch_size=1``.

A row's question: the question a meg-harness task document names (:func:`routing_question`); otherwise
the question :func:`~meg_harness.editing.routing.question_from_text` recovers from the request's context
(the same rule as the EasyEdit-style API's routing: with the query template of model arg ``template``,
the text between its prefix and suffix when the context has that form, else the whole context, stripped);
for rolling-loglikelihood windows, their decoded text.

Requests of meg-harness short-answer probe documents skip HFLM and run the native protocol code
(:func:`teacher_forced_accuracy`, :func:`greedy_answers`), which enters ``rows`` itself: same token ids,
same batching rules, same numbers as ``meg-harness run``.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from safetensors import SafetensorError

from meg_harness.editing.base import Edited
from meg_harness.editing.routing import is_per_row, question_from_text
from meg_harness.errors import HarnessError
from meg_harness.evaluate.scoring import MAX_NEW_TOKENS, Probe, greedy_answers, teacher_forced_accuracy
from meg_harness.lm_eval_plugin import preflight
from meg_harness.lm_eval_plugin.probes import probe_of, routing_question, tf_response
from meg_harness.models.loading import _HUB_ID, resolve_alias
from meg_harness.prompts import (
    ANSWER_CUTS,
    LONG_ANSWER_CUTS,
    QueryTemplate,
    encode_query,
    encode_target,
    get_template,
)
from meg_harness.store import artifact_run

NATIVE_BATCH_SIZE = 16  # for the native path when lm-eval's batch size is "auto"
NATIVE_TF_LABEL = "meg-harness teacher forcing"  # progress bars of the native path (lm-eval's own bars
NATIVE_GENERATE_LABEL = "meg-harness greedy answers"  # cover only the requests HFLM runs)
_AMBIGUOUS = object()


def _digest(tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(array("q", tokens).tobytes(), digest_size=16).digest()


def _init_cpu_process_group() -> None:
    """Under torchrun on a machine without CUDA, HFLM's ``Accelerator()`` sees one process; an
    ``Accelerator(cpu=True)`` created first sets up the gloo process group that HFLM's then shares."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        from accelerate import Accelerator

        Accelerator(cpu=True)


def _check_pretrained(source: str) -> None:
    """A local model path that does not exist, or a file, is an error before HFLM tries the hub with it."""
    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():
        raise HarnessError(
            "is a file; expected a model directory or a hub id", file=source, field="pretrained"
        )
    if not path.exists() and (source.startswith(("/", ".", "~")) or not _HUB_ID.match(source)):
        raise HarnessError(
            "does not exist (neither a model directory nor a hub id)", file=source, field="pretrained"
        )


def _strip_zeros(tokens: Sequence[int]) -> Sequence[int]:
    end = len(tokens)
    while end and tokens[end - 1] == 0:
        end -= 1
    return tokens[:end]


class PerRowHFLM(HFLM):
    """HFLM + an :class:`Edited` whose ``rows(questions)`` wraps every forward/generate call.

    Extra model args: ``template`` (a template name or text with ``{}``; used to strip the query template
    off contexts of other tasks), ``cache_dir`` (meg-harness cache, for model aliases). ``pretrained`` may
    be a meg-harness alias (``smollm2-135m``). ``dtype`` defaults to float32 like ``meg-harness run``.
    """

    def __init__(
        self,
        pretrained: str,
        *,
        template: str | None = None,
        cache_dir: str | None = None,
        dtype: str = "float32",
        **kwargs: Any,
    ) -> None:
        preflight.check_command_line()  # the lm_eval command's task arguments, before anything loads
        self.template: QueryTemplate | None = get_template(template) if template else None  # before loading
        if isinstance(pretrained, str):
            pretrained = resolve_alias(pretrained, cache_dir)
            _check_pretrained(pretrained)
        _init_cpu_process_group()
        try:
            super().__init__(pretrained=pretrained, dtype=dtype, **kwargs)
        except OSError as error:  # transformers: a folder without weights, an unknown or unreachable hub id
            reason = " ".join(str(error).split())[:500]
            raise HarnessError(
                f"cannot load the model: {reason}", file=str(pretrained), field="pretrained"
            ) from None
        self._fix_cpu_data_parallel()
        try:
            self.edited: Edited = self.load_edited(self.model, self.tokenizer)
        except HarnessError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError, IndexError, SafetensorError) as error:
            # an artifact of another model (shapes, layers) or a damaged file: one line, not a traceback
            reason = " ".join(str(error).split())[:500]
            raise HarnessError(
                f"the edit does not fit this model ({pretrained}): {type(error).__name__}: {reason}",
                field="model_args",
            ) from error
        self._questions: dict[str, str] = {}  # context string -> question
        self._row_exact: dict[bytes, Any] = {}
        self._row_stripped: dict[bytes, Any] = {}
        self._batch_contexts: list[str] | None = None

    # -- extension point --------------------------------------------------------------------------
    def load_edited(self, model: Any, tokenizer: Any) -> Edited:
        """The edit to evaluate; the base class evaluates the model as it is."""
        return Edited(model, tokenizer)

    @property
    def per_row(self) -> bool:
        """Whether the edit differs per row (bookkeeping is skipped for static or no edits)."""
        return is_per_row(self.edited)

    # -- questions ----------------------------------------------------------------------------------
    def question_for_context(self, context: str) -> str:
        """The raw question of a context that is not a meg-harness document (see module docstring)."""
        return question_from_text(context, self.template)

    def _remember(self, requests: Iterable[Any]) -> None:
        for req in requests:
            context = req.args[0]
            question = routing_question(req.doc)
            self._questions[context] = (
                question if question is not None else self.question_for_context(context)
            )

    def _question(self, context: str | None, tokens: Sequence[int]) -> str:
        if context is None:
            return self.tok_decode(list(tokens))
        question = self._questions.get(context)
        return question if question is not None else self.question_for_context(context)

    @staticmethod
    def _put(table: dict[bytes, Any], key: bytes, question: str) -> None:
        old = table.get(key)
        table[key] = question if old is None or old == question else _AMBIGUOUS

    def _row_question(self, row: list[int]) -> str:
        question = self._row_exact.get(_digest(row))
        if isinstance(question, str):
            return question
        question = self._row_stripped.get(_digest(_strip_zeros(row)))
        if isinstance(question, str):
            return question
        what = "matches several requests routed differently" if question is _AMBIGUOUS else "is unknown"
        raise HarnessError(
            f"a loglikelihood batch row {what}: cannot tell its question; run with --batch_size 1",
            field="batch_size",
        )

    # -- loglikelihood ------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        results: list[Any] = [None] * len(requests)
        native = [i for i, req in enumerate(requests) if probe_of(req.doc) is not None]
        if native:
            scores = teacher_forced_accuracy(
                self.edited,
                [self._probe(requests[i], with_target=True) for i in native],
                self._native_bs(),
                progress=None if disable_tqdm or self.rank != 0 else NATIVE_TF_LABEL,
            )
            for i, tf in zip(native, scores):
                results[i] = tf_response(tf)
                self.cache_hook.add_partial("loglikelihood", requests[i].args, results[i])
        others = [i for i in range(len(requests)) if results[i] is None]
        if others:
            if self.per_row:
                self._remember(requests[i] for i in others)
            answers = super().loglikelihood([requests[i] for i in others], disable_tqdm=disable_tqdm)
            for i, answer in zip(others, answers):
                results[i] = answer
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.per_row and self.backend == "causal":
            for request_str, context_enc, continuation_enc in requests:
                row = (context_enc + continuation_enc)[-(self.max_length + 1) :][:-1]
                question = self._question(request_str[0] if request_str else None, row)
                self._put(self._row_exact, _digest(row), question)
                self._put(self._row_stripped, _digest(_strip_zeros(row)), question)
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._row_exact.clear()
            self._row_stripped.clear()

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if not self.per_row:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        if attn_mask is not None:
            raise HarnessError("per-row editing supports decoder-only (causal) models only", field="model")
        questions = [self._row_question(row) for row in inps.tolist()]
        with self.edited.rows(questions):
            return super()._model_call(inps)

    # -- generation ---------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results: list[Any] = [None] * len(requests)
        native = [i for i, req in enumerate(requests) if probe_of(req.doc) is not None]
        by_length: dict[tuple[int, bool], list[int]] = {}
        for i in native:
            kwargs = requests[i].args[1] if len(requests[i].args) > 1 else {}
            long = bool(probe_of(requests[i].doc).get("long"))
            by_length.setdefault((int(kwargs.get("max_gen_toks", MAX_NEW_TOKENS)), long), []).append(i)
        for (max_new_tokens, long), group in by_length.items():
            probes = [self._probe(requests[i], with_target=False) for i in group]
            answers = greedy_answers(
                self.edited,
                probes,
                self._native_bs(),
                max_new_tokens,
                cuts=LONG_ANSWER_CUTS if long else ANSWER_CUTS,
                progress=None if disable_tqdm or self.rank != 0 else NATIVE_GENERATE_LABEL,
            )
            for i, generation in zip(group, answers):
                results[i] = generation.text
                self.cache_hook.add_partial("generate_until", requests[i].args, generation.text)
        others = [i for i in range(len(requests)) if results[i] is None]
        if others:
            if self.per_row:
                self._remember(requests[i] for i in others)
            answers = super().generate_until([requests[i] for i in others], disable_tqdm=disable_tqdm)
            for i, answer in zip(others, answers):
                results[i] = answer
        return results

    def tok_batch_encode(self, strings: list[str], *args: Any, **kwargs: Any):
        self._batch_contexts = list(strings)
        return super().tok_batch_encode(strings, *args, **kwargs)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        if not self.per_row:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        contexts = self._batch_contexts
        if contexts is None or len(contexts) != context.shape[0]:
            raise HarnessError("generation batch without its contexts: cannot tell the rows' questions")
        self._batch_contexts = None
        questions = [self._question(c, ()) for c in contexts]
        with self.edited.rows(questions):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # -- native protocol path -----------------------------------------------------------------------
    def _native_bs(self) -> int:
        return self.batch_size if isinstance(self.batch_size, int) else NATIVE_BATCH_SIZE

    def _probe(self, request: Any, *, with_target: bool) -> Probe:
        probe = probe_of(request.doc)
        template = QueryTemplate("custom", probe["template"])
        query_ids = encode_query(self.tokenizer, template, probe["question"])
        target_ids: tuple[int, ...] = ()
        if with_target:
            target_ids = tuple(probe.get("target_ids") or ()) or encode_target(
                self.tokenizer, probe["target"]
            )
        return Probe(probe["question"], query_ids, target_ids)

    # -- distributed and reporting --------------------------------------------------------------------
    def _fix_cpu_data_parallel(self) -> None:
        """HFLM assigns ranks only when GPUs > 1; on the CPU every process would evaluate everything.
        Give each process its rank so that lm-eval splits the documents."""
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1:
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes

    def artifact_folder(self) -> str | None:
        """The artifact folder the edit was read from (None: the unedited model)."""
        return None

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["meg_harness_edit"] = type(self.edited).__name__
        folder = self.artifact_folder()
        if folder is not None:  # what was edited, so that a results file names its setting by itself
            info["meg_harness_run"] = artifact_run(Path(folder))
        return info
