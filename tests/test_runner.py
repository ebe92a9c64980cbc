"""`meg-harness run` end to end on a tiny model: layout, determinism, resume, refusal to mix configs."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from meg_harness.cli import main
from meg_harness.errors import HarnessError
from meg_harness.evaluate.protocol import ALL_METRIC_KEYS

VOLATILE = {"timings", "resources", "git_sha"}


def _records(n: int = 6) -> list[dict]:
    capitals = [
        ("France", "Paris", "Rome"),
        ("Spain", "Madrid", "Lisbon"),
        ("Italy", "Rome", "Oslo"),
        ("Norway", "Oslo", "Bern"),
        ("Greece", "Athens", "Vienna"),
        ("Peru", "Lima", "Quito"),
    ]
    return [
        {
            "case_id": i,
            "requested_rewrite": {
                "prompt": "The capital of {} is",
                "subject": country,
                "target_new": {"str": new},
                "target_true": {"str": true},
            },
            "paraphrase_prompts": [f"{country}'s capital city is", f"What is the capital of {country}?"],
            "neighborhood_prompts": ["The capital of Chile is", f"The largest city near {true} is"],
        }
        for i, (country, true, new) in enumerate(capitals[:n])
    ]


@pytest.fixture
def run_config(tmp_path, tiny_model_dir):
    def write(**overrides) -> Path:
        data = tmp_path / "cf.json"
        data.write_text(json.dumps(_records()))
        config = {
            "model": str(tiny_model_dir("gpt2")),
            "dataset": "counterfact",
            "data_path": str(data),
            "n_edits": 4,
            "seeds": [0, 1],
            "methods": ["none"],
            "batch_size": 4,
        }
        config.update(overrides)
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write


def _stable(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in VOLATILE}


def test_run_layout_and_values(run_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(run_config()), "--out", str(out)]) == 0
    for seed in (0, 1):
        seed_dir = out / "none" / f"seed{seed}"
        metrics = json.loads((seed_dir / "metrics.json").read_text())
        assert all(k in metrics for k in ALL_METRIC_KEYS)
        assert metrics["locality_ag"] == 100.0 and metrics["locality_tf"] == 100.0
        assert metrics["counts"]["cases"] == 4 and metrics["seed"] == seed
        assert {"versions", "git_sha", "config", "timings"} <= set(metrics)
        items = [json.loads(line) for line in (seed_dir / "items.jsonl").read_text().splitlines()]
        assert len(items) == 4 * (1 + 2 + 2)
        assert (seed_dir / "artifact").is_dir()
    averaged = json.loads((out / "none" / "metrics.json").read_text())
    per_seed = [json.loads((out / "none" / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert averaged["reliability_tf"] == pytest.approx(
        (per_seed[0]["reliability_tf"] + per_seed[1]["reliability_tf"]) / 2
    )
    assert "reliability_tf_std" in averaged
    assert not list(out.rglob("*.tmp")), "no temporary folders left behind"


def test_same_config_and_seed_give_identical_results(run_config, tmp_path):
    config = run_config(seeds=[3])
    assert main(["run", str(config), "--out", str(tmp_path / "a")]) == 0
    assert main(["run", str(config), "--out", str(tmp_path / "b")]) == 0
    a, b = (tmp_path / x / "none" / "seed3" for x in "ab")
    assert _stable(a / "metrics.json") == _stable(b / "metrics.json")
    assert (a / "items.jsonl").read_bytes() == (b / "items.jsonl").read_bytes()


def test_rerun_skips_finished_and_refuses_other_config(run_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(run_config()), "--out", str(out)]) == 0
    finished = out / "none" / "seed0" / "metrics.json"
    stamp = finished.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", str(run_config()), "--out", str(out)]) == 0
    assert "already done" in capsys.readouterr().out
    assert finished.stat().st_mtime_ns == stamp
    assert main(["run", str(run_config(n_edits=3)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "different run config" in err and "n_edits" in err
    assert finished.stat().st_mtime_ns == stamp


def test_unfinished_method_may_change_hparams_finished_may_not(run_config, tmp_path, capsys):
    out = tmp_path / "out"
    methods = ["none", "none@b"]
    first = run_config(seeds=[0], methods=methods, hparams={"none@b": {"note": "a"}})
    assert main(["run", str(first), "--out", str(out)]) == 0
    shutil.rmtree(out / "none@b")  # as if none@b had been interrupted before it finished
    changed = run_config(seeds=[0], methods=methods, hparams={"none@b": {"note": "b"}})
    assert main(["run", str(changed), "--out", str(out)]) == 0
    recorded = json.loads((out / "none@b" / "seed0" / "metrics.json").read_text())["hparams"]
    assert recorded["note"] == "b"
    assert json.loads((out / "run_config.json").read_text())["hparams"]["none@b"] == {"note": "b"}
    capsys.readouterr()
    again = run_config(seeds=[0], methods=methods, hparams={"none@b": {"note": "c"}})
    assert main(["run", str(again), "--out", str(out)]) == 2  # none@b has finished with note b
    assert "different run config" in capsys.readouterr().err


def test_adding_a_labelled_variant_reuses_finished_results(run_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(run_config(seeds=[0])), "--out", str(out)]) == 0
    finished = out / "none" / "seed0" / "metrics.json"
    stamp = finished.stat().st_mtime_ns
    variant = run_config(seeds=[0], methods=["none", "none@b"], hparams={"none@b": {"note": "variant"}})
    assert main(["run", str(variant), "--out", str(out)]) == 0
    assert finished.stat().st_mtime_ns == stamp  # not recomputed
    assert (out / "none@b" / "seed0" / "artifact" / "lm_eval_cases.json").is_file()  # for lm-eval tasks
    from meg_harness.editing.base import Edited
    from meg_harness.runner import load_run_edit, run_cases

    scored = [json.loads(line)["case_id"] for line in (out / "none" / "seed0" / "items.jsonl").open()]
    assert [c.case_id for c in run_cases(out, 0)] == list(dict.fromkeys(scored))
    assert type(load_run_edit(out, "none@b", 0)) is Edited  # the label's editor (none), the run's model
    record = json.loads((out / "none@b" / "seed0" / "metrics.json").read_text())
    assert record["method"] == "none@b" and record["hparams"] == {"note": "variant"}
    changed = run_config(seeds=[0], methods=["none", "none@b"], hparams={"none@b": {"note": "other"}})
    capsys.readouterr()
    assert main(["run", str(changed), "--out", str(out)]) == 2  # a finished method's hparams changed
    assert "changed: hparams" in capsys.readouterr().err


def test_rerun_refuses_a_finished_method_whose_hparams_file_changed(run_config, tmp_path, capsys):
    hparams_file = tmp_path / "none.yaml"
    hparams_file.write_text("note: first\n")
    config = run_config(seeds=[0], hparams={"none": str(hparams_file)})
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out)]) == 0
    finished = out / "none" / "seed0" / "metrics.json"
    stamp = finished.stat().st_mtime_ns
    hparams_file.write_text("note: second\n")  # the run config still says the same path
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "none seed 0 was run with other hparams (changed: note)" in err and "\n" not in err
    assert finished.stat().st_mtime_ns == stamp
    hparams_file.write_text("note: first\n")
    assert main(["run", str(config), "--out", str(out)]) == 0  # the same contents again: skipped
    assert finished.stat().st_mtime_ns == stamp


def test_kill9_of_a_multi_method_run_then_restart_recomputes_nothing_finished(run_config, tmp_path):
    """Issue 8 d: ``kill -9`` part-way through a multi-method run; the rerun keeps every finished
    method/seed (byte-identical, not rewritten) and completes the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    methods = [f"none@{i}" for i in range(6)]
    config = run_config(methods=methods, hparams={m: {"note": m} for m in methods})
    out = tmp_path / "out"
    command = [sys.executable, "-m", "meg_harness.cli", "run", str(config), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*/seed*/metrics.json"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    finished = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*/seed*/metrics.json")}
    assert 2 <= len(finished) < len(methods) * 2, "killed part-way"
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert rerun.stdout.count("already done") == len(finished)
    for path, (stamp, content) in finished.items():
        assert path.stat().st_mtime_ns == stamp and path.read_bytes() == content
    assert len(list(out.glob("*/seed*/metrics.json"))) == len(methods) * 2
    assert not list(out.rglob("*.tmp")), "no temporary folders left behind"


