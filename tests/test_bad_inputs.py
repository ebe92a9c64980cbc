"""Every user error the README promises to handle: exit code 2, exactly one line on stderr that names the
file, record and field where they apply, no traceback, and nothing written (issue 21).

One table. Each case writes its input files into a fresh folder, runs one command in-process
(``meg-harness`` through :func:`meg_harness.cli.main`; the lm-eval models through
:func:`lm_eval.simple_evaluate`, whose exceptions the ``lm_eval`` command prints as its start-up hook does)
and checks the one line against the case's expected substrings. Placeholders in arguments, files and
expected text: ``{tmp}`` (the case's folder), ``{fixtures}`` (tests/fixtures/data), ``{model}`` / ``{gpt2}``
/ ``{bert}`` (tiny models), ``{meg}`` / ``{delta}`` (a tiny MeG artifact and a GPT-2 weight delta),
``{meg_cut}`` / ``{delta_cut}`` (their copies with a truncated tensor file in the case's folder).
"""

from __future__ import annotations

import copy
import json
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from meg_harness.cli import main
from meg_harness.errors import HarnessError
from meg_harness.evaluate.protocol import ALL_METRIC_KEYS
from meg_harness.settings import POSITIVE, Rule, Settings, settings_from_mapping
from tests.test_lm_eval_errors import _truncated, delta_gpt2  # noqa: F401  (lm-eval cases' fixtures)
from tests.test_lm_eval_meg import artifact, cases  # noqa: F401  (a tiny MeG artifact)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
BASE_CONFIG = {
    "model": "{model}",
    "dataset": "counterfact",
    "data_path": "{fixtures}/counterfact.json",
    "n_edits": 2,
    "methods": ["none"],
}
RUN = ("run", "{tmp}/run.yaml", "--out", "{tmp}/out")


@dataclass(frozen=True)
class Case:
    """One bad input: ``files`` (path in the case's folder -> content: ``str``/``bytes`` as is, otherwise
    YAML for ``.yaml`` and JSON for the rest), the command, and substrings of its one error line."""

    id: str
    argv: tuple[str, ...]
    needles: tuple[str, ...]
    files: Mapping[str, Any] = field(default_factory=dict)


def run(id: str, *needles: str, files: Mapping[str, Any] | None = None, **keys: Any) -> Case:
    """``meg-harness run`` of the base config with ``keys`` changed (a key set to ``...`` is removed)."""
    config = {k: v for k, v in {**BASE_CONFIG, **keys}.items() if v is not ...}
    return Case(id, RUN, needles, {"run.yaml": config, **(files or {})})


def raw_config(id: str, text: str | bytes, *needles: str) -> Case:
    """``meg-harness run`` of a config file with the given contents."""
    return Case(id, RUN, needles, {"run.yaml": text})


def hparams(id: str, method: str, values: Any, *needles: str, files: Mapping[str, Any] | None = None) -> Case:
    """``none`` then ``method`` with these hparams (inline or a path): the error comes before ``none`` ran."""
    return run(id, *needles, files=files, methods=["none", method], hparams={method: values})


def command(id: str, argv: tuple[str, ...], *needles: str, files: Mapping[str, Any] | None = None) -> Case:
    return Case(id, argv, needles, dict(files or {}))


# -- data files: one broken record of each format -------------------------------------------------------
DATA_FILES = {
    "zsre": "zsre.json",
    "counterfact": "counterfact.json",
    "flat": "counterfact_flat.json",
    "mquake": "mquake.json",
    "unke": "unke.json",
}


def _set(path: tuple, value: Any) -> Callable[[dict], None]:
    def mutate(record: dict) -> None:
        obj = record
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return mutate


def _del(path: tuple) -> Callable[[dict], None]:
    def mutate(record: dict) -> None:
        obj = record
        for key in path[:-1]:
            obj = obj[key]
        del obj[path[-1]]

    return mutate


def record(kind: str, index: int, mutate: Callable[[dict], None], name: str, reason: str) -> Case:
    """The ``kind`` fixture with record ``index`` broken: the line names the file, record, field, reason."""
    data = copy.deepcopy(json.loads((FIXTURES / DATA_FILES[kind]).read_text(encoding="utf-8")))
    mutate(data[index])
    dataset = "counterfact" if kind == "flat" else kind
    extra = {"zsre_target": "alt"} if name == "alt" else {}  # alt is only read with zsre_target: alt
    file = f"broken_{kind}.json"
    return run(
        f"record-{kind}-{index}-{name}-{reason}".replace(" ", "-"),
        f"{{tmp}}/{file}",
        f"record {index}",
        f"field '{name}'",
        reason,
        files={file: data},
        dataset=dataset,
        data_path=f"{{tmp}}/{file}",
        n_edits=1,
        **extra,
    )


def _rome_record(i: int, **overrides: Any) -> dict:
    data = {
        "case_id": i,
        "requested_rewrite": {
            "prompt": "The capital of {} is",
            "subject": f"Country{i}",
            "target_new": {"str": "Paris"},
            "target_true": {"str": "Rome"},
        },
        "paraphrase_prompts": [f"Country{i} has its capital in", f"Where is the capital of Country{i}?"],
        "neighborhood_prompts": ["The capital of Italy is", "The capital of Spain is"],
    }
    for key, value in overrides.items():
        if key.startswith("rw_"):
            data["requested_rewrite"][key[3:]] = value
        else:
            data[key] = value
    return data


FLAT = {
    "case_id": 0,
    "prompt": "The capital of Spain is",
    "subject": "Spain",
    "target_new": "Rome",
    "ground_truth": "Madrid",
    "rephrase_prompt": "Spain's capital is",
    "locality_prompt": "The capital of Italy is",
    "locality_ground_truth": "Rome",
}


def rome(id: str, records: Any, *needles: str, **keys: Any) -> Case:
    """A two-record CounterFact file written as given (a list of records, or raw text)."""
    return run(id, *needles, files={"cf.json": records}, data_path="{tmp}/cf.json", **keys)


