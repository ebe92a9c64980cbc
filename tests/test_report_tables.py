"""`meg-harness tables`: the paper's tables and figures from synthetic result trees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meg_harness.cli import main
from meg_harness.errors import HarnessError
from meg_harness.evaluate.protocol import ALL_METRIC_KEYS
from meg_harness.report.model_names import canonical_model
from meg_harness.report.tables import write_tables

KEYS = list(ALL_METRIC_KEYS)
MEG_HPARAMS = {
    "layer": 29,
    "familiarity": {"enabled": True, "threshold": 0.1},
    "generator": {"preset": "DiT-B"},
}


def _seed(root: Path, run: str, method: str, seed: int, values, **setting) -> Path:
    """``root/run/method/seed<k>/metrics.json``; ``setting``: model, dataset, n_edits, hparams, range."""
    model = setting.get("model", "smollm2-135m")
    dataset = setting.get("dataset", "counterfact")
    n_edits = setting.get("n_edits", 4)
    folder = root / run / method / f"seed{seed}"
    folder.mkdir(parents=True)
    record = dict(zip(KEYS, values))
    config = {"model": model, "dataset": dataset, "n_edits": n_edits, "methods": [method]}
    if "range" in setting:
        config.update(data_path="data/counterfact-edit.json", range=setting["range"])
    record.update(
        method=method,
        seed=seed,
        config=config,
        counts={"cases": n_edits},
        hparams=setting.get("hparams", {}),
    )
    if "ag_prefix" in setting:
        record["ag_prefix"] = setting["ag_prefix"]
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder


def _lm_eval(root: Path, name: str, model: str, model_args, results: dict, **config) -> Path:
    """An lm-eval results file; ``config``: more of its config (``model_num_parameters``), ``n_shot``."""
    folder = root / "lm_eval" / name / "model"
    folder.mkdir(parents=True)
    path = folder / "results_2026-01-01T00-00-00.000000.json"
    shots, chat = config.pop("n_shot", {}), config.pop("chat_template", None)
    documents = config.pop("n_samples", {})  # task -> (scored, in the task), as lm-eval's n-samples
    record = {
        "results": results,
        "config": {"model": model, "model_args": model_args, **config},
        "n-shot": shots,
        "chat_template": chat,
        "n-samples": {t: {"original": total, "effective": n} for t, (n, total) in documents.items()},
    }
    path.write_text(json.dumps(record))
    return path


def _sweep(root: Path, model="smollm2-135m", dataset="counterfact") -> None:
    folder = root / "sweeps" / dataset
    folder.mkdir(parents=True)
    rows = [
        {"layer": layer, "reliability_ag": value} for layer, value in enumerate([50.0, 75.0, 100.0, 87.5])
    ]
    (folder / "layer_sweep.json").write_text(
        json.dumps({"rows": rows, "meta": {"model": model, "dataset": dataset}})
    )


def _table_line(text: str, first_cell: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))


def _full_tree(root: Path) -> None:
    """Runs at two scales (variants included), a phi-2 run in a paper setting, lm-eval results, a sweep."""
    for n_edits, shift in ((4, 0.0), (8, -10.0)):
        run = f"cf/n{n_edits}"
        _seed(root, run, "none", 0, [0, 2, 0, 3, 100, 100, 0], n_edits=n_edits)
        starts = [{"edit": 92.0, "rephrase": 52.0}, {"edit": 96.0, "rephrase": 60.0}]
        _seed(
            root,
            run,
            "meg",
            0,
            [90, 91, 50, 55, 80, 90, 60 + shift],
            n_edits=n_edits,
            hparams=MEG_HPARAMS,
            ag_prefix=starts[0],
        )
        _seed(
            root,
            run,
            "meg",
            1,
            [94, 95, 54, 59, 84, 94, 64 + shift],
            n_edits=n_edits,
            hparams=MEG_HPARAMS,
            ag_prefix=starts[1],
        )
        _seed(root, run, "memit", 0, [70, 80, 30, 40, 20, 50, 35 + shift], n_edits=n_edits)
    variant = {"base": "hparams/MEG/x.yaml", "familiarity": {"threshold": 0.3}}
    _seed(root, "cf/n4", "meg@eps0.3", 0, [90, 91, 55, 60, 70, 85, 58], hparams=variant)
    phi = {"model": "microsoft/phi-2", "dataset": "zsre", "n_edits": 1024}  # a setting of the paper (Table 9)
    _seed(root, "phi", "meg", 0, [99, 99, 80, 87, 88, 95, 91], **phi, hparams=MEG_HPARAMS)
    _seed(root, "phi", "memit", 0, [97, 98, 69, 84, 23, 69, 57], **phi)
    no_fn = {"base": "hparams/MEG/phi-2.yaml", "familiarity": {"enabled": False}}
    _seed(root, "phi", "meg@no-fn", 0, [99, 99, 83, 89, 53, 83, 81], **phi, hparams=no_fn)
    _sweep(root)


def test_editing_table_mean_std_best_and_no_paper_numbers_for_our_model(tmp_path):
    _full_tree(tmp_path)
    write_tables(tmp_path, tmp_path / "out")
    text = (tmp_path / "out" / "editing_counterfact_smollm2-135m_n4.md").read_text()
    header = "| Method | Rel AG | Rel TF | Gen AG | Gen TF | Loc AG | Loc TF | Score "
    assert header + "| Rel AG starts-with | Gen AG starts-with | Seeds |" in text
    # the starts-with rates: mean over seeds, not bold (not a protocol metric); '–' where not recorded
    assert _table_line(text, "meg").endswith("| 94.00 | 56.00 | 2 |")
    assert _table_line(text, "memit").endswith("| – | – | 1 |")
    assert "the rule of the paper's baseline code" in text
    rows = [
        line.split(" | ")[0][2:] for line in text.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert rows == ["Method", "none", "meg", "memit"]  # variants are not in the main table
    meg = _table_line(text, "meg")
    # seeds 0 and 1: mean of 90 and 94, sample std sqrt(8) = 2.83
    assert "**92.00 ± 2.83**" in meg and "**62.00 ± 2.83**" in meg and meg.endswith("| 2 |")
    assert "70.00" in _table_line(text, "memit") and "**" not in _table_line(text, "none")
    assert "| ↳ paper" not in text and "publishes no numbers" in text


def test_paper_numbers_beside_ours_in_a_matching_setting(tmp_path):
    _full_tree(tmp_path)
    write_tables(tmp_path, tmp_path / "out")
    text = (tmp_path / "out" / "editing_zsre_phi-2_n1024.md").read_text()  # microsoft/phi-2 -> phi-2
    assert "Layout of the paper's Table 9" in text
    lines = text.splitlines()
    memit = lines.index(_table_line(text, "memit"))
    assert lines[memit + 1].startswith("| ↳ paper (Table 9) | *96.97* | *98.25* | *69.34* |")
    assert lines[memit + 1].endswith("| *57.95* | – | – | – |")  # no starts-with rates, no seeds
    ablation = (tmp_path / "out" / "ablation_meg_zsre_phi-2_n1024.md").read_text()
    assert "| meg@no-fn | familiarity.enabled=false |" in ablation
    assert "| ↳ paper (Table 5: w/o FN) | familiarity.enabled=false | *99.71*" in ablation
    assert "↳ paper (Table 16: threshold 0.1)" in ablation  # the reference's threshold is 0.1
    assert "Table 15" not in ablation  # augment.enabled is not among the reference's hparams


def test_ablation_table_and_threshold_figure_of_our_model(tmp_path):
    _full_tree(tmp_path)
    write_tables(tmp_path, tmp_path / "out")
    text = (tmp_path / "out" / "ablation_meg_counterfact_smollm2-135m_n4.md").read_text()
    assert "| meg | (reference) |" in text
    assert "| meg@eps0.3 | familiarity.threshold=0.3 |" in text
    assert "| ↳ paper" not in text
    png = (tmp_path / "out" / "threshold_counterfact_smollm2-135m_n4.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_figures_of_scale_and_layers(tmp_path):
    _full_tree(tmp_path)
    written = {p.name for p in write_tables(tmp_path, tmp_path / "out")}
    assert {"score_vs_scale_smollm2-135m.png", "reliability_vs_layer_smollm2-135m.png"} <= written
    assert "ag_vs_scale_counterfact_smollm2-135m.png" in written  # Rel / Gen / Loc AG, a panel each
    assert not {"score_vs_scale_phi-2.png", "ag_vs_scale_zsre_phi-2.png"} & written  # one scale only
    assert "scale_leaderboard_smollm2-135m.md" in written and "scale_leaderboard_phi-2.md" not in written
    from PIL import Image

    with Image.open(tmp_path / "out" / "ag_vs_scale_counterfact_smollm2-135m.png") as image:
        assert image.size == (3 * 640, 400)  # three panels side by side


def test_general_mquake_and_unke_tables_from_lm_eval_results(tmp_path):
    artifact = _seed(tmp_path, "phi10k", "meg", 0, [95] * 7, model="phi-2", dataset="zsre", n_edits=10000)
    (artifact / "artifact").mkdir()
    unedited = {"bbh_meg": {"exact_match,none": 0.4}, "mmlu_meg": {"acc,none": 0.5, "acc_stderr,none": 0.01}}
    unedited["mmlu_mc"] = {"acc,none": 0.6}  # a large model: the paper's formulation is shown
    _lm_eval(
        tmp_path, "base", "hf", "pretrained=microsoft/phi-2", unedited, model_num_parameters=2_779_683_840
    )
    edited = {
        "bbh_meg": {"exact_match,none": 0.45},
        "mmlu_meg": {"acc,none": 0.25},
        "mquake_ke": {"edit_wise,none": 0.9, "instance_wise,none": 0.8, "multi_hop,none": 0.3},
        "unke_ke": {"reliability_bert_score,none": 0.9, "reliability_rougeL,none": 0.7},
    }
    meg_args = {"pretrained": "microsoft/phi-2", "meg_path": str(artifact / "artifact")}
    _lm_eval(tmp_path, "meg", "meg", meg_args, edited)
    write_tables(tmp_path, tmp_path / "out")
    general = (tmp_path / "out" / "general_phi-2.md").read_text()
    assert "| Task | Before Edit | meg |" in general
    assert "| BBH (paper prompt, generated answer, 3-shot) | 40.00 | **45.00** |" in general
    assert "| MMLU (paper prompt, generated answer, 5-shot) | 50.00 | **25.00** |" in general
    assert "| ↳ paper (Table 3) | *40.58* | *40.67* |" in general  # Phi-2, 10000 ZsRE edits: a paper setting
    assert "| GSM8K (paper prompt, generated answer, 0-shot) | – | – |" in general
    mquake = (tmp_path / "out" / "mquake.md").read_text()
    assert "| meg | zsre, 10000 edits | 90.00 | 80.00 | 30.00 | 1 |" in mquake
    assert "| ↳ paper" not in mquake  # the paper's Table 18 is 1024 MQuAKE edits
    unke = (tmp_path / "out" / "unke.md").read_text()
    assert "FT_ACC (paper's measure)" in unke and "| 90.00 | 70.00 | – | – | – |" in unke


def test_general_table_of_a_small_model_shows_the_loglikelihood_formulation(tmp_path):
    """SmolLM2-135M: MMLU, RTE, SST-2 in lm-eval's loglikelihood formulation (labelled with its shots);
    BBH and GSM8K have only the paper's; the paper's rows are not set beside loglikelihood values."""
    results = {
        "mmlu_meg_local": {"acc,none": 0.23},
        "mmlu_mc_local": {"acc,none": 0.31},
        "rte_meg_local": {"acc,none": 0.0},
        "rte_mc_local": {"acc,none": 0.555},
        "sst2_mc": {"acc,none": 0.56},
        "gsm8k_meg_local": {"exact_match,none": 0.0},
    }
    shots = {"mmlu_mc_local": 0, "rte_mc_local": 0, "sst2_mc": 0}
    _lm_eval(
        tmp_path,
        "base",
        "edited",
        "pretrained=smollm2-135m",
        results,
        model_num_parameters=134_515_008,
        n_shot=shots,
    )
    chat = {"gsm8k_meg_local": {"exact_match,none": 0.5}, "bbh_meg_local": {"exact_match,none": 0.1}}
    _lm_eval(tmp_path, "chat", "edited", "pretrained=smollm2-135m", chat, chat_template="{{ messages }}")
    write_tables(tmp_path, tmp_path / "out")
    general = (tmp_path / "out" / "general_smollm2-135m.md").read_text()
    # a chat-template run is a formulation of its own: it does not replace the plain prompts' value
    assert "| BBH (paper prompt in the chat template, generated answer, 3-shot) | 10.00 |" in general
    assert "| MMLU (loglikelihood, 0-shot) | 31.00 |" in general
    assert (
        "| RTE (loglikelihood, 0-shot) | 55.50 |" in general
        and "| SST-2 (loglikelihood, 0-shot) | 56.00 |" in general
    )
    assert "| GSM8K (paper prompt, generated answer, 0-shot) | 0.00 |" in general
    assert "(0.13B parameters): below 1B parameters lm-eval's loglikelihood" in general
    assert "mmlu_mc_local acc,none" in general and "mmlu_meg_local" not in general


def test_general_rows_compare_only_results_over_equally_many_documents(tmp_path):
    """A subset run (``--limit``/``--samples``) is labelled with its size, and a 3-document unedited run does
    not stand in the row of 27-document edited runs."""
    artifact = _seed(tmp_path, "cf256", "memit", 0, [90, 90, 50, 50, 20, 90, 40], n_edits=256) / "artifact"
    artifact.mkdir()
    bbh = "bbh_meg_local"
    for documents, hits in ((3, 1), (27, 3)):  # two unedited runs: 1 of 3 and 3 of 27 documents right
        results = {bbh: {"exact_match,none": hits / documents}}
        unedited = "pretrained=smollm2-135m"
        _lm_eval(
            tmp_path, f"base{documents}", "edited", unedited, results, n_samples={bbh: (documents, 6511)}
        )
    edited = {"pretrained": "smollm2-135m", "delta": str(artifact)}
    _lm_eval(
        tmp_path, "memit", "edited", edited, {bbh: {"exact_match,none": 2 / 27}}, n_samples={bbh: (27, 6511)}
    )
    write_tables(tmp_path, tmp_path / "out")
    general = (tmp_path / "out" / "general_smollm2-135m.md").read_text()
    row = "| BBH (paper prompt, generated answer, 3-shot, 27 of 6511 documents) | 11.11 | **7.41** |"
    assert row in general, general
    assert "33.33" not in general


def test_native_mquake_and_unke_runs_feed_tables_17_and_18_not_the_leaderboard(tmp_path):
    _seed(tmp_path, "cf", "none", 0, [50] * 7)
    for method, values in (("none", [10.0, 0.0, 0.0]), ("memit", [80.0, 60.0, 5.0])):
        folder = _seed(tmp_path, "mq", method, 0, [], model="phi-2", dataset="mquake", n_edits=1024)
        record = json.loads((folder / "metrics.json").read_text())
        record.update(dict(zip(("edit_wise", "instance_wise", "multi_hop"), values)))
        (folder / "metrics.json").write_text(json.dumps(record))
    folder = _seed(tmp_path, "uk", "meg", 0, [], dataset="unke", n_edits=2)
    record = json.loads((folder / "metrics.json").read_text())
    keys = ("reliability_bert_score", "reliability_rougeL", "generality_bert_score", "generality_rougeL")
    record.update(dict(zip(keys, (91.0, 40.0, 80.0, 30.0))))
    (folder / "metrics.json").write_text(json.dumps(record))
    write_tables(tmp_path, tmp_path / "out")
    mquake = (tmp_path / "out" / "mquake.md").read_text()
    assert "| memit | mquake, 1024 edits | **80.00** | **60.00** | **5.00** | 1 |" in mquake
    assert "| ↳ paper (Table 18) | mquake, 1024 edits | *79.30* | *62.01* | *0.10* |" in mquake
    unke = (tmp_path / "out" / "unke.md").read_text()
    assert "| meg | unke, 2 edits | 91.00 | 40.00 | 80.00 | 30.00 | – | 1 |" in unke  # one method: no bold
    from meg_harness.report.leaderboard import collect_rows
    from meg_harness.report.runs import collect_runs

    assert {run.dataset for run in collect_runs(tmp_path)} == {"counterfact"}  # not in the editing tables
    for run, method in (("cf", "none"), ("mq", "memit")):  # seed-averaged files, as `run` writes them
        seed_file = tmp_path / run / method / "seed0" / "metrics.json"
        (seed_file.parent.parent / "metrics.json").write_text(seed_file.read_text())
    assert {row.group[1] for row in collect_rows(tmp_path)} == {"counterfact"}


def test_regeneration_is_byte_identical_and_free_of_paths(tmp_path):
    _full_tree(tmp_path / "results")
    out = tmp_path / "results" / "tables"  # the default output folder, inside the scanned one
    first = write_tables(tmp_path / "results")
    assert first[-1] == out / "index.md"
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    assert any(name.endswith(".png") for name in snapshot)
    write_tables(tmp_path / "results")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    elsewhere = tmp_path / "elsewhere"
    write_tables(tmp_path / "results", elsewhere)
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == snapshot
    for name, content in snapshot.items():
        if name.endswith(".md"):
            assert str(tmp_path) not in content.decode()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_skipped_tables_are_listed_and_stale_files_removed(tmp_path):
    _seed(tmp_path, "run", "meg", 0, [90, 90, 50, 50, 80, 80, 70])
    _seed(
        tmp_path,
        "run",
        "meg@no-fn",
        0,
        [90, 90, 50, 50, 20, 60, 50],
        hparams={"familiarity": {"enabled": False}},
    )
    write_tables(tmp_path, tmp_path / "out")
    assert (tmp_path / "out" / "ablation_meg_counterfact_smollm2-135m_n4.md").is_file()
    index = (tmp_path / "out" / "index.md").read_text()
    for skipped in ("Table 3 (", "Table 17 (", "Table 18 (", "Table 19 (", "Figures 3-4 (", "Figures 5-7 ("):
        assert f"- {skipped}" in index.split("## Skipped")[1]
    assert "Tables 4-8" not in index.split("## Skipped")[1]
    import shutil

    shutil.rmtree(tmp_path / "run" / "meg@no-fn")
    write_tables(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out" / "ablation_meg_counterfact_smollm2-135m_n4.md").exists()
    assert "- Tables 4-8" in (tmp_path / "out" / "index.md").read_text()


def test_bad_metrics_file_names_file_and_field(tmp_path):
    _seed(tmp_path, "run", "meg", 0, [90, 90, 50, 50, 80, 80, 70])
    bad = _seed(tmp_path, "run", "memit", 0, [90, 90, 50, 50, 80])  # no locality_tf, no score
    with pytest.raises(HarnessError) as error:
        write_tables(tmp_path, tmp_path / "out")
    assert str(bad / "metrics.json") in str(error.value) and "field 'locality_tf'" in str(error.value)
    (bad / "metrics.json").write_text("{not json")
    with pytest.raises(HarnessError, match="unreadable result file"):
        write_tables(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written when an input is bad


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "unreadable result file"),
        (json.dumps({"results": {}, "config": {}}), "field 'config.model'"),
    ],
)
def test_cli_exits_2_with_one_line(tmp_path, capsys, content, needle):
    _seed(tmp_path, "run", "meg", 0, [90, 90, 50, 50, 80, 80, 70])
    path = tmp_path / "lm" / "results_x.json"
    path.parent.mkdir()
    path.write_text(content)
    code = main(["tables", str(tmp_path), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("meg-harness: error: ")
    assert str(path) in captured.err and needle in captured.err
    assert not (tmp_path / "out").exists()


def test_cli_prints_files_written(tmp_path, capsys):
    _seed(tmp_path, "run", "meg", 0, [90, 90, 50, 50, 80, 80, 70])
    assert main(["tables", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    tables = tmp_path / "tables"
    assert printed == [str(tables / "editing_counterfact_smollm2-135m_n4.md"), str(tables / "index.md")]


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(HarnessError, match="no results found"):
        write_tables(tmp_path)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("microsoft/phi-2", "phi-2"),
        ("/models/gpt-j-6B", "gpt-j-6b"),
        ("Phi-2", "phi-2"),
        ("/tmp/x/tiny", "tiny"),
    ],
)
def test_canonical_model_names(name, expected):
    assert canonical_model(name) == expected


def test_dev_and_reserved_edit_ranges_are_separate_settings(tmp_path):
    """Same model, dataset and scale on two index ranges of one file: two tables, and a variant of the dev
    run is compared with the dev run's plain method only."""
    root = tmp_path / "results"
    dev, reserved = {"range": [0, 8000]}, {"range": [8000, 10000]}
    _seed(root, "dev", "meg", 0, [90, 91, 50, 55, 80, 90, 61.5], hparams=MEG_HPARAMS, **dev)
    variant = {"base": "hparams/MEG/x.yaml", "familiarity": {"threshold": 0.3}}
    _seed(root, "dev", "meg@eps0.3", 0, [80, 81, 40, 45, 70, 80, 52.5], hparams=variant, **dev)
    _seed(root, "reserved", "meg", 0, [70, 71, 30, 35, 60, 70, 43.5], hparams=MEG_HPARAMS, **reserved)
    write_tables(root, tmp_path / "out")
    dev_table = (tmp_path / "out" / "editing_counterfact_smollm2-135m_n4_r0-8000.md").read_text()
    reserved_table = (tmp_path / "out" / "editing_counterfact_smollm2-135m_n4_r8000-10000.md").read_text()
    assert "counterfact-edit.json [0, 8000)" in dev_table and "61.50" in _table_line(dev_table, "meg")
    assert "counterfact-edit.json [8000, 10000)" in reserved_table
    assert "43.50" in _table_line(reserved_table, "meg") and "61.50" not in reserved_table
    ablation = (tmp_path / "out" / "ablation_meg_counterfact_smollm2-135m_n4_r0-8000.md").read_text()
    assert "43.50" not in ablation and "61.50" in ablation and "52.50" in ablation
    assert not (tmp_path / "out" / "ablation_meg_counterfact_smollm2-135m_n4_r8000-10000.md").exists()


