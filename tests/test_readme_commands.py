"""Every command line in README.md's code blocks runs as written, on a tiny model (issue 20, item 4).

Which lines: in the README's shell code blocks (not ``yaml``/``python``), every line (backslash
continuations joined, ``#`` comments dropped) that runs ``lm_eval``, ``meg-harness`` or ``python -m
meg_harness...`` (also behind a launcher: ``accelerate launch -m lm_eval``). :func:`readme_commands` finds
them; :data:`EXPECTED` pins how many there are, so that a new command cannot go unnoticed.

How a command is run, the documented mapping (nothing else is changed):

- the model alias ``smollm2-135m`` is replaced by the folder of a tiny random llama (with a ChatML chat
  template, for ``--apply_chat_template``);
- the working directory is a fresh folder ``W`` whose parent holds ``shared/data/`` with small files in the
  real data's formats and under the real names, so that ``../shared/data/...`` (and the general tasks'
  default, ``../shared/data/general``) resolve to them; ``W/runs/x/meg/seed0/artifact`` is a tiny MeG
  artifact and ``W/runs/x/memit/seed0/artifact`` a tiny weight delta, each with the ``lm_eval_cases.json``
  that ``meg-harness run`` writes into an artifact;
- ``bash -c`` runs the line with this interpreter's ``bin/`` first on PATH, so ``$(meg-harness tasks-path)``
  expands as in a shell. Commands run in README order (the unedited ``lm_eval`` reads the ``cases.json``
  the export command before it writes).

A synopsis line (``[...]`` or ``a|b`` or an upper-case placeholder such as ``CONFIG.yaml``, ``DIR``) runs as
``<its command> --help``. :data:`RULES` lists the commands that are not run, or only with ``-m slow``, each
with its reason (all but the first ``lm_eval`` line are slow: ``pytest -m slow tests/test_readme_commands.py``
runs them). Each command must exit with 0; ``lm_eval`` commands must print their results table.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from meg_harness.lm_eval_plugin.general import BBH_TASKS  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402
from tests.test_lm_eval_general import CHATML  # noqa: E402
from tests.test_lm_eval_meg import artifact, cases  # noqa: E402, F401  (the tiny MeG artifact fixture)

README = REPO_ROOT / "README.md"
ALIAS = "smollm2-135m"
COMMAND = re.compile(r"(^|\s)(lm_eval|meg-harness|-m meg_harness[\w.]*|\S*/meg-harness)(\s|$)")
SYNOPSIS = re.compile(r"\[|\w\|\w|(?<![\w/.-])(?:[A-Z][A-Z_]{2,}|CONFIG\.yaml)(?![\w/.=-])")
EXPECTED = 20  # command lines in README.md: a set-up line, 6 synopses, tasks-path, the export, 10 lm_eval,
# a 4-GPU run


@dataclass(frozen=True)
class Rule:
    pattern: str
    action: str  # skip | slow
    reason: str


RULES = (  # the first rule that matches a line decides
    Rule(r"scripts/setup_venv\.sh", "skip", "sets up a fresh virtual environment (a fresh machine, minutes)"),
    Rule(r"^accelerate launch -m lm_eval", "skip", "lm-eval's multi-GPU launcher: needs GPUs"),
    Rule(r"^torchrun --standalone --nproc_per_node 4", "skip", "a 4-GPU run: needs GPUs"),
    Rule(
        r"^CUDA_VISIBLE_DEVICES= torchrun",
        "skip",
        "a synopsis under a launcher; tests/test_ranks.py runs meg-harness run in 2 gloo processes",
    ),
    Rule(
        r"^CUDA_VISIBLE_DEVICES= accelerate launch",
        "slow",
        "two processes with a model each (gloo); minutes on a 2-core CPU",
    ),
    Rule(
        r"^lm_eval ",
        "slow",
        "an lm_eval process (imports, model, tasks): 1-3 minutes each on a busy 2-core CPU; the first one "
        "runs in the default suite",
    ),
)
EXPORT = "python -m meg_harness.lm_eval_plugin.export cases.json"  # writes what `cases=cases.json` reads


@dataclass(frozen=True)
class Command:
    line: str
    index: int

    @property
    def synopsis(self) -> bool:
        return bool(SYNOPSIS.search(self.line))

    @property
    def rule(self) -> Rule | None:
        return next((r for r in RULES if re.search(r.pattern, self.line)), None)

    def shell(self) -> str:
        """What runs: the line itself, or ``<command> [<subcommand>] --help`` for a synopsis."""
        if self.synopsis:
            words = self.line.split()
            head = words[:2] if words[0] == "meg-harness" else words[:3]
            return " ".join([*head, "--help"])
        return self.line


def readme_commands(text: str) -> list[Command]:
    """The command lines of the README's shell code blocks (see the module docstring)."""
    found: list[str] = []
    for language, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        if language not in ("", "bash", "sh", "console"):
            continue
        lines = body.replace("\\\n", " ").splitlines()
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not language:  # a synopsis block: the command, then its description after 2+ spaces
                line = re.split(r"\s{2,}", line)[0]
            line = re.sub(r"\s+", " ", line)
            if COMMAND.search(line):
                found.append(line)
    return [Command(line, i) for i, line in enumerate(found)]


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))
FIRST_LM_EVAL = next(c.index for c in COMMANDS if c.line.startswith("lm_eval "))