DATA_CASES = [
    record("zsre", 1, _del(("src",)), "src", "missing"),
    record("zsre", 2, _set(("answers",), []), "answers", "non-empty"),
    record("zsre", 1, _set(("answers",), "Elbe"), "answers", "list"),
    record("zsre", 0, _set(("answers",), [3]), "answers[0]", "string"),
    record("zsre", 0, _set(("answers",), ["  "]), "answers[0]", "empty"),
    record("zsre", 0, _set(("subject",), "Nowhere Bridge"), "src", "does not occur"),
    record("zsre", 0, _set(("alt",), " "), "alt", "empty"),
    record("zsre", 2, _set(("loc",), 7), "loc", "string"),
    record("zsre", 2, _del(("loc_ans",)), "loc_ans", "missing"),
    record("zsre", 1, _set(("rephrase",), None), "rephrase", "missing"),
    record(
        "counterfact",
        3,
        _set(("requested_rewrite", "prompt"), "The city of Northwind Orchestra"),
        "requested_rewrite.prompt",
        "placeholder",
    ),
    record(
        "counterfact",
        2,
        _set(("requested_rewrite", "prompt"), "{} plays the {x}"),
        "requested_rewrite.prompt",
        "cannot be filled",
    ),
    record(
        "counterfact",
        1,
        _set(("requested_rewrite", "target_new"), "Antarctica"),
        "requested_rewrite.target_new",
        "object",
    ),
    record(
        "counterfact",
        1,
        _set(("requested_rewrite", "target_new", "str"), 5),
        "requested_rewrite.target_new.str",
        "string",
    ),
    record(
        "counterfact",
        4,
        _set(("requested_rewrite", "target_true", "str"), ""),
        "requested_rewrite.target_true.str",
        "empty",
    ),
    record("counterfact", 0, _del(("requested_rewrite", "subject")), "requested_rewrite.subject", "missing"),
    record("counterfact", 2, _del(("requested_rewrite",)), "requested_rewrite", "missing"),
    record(
        "counterfact", 2, _set(("neighborhood_prompts",), "Dex Harlow plays"), "neighborhood_prompts", "list"
    ),
    record("counterfact", 2, _set(("paraphrase_prompts",), [None]), "paraphrase_prompts[0]", "string"),
    record("counterfact", 3, _set(("case_id",), 0), "case_id", "duplicate"),
    record("flat", 0, _set(("subject",), "Someone Else"), "prompt", "does not occur"),
    record("flat", 1, _set(("target_new",), ["violin"]), "target_new", "string"),
    record("flat", 1, _set(("target_new",), "   "), "target_new", "target is empty"),
    record("flat", 2, _del(("ground_truth",)), "ground_truth", "missing"),
    record(
        "flat", 1, _set(("locality_ground_truth",), ["banjo"]), "locality_ground_truth", "2 locality prompts"
    ),
    record("flat", 0, _set(("rephrase_prompt",), 3), "rephrase_prompt", "string or a list"),
    record("mquake", 1, _set(("requested_rewrite",), []), "requested_rewrite", "non-empty"),
    record(
        "mquake",
        0,
        _set(("requested_rewrite", 1, "prompt"), "Ilse Brandt is a citizen of"),
        "requested_rewrite[1].prompt",
        "placeholder",
    ),
    record(
        "mquake", 0, _del(("requested_rewrite", 1, "question")), "requested_rewrite[1].question", "missing"
    ),
    record(
        "mquake",
        0,
        _set(("requested_rewrite", 0, "target_new", "str"), None),
        "requested_rewrite[0].target_new.str",
        "missing",
    ),
    record("mquake", 1, _set(("questions",), "What?"), "questions", "list"),
    record("mquake", 1, _set(("new_answer",), ""), "new_answer", "empty"),
    record("mquake", 0, _set(("new_answer_alias",), "PE"), "new_answer_alias", "list"),
    record("unke", 1, _del(("question",)), "question", "missing"),
    record("unke", 0, _set(("answer",), 42), "answer", "string"),
    record("unke", 0, _set(("sub_answer",), ["only one"]), "sub_answer", "sub-questions"),
    record("unke", 1, _set(("id",), 0), "id", "duplicate"),
    # the same through hand-written CounterFact files
    rome(
        "rome-missing-field",
        [_rome_record(0), {"case_id": 1, "paraphrase_prompts": [], "neighborhood_prompts": []}],
        "{tmp}/cf.json",
        "record 1",
        "requested_rewrite",
    ),
    rome(
        "rome-wrong-type",
        [_rome_record(0), _rome_record(1, rw_target_new={"str": 7})],
        "{tmp}/cf.json",
        "record 1",
        "target_new",
    ),
    rome(
        "rome-empty-target",
        [_rome_record(0), _rome_record(1, rw_target_new={"str": "   "})],
        "{tmp}/cf.json",
        "record 1",
        "target_new",
    ),
    rome(
        "rome-prompt-without-placeholder",
        [_rome_record(0), _rome_record(1, rw_prompt="The capital is")],
        "{tmp}/cf.json",
        "record 1",
        "prompt",
    ),
    rome(
        "flat-subject-not-in-prompt",
        [FLAT, {**FLAT, "case_id": 1, "subject": "Portugal"}],
        "{tmp}/cf.json",
        "record 1",
        "subject",
    ),
    rome(
        "prompt-longer-than-the-context",
        [_rome_record(0), _rome_record(1, rw_prompt="The capital of {} is " + "very " * 1200)],
        "{tmp}/cf.json",
        "record 1",
        "field 'prompt'",
        "context",
        model="{gpt2}",
    ),
]

# -- data files as a whole ------------------------------------------------------------------------------
FILE_CASES = [
    rome("data-not-json", "{not json", "{tmp}/cf.json", "not valid JSON"),
    rome("data-an-object", '{"a": 1}', "{tmp}/cf.json", "expected a JSON list of records, got a JSON object"),
    rome("data-no-records", "[]", "{tmp}/cf.json", "no records"),
    rome(
        "data-record-not-an-object",
        '[{"subject": "x"}, 3]',
        "{tmp}/cf.json",
        "record 1",
        "expected a JSON object",
    ),
    rome("data-binary", b"\xff\xfe\x00\x81garbage", "{tmp}/cf.json", "not a UTF-8 text file"),
    run(
        "data-jsonl-bad-line",
        "{tmp}/bad.jsonl",
        "record 1",
        "line 2 is not valid JSON",
        files={
            "bad.jsonl": "\n".join(
                [(FIXTURES / "zsre.jsonl").read_text(encoding="utf-8").splitlines()[0], '{"subject": ']
            )
        },
        dataset="zsre",
        data_path="{tmp}/bad.jsonl",
    ),
    run(
        "data-missing-file",
        "{tmp}/nope.json",
        "field 'data_path'",
        "no such file",
        data_path="{tmp}/nope.json",
    ),
    run("data-a-directory", "{tmp}", "is a directory", data_path="{tmp}"),
    run("data-path-a-number", "{tmp}/run.yaml", "field 'data_path'", data_path=5),
    *[
        run(
            f"no-demo-data-{name}",
            "{tmp}/run.yaml",
            "field 'data_path'",
            f"no demo data ships for {name}",
            "https://",
            dataset=name,
            data_path=None,
        )
        for name in ("zsre", "mquake", "unke")
    ],
]