def _meg_seed(root: Path, n_edits: int, routed_rephrases: int, routed_locality: int) -> None:
    """A MeG seed folder with its fit section and items: 4 probes per kind, AG true for the first 3."""
    folder = _seed(root, f"n{n_edits}", "meg", 0, [90.0] * len(KEYS), n_edits=n_edits, range=[0, 100])
    record = json.loads((folder / "metrics.json").read_text())
    record["fit"] = {
        "collection": {"success_rate": 75.0, "mean_steps": 12.5},
        "generator": {"steps": 600, "evaluations": [{"l2_mean": 3.0}, {"l2_mean": 1.25}]},
    }
    (folder / "metrics.json").write_text(json.dumps(record))
    routed = {"edit": 4, "rephrase": routed_rephrases, "locality": routed_locality}
    items = [
        {"kind": kind, "ag": i < 3, "tf": 1.0, "routed": i < routed[kind]}
        for kind in routed
        for i in range(4)
    ]
    (folder / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))


def test_meg_stages_table_by_scale(tmp_path):
    _meg_seed(tmp_path, 8, routed_rephrases=4, routed_locality=0)
    _meg_seed(tmp_path, 16, routed_rephrases=2, routed_locality=1)
    _seed(tmp_path, "n16", "memit", 0, [50.0] * len(KEYS), n_edits=16, range=[0, 100])  # not MeG: no row
    write_tables(tmp_path, tmp_path / "tables")
    text = (tmp_path / "tables" / "meg_stages_counterfact_smollm2-135m_r0-100.md").read_text()
    rows = {
        line.split(" | ")[0]: line
        for line in text.splitlines()
        if line.startswith("| 8 ") or line.startswith("| 16 ")
    }
    metrics = "| meg | 90.00 | 90.00 | 90.00 | 90.00 "
    stages = "| 75.00 | 12.50 | 1.25 | 600 "  # collected, mean steps, the LAST evaluation's L2, steps
    # routed % edit / rephrase / locality, then AG among the routed rephrases and locality probes
    # (AG holds for the first 3 of 4 probes of each kind)
    assert rows["| 8"] == f"| 8 {metrics}{stages}| 100.00 | 100.00 | 0.00 | 75.00 | – |"
    assert rows["| 16"] == f"| 16 {metrics}{stages}| 100.00 | 50.00 | 25.00 | 100.00 | 100.00 |"
    assert "memit" not in text


