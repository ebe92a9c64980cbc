"""General benchmarks: the paper's prompts (Table 23; BBH and MMLU as in chain-of-thought-hub), scored on
generated text, and lm-eval's standard loglikelihood formulation of MMLU, RTE and SST-2.

Every task's ``custom_dataset`` is :func:`load_general`: ``source: hub`` reads the benchmark from the
Hugging Face hub (the datasets lm-eval's built-in tasks use), ``source: local`` reads the same data from a
folder laid out like ``../shared/data/general`` (``mmlu.json``, ``sst2.json``, ``rte.json``,
``gsm8k_test.jsonl``, ``bbh/<task>.json``). The folder: metadata ``general_data``, else the environment
variable ``MEG_HARNESS_GENERAL_DATA``, else ``../shared/data/general`` relative to the working directory.
Prompt style (metadata ``prompt_style``): ``gptj`` (default) or ``phi2``, the two columns of Table 23.

Paper-prompt (generation) tasks ``<bench>_meg[_local]``: each document carries its full prompt (``prompt``)
and gold answer (``gold``); ``process_results`` functions read the answer from the generated text (the
first label word or letter, case-insensitive, after chat-template markup is removed: see
:func:`clean_generation`), so that they also work with ``--apply_chat_template``.

Loglikelihood tasks ``<bench>_mc[_local]`` (:func:`load_general_mc`): the records as lm-eval's own ``mmlu``,
``rte`` and ``sst2`` tasks read them; their YAMLs hold lm-eval's prompts and choices (``output_type:
multiple_choice``), so a model is scored on which answer it finds likeliest, not on what it writes.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from lm_eval.api.task import ConfigurableTask

from meg_harness.errors import HarnessError

GENERAL_DATA_ENV = "MEG_HARNESS_GENERAL_DATA"
DEFAULT_GENERAL_DATA = Path("..") / "shared" / "data" / "general"
STYLES = ("gptj", "phi2")

# Table 23 (A.11.2); one line each, as printed.
PROMPTS: dict[str, dict[str, str]] = {
    "gsm8k": {
        "phi2": "Question: {question} Output: Let's think step by step.",
        "gptj": "Question: {question} Answer: Let's think step by step.",
    },
    "rte": {
        "phi2": "Instruct: {sentence1} entails the {sentence2}. True or False? Output:",
        "gptj": "{sentence1} entails the {sentence2}. True or False? answer:",
    },
    "sst2": dict.fromkeys(
        STYLES,
        "For each snippet of text, label the sentiment of the text as positive or negative. "
        "The answer should be exact 'positive' or 'negative'. text: {sentence} answer:",
    ),
}
LABEL_WORDS = {"sst2": ("negative", "positive"), "rte": ("true", "false")}  # index = dataset label
# Words read as a label word: RTE's question is "... True or False?", which models often answer yes/no.
LABEL_SYNONYMS = {"true": ("yes",), "false": ("no",)}
MC_BENCHMARKS = ("mmlu", "rte", "sst2")
LOCAL_FILES = {  # what each benchmark reads from the local folder
    "mmlu": "mmlu.json",
    "sst2": "sst2.json",
    "rte": "rte.json",
    "gsm8k": "gsm8k_test.jsonl",
    "bbh": "bbh",
}  # those with a loglikelihood (multiple_choice) variant

# chain-of-thought-hub BBH: answer extraction mode per task.
BBH_MULTIPLE_CHOICE = (
    "temporal_sequences disambiguation_qa date_understanding tracking_shuffled_objects_three_objects "
    "penguins_in_a_table geometric_shapes snarks ruin_names tracking_shuffled_objects_seven_objects "
    "tracking_shuffled_objects_five_objects logical_deduction_three_objects hyperbaton "
    "logical_deduction_five_objects logical_deduction_seven_objects movie_recommendation "
    "salient_translation_error_detection reasoning_about_colored_objects"
).split()
BBH_FREE_FORM = (
    "multistep_arithmetic_two navigate dyck_languages word_sorting sports_understanding boolean_expressions "
    "object_counting formal_fallacies causal_judgement web_of_lies"
).split()
BBH_TASKS = tuple(sorted(BBH_MULTIPLE_CHOICE + BBH_FREE_FORM))
MMLU_SHOTS = 5
MMLU_LETTERS = "ABCD"
# With --apply_chat_template an instruct model answers in a sentence ("The answer is ..."): the short-answer
# tasks then read up to this many tokens instead of the reference code's 1 (MMLU) or 3 (SST-2, RTE).
CHAT_MAX_GEN_TOKS = {"mmlu": 16, "rte": 16, "sst2": 16}


# -- data -------------------------------------------------------------------------------------------------
def general_data_dir(metadata: dict[str, Any]) -> Path:
    """Where the local variants read from (see module docstring)."""
    value = metadata.get("general_data") or os.environ.get(GENERAL_DATA_ENV) or DEFAULT_GENERAL_DATA
    return Path(str(value)).expanduser()


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise HarnessError(
            f"local benchmark file not found; set --metadata general_data=DIR or {GENERAL_DATA_ENV}",
            file=path,
        )
    try:
        if path.suffix == ".jsonl":
            return [
                json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise HarnessError(f"not valid JSON: {error}", file=path) from None


def _hub(path: str, name: str | None, split: str) -> list[dict[str, Any]]:
    import datasets

    return [dict(row) for row in datasets.load_dataset(path, name, split=split)]


def _records(benchmark: str, source: str, metadata: dict[str, Any], *, shots: bool = True) -> Any:
    local = source == "local"
    root = general_data_dir(metadata) if local else None
    if benchmark in ("sst2", "rte"):
        return (
            _read_json(root / f"{benchmark}.json") if local else _hub("nyu-mll/glue", benchmark, "validation")
        )
    if benchmark == "gsm8k":
        return _read_json(root / "gsm8k_test.jsonl") if local else _hub("openai/gsm8k", "main", "test")
    if benchmark == "mmlu":
        if local:
            return _read_json(root / "mmlu.json"), None
        return _hub("cais/mmlu", "all", "test"), _hub("cais/mmlu", "all", "dev") if shots else None
    if benchmark == "bbh":
        tasks = {}
        for task in BBH_TASKS:
            if local:
                tasks[task] = _read_json(root / "bbh" / f"{task}.json")["examples"]
            else:
                tasks[task] = _hub("SaylorTwift/bbh", task, "test")
        return tasks
    raise HarnessError(f"unknown general benchmark {benchmark!r}", field="benchmark")


def check_general_metadata(
    metadata: dict[str, Any], benchmark: str | None = None, source: str = "local"
) -> None:
    """The metadata a general task reads (``prompt_style``; for the local variants ``general_data`` and the
    benchmark's file in it), checked without reading any benchmark: a HarnessError naming the key."""
    _check_source(source)
    style = str(metadata.get("prompt_style") or "gptj")
    if style not in STYLES:
        raise HarnessError(f"prompt_style must be one of {STYLES}, got {style!r}", field="prompt_style")
    if source != "local":
        return
    folder = general_data_dir(metadata)
    if not folder.is_dir():
        raise HarnessError(
            f"the local general-benchmark folder does not exist; set --metadata general_data=DIR or "
            f"{GENERAL_DATA_ENV}",
            file=folder,
            field="general_data",
        )
    name = LOCAL_FILES.get(str(benchmark))
    if name is not None and not (folder / name).exists():
        raise HarnessError(
            f"no {benchmark} data in the local general-benchmark folder (--metadata general_data=DIR)",
            file=folder / name,
            field="general_data",
        )


def _check_source(source: str) -> None:
    if source not in ("local", "hub"):
        raise HarnessError(f"source must be local or hub, got {source!r}", field="source")


def load_general(benchmark: str, source: str = "local", **metadata: Any) -> dict[str, Any]:
    """``custom_dataset`` of the paper-prompt tasks: ``{"test": Dataset}`` of ``{prompt, gold, ...}`` docs."""
    import datasets

    _check_source(source)
    style = str(metadata.get("prompt_style") or "gptj")
    if style not in STYLES:
        raise HarnessError(f"prompt_style must be one of {STYLES}, got {style!r}", field="prompt_style")
    records = _records(benchmark, source, metadata)
    builders = {
        "sst2": _glue_docs,
        "rte": _glue_docs,
        "gsm8k": _gsm8k_docs,
        "mmlu": _mmlu_docs,
        "bbh": _bbh_docs,
    }
    docs = builders[benchmark](benchmark, records, style)
    return {"test": datasets.Dataset.from_list(docs)}


def load_general_mc(benchmark: str, source: str = "local", **metadata: Any) -> dict[str, Any]:
    """``custom_dataset`` of the loglikelihood tasks ``<bench>_mc[_local]``: ``{"test": Dataset}`` of the
    records as lm-eval's own tasks read them (GLUE ``{sentence[1/2], label}``; MMLU ``{question, choices,
    answer, subject}`` plus ``description``, the header lm-eval's per-subject ``mmlu_*`` tasks put first)."""
    import datasets

    _check_source(source)
    if benchmark not in MC_BENCHMARKS:
        raise HarnessError(
            f"no loglikelihood variant of {benchmark!r}; one of {MC_BENCHMARKS}", field="benchmark"
        )
    records = _records(benchmark, source, metadata, shots=False)
    if benchmark == "mmlu":
        docs = [{**row, "description": mmlu_description(row["subject"])} for row in records[0]]
    else:
        docs = [dict(row) for row in records]
    return {"test": datasets.Dataset.from_list(docs)}


def mmlu_description(subject: str) -> str:
    """lm-eval's description of its ``mmlu_<subject>`` tasks (one space per underscore)."""
    return (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    )


def _glue_docs(benchmark: str, records: Sequence[dict], style: str) -> list[dict[str, Any]]:
    template = PROMPTS[benchmark][style]
    return [
        {"prompt": template.format(**r), "gold": LABEL_WORDS[benchmark][int(r["label"])]} for r in records
    ]


def gsm8k_number(answer: str) -> str:
    """The gold number of a GSM8K answer (after ``####``), commas removed."""
    return answer.split("####")[-1].strip().replace(",", "")


def _gsm8k_docs(benchmark: str, records: Sequence[dict], style: str) -> list[dict[str, Any]]:
    template = PROMPTS["gsm8k"][style]
    return [
        {"prompt": template.format(question=r["question"]), "gold": gsm8k_number(r["answer"])}
        for r in records
    ]


def mmlu_example(question: str, choices: Sequence[str], answer: int | None = None) -> str:
    """chain-of-thought-hub ``format_example``: the question, lettered choices, ``Answer:`` (+ the letter)."""
    text = question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, choices))
    text += "\nAnswer:"
    return text if answer is None else text + f" {MMLU_LETTERS[answer]}\n\n"