# -- the run config: every key ---------------------------------------------------------------------------
CONFIG_CASES = [
    raw_config("config-a-list", "- just\n- a list\n", "{tmp}/run.yaml", "mapping"),
    raw_config("config-empty", "", "{tmp}/run.yaml", "mapping"),
    raw_config("config-bad-yaml", "model: [unclosed\n", "{tmp}/run.yaml", "not valid YAML"),
    raw_config("config-binary", b"\xff\xfe\x00model", "{tmp}/run.yaml", "cannot read the run config"),
    command("config-missing", ("run", "{tmp}/absent.yaml", "--out", "{tmp}/out"), "{tmp}/absent.yaml"),
    command(
        "config-a-directory", ("run", "{tmp}", "--out", "{tmp}/out"), "{tmp}", "cannot read the run config"
    ),
    run("config-unknown-key", "{tmp}/run.yaml", "field 'n_edit'", "unknown config key", n_edit=3),
    run("model-a-number", "{tmp}/run.yaml", "field 'model'", model=5),
    run(
        "model-missing-folder",
        "{tmp}/run.yaml",
        "field 'model'",
        "{tmp}/no-model-here",
        model="{tmp}/no-model-here",
    ),
    run("model-a-file", "{tmp}/run.yaml", "field 'model'", "is a file", model="{tmp}/run.yaml"),
    run(
        "model-without-tokenizer",
        "{tmp}/run.yaml",
        "field 'model'",
        "{tmp}/weights",
        "has no tokenizer",
        files={"weights/config.json": {"model_type": "llama"}},
        model="{tmp}/weights",
    ),
    run(
        "model-folder-without-config",
        "{tmp}/run.yaml",
        "field 'model'",
        "cannot load model",
        files={"empty/tokenizer.json": "{}"},
        model="{tmp}/empty",
    ),
    run("model-unknown-architecture", "{tmp}/run.yaml", "field 'model'", "bert", "llama", model="{bert}"),
    run("dataset-unknown", "{tmp}/run.yaml", "field 'dataset'", "wikifacts", dataset="wikifacts"),
    run("dataset-a-number", "{tmp}/run.yaml", "field 'dataset'", dataset=3),
    run("n_edits-a-word", "{tmp}/run.yaml", "field 'n_edits'", "'many'", n_edits="many"),
    run("n_edits-zero", "{tmp}/run.yaml", "field 'n_edits'", n_edits=0),
    run("n_edits-negative", "{tmp}/run.yaml", "field 'n_edits'", n_edits=-3),
    run("n_edits-a-bool", "{tmp}/run.yaml", "field 'n_edits'", n_edits=True),
    run("n_edits-repeated-scales", "{tmp}/run.yaml", "field 'n_edits'", n_edits=[2, 2]),
    run("n_edits-empty-list", "{tmp}/run.yaml", "field 'n_edits'", n_edits=[]),
    run("n_edits-too-many", "{tmp}/run.yaml", "field 'n_edits'", "asks for 500 edits", n_edits=500),
    run(
        "n_edits-too-many-in-range",
        "{tmp}/run.yaml",
        "field 'n_edits'",
        "in range [0, 1]",
        n_edits=2,
        range=[0, 1],
    ),
    run("range-one-number", "{tmp}/run.yaml", "field 'range'", range=[5]),
    run("range-reversed", "{tmp}/run.yaml", "field 'range'", range=[3, 1]),
    run("range-negative", "{tmp}/run.yaml", "field 'range'", range=[-1, 3]),
    run("range-words", "{tmp}/run.yaml", "field 'range'", range=["a", "b"]),
    run("range-a-string", "{tmp}/run.yaml", "field 'range'", range="0-10"),
    run(
        "range-past-the-end",
        "{fixtures}/counterfact.json",
        "field 'range'",
        "past the end of the data (5 records)",
        range=[0, 100000],
    ),
    run("seeds-empty", "{tmp}/run.yaml", "field 'seeds'", seeds=[]),
    run("seeds-repeated", "{tmp}/run.yaml", "field 'seeds'", seeds=[0, 0]),
    run("seeds-a-word", "{tmp}/run.yaml", "field 'seeds'", seeds="zero"),
    run("seeds-a-float", "{tmp}/run.yaml", "field 'seeds'", seeds=[1.5]),
    run("methods-empty", "{tmp}/run.yaml", "field 'methods'", methods=[]),
    run("methods-repeated", "{tmp}/run.yaml", "field 'methods'", methods=["none", "none"]),
    run("methods-unknown", "{tmp}/run.yaml", "field 'methods'", "rome2", "none", methods=["none", "rome2"]),
    run("methods-unknown-variant", "{tmp}/run.yaml", "field 'methods'", "'rome'", methods=["none", "rome@x"]),
    run("methods-a-number", "{tmp}/run.yaml", "field 'methods'", methods=5),
    run("hparams-a-string", "{tmp}/run.yaml", "field 'hparams'", hparams="memit.yaml"),
    run("hparams-of-an-absent-method", "{tmp}/run.yaml", "field 'hparams'", "'memit'", hparams={"memit": {}}),
    run("hparams-a-number", "{tmp}/run.yaml", "field 'hparams.none'", hparams={"none": 5}),
    run("hparams-missing-file", "{tmp}/h.yaml", "field 'hparams.none'", hparams={"none": "{tmp}/h.yaml"}),
    run(
        "hparams-file-not-yaml",
        "{tmp}/h.yaml",
        "not valid YAML",
        files={"h.yaml": "a: [b\n"},
        hparams={"none": "{tmp}/h.yaml"},
    ),
    run(
        "hparams-file-a-list",
        "{tmp}/h.yaml",
        "mapping",
        files={"h.yaml": "- 1\n"},
        hparams={"none": "{tmp}/h.yaml"},
    ),
    run(
        "hparams-base-missing",
        "{tmp}/gone.yaml",
        "field 'hparams.memit@x'",
        methods=["memit@x"],
        hparams={"memit@x": {"base": "{tmp}/gone.yaml"}},
    ),
    run(
        "hparams-base-loop",
        "{tmp}/a.yaml",
        "field 'base'",
        "leads back to itself",
        files={"a.yaml": "base: {tmp}/b.yaml\n", "b.yaml": "base: {tmp}/a.yaml\n"},
        hparams={"none": "{tmp}/a.yaml"},
    ),
    run(
        "hparams-file-binary",
        "{tmp}/h.yaml",
        "not a UTF-8 text file",
        files={"h.yaml": b"\xff\xfe\x00"},
        hparams={"none": "{tmp}/h.yaml"},
    ),
    run(
        "hparams-base-a-number",
        "{tmp}/run.yaml",
        "field 'hparams.memit@x'",
        methods=["memit@x"],
        hparams={"memit@x": {"base": 5}},
    ),
    run("device-unknown", "{tmp}/run.yaml", "field 'device'", "gpu9", device="gpu9"),
    run("device-a-number", "{tmp}/run.yaml", "field 'device'", device=3),
    run("dtype-unknown", "{tmp}/run.yaml", "field 'dtype'", "float8", dtype="float8"),
    run("dtype-a-number", "{tmp}/run.yaml", "field 'dtype'", dtype=16),
    run("template-unknown", "{tmp}/run.yaml", "field 'template'", "'nope'", template="nope"),
    run("template-a-number", "{tmp}/run.yaml", "field 'template'", template=5),
    run("batch_size-zero", "{tmp}/run.yaml", "field 'batch_size'", batch_size=0),
    run("batch_size-a-word", "{tmp}/run.yaml", "field 'batch_size'", batch_size="big"),
    run("zsre_target-unknown", "{tmp}/run.yaml", "field 'zsre_target'", "'pred'", zsre_target="pred"),
    run("filter_known-a-word", "{tmp}/run.yaml", "field 'filter_known'", filter_known="yes"),
    run("one_per_subject-a-number", "{tmp}/run.yaml", "field 'one_per_subject'", one_per_subject=1),
    run("cache_dir-a-number", "{tmp}/run.yaml", "field 'cache_dir'", cache_dir=5),
]

