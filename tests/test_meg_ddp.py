"""Generator training data-parallel: `accelerate launch --num_processes 2` on CPU (gloo) vs one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from meg_harness.meg.train_generator import save_pairs

pytest.importorskip("accelerate")

SETTINGS = {
    "generator": {"kind": "mlp", "hidden": 64, "depth": 2},
    "diffusion": {"ddim_steps": 5},
    "train": {
        "lr": 3e-3,
        "batch_size": 32,
        "max_steps": 300,
        "eval_every": 50,
        "eval_ddim_steps": 5,
        "checkpoint_every": 100,
        "success_l2": 0.0,
        "ema_decay": 0.9,
        "ema_warmup": False,
    },
}


def _train(tmp_path, processes: int) -> dict:
    out = tmp_path / f"out{processes}"
    # --multi_gpu is accelerate's torchrun launcher; without CUDA, Accelerator(cpu=True) runs DDP over gloo
    device = "--multi_gpu" if processes > 1 else "--cpu"
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", device, "--num_processes", str(processes)),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("-m", "meg_harness.meg.train_generator", "--pairs", str(tmp_path / "pairs.safetensors")),
        *("--config", str(tmp_path / "settings.json"), "--out", str(out)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "train.json").read_text())


def test_two_process_training_runs_and_learns_like_one(tmp_path):
    gen = torch.Generator().manual_seed(0)
    save_pairs(
        tmp_path / "pairs.safetensors", torch.randn(8, 6, generator=gen), torch.randn(8, 40, generator=gen)
    )
    (tmp_path / "settings.json").write_text(json.dumps(SETTINGS))
    one, two = _train(tmp_path, 1), _train(tmp_path, 2)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["steps"] == two["steps"] == 300
    for record in (one, two):
        losses = record["losses"]
        assert losses[-1] < 0.6 * losses[0], losses  # the v-loss falls
    # same global batch (16 rows per process): the curves agree to within noise
    assert abs(two["losses"][-1] - one["losses"][-1]) < 0.5 * one["losses"][0]