def mmlu_header(subject: str) -> str:
    """chain-of-thought-hub ``gen_prompt`` header; ``format_subject`` puts a space before each word, hence
    the double space after "about"."""
    return "The following are multiple choice questions (with answers) about {}.\n\n".format(
        "".join(" " + word for word in subject.split("_"))
    )


def _mmlu_docs(benchmark: str, records: Any, style: str) -> list[dict[str, Any]]:
    tests, dev = records
    shots: dict[str, list[dict]] = defaultdict(list)
    for row in dev if dev is not None else tests:  # local data has no dev split: shots from the same file
        shots[row["subject"]].append(row)
    docs = []
    for row in tests:
        pool = [s for s in shots[row["subject"]] if dev is not None or s is not row][:MMLU_SHOTS]
        prompt = mmlu_header(row["subject"]) + "".join(
            mmlu_example(s["question"], s["choices"], int(s["answer"])) for s in pool
        )
        prompt += mmlu_example(row["question"], row["choices"])
        docs.append({"prompt": prompt, "gold": MMLU_LETTERS[int(row["answer"])], "subject": row["subject"]})
    return docs


def bbh_prompt(task: str) -> str:
    """The chain-of-thought-hub ``lib_prompt/<task>.txt`` (Suzgun et al.'s 3-shot CoT prompt), rebuilt from
    the copy inside lm-eval's ``bbh/cot_fewshot`` task (description, then ``Q: / A: Let's think step by
    step.`` shots separated by blank lines)."""
    import yaml

    path = resources.files("lm_eval") / "tasks" / "bbh" / "cot_fewshot" / f"{task}.yaml"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        samples = config["fewshot_config"]["samples"]
        description = config["description"].strip()
    except (OSError, KeyError, TypeError) as error:
        raise HarnessError(f"no chain-of-thought prompt for BBH task {task} in lm-eval: {error}") from None
    shots = [f"Q: {s['input']}\nA: Let's think step by step.\n{s['target']}" for s in samples]
    return "\n\n".join([description, *shots])