# -- every method's hparams (the tiny llama has 2 layers) ------------------------------------------------
MEMIT_FILE = {"memit.yaml": "alg_name: MEMIT\nlayers: [0]\nv_lr: -0.5\n"}
MEG_FILE = {"meg.yaml": "alg_name: MEG\nlayer: 0\nencoder: {tuning: frozen}\ncollect: {lr: abc}\n"}
MEG = {"alg_name": "MEG", "layer": 0, "encoder": {"tuning": "frozen"}}
MALMEN = {
    "layers": [0],
    "rank": 4,
    "train_dataset": "counterfact",
    "train_path": "{fixtures}/counterfact.json",
}


def meg(id: str, section: str, values: Any, *needles: str) -> Case:
    """MeG with ``section`` (a top-level key) changed; ``values`` merged into a mapping section."""
    merged = {**MEG.get(section, {}), **values} if isinstance(values, dict) and section in MEG else values
    return hparams(f"meg-{id}", "meg", {**MEG, section: merged}, *needles)


HPARAMS_CASES = [
    # MEMIT (and the shared locate-then-edit settings)
    hparams(
        "memit-negative-v_lr",
        "memit",
        {"layers": [0], "v_lr": -0.5},
        "{tmp}/run.yaml",
        "field 'hparams.memit.v_lr'",
        "positive number, got -0.5",
    ),
    hparams(
        "memit-word-v_lr", "memit", {"layers": [0], "v_lr": "fast"}, "field 'hparams.memit.v_lr'", "'fast'"
    ),
    hparams(
        "memit-layer-past-the-depth",
        "memit",
        {"layers": [10]},
        "field 'hparams.memit.layers'",
        "the model has 2 layers",
    ),
    hparams(
        "memit-last-layer",
        "memit",
        {"layers": [1]},
        "field 'hparams.memit.layers'",
        "below the model's last layer",
    ),
    hparams("memit-no-layers", "memit", {"layers": []}, "field 'hparams.memit.layers'", "non-empty"),
    hparams("memit-repeated-layers", "memit", {"layers": [0, 0]}, "field 'hparams.memit.layers'", "distinct"),
    hparams("memit-layers-words", "memit", {"layers": ["first"]}, "field 'hparams.memit.layers'"),
    hparams(
        "memit-unknown-key",
        "memit",
        {"layers": [0], "v_lrr": 1.0},
        "field 'hparams.memit.v_lrr'",
        "unknown memit hparam",
    ),
    hparams(
        "memit-alg_name-of-another-method",
        "memit",
        {"alg_name": "FT", "layers": [0]},
        "field 'hparams.memit.alg_name'",
        "'FT'",
    ),
    hparams(
        "memit-kl_prompt-without-subject",
        "memit",
        {"layers": [0], "kl_prompt": "is a"},
        "field 'hparams.memit.kl_prompt'",
    ),
    hparams(
        "memit-fact_token",
        "memit",
        {"layers": [0], "fact_token": "last"},
        "field 'hparams.memit.fact_token'",
        "subject_last",
    ),
    hparams(
        "memit-zero-z_batch_size",
        "memit",
        {"layers": [0], "z_batch_size": 0},
        "field 'hparams.memit.z_batch_size'",
    ),
    hparams(
        "memit-mom2_dtype",
        "memit",
        {"layers": [0], "mom2_dtype": "float16"},
        "field 'hparams.memit.mom2_dtype'",
    ),
    hparams(
        "memit-negative-mom2_n_samples",
        "memit",
        {"layers": [0], "mom2_n_samples": -1},
        "field 'hparams.memit.mom2_n_samples'",
    ),
    hparams(
        "memit-mom2_adjustment-a-word",
        "memit",
        {"layers": [0], "mom2_adjustment": "yes"},
        "field 'hparams.memit.mom2_adjustment'",
        "true or false",
    ),
    hparams("memit-not-a-mapping-or-path", "memit", 5, "field 'hparams.memit'"),
    hparams("memit-file", "memit", "{tmp}/memit.yaml", "{tmp}/memit.yaml", "field 'v_lr'", files=MEMIT_FILE),
    run(
        "memit-variant-override",
        "{tmp}/run.yaml",
        "field 'hparams.memit@x.v_lr'",
        files={"memit.yaml": "alg_name: MEMIT\nlayers: [0]\n"},
        methods=["none", "memit@x"],
        hparams={"memit@x": {"base": "{tmp}/memit.yaml", "v_lr": -1}},
    ),
    run(
        "memit-variant-bad-base-value",
        "{tmp}/memit.yaml",
        "field 'v_lr'",
        files=MEMIT_FILE,
        methods=["none", "memit@x"],
        hparams={"memit@x": {"base": "{tmp}/memit.yaml", "kl_factor": 0.1}},
    ),
    run(
        "memit-variant-typo-fails-before-any-method-runs",
        "{tmp}/run.yaml",
        "field 'hparams.memit@x.v_lrr'",
        files={"memit.yaml": "alg_name: MEMIT\nlayers: [1]\nv_lr: 0.5\n"},
        methods=["none", "memit@x"],
        hparams={"memit@x": {"base": "{tmp}/memit.yaml", "v_lrr": 1.0}},
    ),
    run(
        "memit-variant-without-hparams",
        "{tmp}/run.yaml",
        "field 'hparams.memit@fast'",
        "no hparams for memit@fast",
        methods=["none", "memit@fast"],
    ),
    # FT
    hparams("ft-negative-lr", "ft", {"layers": [0], "lr": -0.3}, "field 'hparams.ft.lr'", "positive number"),
    hparams("ft-word-lr", "ft", {"layers": [0], "lr": "fast"}, "field 'hparams.ft.lr'", "'fast'"),
    hparams("ft-zero-epochs", "ft", {"layers": [0], "epochs": 0}, "field 'hparams.ft.epochs'"),
    hparams(
        "ft-unknown-optimizer",
        "ft",
        {"layers": [0], "optimizer": "lion"},
        "field 'hparams.ft.optimizer'",
        "adam",
    ),
    hparams("ft-params", "ft", {"layers": [0], "params": "attn"}, "field 'hparams.ft.params'", "ffn_out"),
    hparams(
        "ft-layer-past-the-depth",
        "ft",
        {"layers": [9]},
        "field 'hparams.ft.layers'",
        "the model has 2 layers",
    ),
    hparams(
        "ft-alg_name-of-another-method",
        "ft",
        {"alg_name": "MEMIT", "layers": [0]},
        "field 'hparams.ft.alg_name'",
    ),
    hparams(
        "ft-negative-norm_constraint",
        "ft",
        {"layers": [0], "norm_constraint": -1},
        "field 'hparams.ft.norm_constraint'",
    ),
    hparams("ft-unknown-key", "ft", {"layers": [0], "lrr": 1}, "field 'hparams.ft.lrr'", "unknown ft hparam"),
    hparams(
        "ft-terminator-a-word", "ft", {"layers": [0], "terminator": "no"}, "field 'hparams.ft.terminator'"
    ),
    # PMET
    hparams(
        "pmet-ffn_target",
        "pmet",
        {"layers": [0], "ffn_target": "attn"},
        "field 'hparams.pmet.ffn_target'",
        "delta, observed, block",
    ),
    hparams(
        "pmet-residual_at",
        "pmet",
        {"layers": [0], "residual_at": "x"},
        "field 'hparams.pmet.residual_at'",
        "ffn, layer",
    ),
    hparams(
        "pmet-negative-nll_loss_factor",
        "pmet",
        {"layers": [0], "nll_loss_factor": -1},
        "field 'hparams.pmet.nll_loss_factor'",
    ),
    hparams(
        "pmet-alg_name-of-another-method",
        "pmet",
        {"alg_name": "MEMIT", "layers": [0]},
        "field 'hparams.pmet.alg_name'",
    ),
    hparams(
        "pmet-zero-v_num_grad_steps",
        "pmet",
        {"layers": [0], "v_num_grad_steps": 0},
        "field 'hparams.pmet.v_num_grad_steps'",
    ),
    hparams(
        "pmet-layer-past-the-depth",
        "pmet",
        {"layers": [0, 5]},
        "field 'hparams.pmet.layers'",
        "the model has 2 layers",
    ),
    # AlphaEdit
    hparams(
        "alphaedit-zero-nullspace_threshold",
        "alphaedit",
        {"layers": [0], "nullspace_threshold": 0},
        "field 'hparams.alphaedit.nullspace_threshold'",
    ),
    hparams("alphaedit-negative-L2", "alphaedit", {"layers": [0], "L2": -1}, "field 'hparams.alphaedit.L2'"),
    hparams(
        "alphaedit-alg_name-lower-case-other",
        "alphaedit",
        {"alg_name": "memit", "layers": [0]},
        "field 'hparams.alphaedit.alg_name'",
    ),
    hparams(
        "alphaedit-layer-past-the-depth",
        "alphaedit",
        {"layers": [5]},
        "field 'hparams.alphaedit.layers'",
        "the model has 2 layers",
    ),
    # MALMEN
    hparams("malmen-zero-rank", "malmen", {**MALMEN, "rank": 0}, "field 'hparams.malmen.rank'"),
    hparams(
        "malmen-token", "malmen", {**MALMEN, "token": "subject"}, "field 'hparams.malmen.token'", "ans, all"
    ),
    hparams(
        "malmen-reversed-train_range",
        "malmen",
        {**MALMEN, "train_range": [5, 1]},
        "field 'hparams.malmen.train_range'",
    ),
    hparams(
        "malmen-solve_dtype",
        "malmen",
        {**MALMEN, "solve_dtype": "float16"},
        "field 'hparams.malmen.solve_dtype'",
    ),
    hparams(
        "malmen-train_dataset",
        "malmen",
        {**MALMEN, "train_dataset": "wiki"},
        "field 'hparams.malmen.train_dataset'",
    ),
    hparams("malmen-negative-lr", "malmen", {**MALMEN, "lr": -1e-6}, "field 'hparams.malmen.lr'"),
    hparams(
        "malmen-negative-max_steps", "malmen", {**MALMEN, "max_steps": -1}, "field 'hparams.malmen.max_steps'"
    ),
    hparams(
        "malmen-unknown-key",
        "malmen",
        {**MALMEN, "rnak": 4},
        "field 'hparams.malmen.rnak'",
        "unknown malmen hparam",
    ),
    hparams(
        "malmen-alg_name-of-another-method",
        "malmen",
        {**MALMEN, "alg_name": "MEMIT"},
        "field 'hparams.malmen.alg_name'",
    ),
    hparams(
        "malmen-layer-past-the-depth",
        "malmen",
        {**MALMEN, "layers": [7]},
        "field 'hparams.malmen.layers'",
        "the model has 2 layers",
    ),
    hparams(
        "malmen-no-train_path",
        "malmen",
        {**MALMEN, "train_path": None},
        "field 'hparams.malmen.train_path'",
        "training facts",
    ),
    hparams(
        "malmen-missing-train_path",
        "malmen",
        {**MALMEN, "train_path": "{tmp}/train.json"},
        "{tmp}/train.json",
        "field 'train_path'",
        "no such file",
    ),
    hparams(
        "malmen-broken-training-record",
        "malmen",
        {**MALMEN, "train_path": "{tmp}/train.json"},
        "{tmp}/train.json",
        "record 1",
        "field 'requested_rewrite'",
        files={"train.json": [_rome_record(0), {"case_id": 1}]},
    ),
    # MeG: sections are named section.key
    meg(
        "negative-train-lr",
        "train",
        {"lr": -0.002},
        "{tmp}/run.yaml",
        "field 'hparams.meg.train.lr'",
        "positive number",
    ),
    meg("word-collect-lr", "collect", {"lr": "abc"}, "field 'hparams.meg.collect.lr'", "'abc'"),
    meg(
        "unknown-collect-key",
        "collect",
        {"lrr": 1},
        "field 'hparams.meg.collect.lrr'",
        "unknown collect setting",
    ),
    meg(
        "negative-threshold", "familiarity", {"threshold": -0.1}, "field 'hparams.meg.familiarity.threshold'"
    ),
    meg(
        "unknown-generator-kind",
        "generator",
        {"kind": "transformer"},
        "field 'hparams.meg.generator.kind'",
        "dit, mlp",
    ),
    meg(
        "missing-encoder-folder",
        "encoder",
        {"name": "{tmp}/no-encoder"},
        "field 'hparams.meg.encoder.name'",
        "{tmp}/no-encoder",
    ),
    meg("negative-max_steps", "train", {"max_steps": -5}, "field 'hparams.meg.train.max_steps'"),
    meg(
        "unknown-top-level-key",
        "sampling",
        {"steps": 5},
        "field 'hparams.meg.sampling'",
        "unknown MeG hparam",
    ),
    meg("layer-past-the-depth", "layer", 5, "field 'hparams.meg.layer'", "the model has 2 layers"),
    meg("layer-a-word", "layer", "twelve", "field 'hparams.meg.layer'", "'twelve'"),
    meg("no-layer", "layer", None, "field 'hparams.meg.layer'"),
    meg("alg_name-of-another-method", "alg_name", "FT", "field 'hparams.meg.alg_name'"),
    meg("zero-ddim_steps", "diffusion", {"ddim_steps": 0}, "field 'hparams.meg.diffusion.ddim_steps'"),
    meg(
        "too-many-ddim_steps",
        "diffusion",
        {"ddim_steps": 2000},
        "field 'hparams.meg.diffusion.ddim_steps'",
        "1000",
    ),
    meg("unknown-preset", "generator", {"preset": "DiT-X"}, "field 'hparams.meg.generator.preset'"),
    meg(
        "heads-not-dividing-hidden",
        "generator",
        {"hidden": 64, "heads": 3},
        "field 'hparams.meg.generator.heads'",
    ),
    meg(
        "one-class",
        "familiarity",
        {"num_classes": 1},
        "field 'hparams.meg.familiarity.num_classes'",
        "at least 2",
    ),
    meg("unknown-tuning", "encoder", {"tuning": "triplet"}, "field 'hparams.meg.encoder.tuning'", "infonce"),
    meg(
        "tuning-without-pairs", "encoder", {"tuning": "infonce"}, "field 'hparams.meg.encoder.pairs'", "pairs"
    ),
    meg(
        "missing-pairs-file",
        "encoder",
        {"tuning": "mse", "pairs": "{tmp}/pairs.json"},
        "field 'hparams.meg.encoder.pairs'",
        "{tmp}/pairs.json",
    ),
    meg("zero-augment-n", "augment", {"enabled": True, "n": 0}, "field 'hparams.meg.augment.n'"),
    meg("ema_decay-above-one", "train", {"ema_decay": 1.5}, "field 'hparams.meg.train.ema_decay'", "[0, 1)"),
    meg("mixed_precision", "train", {"mixed_precision": "fp8"}, "field 'hparams.meg.train.mixed_precision'"),
    meg("section-not-a-mapping", "collect", 5, "field 'hparams.meg.collect'"),
    meg("enabled-a-word", "familiarity", {"enabled": "no"}, "field 'hparams.meg.familiarity.enabled'"),
    hparams(
        "meg-file", "meg", "{tmp}/meg.yaml", "{tmp}/meg.yaml", "field 'collect.lr'", "'abc'", files=MEG_FILE
    ),
    run(
        "meg-variant-of-a-bad-file",
        "{tmp}/meg.yaml",
        "field 'collect.lr'",
        files=MEG_FILE,
        methods=["none", "meg@no-fn"],
        hparams={"meg@no-fn": {"base": "{tmp}/meg.yaml", "familiarity": {"enabled": False}}},
    ),
]

