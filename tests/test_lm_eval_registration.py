"""`lm_eval --model meg|edited` works after `pip install`: the .pth start-up hook, lazily, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from meg_harness._build import PTH_LINE, PTH_NAME  # noqa: E402
from tests.conftest import SHARED_DATA  # noqa: E402
from tests.test_lm_eval_support import TASKS_PATH  # noqa: E402

PTH = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def _command(name: str) -> str | None:
    """The console script ``name`` installed beside this interpreter (a venv's bin/, on PATH or not), else
    the one on PATH."""
    script = Path(sysconfig.get_paths()["scripts"]) / name
    return str(script) if script.is_file() else shutil.which(name)


def _python(code: str, timeout: int = 120) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_hook_registers_lazily_without_torch():
    out = _python(
        PTH_LINE
        + "import sys\n"
        + "from lm_eval.api.registry import model_registry as r\n"
        + "print(sorted(k for k in ('meg', 'edited', 'hf') if k in r), 'torch' in sys.modules)\n"
        + "from lm_eval.api.registry import get_model\n"
        + "print(get_model('meg').__name__, get_model('edited').__name__)\n"
    )
    assert out.splitlines() == ["['edited', 'hf', 'meg'] False", "MegLM EditedLM"]


def test_pth_is_installed_and_interpreter_start_stays_light():
    if not PTH.is_file():
        pytest.skip(f"{PTH} not installed: reinstall the package (pip install -e .) to get the lm_eval hook")
    assert PTH.read_text() == PTH_LINE
    out = _python(
        "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lm_eval')))"
    )
    assert out == "[]"


def test_lm_eval_cli(tiny_model_dir, tmp_path):
    """The literal `lm_eval` command with `--model edited` on a KE task and a local general benchmark."""
    lm_eval = _command("lm_eval")
    if lm_eval is None or not PTH.is_file():
        pytest.skip("the lm_eval command or the installed .pth hook is missing (pip install -e '.[lm-eval]')")
    from meg_harness.data import load_cases
    from meg_harness.prompts import get_template
    from meg_harness.store import write_cases_file

    cases = load_cases("counterfact")[:1]
    labels = {p.prompt: ("x", (5,)) for p in cases[0].locality}
    write_cases_file(tmp_path / "cases.json", "counterfact", cases, get_template("gptj"), labels)
    tasks = "counterfact_ke" + (",sst2_meg_local" if SHARED_DATA.is_dir() else "")
    command = [
        lm_eval,
        "--model", "edited",
        "--model_args", f"pretrained={tiny_model_dir('llama')}",
        "--tasks", tasks,
        "--include_path", str(TASKS_PATH),
        "--metadata", f"cases={tmp_path / 'cases.json'}", f"general_data={SHARED_DATA / 'general'}",
        "--device", "cpu", "--batch_size", "4", "--limit", "3",
        "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert set(results["counterfact_ke"]) >= {"score,none", "reliability_tf,none", "generality_ag,none"}
    if SHARED_DATA.is_dir():
        assert 0.0 <= results["sst2_meg_local"]["acc,none"] <= 1.0


LAUNCHERS = {
    "torchrun": ["torchrun", "--nproc_per_node", "2"],
    "accelerate": ["accelerate", "launch", "--multi_gpu", "--num_processes", "2"],  # GPUs hidden below
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_data_parallel_on_cpu(launcher, tiny_model_dir, tmp_path):
    """Two gloo processes split the documents and give the single-process numbers (about a minute)."""
    executable = _command(LAUNCHERS[launcher][0])
    if executable is None or not PTH.is_file():
        pytest.skip(f"{launcher} or the installed .pth hook is missing")
    from dataclasses import replace

    from meg_harness.data import load_cases
    from meg_harness.editing.base import Edited
    from meg_harness.evaluate.evaluator import Evaluator
    from meg_harness.evaluate.protocol import ALL_METRIC_KEYS
    from meg_harness.models import load_model
    from meg_harness.prompts import get_template
    from meg_harness.store import write_cases_file

    model, tokenizer = load_model(str(tiny_model_dir("llama")))
    template = get_template("gptj")
    cases = load_cases("counterfact")[:3]
    evaluator = Evaluator(tokenizer, template, batch_size=4, progress=False)
    labels = evaluator.locality_labels(Edited(model, tokenizer), cases, "tiny")
    first = cases[0].locality[0].prompt
    cases[1] = replace(cases[1], prompt=first, target_new=labels[first].text.strip())
    write_cases_file(tmp_path / "cases.json", "counterfact", cases, template, labels)
    native, _ = evaluator.evaluate(Edited(model, tokenizer), cases, labels)
    command = [
        executable, *LAUNCHERS[launcher][1:], "-m", "lm_eval",
        "--model", "edited", "--model_args", f"pretrained={tiny_model_dir('llama')}",
        "--tasks", "counterfact_ke", "--include_path", str(TASKS_PATH),
        "--metadata", f"cases={tmp_path / 'cases.json'}",
        "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on rank 1" in done.stderr
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    for key in ALL_METRIC_KEYS:
        assert results["counterfact_ke"][f"{key},none"] * 100 == pytest.approx(native[key], abs=1e-9), key
