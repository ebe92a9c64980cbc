"""Loaders on small fixtures, the shipped demo data, and the real files in ../shared/data when present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meg_harness.data import (
    EditCase,
    LocalityProbe,
    demo_path,
    flatten_mquake_edits,
    load_cases,
)
from meg_harness.data.unke import guess_subject
from meg_harness.data.zsre import nq_question

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _roundtrip(case: EditCase) -> None:
    assert EditCase.from_dict(json.loads(json.dumps(case.to_dict()))) == case


# ---------------------------------------------------------------- ZsRE
def test_zsre_answers_target():
    cases = load_cases("zsre", FIXTURES / "zsre.json")
    assert [c.case_id for c in cases] == ["0", "1", "2"]
    c = cases[0]
    assert c.prompt == "Which river does Torvald Bridge cross?"
    assert c.subject == "Torvald Bridge"
    assert c.target_new == "Elbe" and c.target_true is None
    assert c.rephrases == ("What river is crossed by Torvald Bridge?",)
    assert c.locality == (LocalityProbe("Who wrote the song blue moon of kentucky?", "Bill Monroe"),)
    assert c.prompt_template == "Which river does {} cross?"
    assert c.extra["pred"] == "Rhine" and c.extra["alt"] == "Danube" and c.extra["index"] == 0
    assert c.source.endswith("zsre.json:0")
    # targets are stripped; the subject matches case-insensitively
    assert cases[1].target_new == "chemist"
    assert cases[1].prompt_template == "What is the occupation of {}?"
    assert cases[1].locality[0].prompt == "When was the first ipod released?"
    _roundtrip(c)


def test_zsre_alt_target():
    cases = load_cases("zsre", FIXTURES / "zsre.json", zsre_target="alt")
    assert (cases[0].target_new, cases[0].target_true) == ("Danube", "Elbe")
    assert (cases[1].target_new, cases[1].target_true) == ("architect", "chemist")


def test_zsre_jsonl():
    cases = load_cases("zsre", FIXTURES / "zsre.jsonl")
    assert [c.subject for c in cases] == ["Torvald Bridge", "Kessel Records"]
    assert [c.case_id for c in cases] == ["0", "1"]


def test_jsonl_content_in_json_file(tmp_path):
    path = tmp_path / "zsre.json"
    path.write_text((FIXTURES / "zsre.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    assert len(load_cases("zsre", path)) == 2


def test_nq_question():
    assert nq_question("nq question: who is the king") == "Who is the king?"
    assert nq_question("nq question: is it?") == "Is it?"
    assert nq_question("Plain question") == "Plain question?"


# ---------------------------------------------------------------- CounterFact
def test_counterfact_rome_format():
    cases = load_cases("counterfact", FIXTURES / "counterfact.json")
    assert len(cases) == 5
    c = cases[0]
    assert c.case_id == "0"
    assert c.prompt == "The native language of Pieter Bakker is"
    assert c.prompt_template == "The native language of {} is"
    assert (c.subject, c.target_new, c.target_true) == ("Pieter Bakker", "Portuguese", "Dutch")
    assert len(c.rephrases) == 2
    assert c.locality == (
        LocalityProbe("The native language of Anna de Vries is", "Dutch"),
        LocalityProbe("The native language of Joost Mulder is", "Dutch"),
    )
    assert c.extra["relation_id"] == "P103"
    assert cases[1].prompt == "Lake Veloren, which is located in"
    assert len(cases[1].locality) == 3
    _roundtrip(c)


def test_counterfact_multi_counterfact_format():
    cases = load_cases("counterfact", FIXTURES / "multi_counterfact.json")
    assert [c.case_id for c in cases] == ["1200", "1201", "1202", "1203", "1204"]
    assert cases[0].target_new == "Nairobi"  # leading space stripped
    assert cases[0].prompt == "The headquarters of Pellervo Systems is in"
    # neighbourhood prompts given as {prompt, target}
    assert cases[3].locality[0] == LocalityProbe("The original language of Cold River is", "Polish")


def test_counterfact_flattened_format():
    cases = load_cases("counterfact", FIXTURES / "counterfact_flat.json")
    c = cases[0]
    assert c.case_id == "10" and c.prompt_template == "The mother tongue of {} is"
    assert (c.target_new, c.target_true) == ("Swahili", "Hungarian")
    assert c.rephrases == ("Olek Varga grew up speaking",)
    assert c.locality == (LocalityProbe("Zsofia Kertesz is a native speaker of", "Hungarian"),)
    # list-valued rephrase / locality fields, leading space of the target stripped
    assert cases[1].target_new == "violin"
    assert len(cases[1].rephrases) == 2 and len(cases[1].locality) == 2
    assert cases[1].prompt_template == "{}, the"
    # literal braces in the prompt are escaped in the template
    t = cases[2].prompt_template
    assert t.format(cases[2].subject) == cases[2].prompt


# ---------------------------------------------------------------- MQuAKE
def test_mquake():
    cases = load_cases("mquake", FIXTURES / "mquake.json")
    assert len(cases) == 2
    c = cases[0]
    assert c.case_id == "501"
    assert c.prompt == "Who wrote The Salt Road?"
    assert (c.subject, c.target_new, c.target_true) == ("The Salt Road", "Ilse Brandt", "Omar Haddad")
    assert c.prompt_template == "Who wrote {}?"
    edits = c.extra["edits"]
    assert len(edits) == 2
    keys = ("prompt", "cloze", "subject", "target_new", "target_true")
    assert {k: edits[1][k] for k in keys} == {
        "prompt": "What is the country of citizenship of Ilse Brandt?",
        "cloze": "Ilse Brandt is a citizen of",
        "subject": "Ilse Brandt",
        "target_new": "Peru",
        "target_true": "Austria",
    }
    mh = c.multi_hop
    assert len(mh.questions) == 3
    assert (mh.new_answer, mh.answer) == ("Peru", "Jordan")
    assert mh.new_answer_aliases == ("Republic of Peru", "PE")
    assert mh.answer_aliases == ("Hashemite Kingdom of Jordan",)
    _roundtrip(c)


def test_flatten_mquake_edits():
    flat = flatten_mquake_edits(load_cases("mquake", FIXTURES / "mquake.json"))
    assert [c.case_id for c in flat] == ["501-0", "501-1", "502-0"]
    assert flat[1].prompt == "What is the country of citizenship of Ilse Brandt?"
    assert (flat[1].subject, flat[1].target_new, flat[1].target_true) == ("Ilse Brandt", "Peru", "Austria")
    assert flat[1].extra["cloze"] == "Ilse Brandt is a citizen of"
    assert flat[1].extra["parent_case_id"] == "501" and flat[1].extra["index"] == 0
    assert flat[2].extra["index"] == 1
    assert all(c.multi_hop is None for c in flat)


def test_mquake_subject_not_in_question_gives_no_template(tmp_path):
    data = json.loads((FIXTURES / "mquake.json").read_text())
    data[1]["requested_rewrite"][0]["question"] = "Which city is the seat of government there?"
    path = tmp_path / "mq.json"
    path.write_text(json.dumps(data))
    assert load_cases("mquake", path)[1].prompt_template is None


# ---------------------------------------------------------------- UnKE
def test_unke():
    cases = load_cases("unke", FIXTURES / "unke.json")
    c = cases[0]
    assert c.case_id == "0"
    assert c.prompt == "What is Corwin Abernathy's occupation?"
    assert c.subject == "Corwin Abernathy"
    assert c.prompt_template == "What is {}'s occupation?"
    assert c.target_new == c.long_answer and c.long_answer.startswith("Corwin Abernathy is a marine")
    assert c.rephrases == ("What does Corwin Abernathy do for work?",)
    assert c.extra["sub_question"] == ["What does Corwin Abernathy study?", "Where does he work?"]
    assert c.extra["sub_answer"] == ["Coral reefs.", "Off the coast of Belize."]
    # no derivable subject -> ""
    assert cases[1].subject == "" and cases[1].prompt_template is None


@pytest.mark.parametrize(
    ("question", "para", "subject"),
    [
        ("What is George Rankin's occupation?", "What does George Rankin do?", "George Rankin"),
        ("Who is Dr. Herman A. Barnett?", "Tell me about Herman A. Barnett", "Herman A. Barnett"),
        ('Who wrote "Crazy in Love" performed by Beyonce?', "Beyonce's song writer?", "Beyonce"),
        ("How did the rock genre grow?", "Why did rock grow?", ""),
    ],
)
def test_guess_subject(question, para, subject):
    assert guess_subject(question, para) == subject


# ---------------------------------------------------------------- demo data
def test_demo_data():
    assert demo_path("counterfact").is_file()
    cases = load_cases("counterfact")
    assert len(cases) >= 95
    subjects = [c.subject.casefold() for c in cases]
    assert len(set(subjects)) == len(subjects)
    neighbours = set()
    for c in cases:
        assert c.prompt_template and "{}" in c.prompt_template
        assert c.prompt == c.prompt_template.format(c.subject)
        assert len(c.rephrases) >= 2 and len(c.locality) >= 2
        assert c.target_new and c.target_true and c.target_new != c.target_true
        assert all(p.gold == c.target_true for p in c.locality)
        assert all(c.subject in r for r in c.rephrases)
        neighbours |= {p.prompt for p in c.locality}
    # no neighbourhood prompt is the edit prompt of another case (neighbours are never edited subjects)
    assert not neighbours & {c.prompt for c in cases}


# ---------------------------------------------------------------- real data (../shared/data)
@pytest.fixture
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real benchmark data not found at {SHARED} (only present in the project's workplace)")
    return SHARED


def test_real_counterfact(shared):
    cases = load_cases("counterfact", shared / "counterfact" / "counterfact-edit.json")
    assert len(cases) == 10000
    c = cases[0]
    assert (c.case_id, c.subject) == ("0", "Danielle Darrieux")
    assert (c.target_new, c.target_true) == ("English", "French")
    assert c.prompt == "The mother tongue of Danielle Darrieux is"
    assert c.prompt_template == "The mother tongue of {} is"
    assert c.locality[0].gold == "French" and len(c.rephrases) == 1


def test_real_zsre(shared):
    cases = load_cases("zsre", shared / "zsre" / "zsre_mend_eval_portability_gpt4.json")
    assert len(cases) == 1037
    c = cases[0]
    assert (c.subject, c.target_new) == ("IAAF Combined Events Challenge", "1998")
    assert c.locality[0].prompt == "What is the name of the last episode of spongebob?"
    assert all(c.prompt_template and c.locality and c.rephrases for c in cases)
    alt = load_cases("zsre", shared / "zsre" / "zsre_mend_eval_portability_gpt4.json", zsre_target="alt")
    assert (alt[0].target_new, alt[0].target_true) == ("2006", "1998")


def test_real_mquake(shared):
    cases = load_cases("mquake", shared / "mquake" / "MQuAKE-hard.json")
    assert len(cases) == 429
    c = cases[0]
    assert c.case_id == "7417" and c.prompt == "Who performed Hey Jude?"
    assert (c.target_new, c.target_true) == ("Madonna", "The Beatles")
    assert c.multi_hop.new_answer == "Arabic" and len(c.multi_hop.questions) == 3
    assert all(len(c.extra["edits"]) == 4 for c in cases)
    assert len(flatten_mquake_edits(cases)) == 4 * 429


def test_real_unke(shared):
    cases = load_cases("unke", shared / "unke" / "final_data_v2.json")
    assert len(cases) == 1000
    assert cases[0].subject == "George Rankin"
    assert cases[0].rephrases == ("What does George Rankin do for a living?",)
    assert len(cases[0].extra["sub_question"]) == 5
    assert sum(bool(c.subject) for c in cases) >= 990