# -- output folders ----------------------------------------------------------------------------------------
PREVIOUS = {
    "model": "{model}", "dataset": "counterfact", "data_path": "{fixtures}/counterfact.json", "n_edits": 3,
    "range": None, "seeds": [0], "methods": ["none"], "hparams": {}, "device": "cpu", "dtype": "float32",
    "template": None, "batch_size": 16, "zsre_target": "answers", "filter_known": False,
    "one_per_subject": True, "cache_dir": None,
}  # fmt: skip
OUT_CASES = [
    run(
        "out-holds-another-config",
        "{tmp}/out",
        "field 'n_edits'",
        "different run config",
        files={"out/run_config.json": PREVIOUS},
    ),
    run(
        "out-finished-with-other-hparams",
        "{tmp}/out/none@b/seed0/metrics.json",
        "field 'hparams.none@b'",
        "other hparams",
        files={
            "b.yaml": "note: b\n",  # the run recorded {note: a}: the file changed since
            "out/run_config.json": {
                **PREVIOUS,
                "n_edits": 2,
                "methods": ["none@b"],
                "hparams": {"none@b": "{tmp}/b.yaml"},
            },
            "out/none@b/seed0/metrics.json": {"method": "none@b", "hparams": {"note": "a"}},
        },
        methods=["none@b"],
        hparams={"none@b": "{tmp}/b.yaml"},
    ),
    command("out-is-a-file", (*RUN[:3], "{tmp}/run.yaml"), "{tmp}/run.yaml", files={"run.yaml": BASE_CONFIG}),
]

