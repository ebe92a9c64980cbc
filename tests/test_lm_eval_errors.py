"""The lm-eval models' errors: bad model args and artifacts are found before the model is loaded, and the
``lm_eval`` command prints each as one line (exit code 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from meg_harness.errors import HarnessError  # noqa: E402
from meg_harness.lm_eval_plugin.cli_errors import harness_error_of, running_lm_eval_cli  # noqa: E402
from tests.test_lm_eval_meg import artifact, cases  # noqa: E402, F401  (the tiny MeG artifact fixture)
from tests.test_lm_eval_registration import PTH, _command  # noqa: E402
from tests.test_lm_eval_support import TASKS_PATH  # noqa: E402


@pytest.fixture(scope="module")
def delta_gpt2(tiny_model_dir, tmp_path_factory) -> Path:
    """A weight delta fitted on the tiny GPT-2 (another architecture than the tiny llama)."""
    import torch

    from meg_harness.baselines.delta import DeltaEdited, WeightDelta, save_delta_artifact
    from meg_harness.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir("gpt2")))
    delta = WeightDelta()
    name = "transformer.h.0.mlp.c_proj.weight"
    delta.add(model, name, torch.full_like(model.get_parameter(name), 1e-3))
    folder = tmp_path_factory.mktemp("delta") / "artifact"
    save_delta_artifact(DeltaEdited(model, tokenizer, delta), folder, "memit", None)
    (folder / "editor.json").write_text(json.dumps({"method": "memit", "hparams": {}}))
    return folder


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if HFLM starts loading a model (the error must come first)."""
    from lm_eval.models.huggingface import HFLM

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad argument was found")

    monkeypatch.setattr(HFLM, "__init__", refuse)


def _create(name: str, args: str):
    from lm_eval.api.registry import get_model

    return get_model(name).create_from_arg_string(args, {"batch_size": 2, "device": "cpu"})


def _truncated(source: Path, folder: Path) -> Path:
    import shutil

    shutil.copytree(source, folder)
    tensors = folder / "generator.safetensors"
    if not tensors.is_file():
        tensors = folder / "delta.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    return folder


def test_bad_args_and_artifacts_are_refused_before_the_model_is_loaded(
    tiny_model_dir,
    artifact,  # noqa: F811
    delta_gpt2,
    tmp_path,
    no_model_loading,
):
    llama = tiny_model_dir("llama")
    meg = f"pretrained={llama},meg_path={artifact}"
    expected = {
        ("meg", meg + ",route=sometimes"): r"field 'route': routing must be one of",
        ("meg", meg + ",ddim_steps=-3"): r"ddim_steps must be a positive integer, got -3",
        ("meg", meg + ",template=nonsense"): r"unknown query template 'nonsense'",
        ("meg", f"pretrained={llama}"): r"--model meg needs meg_path=",
        ("meg", f"pretrained={llama},meg_path={tmp_path / 'missing'}"): r"MeG artifact folder does not exist",
        (
            "meg",
            f"pretrained={llama},meg_path={delta_gpt2}",
        ): r"a 'memit' artifact, not MeG's: use `--model edited",
        (
            "meg",
            f"pretrained={llama},meg_path={_truncated(artifact, tmp_path / 'cut')}",
        ): r"generator\.safetensors: "
        r"unreadable tensor file \(truncated",
        (
            "edited",
            f"pretrained={llama},delta={artifact}",
        ): r"a MeG artifact, not a weight edit: use `--model meg",
        ("edited", f"pretrained={llama},delta={tmp_path / 'missing'}"): r"artifact folder does not exist",
        ("edited", f"pretrained={llama},delta={tmp_path}"): r"not an edit artifact",
        (
            "edited",
            f"pretrained={llama},delta={_truncated(delta_gpt2, tmp_path / 'cut2')}",
        ): r"unreadable tensor",
    }
    for (name, args), message in expected.items():
        with pytest.raises(HarnessError, match=message) as error:
            _create(name, args)
        assert "\n" not in str(error.value), str(error.value)


