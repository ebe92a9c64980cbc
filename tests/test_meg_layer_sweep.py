"""`meg-harness layer-sweep` (paper A.4): per-layer single-neuron Reliability, files, resume, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from meg_harness.cli import main
from meg_harness.data import load_cases
from meg_harness.errors import HarnessError
from meg_harness.meg.collect import CollectHParams, collect_neurons
from meg_harness.meg.layer_sweep import best_layer, parse_layers, sweep_layers, sweep_markdown
from meg_harness.prompts import get_template

TEMPLATE = get_template("gptj")
FAST = {"lr": 0.05, "max_steps": 8, "check_every": 4, "batch_size": 4, "shard_size": 4}


@pytest.fixture(scope="module")
def cases():
    return load_cases("counterfact", None)[:4]


def test_rows_match_independent_collection(tiny_models, cases, tmp_path):
    model, tok = tiny_models("llama")
    rows = sweep_layers(model, tok, cases, TEMPLATE, FAST, [1, 0], tmp_path / "a", progress=False)
    assert [r["layer"] for r in rows] == [1, 0]
    for row in rows:
        hp = dataclasses.replace(CollectHParams(**FAST), layer=row["layer"])  # a separate cache: recomputed
        result = collect_neurons(model, tok, cases, TEMPLATE, hp, cache_dir=tmp_path / "b", progress=False)
        assert result.reused == 0 and result.layer == row["layer"]
        assert row["n"] == len(cases) and row["n_success"] == sum(result.success)
        assert row["reliability_ag"] == pytest.approx(100 * sum(result.success) / len(result.success))
        assert row["mean_steps"] == pytest.approx(sum(result.steps) / len(result.steps))
        assert row["wall_s"] > 0 and row["reused"] == 0
    # a rerun reads every layer back from the cache and reports the original collection time
    again = sweep_layers(model, tok, cases, TEMPLATE, FAST, [1, 0], tmp_path / "a", progress=False)
    assert [r["reused"] for r in again] == [len(cases)] * 2
    strip = [{k: v for k, v in r.items() if k != "reused"} for r in rows]
    assert [{k: v for k, v in r.items() if k != "reused"} for r in again] == strip


def test_best_layer_and_markdown():
    def row(layer, rel, steps):
        return {"layer": layer, "reliability_ag": rel, "mean_steps": steps, "wall_s": 1.0, "n": 8}

    assert best_layer([row(0, 50.0, 10), row(1, 87.5, 30), row(2, 75.0, 5)]) == 1
    assert best_layer([row(3, 87.5, 30), row(5, 87.5, 20), row(4, 50.0, 1)]) == 5  # tie: fewer steps
    assert best_layer([row(7, 87.5, 20), row(2, 87.5, 20), row(9, 87.5, 20)]) == 2  # tie: lower layer
    text = sweep_markdown([row(0, 50.0, 10), row(1, 87.5, 30)], {"model": "m", "dataset": "d", "n": 8})
    assert "| 1 | 87.50 |" in text and "Best layer: 1" in text


def test_parse_layers():
    assert parse_layers("0-3") == [0, 1, 2, 3]
    assert parse_layers("6,2, 4") == [2, 4, 6]
    assert parse_layers("0-2,8,1") == [0, 1, 2, 8]
    for bad in ("", "a", "3-1", "-1", "1,,2", "1.5"):
        with pytest.raises(HarnessError, match="layer"):
            parse_layers(bad)


def _sweep_args(tiny_model_dir, tmp_path, *extra: str) -> list[str]:
    hparams = tmp_path / "collect.yaml"
    hparams.write_text(yaml.safe_dump({"alg_name": "MEG", "layer": 0, **FAST}))
    model = str(tiny_model_dir("llama"))
    common = ["--model", model, "--dataset", "counterfact", "--n", "3", "--seed", "1", "--range", "0", "50"]
    return ["layer-sweep", *common, "--hparams", str(hparams), "--template", "gptj", *extra]


def test_cli_writes_json_markdown_png(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_sweep_args(tiny_model_dir, tmp_path, "--layers", "0,1", "--out", str(out))) == 0
    printed = capsys.readouterr().out
    assert "best layer:" in printed and "| layer |" in printed
    data = json.loads((out / "layer_sweep.json").read_text())
    assert [r["layer"] for r in data["rows"]] == [0, 1]
    meta = data["meta"]
    assert (meta["dataset"], meta["n"], meta["seed"], meta["range"]) == ("counterfact", 3, 1, [0, 50])
    assert meta["hparams"]["max_steps"] == FAST["max_steps"] and "layer" not in meta["hparams"]
    assert "torch" in meta["versions"] and meta["best_layer"] == best_layer(data["rows"])
    assert "| layer |" in (out / "layer_sweep.md").read_text()
    assert (out / "layer_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # default layers = every layer of the (2-layer) model; cached layers are reused
    assert main(_sweep_args(tiny_model_dir, tmp_path, "--out", str(out))) == 0
    again = json.loads((out / "layer_sweep.json").read_text())["rows"]
    assert [r["reused"] for r in again] == [3, 3]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--layers", "0,7"], "layer 7"),
        (["--layers", "zero"], "zero"),
        (["--range", "50", "10"], "range"),
        (["--n", "0"], "n_edits"),
    ],
)
def test_cli_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    code = main([*_sweep_args(tiny_model_dir, tmp_path, "--out", str(out)), *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meg-harness: error: ") and needle in lines[0], lines
    assert not out.exists()