# -- leaderboard and tables ------------------------------------------------------------------------------
RESULT = {
    "method": "none",
    "config": {"model": "m", "dataset": "counterfact", "n_edits": 2},
    "counts": {"cases": 2},
    **dict.fromkeys(ALL_METRIC_KEYS, 50.0),
}
REPORT_CASES = [
    command("leaderboard-missing-folder", ("leaderboard", "{tmp}/none"), "{tmp}/none"),
    command("leaderboard-a-file", ("leaderboard", "{tmp}/x.txt"), "{tmp}/x.txt", files={"x.txt": "x"}),
    command(
        "leaderboard-no-results",
        ("leaderboard", "{tmp}/runs"),
        "{tmp}/runs",
        "no results",
        files={"runs/readme.txt": "x"},
    ),
    command(
        "leaderboard-metrics-a-list",
        ("leaderboard", "{tmp}/runs"),
        "{tmp}/runs/a/none/metrics.json",
        "JSON object",
        files={"runs/a/none/metrics.json": [1, 2, 3]},
    ),
    command(
        "leaderboard-metrics-not-json",
        ("leaderboard", "{tmp}/runs"),
        "{tmp}/runs/a/none/metrics.json",
        "unreadable",
        files={"runs/a/none/metrics.json": "{oops"},
    ),
    command(
        "leaderboard-metric-a-word",
        ("leaderboard", "{tmp}/runs"),
        "{tmp}/runs/a/none/metrics.json",
        "score",
        files={"runs/a/none/metrics.json": {**RESULT, "score": "high"}},
    ),
    command("tables-missing-folder", ("tables", "{tmp}/none", "--out", "{tmp}/tables"), "{tmp}/none"),
    command(
        "tables-no-results",
        ("tables", "{tmp}/runs", "--out", "{tmp}/tables"),
        "{tmp}/runs",
        "no results",
        files={"runs/readme.txt": "x"},
    ),
    command(
        "tables-metrics-a-list",
        ("tables", "{tmp}/runs", "--out", "{tmp}/tables"),
        "{tmp}/runs/a/none/seed0/metrics.json",
        "JSON object",
        files={"runs/a/none/seed0/metrics.json": [1, 2, 3]},
    ),
    command(
        "tables-metrics-not-json",
        ("tables", "{tmp}/runs", "--out", "{tmp}/tables"),
        "{tmp}/runs/a/none/seed0/metrics.json",
        "unreadable",
        files={"runs/a/none/seed0/metrics.json": "{oops"},
    ),
    command(
        "tables-metric-missing",
        ("tables", "{tmp}/runs", "--out", "{tmp}/tables"),
        "{tmp}/runs/a/none/seed0/metrics.json",
        "score",
        files={"runs/a/none/seed0/metrics.json": {k: v for k, v in RESULT.items() if k != "score"}},
    ),
]

