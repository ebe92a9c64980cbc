"""The demo's run config: every method's hparams are the repository's SmolLM2 file (``base:``) with only
the keys the demo YAML overrides, each on a line marked "# demo"; MeG runs its reference settings on the
shipped pseudo-knowledge (disjoint from the demo's records); MALMEN meta-trains on demo records the edits
do not use."""

from __future__ import annotations

import importlib.util
import json
import re
from importlib import resources
from pathlib import Path

import pytest
import yaml

from meg_harness.cli import DEMO_CONFIG, DEMO_FILE_KEYS, DEMO_METHODS, demo_config
from meg_harness.config import load_hparams
from meg_harness.data import demo_path, load_cases
from meg_harness.editing.registry import get_editor_class
from meg_harness.errors import HarnessError
from meg_harness.settings import flatten, read_hparams_file
from meg_harness.shipped import hparams_root
from tests.conftest import REPO_ROOT

DIRS = {
    "meg": "MEG",
    "memit": "MEMIT",
    "alphaedit": "AlphaEdit",
    "pmet": "PMET",
    "ft": "FT",
    "malmen": "MALMEN",
}
DEMO = resources.files("meg_harness") / "data" / "demo"
TEXT = (DEMO / DEMO_CONFIG).read_text(encoding="utf-8")
RAW = yaml.safe_load(TEXT)["hparams"]
PSEUDO = Path(str(DEMO / "counterfact_pseudo_knowledge.json"))


def _overrides(method: str) -> dict:
    """The dotted keys the demo YAML sets for ``method`` (its ``base`` aside), as written."""
    return flatten({k: v for k, v in RAW[method].items() if k != "base"})


def _section_lines(method: str) -> list[str]:
    section = re.search(rf"^  {method}:\n((?:    .*\n|\s*\n)*)", TEXT, flags=re.MULTILINE)
    assert section, method
    return [line for line in section.group(1).splitlines() if line.strip()]


def test_the_demo_runs_every_method_on_its_repository_file():
    assert set(RAW) == set(DEMO_METHODS) - {"none"}
    for method, folder in DIRS.items():
        assert RAW[method]["base"] == f"{folder}/smollm2-135m.yaml"


@pytest.mark.parametrize("method", sorted(DIRS))
def test_demo_hparams_are_the_repository_file_but_the_demo_overrides(method):
    config = demo_config("smollm2-135m", ["none", method])
    demo = flatten(load_hparams(config.hparams[method], method, "demo"))
    repo = flatten(read_hparams_file(hparams_root() / DIRS[method] / "smollm2-135m.yaml"))
    overrides = _overrides(method)
    assert set(demo) == set(repo) | set(overrides)
    assert {k: v for k, v in demo.items() if k not in overrides} == {
        k: v for k, v in repo.items() if k not in overrides
    }
    files = set(DEMO_FILE_KEYS.get(method, ()))
    for key, value in overrides.items():  # as written, or (a shipped file's name) that file
        assert demo[key] == (str(Path(str(DEMO / value))) if key in files else value), key
        # an override that equals the repository's value would be a copy to keep in step
        assert demo[key] != repo.get(key, "absent"), f"{method}: {key} overrides nothing"


@pytest.mark.parametrize("method", sorted(DIRS))
def test_every_demo_override_line_says_why(method):
    """Each line that sets a value (not ``base``, not a section heading) carries a "# demo" comment."""
    leaves = [line for line in _section_lines(method) if not re.match(r"^\s*(base:.*|\w+:\s*)$", line)]
    assert len(leaves) == len(_overrides(method))
    assert all("# demo" in line for line in leaves), [line for line in leaves if "# demo" not in line]


def test_demo_meg_runs_its_reference_settings_on_the_shipped_pseudo_knowledge():
    meg = load_hparams(demo_config("smollm2-135m", ["meg"]).hparams["meg"], "meg", "demo")
    repo = read_hparams_file(hparams_root() / "MEG" / "smollm2-135m.yaml")
    assert meg["encoder"]["tuning"] == repo["encoder"]["tuning"] == "infonce"
    assert meg["familiarity"]["negatives"] == repo["familiarity"]["negatives"] > 0
    assert Path(meg["encoder"]["pairs"]) == PSEUDO and PSEUDO.is_file()
    assert meg["encoder"]["pairs_format"] == "counterfact"
    cases = load_cases("counterfact", PSEUDO)
    assert len(cases) >= meg["familiarity"]["negatives"]  # enough pseudo-irrelevant prompts to draw from


def test_demo_config_builds_every_editor_and_keeps_malmen_training_off_the_edits():
    config = demo_config("smollm2-135m", DEMO_METHODS)
    assert config.methods == DEMO_METHODS and config.n_edits == [16, 32]
    for method in DEMO_METHODS:
        get_editor_class(method)(load_hparams(config.hparams.get(method), method, "demo"))
    malmen = config.hparams["malmen"]
    assert Path(malmen["train_path"]) == demo_path("counterfact")
    train_start, _ = malmen["train_range"]
    assert config.range[1] <= train_start  # the edits come before MALMEN's training records
    assert max(config.n_edits) <= config.range[1] - config.range[0]


def test_demo_config_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is found relative to the working directory
    config = demo_config("smollm2-135m", DEMO_METHODS)
    for method in DIRS:
        assert Path(config.hparams[method]["base"]).is_file()
        load_hparams(config.hparams[method], method, "demo")


def test_demo_rejects_a_method_it_has_no_settings_for():
    with pytest.raises(HarnessError) as error:
        demo_config("smollm2-135m", ["none", "rome"])
    assert error.value.field == "methods"


# ---------------------------------------------------------------- the shipped pseudo-knowledge


def _key(text: str) -> str:
    return " ".join(text.split()).lower()


def test_pseudo_knowledge_shares_no_subject_or_prompt_with_the_demo_records():
    demo = json.loads(demo_path("counterfact").read_text(encoding="utf-8"))
    subjects = {_key(r["requested_rewrite"]["subject"]) for r in demo}
    prompts = {_key(r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"])) for r in demo}
    prompts |= {_key(p) for r in demo for p in r["paraphrase_prompts"] + r["neighborhood_prompts"]}
    records = json.loads(PSEUDO.read_text(encoding="utf-8"))
    assert len(records) == 3000 and PSEUDO.stat().st_size < 1_000_000
    assert not {_key(r["subject"]) for r in records} & subjects
    texts = {_key(r[k]) for r in records for k in ("prompt", "rephrase_prompt", "locality_prompt")}
    assert not texts & prompts


def test_pseudo_knowledge_is_the_documented_cut(shared_data):
    script = REPO_ROOT / "scripts" / "make_demo_pseudo_knowledge.py"
    spec = importlib.util.spec_from_file_location("make_demo_pseudo_knowledge", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = shared_data / "counterfact" / "counterfact-train.json"
    assert module.cut(source) == PSEUDO.read_text(encoding="utf-8")