def test_a_run_that_adds_methods_records_the_earlier_ones(run_config, tmp_path):
    out = tmp_path / "out"
    first = run_config(seeds=[0], methods=["none@a"], hparams={"none@a": {"note": "a"}})
    assert main(["run", str(first), "--out", str(out)]) == 0
    second = run_config(seeds=[1], methods=["none@b"], hparams={"none@b": {"note": "b"}})
    assert main(["run", str(second), "--out", str(out)]) == 0
    recorded = json.loads((out / "run_config.json").read_text())
    assert recorded["methods"] == ["none@a", "none@b"] and recorded["seeds"] == [0, 1]
    assert recorded["hparams"] == {"none@a": {"note": "a"}, "none@b": {"note": "b"}}


def test_edit_scales_run_one_after_another_and_resume(run_config, tmp_path, capsys):
    out = tmp_path / "out"
    config = run_config(n_edits=[2, 3], seeds=[0])
    assert main(["run", str(config), "--out", str(out)]) == 0
    for n in (2, 3):
        metrics = json.loads((out / f"n{n}" / "none" / "seed0" / "metrics.json").read_text())
        assert metrics["counts"]["cases"] == n and metrics["config"]["n_edits"] == n
    finished = out / "n2" / "none" / "seed0" / "metrics.json"
    stamp = finished.stat().st_mtime_ns
    (out / "n3" / "none" / "seed0" / "metrics.json").unlink()  # as if killed during the second scale
    capsys.readouterr()
    assert main(["run", str(run_config(n_edits=[2, 3, 4], seeds=[0])), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("already done") == 1 and finished.stat().st_mtime_ns == stamp
    assert (out / "n3" / "none" / "seed0" / "metrics.json").is_file()
    assert json.loads((out / "n4" / "none" / "seed0" / "metrics.json").read_text())["counts"]["cases"] == 4
    assert main(["run", str(run_config(n_edits=[2, 2])), "--out", str(out)]) == 2
    assert "n_edits" in capsys.readouterr().err


def test_leaderboard_formats(run_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(run_config()), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["leaderboard", str(out)]) == 0
    md = capsys.readouterr().out
    assert "| none |" in md and "Rel AG" in md and "±" in md
    assert main(["leaderboard", str(out), "--format", "csv"]) == 0
    csv_text = capsys.readouterr().out
    header, row = list(csv.reader(io.StringIO(csv_text)))[:2]
    assert header[:7] == ["model", "dataset", "n_edits", "edits", "method", "n_seeds", "reliability_ag"]
    assert row[3] == "cf.json" and row[4] == "none"  # edits: the data file (the config names no range)
    assert main(["leaderboard", str(out), "--format", "latex"]) == 0
    assert "\\begin{tabular}" in capsys.readouterr().out


def test_demo_on_a_tiny_model_writes_leaderboard(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    model = str(tiny_model_dir("llama"))
    assert main(["demo", "--model", model, "--out", str(out), "--methods", "none", "--scales", "4", "8"]) == 0
    board = (out / "leaderboard.md").read_text()
    assert "| none |" in board and "counterfact · 4 edits" in board and "counterfact · 8 edits" in board
    metrics = json.loads((out / "n8" / "none" / "seed0" / "metrics.json").read_text())
    assert metrics["counts"]["cases"] == 8  # demo records 0-49 (50-99 train MALMEN)
    assert metrics["locality_ag"] == 100.0
    assert (out / "tables" / "index.md").is_file()


def test_make_tiny_model_and_tasks_path(tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "m"), "--arch", "phi"]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
    capsys.readouterr()
    assert main(["tasks-path"]) == 0
    assert Path(capsys.readouterr().out.strip()).is_dir()


def test_a_variant_of_any_method_extends_a_base_hparams_file(tmp_path):
    from meg_harness.config import load_hparams

    base = tmp_path / "memit.yaml"
    base.write_text("alg_name: MEMIT\nlayers: [1, 2]\nv_lr: 0.5\nkl_factor: 0.0625\n")
    child = tmp_path / "child.yaml"  # a file may itself extend another
    child.write_text(f"base: {base}\nkl_factor: 1.0\n")
    inline = load_hparams({"base": str(child), "v_lr": 0.2}, "memit@x", "run.yaml")
    assert inline == {"alg_name": "MEMIT", "layers": [1, 2], "v_lr": 0.2, "kl_factor": 1.0}
    assert load_hparams(str(child), "memit", "run.yaml") == {
        "alg_name": "MEMIT",
        "layers": [1, 2],
        "v_lr": 0.5,
        "kl_factor": 1.0,
    }


def test_a_key_written_out_with_its_default_is_no_hparams_change(tmp_path):
    """A finished result recorded before ``terminator`` was written into the hparams file (so without it)
    is skipped when the file now says ``terminator: false`` (the default), recomputed when it says true."""
    from meg_harness.baselines.ft import FT
    from meg_harness.config import parse_config
    from meg_harness.store import check_finished_hparams

    finished = tmp_path / "ft" / "seed0" / "metrics.json"
    finished.parent.mkdir(parents=True)
    finished.write_text(json.dumps({"hparams": {"layers": [0], "lr": 0.5}}))
    config = parse_config({"model": "m", "data_path": "d.json", "n_edits": 1, "methods": ["ft"]})
    same = {"ft": {"layers": [0], "lr": 0.5, "terminator": False}}
    check_finished_hparams(tmp_path, config, same, {"ft": FT})  # no error
    other = {"ft": {"layers": [0], "lr": 0.5, "terminator": True}}
    with pytest.raises(HarnessError, match=r"other hparams \(changed: terminator\)"):
        check_finished_hparams(tmp_path, config, other, {"ft": FT})
