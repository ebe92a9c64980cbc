"""A run under `torchrun --nproc_per_node 2` (gloo on the CPU) equals the same run in one process.

The per-edit work (MEMIT's z chunks, MeG's neuron shards, the probe batches of both scoring passes and the
unedited answers) is spread over the two ranks and gathered; rank 0 writes. Compared: every probe of
items.jsonl, metrics.json apart from timings, and the z and neuron caches each run wrote, byte for byte.
MeG's generator trains data-parallel under a launcher (other batches per rank), so its cache entry is
its own and is not compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from test_runner import _records

from meg_harness.ranks import _to, map_shared, spread_over_ranks, world

VOLATILE = {"timings", "resources", "git_sha", "config"}  # config: each run has its own cache_dir


def test_map_shared_in_one_process_is_a_plain_loop():
    seen = []

    def square(x: int) -> int:
        seen.append(x)
        return x * x

    with spread_over_ranks():
        assert world() == (0, 1)
        assert map_shared([3, 1, 2], square) == [9, 1, 4]
    assert seen == [3, 1, 2]


def test_results_move_to_a_device_inside_dataclasses_lists_and_dicts():
    @dataclass(frozen=True)
    class Part:
        weights: torch.Tensor
        names: list

    moved = _to({"a": [Part(torch.ones(2, dtype=torch.float64), ["x"])], "b": (torch.zeros(1), 3)}, "meta")
    assert moved["a"][0].weights.device.type == "meta" and moved["a"][0].names == ["x"]
    assert moved["b"][0].device.type == "meta" and moved["b"][1] == 3


def _config(tmp_path: Path, model: Path, encoder: str, cache: Path) -> Path:
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(_records()))
    config = {
        "model": str(model),
        "dataset": "counterfact",
        "data_path": str(data),
        "n_edits": 6,
        "seeds": [0],
        "batch_size": 2,  # 3 probe batches per pass
        "cache_dir": str(cache),
        "methods": ["none", "memit", "meg"],
        "hparams": {
            "memit": {
                "alg_name": "MEMIT",
                "layers": [0],
                "z_batch_size": 2,  # 3 z chunks
                "v_num_grad_steps": 5,
                "mom2_adjustment": False,
            },
            "meg": {
                "alg_name": "MEG",
                "layer": 1,
                "encoder": {"name": encoder, "tuning": "frozen"},
                "familiarity": {"hidden": 32, "n_blocks": 1, "max_epochs": 20},
                "collect": {"max_steps": 10, "batch_size": 2, "shard_size": 2},  # 3 neuron shards
                "generator": {"kind": "mlp", "hidden": 32, "depth": 2},
                "diffusion": {"ddim_steps": 5},
                "train": {"max_steps": 40, "batch_size": 8, "eval_every": 20, "eval_ddim_steps": 5},
            },
        },
    }
    path = tmp_path / f"{cache.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(config: Path, out: Path, processes: int) -> None:
    # --standalone: a free port of this host for the rendezvous
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher = [*torchrun, f"--nproc_per_node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "meg_harness.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [*command, "run", str(config), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _stable(metrics: dict) -> dict:
    kept = {k: v for k, v in metrics.items() if k not in VOLATILE}
    fit = dict(kept.get("fit") or {})
    fit.pop("generator", None)  # MeG: the data-parallel generator's own training record
    for key in [k for k in fit if k.endswith("_s")]:
        fit.pop(key)
    if "statistics" in fit:
        fit["statistics"] = {k: v for k, v in fit["statistics"].items() if k != "seconds"}
    kept["fit"] = fit
    return kept


def _files(folder: Path) -> dict[str, object]:
    """Every file's contents; a safetensors file as its metadata and tensors (its header's key order is
    not fixed from one process to the next)."""
    contents: dict[str, object] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                tensors = {k: handle.get_tensor(k).numpy().tobytes() for k in sorted(handle.keys())}
                contents[str(path.relative_to(folder))] = (handle.metadata(), tensors)
        else:
            contents[str(path.relative_to(folder))] = path.read_bytes()
    return contents


def test_two_process_run_equals_one_process(tmp_path, tiny_model_dir, encoder_dir):
    model = tiny_model_dir("llama")
    runs = {}
    for processes in (1, 2):
        cache = tmp_path / f"cache{processes}"
        runs[processes] = tmp_path / f"out{processes}"
        _run(_config(tmp_path, model, encoder_dir, cache), runs[processes], processes)
    for method in ("none", "memit", "meg"):
        one, two = (runs[p] / method / "seed0" for p in (1, 2))
        assert (one / "items.jsonl").read_bytes() == (two / "items.jsonl").read_bytes(), method
        metrics = [_stable(json.loads((d / "metrics.json").read_text())) for d in (one, two)]
        assert metrics[0] == metrics[1], method
    for stage in ("baseline_z", "neurons"):  # computed by two ranks, chunk by chunk / shard by shard
        one, two = (_files(tmp_path / f"cache{p}" / stage) for p in (1, 2))
        assert len(one) >= 3 and one == two, stage
    assert not (runs[2] / "memit" / "seed0.tmp").exists()
