"""docs/check_results.py: results.md's structure, and its marked tables against runs."""

import numpy as np
import pytest

from docs import check_results, lever_table
from graycnn import study
from graycnn.training import data

REPORT = """# graycnn compress report

## Validation (3 images)

| model | accuracy | Δ |
|---|---|---|
| color model | 50.00% | - |
| merged layer 1 | 33.33% | -16.67 |

## Verdicts

- tied.
"""


def _results(report_md: str, lever: str = "") -> str:
    """A results.md holding `report_md`'s tables (and a lever table), marked for run x."""
    body = report_md.split("\n## Verdicts")[0].split("\n", 1)[1].replace("\n## ", "\n### ")
    text = "# Results\n\n## A run\n<!-- check: x -->\n\n    python -m experiments.compress\n"
    text += body
    if lever:
        text += "\n## Levers\n\n`python -m docs.lever_table x=DIR`\n\n<!-- check: lever_table -->\n"
        text += f"{lever}\n"
    return text


def test_results_md_is_structured_and_its_quantities_agree():
    with open(check_results.RESULTS, encoding="utf-8") as f:
        text = f.read()
    assert check_results.structure_problems(text) == []
    assert check_results.quantity_problems() == []
    marked = [name for name, _, _ in check_results.marked_sections(text)]
    assert marked == ["default", "lever_table"]


def test_numbers_without_a_command_and_earlier_splits_are_reported():
    text = (
        "# R\n\nFrom the earlier split.\n"
        "## Timed\n\n3.2 s.\n### Sub\n\n4 s.\n"
        "## Run\n\n`python -m x` gives 5.\n### Sub2\n\n6 s, on the previous split.\n"
        "## Kept\n<!-- current: the same images for both -->\n\n    python y.py\n\n"
        "Earlier split: 7.\n"
    )
    assert check_results.structure_problems(text) == [
        "R: from an earlier split: From the earlier split.",
        "Timed: states numbers but names no command",
        "Sub: states numbers but names no command",
        "Sub2: from an earlier split: 6 s, on the previous split.",
    ]


def test_a_quantity_stated_twice_must_agree(tmp_path, monkeypatch):
    (tmp_path / "a.md").write_text("took 4m19s alone; warm 97-99 s\n")
    (tmp_path / "b.md").write_text("in 2-4 minutes; warm 98-99 s\n")
    monkeypatch.setattr(
        check_results,
        "QUANTITIES",
        {
            "job": [("a.md", r"took (\S+) alone"), ("b.md", r"in (\S+) minutes")],
            "warm": [("a.md", r"warm (\S+) s"), ("b.md", r"warm (\S+) s")],
            "gone": [("a.md", r"never (\d+)")],
        },
    )
    assert check_results.quantity_problems(str(tmp_path)) == [
        "job: a.md says 4m19s, b.md says 2-4",
        "warm: a.md says 97-99, b.md says 98-99",
        r"gone: not found in a.md (/never (\d+)/)",
    ]


def test_marked_tables_equal_the_report_and_a_changed_cell_is_named(tmp_path, capsys):
    (tmp_path / "report.md").write_text(REPORT)
    results = tmp_path / "results.md"
    results.write_text(_results(REPORT))
    argv = ["--results", str(results), "--run", f"x={tmp_path}"]
    assert check_results.main(argv) == 0
    assert capsys.readouterr().out == "## A run [x]: ok\n"
    results.write_text(_results(REPORT.replace("33.33%", "33.34%")))
    assert check_results.main(argv) == 1
    assert capsys.readouterr().out == (
        "## A run [x]: 'Validation (3 images)': row 'merged layer 1', column 'accuracy':"
        " results.md 33.34%, run 33.33%\n"
    )
    assert check_results.main(["--results", str(results), "--run", f"y={tmp_path}"]) == 0
    assert capsys.readouterr().out == "## A run [x]: skipped (no --run x=DIR)\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, sample_npz):
    """A real compress run: densenet_test trained 1 epoch, layer 1 merged to 5 clusters."""
    split = data.load_dataset("cifar10_sample", "test")
    idx = np.concatenate([np.flatnonzero(split.labels == c)[:8] for c in range(10)])
    held_out = str(tmp_path_factory.mktemp("held_out") / "held_out.npz")
    np.savez(held_out, images=split.images[idx], labels=split.labels[idx])
    config = study.CompressConfig(
        model="densenet_test",
        dataset=f"npz:{sample_npz}",
        eval_dataset=f"npz:{held_out}",
        train_epochs=1,
        layers=(1,),
        steps=3,
        num_clusters={1: 5},
        bn="recalibrate",
        controls=False,
        speed_rounds=0,
    )
    workdir = str(tmp_path_factory.mktemp("run"))
    study.compress(config, workdir)
    return workdir


@pytest.mark.slow
def test_a_real_runs_tables_check_and_one_changed_number_is_found(tiny_run, tmp_path, capsys):
    with open(f"{tiny_run}/report.md", encoding="utf-8") as f:
        report_md = f.read()
    lever = lever_table.table([("x", tiny_run)])
    results = tmp_path / "results.md"
    results.write_text(_results(report_md, lever))
    argv = ["--results", str(results), "--run", f"x={tiny_run}"]
    assert check_results.main(argv) == 0
    assert capsys.readouterr().out == "## A run [x]: ok\n## Levers [x]: ok\n"

    # One accuracy of the merged row, changed in both tables.
    title, shown = next(t for t in check_results.tables(report_md) if t[0].startswith("Valid"))
    name = "merged layer 1 (lstsq_color) + BN re-estimation"  # the default's color refit
    merged = next(row for row in shown if row[0] == name)
    accuracy = merged[2]
    wrong = f"{float(accuracy.rstrip('%')) + 0.01:.2f}%"
    row_text = "| " + " | ".join(merged) + " |"
    lever_row = next(r for r in lever.splitlines() if "| merged L1:5 |" in r)
    bad_lever = (
        lever_row.rsplit(" | ", 2)[0] + " | +9.9 [+9.9, +9.9] | " + lever_row.rsplit(" | ", 1)[1]
    )
    text = _results(report_md, lever).replace(row_text, row_text.replace(accuracy, wrong))
    results.write_text(text.replace(lever_row, bad_lever))
    assert check_results.main(argv) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"## A run [x]: '{title}': row '{merged[0]}', column 'accuracy':"
        f" results.md {wrong}, run {accuracy}"
    )
    assert out[1].startswith("## Levers [x]: row 'x | bn | merged L1:5', column 'validation':")
    assert "results.md +9.9 [+9.9, +9.9], run " in out[1]