# -- other commands ----------------------------------------------------------------------------------------
OTHER_CASES = [
    command(
        "demo-unknown-method",
        ("demo", "--out", "{tmp}/out", "--methods", "rome"),
        "demo-smollm2-135m.yaml",
        "field 'methods'",
        "rome",
    ),
    command(
        "layer-sweep-bad-collect-hparams",
        ("layer-sweep", "--model", "{model}", "--n", "2", "--hparams", "{tmp}/c.yaml", "--out", "{tmp}/out"),
        "{tmp}/c.yaml",
        "field 'lr'",
        files={"c.yaml": "lr: abc\n"},
    ),
    command(
        "layer-sweep-layer-past-the-depth",
        ("layer-sweep", "--model", "{model}", "--n", "2", "--layers", "5", "--out", "{tmp}/out"),
        "field 'layers'",
        "the model has 2 layers",
    ),
    command(
        "layer-sweep-range-past-the-end",
        ("layer-sweep", "--model", "{model}", "--n", "2", "--range", "0", "100000", "--out", "{tmp}/out"),
        "field 'range'",
        "past the end",
    ),
]

# -- the lm-eval models' arguments (the `lm_eval` command prints these as one line, exit code 2) ------------
MEG_ARGS = "pretrained={model},meg_path={meg}"
LM_EVAL_CASES = [
    command(
        "lm_eval-meg-route",
        ("lm_eval", "meg", MEG_ARGS + ",route=sometimes"),
        "field 'route'",
        "routing must be one of",
    ),
    command(
        "lm_eval-meg-negative-ddim_steps", ("lm_eval", "meg", MEG_ARGS + ",ddim_steps=-3"), "ddim_steps", "-3"
    ),
    command(
        "lm_eval-meg-word-ddim_steps", ("lm_eval", "meg", MEG_ARGS + ",ddim_steps=many"), "ddim_steps", "many"
    ),
    command(
        "lm_eval-meg-template",
        ("lm_eval", "meg", MEG_ARGS + ",template=nonsense"),
        "unknown query template 'nonsense'",
    ),
    command("lm_eval-meg-without-meg_path", ("lm_eval", "meg", "pretrained={model}"), "meg_path"),
    command(
        "lm_eval-meg-missing-artifact",
        ("lm_eval", "meg", "pretrained={model},meg_path={tmp}/missing"),
        "{tmp}/missing",
        "does not exist",
    ),
    command(
        "lm_eval-meg-delta-artifact",
        ("lm_eval", "meg", "pretrained={model},meg_path={delta}"),
        "{delta}",
        "use `--model edited",
    ),
    command(
        "lm_eval-meg-truncated-artifact",
        ("lm_eval", "meg", "pretrained={model},meg_path={meg_cut}"),
        "{meg_cut}",
        "truncated",
    ),
    command(
        "lm_eval-meg-of-another-architecture",
        ("lm_eval", "meg", "pretrained={gpt2},meg_path={meg}"),
        "not fit",
    ),
    command(
        "lm_eval-edited-meg-artifact",
        ("lm_eval", "edited", "pretrained={model},delta={meg}"),
        "{meg}",
        "use `--model meg",
    ),
    command(
        "lm_eval-edited-missing-delta",
        ("lm_eval", "edited", "pretrained={model},delta={tmp}/missing"),
        "{tmp}/missing",
        "does not exist",
    ),
    command(
        "lm_eval-edited-not-an-artifact",
        ("lm_eval", "edited", "pretrained={model},delta={tmp}/folder"),
        "{tmp}/folder",
        "not an edit artifact",
        files={"folder/x.txt": "x"},
    ),
    command(
        "lm_eval-edited-truncated-delta",
        ("lm_eval", "edited", "pretrained={model},delta={delta_cut}"),
        "{delta_cut}",
        "unreadable tensor",
    ),
    command(
        "lm_eval-edited-delta-of-another-architecture",
        ("lm_eval", "edited", "pretrained={model},delta={delta}"),
        "does not fit",
    ),
    command(
        "lm_eval-edited-missing-model", ("lm_eval", "edited", "pretrained={tmp}/no-model"), "{tmp}/no-model"
    ),
]