def _timed_seed(root: Path, run: str, method: str, seed: int, timings, rss_mb: float, reused=None) -> None:
    """A seed folder with timings, peak memory and (when given) the fit's read-back list."""
    folder = _seed(root, run, method, seed, [50.0] * len(KEYS), n_edits=8, range=[0, 100])
    record = json.loads((folder / "metrics.json").read_text())
    record.update(timings=timings, resources={"peak_rss_mb": rss_mb})
    if reused is not None:
        record["fit"] = {"reused": reused}
    (folder / "metrics.json").write_text(json.dumps(record))


def test_cost_table_sums_seeds_and_adds_the_work_read_back(tmp_path):
    z = {"stage": "z chunks", "read": 2, "total": 4, "seconds": None}
    steps = {"stage": "meta-training steps", "read": 10, "total": 20, "seconds": 1800.0}
    none_read = {"stage": "z chunks", "read": 0, "total": 4, "seconds": None}
    _timed_seed(tmp_path, "n8", "memit", 0, {"fit_s": 3600.0, "generation_s": 600.0}, 2048.0, [z])
    _timed_seed(tmp_path, "n8", "malmen", 0, {"fit_s": 900.0, "teacher_forcing_s": 900.0}, 1024.0, [steps])
    _timed_seed(tmp_path, "n8", "malmen", 1, {"fit_s": 900.0, "teacher_forcing_s": 0.0}, 3072.0, [])
    _timed_seed(tmp_path, "n8", "ft", 0, {"fit_s": 7200.0, "labels_s": 360.0}, 512.0, [none_read])
    _timed_seed(tmp_path, "n8", "pmet", 0, {"fit_s": 1800.0}, 512.0)  # an older result: nothing recorded
    write_tables(tmp_path, tmp_path / "tables")
    text = (tmp_path / "tables" / "costs_counterfact_smollm2-135m_r0-100.md").read_text()
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| 8 ")}
    # fit h, evaluation h (every other *_s), peak GB (largest seed), fit + read-back hours, what was read
    assert rows["memit"] == "| 8 | memit | 1.00 | 0.17 | 2.00 | ≥ 1.00 | z chunks 2/4 |"
    assert rows["malmen"] == "| 8 | malmen | 0.50 | 0.25 | 3.00 | 1.00 | meta-training steps 10/20 (0.50 h) |"
    assert rows["ft"] == "| 8 | ft | 2.00 | 0.10 | 0.50 | 2.00 | nothing |"
    assert rows["pmet"] == "| 8 | pmet | 0.50 | – | 0.50 | ≥ 0.50 | not recorded |"