def _bbh_docs(benchmark: str, records: dict[str, list[dict]], style: str) -> list[dict[str, Any]]:
    docs = []
    for task, examples in records.items():
        head = bbh_prompt(task)
        for row in examples:
            prompt = head + "\n\nQ: " + row["input"] + "\nA: Let's think step by step."
            docs.append({"prompt": prompt, "gold": row["target"], "subject": task})
    return docs


# -- scoring ----------------------------------------------------------------------------------------------
_MARKUP = re.compile(r"<\|[^|<>]*\|>|</?s>|\[/?INST\]")  # <|im_end|>, <|eot_id|>, <s>, [INST] ...
_ROLE = re.compile(r"^\s*(?:assistant|user|system|model)\s*(?:\n|:)", re.IGNORECASE)


def clean_generation(text: str) -> str:
    """A generation without chat-template markup: special-token texts removed, a role name left at its
    start (``assistant\\n``) dropped, surrounding whitespace stripped."""
    text = _MARKUP.sub(" ", text)
    while True:
        stripped = _ROLE.sub("", text, count=1)
        if stripped == text:
            return text.strip()
        text = stripped


def label_word(
    text: str, words: Sequence[str], synonyms: dict[str, Sequence[str]] | None = None
) -> str | None:
    """The label word (one of ``words``) that occurs first in the generated text, as a whole word,
    case-insensitive, after :func:`clean_generation`; a word of ``synonyms[label]`` counts as ``label``.
    None when there is none."""
    lower = clean_generation(text).lower()
    best: tuple[int, str] | None = None
    for label in words:
        for word in (label, *(synonyms or {}).get(label, ())):
            match = re.search(rf"(?<![a-z]){re.escape(word)}(?![a-z])", lower)
            if match and (best is None or match.start() < best[0]):
                best = (match.start(), label)
    return best[1] if best else None


