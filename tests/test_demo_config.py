"""The demo's run config: every method's settings are the repository's SmolLM2 hparams except the lines
marked "demo", and MALMEN meta-trains on demo records the edits do not use."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest
import yaml

from meg_harness.cli import DEMO_CONFIG, DEMO_METHODS, demo_config
from meg_harness.config import load_hparams
from meg_harness.editing.registry import get_editor_class
from meg_harness.errors import HarnessError

REPO = Path(__file__).resolve().parents[1]
HPARAMS = {"memit": "MEMIT", "alphaedit": "AlphaEdit", "pmet": "PMET", "ft": "FT", "malmen": "MALMEN"}
TEXT = (resources.files("meg_harness") / "data" / "demo" / DEMO_CONFIG).read_text(encoding="utf-8")


def _demo_keys(method: str) -> set[str]:
    """Keys on lines marked "# demo" inside ``method``'s section of the hparams."""
    section = re.search(rf"^  {method}:\n((?:    .*\n|\s*\n)*)", TEXT, flags=re.MULTILINE)
    assert section, method
    return set(re.findall(r"^\s+(\w+):.*# demo", section.group(1), flags=re.MULTILINE))


def _flat(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("method", sorted(HPARAMS))
def test_demo_baseline_hparams_are_the_repository_files_but_the_demo_lines(method):
    demo = yaml.safe_load(TEXT)["hparams"][method]
    repo = load_hparams(str(REPO / "hparams" / HPARAMS[method] / "smollm2-135m.yaml"), method, "test")
    differing = {k for k in set(demo) | set(repo) if demo.get(k, "absent") != repo.get(k, "absent")}
    assert differing <= _demo_keys(method), differing - _demo_keys(method)


def test_demo_meg_hparams_match_the_repository_file_where_not_marked():
    demo = _flat(yaml.safe_load(TEXT)["hparams"]["meg"])
    repo = _flat(load_hparams(str(REPO / "hparams" / "MEG" / "smollm2-135m.yaml"), "meg", "test"))
    shared = set(demo) & set(repo)
    differing = {k for k in shared if demo[k] != repo[k]}
    assert {k.rpartition(".")[2] for k in differing} <= _demo_keys("meg"), differing
    assert demo["layer"] == repo["layer"] and demo["generator.preset"] == repo["generator.preset"]


def test_demo_config_builds_every_editor_and_keeps_malmen_training_off_the_edits():
    config = demo_config("smollm2-135m", DEMO_METHODS)
    assert config.methods == DEMO_METHODS and config.n_edits == [16, 32]
    for method in DEMO_METHODS:
        get_editor_class(method)(config.hparams.get(method, {}))
    malmen = config.hparams["malmen"]
    assert Path(malmen["train_path"]).is_file()
    train_start, _ = malmen["train_range"]
    assert config.range[1] <= train_start  # the edits come before MALMEN's training records
    assert max(config.n_edits) <= config.range[1] - config.range[0]


def test_demo_rejects_a_method_it_has_no_settings_for():
    with pytest.raises(HarnessError) as error:
        demo_config("smollm2-135m", ["none", "rome"])
    assert error.value.field == "methods"
