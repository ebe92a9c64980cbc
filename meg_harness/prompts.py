"""Prompts and answers as the model sees them: query templates, their token ids, the answer format.

One module below :mod:`meg_harness.editing`, :mod:`meg_harness.evaluate` and the methods, so that every one
of them wraps, tokenises and reads answers the same way:

- :class:`QueryTemplate` / :func:`get_template`: how a question is wrapped before it reaches the model (the
  short-answer templates of the editing protocol, and a long-answer form of each for UnKEBench:
  :func:`long_answer_template`);
- :func:`encode_query`, :func:`encode_target`, :func:`encode_answer`: the token ids that are scored and
  trained toward; :func:`context_length`: how many tokens the model takes;
- :func:`cut_answer` / :func:`normalize_answer`: where a generated answer ends and the form AG compares.
"""

from __future__ import annotations

from dataclasses import dataclass

from meg_harness.errors import HarnessError

SHORT_ANSWER = "Answer the following question in less than 5 words. {}"
ANSWER_CUTS = ("\n", "\\")
MAX_NEW_TOKENS = 20  # the most tokens a greedy answer may have (scoring, collection, the lm-eval tasks)
LONG_MAX_NEW_TOKENS = 256  # long answers (UnKEBench: ~100 tokens each): greedy until EOS or this many
LONG_ANSWER_CUTS = ("\n\n",)  # a long answer is one paragraph: it ends at a blank line (or EOS)
LONG_SUFFIX = "_long"  # the long-answer form of a named template: "chatml" -> "chatml_long"


# -- query templates ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueryTemplate:
    """``text`` has one ``{}`` for the question; ``terminator`` ends an answer (what greedy decoding
    should emit after the target so that it stops)."""

    name: str
    text: str
    terminator: str = "\n"

    def format(self, question: str) -> str:
        return self.text.replace("{}", question, 1)


TEMPLATES: dict[str, QueryTemplate] = {
    t.name: t
    for t in (
        # The official MeG code's templates for Phi-2 and GPT-J.
        QueryTemplate("phi2", "Instruct:" + SHORT_ANSWER + "\nOutput:"),
        QueryTemplate("gptj", "Q: " + SHORT_ANSWER + "\nA:"),
        # Llama-3-Instruct chat markup.
        QueryTemplate(
            "llama3",
            "<|start_header_id|>user<|end_header_id|>\n\n"
            + SHORT_ANSWER
            + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        # ChatML instruct models (SmolLM2-Instruct, Qwen2-Instruct).
        QueryTemplate("chatml", "<|im_start|>user\n" + SHORT_ANSWER + "<|im_end|>\n<|im_start|>assistant\n"),
        # No wrapping: the prompt is scored as it is (ROME-style cloze prompts).
        QueryTemplate("plain", "{}"),
        # Long-answer forms (UnKEBench): the same markup without the "less than 5 words" instruction; an
        # answer is a paragraph, ended by the chat turn's end (or a blank line without chat markup).
        QueryTemplate("phi2" + LONG_SUFFIX, "Instruct: {}\nOutput:", terminator="\n\n"),
        QueryTemplate("gptj" + LONG_SUFFIX, "Q: {}\nA:", terminator="\n\n"),
        QueryTemplate(
            "llama3" + LONG_SUFFIX,
            "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            terminator="<|eot_id|>",
        ),
        QueryTemplate(
            "chatml" + LONG_SUFFIX,
            "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            terminator="<|im_end|>",
        ),
    )
}


def long_answer_template(name: str) -> str:
    """The long-answer form of the named short-answer template (``plain`` and custom texts stay as they are:
    they carry no length instruction)."""
    return name + LONG_SUFFIX if name + LONG_SUFFIX in TEMPLATES else name


def get_template(name_or_text: str) -> QueryTemplate:
    """A named template, or a custom one given as text containing ``{}``."""
    if name_or_text in TEMPLATES:
        return TEMPLATES[name_or_text]
    if "{}" in name_or_text:
        return QueryTemplate("custom", name_or_text)
    raise HarnessError(
        f"unknown query template {name_or_text!r}; use one of {sorted(TEMPLATES)} or a text with '{{}}'",
        field="template",
    )


# -- token ids ----------------------------------------------------------------------------------------------
def encode_target(tokenizer, target: str, *, where: str | None = None) -> tuple[int, ...]:
    """Token ids of ``" " + target`` (targets are scored with a leading space)."""
    ids = tuple(tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])
    if not ids:
        file, record = split_source(where)
        raise HarnessError(
            f"target {target!r} tokenizes to nothing", file=file, record=record, field="target_new"
        )
    return ids


def encode_answer(
    tokenizer, template: QueryTemplate, target: str, *, terminator: bool, where: str | None = None
) -> tuple[int, ...]:
    """What an edit trains toward: ``" " + target`` as :func:`encode_target` tokenises it, followed by the
    template's answer terminator when ``terminator`` (greedy decoding then stops after the answer)."""
    ids = encode_target(tokenizer, target, where=where)
    if terminator and template.terminator:
        ids += tuple(tokenizer(template.terminator, add_special_tokens=False)["input_ids"])
    return ids


def encode_query(tokenizer, template: QueryTemplate, question: str) -> tuple[int, ...]:
    """Token ids of the templated question (with the tokenizer's own special tokens, e.g. BOS)."""
    return tuple(tokenizer(template.format(question))["input_ids"])


def split_source(source: str | None) -> tuple[str | None, str | None]:
    """``"file:index"`` (EditCase.source) -> (file, index)."""
    if source is None:
        return None, None
    file, _, record = source.rpartition(":")
    return (file, record) if file and record.isdigit() else (source, None)


def context_length(model) -> int | None:
    """The model's context window in tokens (from its config), ``None`` when the config does not say."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# -- the answer format --------------------------------------------------------------------------------------
def cut_answer(text: str) -> str:
    """The answer part of a generation: up to the first newline (or backslash)."""
    for cut in ANSWER_CUTS:
        text = text.split(cut, 1)[0]
    return text


def cut_long_answer(text: str) -> str:
    """A long answer (UnKEBench): the generation up to the first blank line, stripped."""
    for cut in LONG_ANSWER_CUTS:
        text = text.split(cut, 1)[0]
    return text.strip()


def normalize_answer(text: str) -> str:
    """Cut, strip, drop one trailing period, casefold: the form AG compares."""
    text = cut_answer(text).strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text.casefold()
