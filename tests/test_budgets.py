"""Results are decided by steps, not minutes; artifacts have deterministic bytes.

A wall-clock limit (``max_minutes``) stops a call without a result and the next call finishes the same run;
shipped configs budget training in steps; a weight delta saved by two processes is byte-identical.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meg_harness.budget import TrainingStopped, WallClock
from meg_harness.cli import demo_config
from meg_harness.config import load_hparams
from meg_harness.meg.diffusion import DiffusionConfig
from meg_harness.meg.generator import GeneratorConfig, build_generator
from meg_harness.meg.train_generator import TrainConfig, train_generator
from tests.test_meg_generator import CHECKPOINTED, SMALL_MLP, _pairs

REPO = Path(__file__).resolve().parents[1]


def _generator_run(folder: Path | None, **settings):
    cond, targets = _pairs()
    config = GeneratorConfig.from_mapping(SMALL_MLP, vector_dim=21, cond_dim=6)
    train = TrainConfig(max_steps=25, **{**CHECKPOINTED, "checkpoint_every": 100, **settings})
    return train_generator(
        build_generator(config),
        cond,
        targets,
        DiffusionConfig(ddim_steps=5),
        train,
        checkpoint_dir=folder,
        progress=False,
    )


def test_generator_time_limit_stops_without_a_result_and_a_rerun_finishes_the_same_run(tmp_path):
    whole, whole_result = _generator_run(None)
    with pytest.raises(
        TrainingStopped, match=r"generator training stopped by max_minutes=1e-09 after step 1 of 25"
    ):
        _generator_run(tmp_path, max_minutes=1e-9)
    with pytest.raises(TrainingStopped, match="after step 2 of 25"):  # a limit per call: one more step
        _generator_run(tmp_path, max_minutes=1e-9)
    resumed, result = _generator_run(tmp_path, max_minutes=60)
    assert result.resumed_from == 2 and result.steps == 25
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    # mid-window stops keep the window's losses: the record is the uninterrupted run's
    assert result.losses == whole_result.losses and result.evaluations == whole_result.evaluations


def test_generator_time_limit_without_checkpoint_folder_still_gives_no_result():
    with pytest.raises(TrainingStopped, match="nowhere: no checkpoint_dir"):
        _generator_run(None, max_minutes=1e-9)


def test_wall_clock_predicts_the_next_step(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("meg_harness.budget.time.monotonic", lambda: now[0])
    clock = WallClock(1.0)  # 60 s
    for _ in range(2):
        now[0] += 25.0
        clock.step_done()
    assert clock.next_step_overruns()  # 50 s spent, a third 25 s step would end at 75 s
    assert not WallClock(None).next_step_overruns()


def _demo_malmen() -> dict:
    """MALMEN's hparams in the demo: its repository file with the demo's overrides."""
    return load_hparams(demo_config("smollm2-135m", ["malmen"]).hparams["malmen"], "malmen", "demo")


def test_shipped_configs_budget_training_in_steps():
    """No shipped config lets the clock decide a result: MALMEN's budgets are max_steps."""
    demo = _demo_malmen()
    assert demo.get("max_minutes") is None and isinstance(demo["max_steps"], int)
    files = [*sorted((REPO / "hparams").rglob("*.yaml")), *sorted((REPO / "configs").glob("[!_]*.yaml"))]
    for path in files:
        text = path.read_text(encoding="utf-8")
        for line in text.splitlines():
            key, _, value = line.partition("#")[0].partition(":")
            if key.strip() == "max_minutes":
                assert value.strip() in ("null", "~", ""), f"{path}: {line}"


DELTA = (
    "import sys, torch\n"
    "from torch import nn\n"
    "from meg_harness.baselines.delta import DeltaEdited, WeightDelta, save_delta_artifact\n"
    "torch.manual_seed(0)\n"
    "model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))\n"
    "delta = WeightDelta()\n"
    "delta.add(model, '1.weight', torch.randn(2, 3))\n"
    "delta.add(model, '0.bias', torch.randn(3))\n"
    "info = {'statistics': {'seconds': float(sys.argv[2]), 'tokens': 7}, 'meta_train_s': 1.0, 'steps': 3}\n"
    "save_delta_artifact(DeltaEdited(model, None, delta, info), sys.argv[1], 'memit', 'abc123')\n"
)


def test_delta_artifacts_of_two_processes_are_byte_identical(tmp_path):
    """safetensors keeps its metadata in a hash map whose order changes per process: our writer sorts it;
    timings stay out of edit.json. Checked across several processes (several hash seeds)."""
    for i, seconds in enumerate(("1.5", "99.0", "3.25")):
        subprocess.run(
            [sys.executable, "-c", DELTA, str(tmp_path / f"a{i}"), seconds], check=True, timeout=120
        )
    files = ("delta.safetensors", "edit.json")
    first = {name: (tmp_path / "a0" / name).read_bytes() for name in files}
    for i in (1, 2):
        assert {name: (tmp_path / f"a{i}" / name).read_bytes() for name in files} == first
    assert b'"tokens": 7' in first["edit.json"] and b"seconds" not in first["edit.json"]
    assert b"meta_train_s" not in first["edit.json"] and b'"steps": 3' in first["edit.json"]
    header = first["delta.safetensors"][8:200]
    assert header.startswith(b'{"__metadata__":{"base_fingerprint":"abc123","format":')