def test_artifacts_of_another_architecture_are_one_harness_error(
    tiny_model_dir,
    artifact,  # noqa: F811
    delta_gpt2,
):
    with pytest.raises(
        HarnessError, match=r"delta's tensor transformer\.h\.0\.mlp\.c_proj\.weight .* does not fit"
    ):
        _create("edited", f"pretrained={tiny_model_dir('llama')},delta={delta_gpt2}")
    with pytest.raises(
        HarnessError, match=r"MeG artifact's neurons .* do not fit|edit does not fit this model"
    ):
        _create("meg", f"pretrained={tiny_model_dir('gpt2')},meg_path={artifact}")


def test_error_display_finds_harness_errors_in_chains_only():
    try:
        try:
            raise HarnessError("bad artifact", file="x")
        except HarnessError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert str(harness_error_of(outer)) == "x: bad artifact"
    assert harness_error_of(ValueError("other")) is None
    assert not running_lm_eval_cli()  # pytest is not the lm_eval command: no hook here


HOOKED = (
    "import sys\n"
    "from meg_harness.errors import HarnessError\n"
    "from meg_harness.lm_eval_plugin.cli_errors import install\n"
    "assert install(force=True)\n"
    "if sys.argv[1] == 'harness':\n"
    "    try:\n"
    "        raise HarnessError('the artifact is of another model', file='a/b', field='delta')\n"
    "    except HarnessError as error:\n"
    "        raise RuntimeError('while loading') from error\n"
    "raise ValueError('a bug')\n"
)


def test_hook_prints_one_line_with_exit_2_and_leaves_other_errors_alone():
    done = subprocess.run(
        [sys.executable, "-c", HOOKED, "harness"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr == "lm_eval: error: a/b, field 'delta': the artifact is of another model\n"
    other = subprocess.run([sys.executable, "-c", HOOKED, "bug"], capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and "Traceback" in other.stderr and "ValueError: a bug" in other.stderr


def _cases_file(folder: Path) -> Path:
    """A valid cases file for counterfact_ke (the task arguments pass their check before loading)."""
    from meg_harness.data import load_cases
    from meg_harness.prompts import get_template
    from meg_harness.store import write_cases_file

    chosen = load_cases("counterfact", None)[:2]
    labels = {p.prompt: ("x", [1]) for case in chosen for p in case.locality}
    return write_cases_file(folder / "cases.json", "counterfact", chosen, get_template("gptj"), labels)


def _lm_eval(model: str, model_args: str, cwd: Path) -> subprocess.CompletedProcess:
    lm_eval = _command("lm_eval")
    if lm_eval is None or not PTH.is_file():
        pytest.skip("the lm_eval command or the installed .pth hook is missing (pip install -e '.[lm-eval]')")
    command = [
        lm_eval, "--model", model, "--model_args", model_args, "--tasks", "counterfact_ke",
        "--include_path", str(TASKS_PATH), "--device", "cpu", "--batch_size", "2",
        "--metadata", f"cases={_cases_file(cwd)}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


# each case is a process of ~20 CPU seconds: one refused before the model is loaded, one after (the other
# cases go the same way; they are checked in-process above)
@pytest.mark.parametrize("case", ["meg-as-delta", "meg-on-gpt2"])
def test_lm_eval_command_prints_one_line_and_exits_2(
    case,
    tiny_model_dir,
    artifact,  # noqa: F811
    delta_gpt2,
    tmp_path,
):
    """The literal `lm_eval` command: argument errors (before loading) and artifacts that do not fit the
    loaded model (after loading) are one line on stderr, exit code 2, no traceback."""
    llama, gpt2 = tiny_model_dir("llama"), tiny_model_dir("gpt2")
    model, args, message = {
        "route": ("meg", f"pretrained={llama},meg_path={artifact},route=sometimes", "routing must be one of"),
        "meg-as-delta": ("edited", f"pretrained={llama},delta={artifact}", "use `--model meg"),
        "delta-of-gpt2": ("edited", f"pretrained={llama},delta={delta_gpt2}", "does not fit this model"),
        "meg-on-gpt2": ("meg", f"pretrained={gpt2},meg_path={artifact}", "not fit"),
    }[case]
    done = _lm_eval(model, args, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("lm_eval: error: ")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-3000:]
    assert done.stderr.rstrip("\n").splitlines()[-1] == errors[0]  # the last word, nothing after it