def test_eval_rows_name_their_cases_and_a_moved_artifact_keeps_its_setting(tmp_path):
    """Table 18 rows name the data file and range of their run (dev and reserved rows apart, the unedited
    model's too); an lm-eval results file whose artifact folder is not here takes the setting the plugin
    recorded (``config.meg_harness_run``) instead of ``?, ? edits``."""
    for run, where, values in (("dev", [0, 300], [1.0, 2.0, 3.0]), ("res", [300, 429], [4.0, 5.0, 6.0])):
        folder = _seed(tmp_path, run, "none", 0, [], dataset="mquake", n_edits=16, range=where)
        record = json.loads((folder / "metrics.json").read_text())
        record.update(dict(zip(("edit_wise", "instance_wise", "multi_hop"), values)))
        record["config"]["data_path"] = "../shared/data/mquake/MQuAKE-hard.json"
        (folder / "metrics.json").write_text(json.dumps(record))
    recorded = {
        "method": "memit",
        "seed": 0,
        "model": "smollm2-135m",
        "dataset": "mquake",
        "n_edits": 16,
        "data_path": "../shared/data/mquake/MQuAKE-hard.json",
        "range": [300, 429],
    }
    args = {"pretrained": "smollm2-135m", "delta": "/elsewhere/res/memit/seed0/artifact"}
    results = {"mquake_ke": {"edit_wise,none": 0.5, "instance_wise,none": 0.25, "multi_hop,none": 0.0}}
    _lm_eval(tmp_path, "moved", "edited", args, results, meg_harness_run=recorded)
    write_tables(tmp_path, tmp_path / "out")
    text = (tmp_path / "out" / "mquake.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| none", "| memit"))]
    assert rows == [
        "| none | – · MQuAKE-hard.json [0, 300), 16 cases | 1.00 | 2.00 | 3.00 | 1 |",
        "| none | – · MQuAKE-hard.json [300, 429), 16 cases | 4.00 | 5.00 | 6.00 | 1 |",
        "| memit | mquake, 16 edits · MQuAKE-hard.json [300, 429) | **50.00** | **25.00** | **0.00** | 1 |",
    ]


