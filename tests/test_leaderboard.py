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
