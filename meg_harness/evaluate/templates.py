"""Short-answer query templates: how a question is wrapped before it reaches the model."""

from __future__ import annotations

from dataclasses import dataclass

from meg_harness.errors import HarnessError

SHORT_ANSWER = "Answer the following question in less than 5 words. {}"


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
    )
}


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