CASES = [
    *DATA_CASES,
    *FILE_CASES,
    *CONFIG_CASES,
    *HPARAMS_CASES,
    *OUT_CASES,
    *REPORT_CASES,
    *OTHER_CASES,
    *LM_EVAL_CASES,
]


def test_the_table_covers_at_least_the_issues_139_inputs_once_each():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert len(CASES) >= 139, len(CASES)


def test_a_settings_field_needs_only_its_annotation_and_default():
    """How a key is added to any method's hparams: the field's type is checked and normalised from its
    annotation alone; a Rule in CHECKS adds a range."""

    @dataclass(frozen=True)
    class Example(Settings):
        flag: bool = False
        lr: float = 0.1
        layers: tuple[int, ...] = (1,)
        note: str | None = None
        CHECKS: ClassVar[Mapping[str, Rule]] = {"lr": POSITIVE}

    built = settings_from_mapping(Example, {"flag": True, "lr": "1e-3", "layers": [2, 3]}, "example hparam")
    assert (built.flag, built.lr, built.layers, built.note) == (True, 1e-3, (2, 3), None)
    assert Example(layers=4).layers == (4,)
    for values, name, words in [
        ({"flag": "yes"}, "sec.flag", "must be true or false, got 'yes'"),
        ({"lr": 0}, "sec.lr", "must be a positive number, got 0"),
        ({"lr": "fast"}, "sec.lr", "must be a positive number, got 'fast'"),
        ({"layers": [1.5]}, "sec.layers", "must be a list of integers"),
        ({"note": 3}, "sec.note", "must be a string or null, got 3"),
        ({"nope": 1}, "sec.nope", "unknown example hparam(s) ['nope']"),
    ]:
        with pytest.raises(HarnessError) as error:
            settings_from_mapping(Example, values, "example hparam", "sec.")
        assert error.value.field == name and words in error.value.reason, str(error.value)


# -- running a case -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT (an architecture without an adapter) with a tokenizer."""
    from transformers import BertConfig, BertLMHeadModel

    from meg_harness.models.tiny import make_tiny_model

    folder = tmp_path_factory.mktemp("bert")
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        is_decoder=True,
    )  # fmt: skip
    BertLMHeadModel(config).save_pretrained(folder)
    tokenizer = make_tiny_model(tmp_path_factory.mktemp("bert-tok"), "gpt2")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).exists():
            (folder / name).write_bytes((tokenizer / name).read_bytes())
    return folder


def _fill(value: Any, places: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        for name, text in places.items():
            value = value.replace("{" + name + "}", text)
        return value
    if isinstance(value, dict):
        return {_fill(k, places): _fill(v, places) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, places) for v in value]
    return value


def _places(case: Case, tmp_path: Path, request) -> dict[str, str]:
    """The placeholders the case uses, built on demand (artifacts only for the lm-eval cases)."""
    text = repr(case)
    tiny = request.getfixturevalue("tiny_model_dir")
    places = {"tmp": str(tmp_path), "fixtures": str(FIXTURES)}
    builders = {
        "model": lambda: tiny("llama"),
        "gpt2": lambda: tiny("gpt2"),
        "bert": lambda: request.getfixturevalue("bert_dir"),
        "meg": lambda: request.getfixturevalue("artifact"),
        "delta": lambda: request.getfixturevalue("delta_gpt2"),
        "meg_cut": lambda: _truncated(request.getfixturevalue("artifact"), tmp_path / "meg_cut"),
        "delta_cut": lambda: _truncated(request.getfixturevalue("delta_gpt2"), tmp_path / "delta_cut"),
    }
    for name, build in builders.items():
        if "{" + name + "}" in text:
            places[name] = str(build())
    return places


def _write(folder: Path, files: Mapping[str, Any]) -> None:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        elif path.suffix == ".yaml":
            path.write_text(yaml.safe_dump(content), encoding="utf-8")
        else:
            path.write_text(json.dumps(content), encoding="utf-8")


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file (size, mtime) and folder under ``folder``, the isolated cache aside. A folder's mtime is
    left out: the output lock's file comes and goes inside ``out`` without writing anything."""
    out = {}
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if relative.parts[0] == "cache":
            continue
        stat = path.stat()
        out[relative.as_posix()] = (stat.st_size, stat.st_mtime_ns) if path.is_file() else (-1, -1)
    return out


def _lm_eval(model: str, model_args: str) -> tuple[int, str]:
    """``lm_eval --model MODEL --model_args ARGS`` as the command ends: a HarnessError (itself or in the
    chain) is one line and exit code 2 (:mod:`meg_harness.lm_eval_plugin.cli_errors`), anything else a
    traceback and exit code 1."""
    import lm_eval

    from meg_harness.lm_eval_plugin.cli_errors import harness_error_of

    try:
        lm_eval.simple_evaluate(
            model=model, model_args=model_args, tasks=["counterfact_ke"], device="cpu", batch_size=2
        )
    except Exception as error:  # noqa: BLE001 - sorted as the lm_eval command's hook sorts them
        found = harness_error_of(error)
        if found is None:
            return 1, traceback.format_exc()
        return 2, f"lm_eval: error: {found}\n"
    return 0, ""


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: Case, tmp_path, capsys, request):
    places = _places(case, tmp_path, request)
    _write(tmp_path, {_fill(name, places): _fill(content, places) for name, content in case.files.items()})
    argv = [_fill(arg, places) for arg in case.argv]
    before = _snapshot(tmp_path)
    capsys.readouterr()
    if argv[0] == "lm_eval":
        pytest.importorskip("lm_eval")
        code, err = _lm_eval(argv[1], argv[2])
        prefix = "lm_eval: error: "
    else:
        code, err = main(argv), capsys.readouterr().err
        prefix = "meg-harness: error: "
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(prefix), lines[0]
    for needle in case.needles:
        assert _fill(needle, places) in lines[0], f"{_fill(needle, places)!r} not in {lines[0]!r}"
    assert _snapshot(tmp_path) == before, "nothing may be written after a user error"
