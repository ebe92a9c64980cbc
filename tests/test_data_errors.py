"""Malformed input: every problem raises HarnessError whose message names the file, record and field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from meg_harness.data import load_cases
from meg_harness.errors import HarnessError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
BASE = {
    "zsre": "zsre.json",
    "counterfact": "counterfact.json",
    "flat": "counterfact_flat.json",
    "mquake": "mquake.json",
    "unke": "unke.json",
}


def _set(path: tuple, value):
    def mutate(record: dict) -> None:
        obj = record
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return mutate


def _del(path: tuple):
    def mutate(record: dict) -> None:
        obj = record
        for key in path[:-1]:
            obj = obj[key]
        del obj[path[-1]]

    return mutate


# (fixture, record index to break, mutation, field named in the message, words in the reason)
CASES = [
    ("zsre", 1, _del(("src",)), "src", "missing"),
    ("zsre", 2, _set(("answers",), []), "answers", "non-empty"),
    ("zsre", 1, _set(("answers",), "Elbe"), "answers", "list"),
    ("zsre", 0, _set(("answers",), [3]), "answers[0]", "string"),
    ("zsre", 0, _set(("answers",), ["  "]), "answers[0]", "empty"),
    ("zsre", 0, _set(("subject",), "Nowhere Bridge"), "src", "does not occur"),
    ("zsre", 0, _set(("alt",), " "), "alt", "empty"),  # only read with zsre_target=alt, see below
    ("zsre", 2, _set(("loc",), 7), "loc", "string"),
    ("zsre", 2, _del(("loc_ans",)), "loc_ans", "missing"),
    ("zsre", 1, _set(("rephrase",), None), "rephrase", "missing"),
    (
        "counterfact",
        3,
        _set(("requested_rewrite", "prompt"), "The city of Northwind Orchestra"),
        "requested_rewrite.prompt",
        "placeholder",
    ),
    (
        "counterfact",
        2,
        _set(("requested_rewrite", "prompt"), "{} plays the {x}"),
        "requested_rewrite.prompt",
        "cannot be filled",
    ),
    (
        "counterfact",
        1,
        _set(("requested_rewrite", "target_new"), "Antarctica"),
        "requested_rewrite.target_new",
        "object",
    ),
    (
        "counterfact",
        1,
        _set(("requested_rewrite", "target_new", "str"), 5),
        "requested_rewrite.target_new.str",
        "string",
    ),
    (
        "counterfact",
        4,
        _set(("requested_rewrite", "target_true", "str"), ""),
        "requested_rewrite.target_true.str",
        "empty",
    ),
    ("counterfact", 0, _del(("requested_rewrite", "subject")), "requested_rewrite.subject", "missing"),
    ("counterfact", 2, _del(("requested_rewrite",)), "requested_rewrite", "missing"),
    ("counterfact", 2, _set(("neighborhood_prompts",), "Dex Harlow plays"), "neighborhood_prompts", "list"),
    ("counterfact", 2, _set(("paraphrase_prompts",), [None]), "paraphrase_prompts[0]", "string"),
    ("counterfact", 3, _set(("case_id",), 0), "case_id", "duplicate"),
    ("flat", 0, _set(("subject",), "Someone Else"), "prompt", "does not occur"),
    ("flat", 1, _set(("target_new",), ["violin"]), "target_new", "string"),
    ("flat", 1, _set(("target_new",), "   "), "target_new", "target is empty"),
    ("flat", 2, _del(("ground_truth",)), "ground_truth", "missing"),
    ("flat", 1, _set(("locality_ground_truth",), ["banjo"]), "locality_ground_truth", "2 locality prompts"),
    ("flat", 0, _set(("rephrase_prompt",), 3), "rephrase_prompt", "string or a list"),
    ("mquake", 1, _set(("requested_rewrite",), []), "requested_rewrite", "non-empty"),
    (
        "mquake",
        0,
        _set(("requested_rewrite", 1, "prompt"), "Ilse Brandt is a citizen of"),
        "requested_rewrite[1].prompt",
        "placeholder",
    ),
    ("mquake", 0, _del(("requested_rewrite", 1, "question")), "requested_rewrite[1].question", "missing"),
    (
        "mquake",
        0,
        _set(("requested_rewrite", 0, "target_new", "str"), None),
        "requested_rewrite[0].target_new.str",
        "missing",
    ),
    ("mquake", 1, _set(("questions",), "What?"), "questions", "list"),
    ("mquake", 1, _set(("new_answer",), ""), "new_answer", "empty"),
    ("mquake", 0, _set(("new_answer_alias",), "PE"), "new_answer_alias", "list"),
    ("unke", 1, _del(("question",)), "question", "missing"),
    ("unke", 0, _set(("answer",), 42), "answer", "string"),
    ("unke", 0, _set(("sub_answer",), ["only one"]), "sub_answer", "sub-questions"),
    ("unke", 1, _set(("id",), 0), "id", "duplicate"),
]


@pytest.mark.parametrize(("kind", "index", "mutate", "field", "reason"), CASES)
def test_malformed_record(tmp_path, kind, index, mutate, field, reason):
    data = json.loads((FIXTURES / BASE[kind]).read_text(encoding="utf-8"))
    data = copy.deepcopy(data)
    mutate(data[index])
    path = tmp_path / f"broken_{kind}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    dataset = "counterfact" if kind == "flat" else kind
    extra = {"zsre_target": "alt"} if field == "alt" else {}
    with pytest.raises(HarnessError) as info:
        load_cases(dataset, path, **extra)
    message = str(info.value)
    assert str(path) in message
    assert f"record {index}" in message
    assert f"field '{field}'" in message
    assert reason in message
    assert "\n" not in message
    assert (info.value.record, info.value.field) == (index, field)


@pytest.mark.parametrize(
    ("content", "reason", "record"),
    [
        ("{not json", "not valid JSON", None),
        ('{"a": 1}', "expected a JSON list of records, got a JSON object", None),
        ("[]", "no records", None),
        ('[{"subject": "x"}, 3]', "expected a JSON object", 1),
    ],
)
def test_malformed_file(tmp_path, content, reason, record):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(HarnessError) as info:
        load_cases("zsre", path)
    assert str(path) in str(info.value) and reason in str(info.value)
    if record is not None:
        assert f"record {record}" in str(info.value)


def test_bad_jsonl_line(tmp_path):
    lines = (FIXTURES / "zsre.jsonl").read_text(encoding="utf-8").splitlines()
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([lines[0], '{"subject": ', lines[2]]), encoding="utf-8")
    with pytest.raises(HarnessError, match=r"bad\.jsonl, record 1: line 2 is not valid JSON"):
        load_cases("zsre", path)


def test_binary_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(HarnessError, match="not a UTF-8 text file"):
        load_cases("zsre", path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(HarnessError) as info:
        load_cases("counterfact", tmp_path / "nope.json")
    assert "nope.json" in str(info.value) and "no such file" in str(info.value)
    assert info.value.field == "data_path"
    with pytest.raises(HarnessError, match="is a directory"):
        load_cases("counterfact", tmp_path)


def test_unknown_dataset_and_target():
    with pytest.raises(HarnessError, match=r"field 'dataset': unknown dataset 'wikibio'"):
        load_cases("wikibio", FIXTURES / "zsre.json")
    with pytest.raises(HarnessError, match=r"field 'zsre_target'"):
        load_cases("zsre", FIXTURES / "zsre.json", zsre_target="pred")


@pytest.mark.parametrize("dataset", ["zsre", "mquake", "unke"])
def test_no_demo_data(dataset):
    with pytest.raises(HarnessError) as info:
        load_cases(dataset)
    message = str(info.value)
    assert f"no demo data ships for {dataset}" in message and "https://" in message