def test_scale_leaderboard_takes_each_point_from_the_study_with_most_scales(tmp_path):
    """Score per method and scale, the change from the smallest to the largest scale, and, where two runs
    give one method at one scale, the multi-scale study's run (not the single run sorting first)."""
    where = {"range": [0, 100]}
    for n_edits, memit_score in ((4, 60.0), (8, 42.5)):
        run = f"study/n{n_edits}"
        _seed(tmp_path, run, "none", 0, [0, 2, 0, 3, 100, 100, 0], n_edits=n_edits, **where)
        _seed(tmp_path, run, "memit", 0, [70, 80, 30, 40, 20, 50, memit_score], n_edits=n_edits, **where)
    _seed(tmp_path, "study/n8", "meg", 0, [96, 97, 50, 55, 90, 99, 70.25], n_edits=8, **where)
    _seed(tmp_path, "an_earlier_run", "memit", 0, [10, 10, 10, 10, 10, 10, 10], n_edits=8, **where)
    write_tables(tmp_path, tmp_path / "out")
    text = (tmp_path / "out" / "scale_leaderboard_smollm2-135m.md").read_text()
    assert "## smollm2-135m · counterfact · counterfact-edit.json [0, 100)" in text
    assert _table_line(text, "none") == "| none | 0.00 | 0.00 | +0.00 |"
    assert _table_line(text, "memit") == "| memit | **60.00** | 42.50 | -17.50 |"  # 42.50, not 10.00
    assert _table_line(text, "meg") == "| meg | – | **70.25** | – |"
    assert "| memit | 70.00 / 30.00 / 20.00 | 70.00 / 30.00 / 20.00 |" in text  # Rel / Gen / Loc AG
    assert "**Runs**: 4: study/n4; 8: study/n8." in text
