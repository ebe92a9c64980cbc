"""Malformed inputs: one line on stderr naming file/record/field, exit code 2, no traceback, no output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from meg_harness.cli import main


def _rome_record(i: int, **overrides) -> dict:
    record = {
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
            record["requested_rewrite"][key[3:]] = value
        else:
            record[key] = value
    return record


def _write_data(tmp_path: Path, records, name="cf.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records) if not isinstance(records, str) else records)
    return path


def _write_config(tmp_path: Path, **keys) -> Path:
    config = {"model": "unused-model", "dataset": "counterfact", "n_edits": 2, "methods": ["none"]}
    config.update(keys)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run_expect_error(capsys, tmp_path, config: Path, *needles: str) -> str:
    out = tmp_path / "out"
    code = main(["run", str(config), "--out", str(out)])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert "Traceback" not in captured.err + captured.out
    error_lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1, err
    err = err.splitlines()[-1]  # progress bars may precede the error on stderr; the error is last
    assert err.startswith("meg-harness: error: ")
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert not out.exists(), "no partial output after an error"
    return err


def _data_case(tmp_path, records):
    data = _write_data(tmp_path, records)
    return _write_config(tmp_path, data_path=str(data)), str(data)


@pytest.mark.parametrize(
    ("name", "bad_record", "field"),
    [
        (
            "missing field",
            {"case_id": 1, "paraphrase_prompts": [], "neighborhood_prompts": []},
            "requested_rewrite",
        ),
        ("wrong type", _rome_record(1, rw_target_new={"str": 7}), "target_new"),
        ("empty target", _rome_record(1, rw_target_new={"str": "   "}), "target_new"),
        ("ROME prompt without {}", _rome_record(1, rw_prompt="The capital is"), "prompt"),
        ("subject not in prompt", None, "subject"),
    ],
)
def test_bad_record(capsys, tmp_path, name, bad_record, field):
    if bad_record is None:  # flattened EasyEdit format whose subject is not in its prompt
        good = {
            "case_id": 0,
            "prompt": "The capital of Spain is",
            "subject": "Spain",
            "target_new": "Rome",
            "ground_truth": "Madrid",
            "rephrase_prompt": "Spain's capital is",
            "locality_prompt": "The capital of Italy is",
            "locality_ground_truth": "Rome",
        }
        records = [good, {**good, "case_id": 1, "subject": "Portugal"}]
    else:
        records = [_rome_record(0), bad_record]
    config, data = _data_case(tmp_path, records)
    _run_expect_error(capsys, tmp_path, config, data, "record 1", field)


def test_non_json_data_file(capsys, tmp_path):
    config, data = _data_case(tmp_path, "{not json at all")
    _run_expect_error(capsys, tmp_path, config, data)


def test_unreadable_data_path(capsys, tmp_path):
    missing = tmp_path / "nope.json"
    config = _write_config(tmp_path, data_path=str(missing))
    _run_expect_error(capsys, tmp_path, config, str(missing))


def test_unknown_dataset(capsys, tmp_path):
    config = _write_config(tmp_path, dataset="wikifacts")
    _run_expect_error(capsys, tmp_path, config, str(config), "dataset", "wikifacts")


def test_unknown_method(capsys, tmp_path):
    config = _write_config(tmp_path, methods=["none", "rome2"])
    _run_expect_error(capsys, tmp_path, config, "methods", "rome2", "none")


def test_bad_config_key(capsys, tmp_path):
    config = _write_config(tmp_path, n_edit=3)
    _run_expect_error(capsys, tmp_path, config, str(config), "n_edit")


def test_wrong_config_type(capsys, tmp_path):
    config = _write_config(tmp_path, n_edits="many")
    _run_expect_error(capsys, tmp_path, config, str(config), "n_edits")


def test_config_not_yaml_mapping(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("- just\n- a list\n")
    _run_expect_error(capsys, tmp_path, config, str(config))


def test_missing_config_file(capsys, tmp_path):
    _run_expect_error(capsys, tmp_path, tmp_path / "absent.yaml", "absent.yaml")


def test_missing_hparams_file(capsys, tmp_path):
    config = _write_config(tmp_path, hparams={"none": str(tmp_path / "h.yaml")})
    _run_expect_error(capsys, tmp_path, config, "h.yaml", "hparams.none")


def test_bad_hparam_of_a_later_method_fails_before_any_method_runs(capsys, tmp_path):
    base = tmp_path / "memit.yaml"
    base.write_text("alg_name: MEMIT\nlayers: [1]\nv_lr: 0.5\n")
    config = _write_config(
        tmp_path,
        methods=["none", "memit@x"],
        hparams={"memit@x": {"base": str(base), "v_lrr": 1.0}},
    )
    _run_expect_error(capsys, tmp_path, config, "run.yaml", "hparams.memit@x.v_lrr")


def test_missing_base_hparams_file(capsys, tmp_path):
    config = _write_config(
        tmp_path, methods=["memit@x"], hparams={"memit@x": {"base": str(tmp_path / "gone.yaml")}}
    )
    _run_expect_error(capsys, tmp_path, config, "gone.yaml", "hparams.memit@x")


def test_too_many_edits(capsys, tmp_path):
    data = _write_data(tmp_path, [_rome_record(0), _rome_record(1)])
    config = _write_config(tmp_path, data_path=str(data), n_edits=5)
    _run_expect_error(capsys, tmp_path, config, "n_edits")


def test_unreadable_model_path(capsys, tmp_path):
    data = _write_data(tmp_path, [_rome_record(0), _rome_record(1)])
    config = _write_config(tmp_path, data_path=str(data), model=str(tmp_path / "no-model-here"))
    _run_expect_error(capsys, tmp_path, config, "no-model-here")


def test_unknown_architecture(capsys, tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    model_dir = tmp_path / "bert"
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        is_decoder=True,
    )
    BertLMHeadModel(config).save_pretrained(model_dir)
    from meg_harness.models.tiny import make_tiny_model

    tokenizer_src = make_tiny_model(tmp_path / "tok", "gpt2")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_src / name).exists():
            (model_dir / name).write_bytes((tokenizer_src / name).read_bytes())
    data = _write_data(tmp_path, [_rome_record(0), _rome_record(1)])
    run = _write_config(tmp_path, data_path=str(data), model=str(model_dir))
    _run_expect_error(capsys, tmp_path, run, "bert", "llama")


def test_prompt_longer_than_context(capsys, tmp_path, tiny_model_dir):
    long_prompt = "The capital of {} is " + "very " * 1200
    data = _write_data(tmp_path, [_rome_record(0), _rome_record(1, rw_prompt=long_prompt)])
    config = _write_config(tmp_path, data_path=str(data), model=str(tiny_model_dir("gpt2")))
    _run_expect_error(capsys, tmp_path, config, str(data), "record 1", "prompt", "context")


def test_leaderboard_of_missing_folder(capsys, tmp_path):
    code = main(["leaderboard", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and "none" in err and len(err.strip().splitlines()) == 1