def _param(command: Command, first_lm_eval: int):
    rule, marks = command.rule, []
    if rule is not None and rule.action == "skip":
        marks.append(pytest.mark.skip(reason=rule.reason))
    elif rule is not None and command.index != first_lm_eval:
        marks.append(pytest.mark.slow)
    words = command.line.split()
    return pytest.param(command, marks=marks, id=f"{command.index:02d}-{'-'.join(words[:4])}"[:60])


def test_the_readme_commands_are_found_and_classified():
    assert len(COMMANDS) == EXPECTED, [c.line for c in COMMANDS]
    assert sum(c.synopsis for c in COMMANDS) == 6  # with the 2-process run (CONFIG, OUT)
    lm_eval = [c for c in COMMANDS if re.search(r"(^|-m )lm_eval ", c.line)]
    assert len(lm_eval) == 10 and all("$(meg-harness tasks-path)" in c.line for c in lm_eval)
    # the README's unedited counterfact_ke command has its cases (issue 20: it failed without)
    assert any("--model_args pretrained=smollm2-135m --tasks counterfact_ke" in c.line and "cases=" in c.line
               for c in COMMANDS)  # fmt: skip


# -- the working directory -----------------------------------------------------------------------------------
def _general(folder: Path) -> None:
    """A few records of each local general benchmark, in the shared data's formats and names."""
    folder.mkdir(parents=True)
    reviews = [("a fine film .", 1), ("dull .", 0)]
    sst2 = [{"sentence": s, "label": y, "idx": i} for i, (s, y) in enumerate(reviews)]
    rte = [
        {"sentence1": "Paris is in France.", "sentence2": "Paris is in Europe.", "label": 0, "idx": 0},
        {"sentence1": "The cat sleeps.", "sentence2": "The dog barks.", "label": 1, "idx": 1},
    ]
    mmlu = [
        {"question": f"What is {a} + {a}?", "subject": s, "choices": ["1", str(2 * a), "0", "7"], "answer": 1}
        for a, s in ((2, "elementary_mathematics"), (3, "elementary_mathematics"), (4, "astronomy"))
    ]
    for name, records in (("sst2", sst2), ("rte", rte), ("mmlu", mmlu)):
        (folder / f"{name}.json").write_text(json.dumps(records))
    gsm8k = {
        "question": "Tom has 2 apples and buys 3 more. How many apples has he?",
        "answer": "2+3=5\n#### 5",
    }
    (folder / "gsm8k_test.jsonl").write_text(json.dumps(gsm8k) + "\n")
    (folder / "bbh").mkdir()
    for task in BBH_TASKS:
        example = {"input": "not ( True ) and ( True ) is", "target": "False"}
        (folder / "bbh" / f"{task}.json").write_text(json.dumps({"examples": [example]}))