def process_glue(doc: dict, results: Sequence[str]) -> dict[str, float]:
    """SST-2 / RTE: the first label word of the answer (RTE: ``yes``/``no`` read as true/false)."""
    words = LABEL_WORDS["sst2"] if doc["gold"] in LABEL_WORDS["sst2"] else LABEL_WORDS["rte"]
    return {"acc": float(label_word(results[0], words, LABEL_SYNONYMS) == doc["gold"])}


_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def last_number(text: str) -> str | None:
    """The last number in a generation, commas removed, a trailing ``.0`` dropped."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "")
    return value[:-2] if value.endswith(".0") else value


def process_gsm8k(doc: dict, results: Sequence[str]) -> dict[str, float]:
    predicted = last_number(results[0])
    try:
        hit = predicted is not None and float(predicted) == float(doc["gold"])
    except ValueError:
        hit = False
    return {"exact_match": float(hit)}


_LETTER = re.compile(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])")


def mmlu_letter(text: str) -> str | None:
    """The first standalone letter A-D of a generation (``" B"``, ``"(C)"``, ``"D."``, ``"assistant\\nA"``)
    after :func:`clean_generation`; None when there is none. chain-of-thought-hub reads the last character
    of prompt + one greedy token, which is the same letter whenever that token is one."""
    match = _LETTER.search(clean_generation(text))
    return match.group(1) if match else None


def process_mmlu(doc: dict, results: Sequence[str]) -> dict[str, Any]:
    """chain-of-thought-hub's MMLU (one greedy token), the letter read by :func:`mmlu_letter`."""
    hit = float(mmlu_letter(results[0]) == doc["gold"])
    return {"acc": hit, "acc_macro": (doc["subject"], hit)}


def bbh_extract(answer: str, multiple_choice: bool) -> str:
    """chain-of-thought-hub ``extract_ans``: the text after the last ``answer is ``; an option ``(X)`` for
    multiple-choice tasks; one trailing period dropped for free-form ones."""
    parts = answer.split("answer is ")
    if len(parts) == 1:
        return answer
    answer = parts[-1].strip()
    if multiple_choice:
        for letter in "ABCDEFGHIJKLMNOPQR":
            if f"({letter})" in answer:
                return f"({letter})"
        return answer
    return answer[:-1] if answer.endswith(".") else answer


def process_bbh(doc: dict, results: Sequence[str]) -> dict[str, Any]:
    predicted = bbh_extract(results[0], doc["subject"] in BBH_MULTIPLE_CHOICE)
    hit = float(predicted == doc["gold"])
    return {"exact_match": hit, "exact_match_macro": (doc["subject"], hit)}


class PaperPromptTask(ConfigurableTask):
    """The paper-prompt tasks: lm-eval's ConfigurableTask, with :data:`CHAT_MAX_GEN_TOKS` new tokens for
    the short-answer benchmarks when lm-eval applies a chat template."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"})

    def construct_requests(self, doc: dict, ctx: Any, **kwargs: Any) -> Any:
        chat = bool(kwargs.get("apply_chat_template"))
        requests = super().construct_requests(doc, ctx, **kwargs)
        longer = CHAT_MAX_GEN_TOKS.get(str((self.config.dataset_kwargs or {}).get("benchmark")))
        if chat and longer:
            for request in requests if isinstance(requests, list) else [requests]:
                generation = request.arguments[1]
                generation["max_gen_toks"] = max(int(generation.get("max_gen_toks") or 0), longer)
        return requests


def macro_mean(items: Sequence[tuple[str, float]]) -> float:
    """The mean over groups (subjects, BBH tasks) of each group's mean."""
    groups: dict[str, list[float]] = defaultdict(list)
    for group, value in items:
        groups[group].append(value)
    return sum(sum(v) / len(v) for v in groups.values()) / len(groups) if groups else float("nan")
