"""Leaderboard rendering: grouping, mean +- std, best per column marked (never the `none` row)."""

import json

from meg_harness.report.leaderboard import collect_rows, render


def _write(root, method, values, std=None, n_edits=4, edit_range=None):
    data = {
        k: v
        for k, v in zip(
            [
                "reliability_ag",
                "reliability_tf",
                "generality_ag",
                "generality_tf",
                "locality_ag",
                "locality_tf",
                "score",
            ],
            values,
        )
    }
    if std is not None:
        data.update({f"{k}_std": std for k in list(data)})
    data.update(
        method=method,
        seeds=[0, 1] if std is not None else [0],
        config={"model": "m", "dataset": "counterfact", "n_edits": n_edits},
        counts={"cases": n_edits},
    )
    if edit_range is not None:
        data["config"].update(data_path="../shared/data/cf-edit.json", range=edit_range)
    (root / method).mkdir(parents=True)
    (root / method / "metrics.json").write_text(json.dumps(data))


def test_markdown_marks_best_edited_method(tmp_path):
    _write(tmp_path, "none", [0, 10, 0, 10, 100, 100, 0])
    _write(tmp_path, "a", [90, 95, 80, 85, 60, 70, 78.5], std=1.25)
    _write(tmp_path, "b", [50, 60, 40, 50, 99, 99, 55.0], std=0.5)
    rows = collect_rows(tmp_path)
    assert [r.method for r in rows] == ["none", "a", "b"]
    md = render(rows, "md")
    line_a = next(line for line in md.splitlines() if line.startswith("| a |"))
    line_b = next(line for line in md.splitlines() if line.startswith("| b |"))
    line_none = next(line for line in md.splitlines() if line.startswith("| none |"))
    assert "**90.00 ± 1.25**" in line_a and "**78.50 ± 1.25**" in line_a
    assert "**99.00 ± 0.50**" in line_b and "60.00 ± 1.25" in line_a
    assert "**" not in line_none  # 100.0 locality of the unedited model is the reference, not a winner


def test_runs_on_different_edit_ranges_are_grouped_apart(tmp_path):
    _write(tmp_path / "dev", "a", [90, 95, 80, 85, 60, 70, 78.5], edit_range=[0, 800])
    _write(tmp_path / "reserved", "a", [50, 60, 40, 50, 99, 99, 55.0], edit_range=[800, 1037])
    md = render(collect_rows(tmp_path), "md")
    headings = [line for line in md.splitlines() if line.startswith("### ")]
    assert headings == [
        "### m · counterfact · 4 edits · cf-edit.json [0, 800)",
        "### m · counterfact · 4 edits · cf-edit.json [800, 1037)",
    ]
    dev, reserved = md.split("### ")[1:]
    assert "| a | 90.00 |" in dev and "55.00" not in dev
    assert "| a | 50.00 |" in reserved and "78.50" not in reserved


def test_starts_with_rates_beside_the_protocol_from_the_average_or_the_seed_files(tmp_path):
    _write(tmp_path, "a", [20, 70, 5, 30, 3, 70, 10.0])
    averaged = json.loads((tmp_path / "a" / "metrics.json").read_text())
    averaged["ag_prefix"] = {"edit": 78.5, "rephrase": 41.0}
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(averaged))
    _write(tmp_path, "b", [30, 70, 5, 30, 3, 70, 12.0])  # an older run: rates in its seed files only
    for seed, rates in ((0, {"edit": 50.0, "rephrase": 20.0}), (1, {"edit": 60.0, "rephrase": 30.0})):
        (tmp_path / "b" / f"seed{seed}").mkdir()
        (tmp_path / "b" / f"seed{seed}" / "metrics.json").write_text(json.dumps({"ag_prefix": rates}))
    _write(tmp_path, "c", [40, 70, 5, 30, 3, 70, 14.0])  # none recorded
    rows = collect_rows(tmp_path)
    md = render(rows, "md")
    assert "| Score | Rel AG starts-with | Gen AG starts-with |" in md
    line = {m: next(x for x in md.splitlines() if x.startswith(f"| {m} |")) for m in "abc"}
    assert line["a"].endswith("| 10.00 | 78.50 | 41.00 |")
    assert line["b"].endswith("| 12.00 | 55.00 | 25.00 |")
    assert line["c"].endswith("| **14.00** | – | – |")  # the starts-with rates are never bold
    assert "the rule of the paper's baseline code" in md
    csv_text = render(rows, "csv")
    assert csv_text.splitlines()[0].endswith(",reliability_ag_starts_with,generality_ag_starts_with")
    assert [x for x in csv_text.splitlines() if ",a," in x][0].endswith(",78.5000,41.0000")