def _counterfact(path: Path, n: int = 8000) -> None:
    """``n`` synthetic CounterFact records (EasyEdit's flat format): the README's export selects 256 of
    the dev range ``0 8000``."""
    path.parent.mkdir(parents=True)
    records = [
        {
            "case_id": i,
            "prompt": f"The mother tongue of Person {i} is",
            "subject": f"Person {i}",
            "target_new": ["French", "Swahili", "Dutch"][i % 3],
            "ground_truth": "English",
            "rephrase_prompt": f"Person {i} grew up speaking",
            "locality_prompt": f"Person {i + n} is a native speaker of",
            "locality_ground_truth": "English",
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(records))


def _with_cases(folder: Path, model_dir: Path) -> None:
    """The ``lm_eval_cases.json`` a run writes into an artifact (4 demo CounterFact cases, gptj template)."""
    from meg_harness.data import load_cases
    from meg_harness.editing.base import Edited
    from meg_harness.evaluate.evaluator import Evaluator
    from meg_harness.models import load_model
    from meg_harness.prompts import get_template
    from meg_harness.store import CASES_FILE, write_cases_file

    model, tokenizer = load_model(str(model_dir))
    chosen, template = load_cases("counterfact", None)[:4], get_template("gptj")
    labels = Evaluator(tokenizer, template, progress=False).locality_labels(
        Edited(model, tokenizer), chosen, "t"
    )
    write_cases_file(folder / CASES_FILE, "counterfact", chosen, template, labels)


def _delta(folder: Path, model_dir: Path) -> None:
    """A tiny weight delta (as MEMIT saves one) on the tiny llama."""
    import torch

    from meg_harness.baselines.delta import DeltaEdited, WeightDelta, save_delta_artifact
    from meg_harness.models import load_model

    model, tokenizer = load_model(str(model_dir))
    delta = WeightDelta()
    name = "model.layers.0.mlp.down_proj.weight"
    delta.add(model, name, torch.full_like(model.get_parameter(name), 1e-3))
    save_delta_artifact(DeltaEdited(model, tokenizer, delta), folder, "memit", None)
    (folder / "editor.json").write_text(json.dumps({"method": "memit", "hparams": {}}))


@pytest.fixture(scope="module")
def workdir(tiny_model_dir, artifact, tmp_path_factory):  # noqa: F811
    """``(W, tiny model)``: the working directory of the commands (see the module docstring)."""
    root = tmp_path_factory.mktemp("readme")
    model = root / "tiny-chat-llama"
    shutil.copytree(tiny_model_dir("llama"), model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(str(model))
    data = root / "shared" / "data"
    _general(data / "general")
    _counterfact(data / "counterfact" / "counterfact-edit.json")
    for name, target in (("mquake", "mquake/MQuAKE-hard.json"), ("unke", "unke/final_data_v2.json")):
        (data / target).parent.mkdir(parents=True)
        shutil.copy(REPO_ROOT / "tests" / "fixtures" / "data" / f"{name}.json", data / target)
    work = root / "work"
    meg = work / "runs" / "x" / "meg" / "seed0" / "artifact"
    shutil.copytree(artifact, meg)
    _with_cases(meg, model)
    memit = work / "runs" / "x" / "memit" / "seed0" / "artifact"
    _delta(memit, model)
    _with_cases(memit, model)
    return work, model


def _shell(line: str, model: Path) -> str:
    shell = line.replace(ALIAS, str(model))
    return sys.executable + shell[len("python") :] if shell.startswith("python ") else shell


@pytest.mark.parametrize("command", [_param(c, FIRST_LM_EVAL) for c in COMMANDS])
def test_readme_command_runs_as_written(command, workdir):
    work, model = workdir
    shell = _shell(command.shell(), model)
    bin_dir = sysconfig.get_paths()["scripts"]
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("MEG_HARNESS_GENERAL_DATA", None)
    if "cases=cases.json" in shell and not (work / "cases.json").is_file():  # run alone (-k, -m slow)
        export = next(c.line for c in COMMANDS if c.line.startswith(EXPORT))
        subprocess.run(["bash", "-c", _shell(export, model)], cwd=work, env=env, check=True, timeout=1200)
    done = subprocess.run(
        ["bash", "-c", shell], cwd=work, env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, f"{shell}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    if re.search(r"(^|-m )lm_eval ", command.line):
        assert re.search(r"\|\s*Tasks\s*\|", done.stdout), done.stdout[-2000:]


def _module_entry_points() -> list[str]:
    """Every module of the package that runs as ``python -m <module>``."""
    package = REPO_ROOT / "meg_harness"
    return sorted(
        ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
        for path in package.rglob("*.py")
        if 'if __name__ == "__main__":' in path.read_text(encoding="utf-8")
    )


@pytest.mark.parametrize("module", _module_entry_points())
def test_module_entry_points_name_themselves_in_help(module):
    """``python -m X --help`` says ``usage: python -m X`` (the export used to say ``python -m __main__``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: python -m {module} "), done.stdout[:200]
