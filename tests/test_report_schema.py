"""report.json's schema: a round trip, a report written before versions, refusals.

tests/data/report_v0.json and report_v0.md are a real compress run's report.json and
report.md as written before the schema had a version (densenet_test on 160 images,
--seeds=2 --compensate=lstsq_color --finetune_epochs=1 --controls=false, a held-out
npz).
"""

import copy
import json
import pathlib

import pytest

from graycnn.study import format_report
from graycnn.study.schema import SCHEMA_VERSION, Comparison, Report

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def old():
    return json.loads((DATA / "report_v0.json").read_text())


def _without_against(value):
    """`value` (new JSON) without what version 1 added."""
    if isinstance(value, dict):
        return {k: _without_against(v) for k, v in value.items()
                if k not in ("against", "schema_version")}  # fmt: skip
    if isinstance(value, list):
        return [_without_against(v) for v in value]
    return value


def test_old_report_reads_with_every_number_and_its_comparisons_named(old):
    report = Report.from_json(old, "old/report.json")
    assert "schema_version" not in old
    new = report.to_json()
    assert new["schema_version"] == SCHEMA_VERSION
    assert _without_against(new) == old  # every key and number as written
    assert json.dumps(_without_against(new)) == json.dumps(old)  # in the same order
    merged = report.row("merged_1+2")
    assert merged.validation.vs_bar.against == "gray_bn"
    assert merged.held_out.vs_bar.against == "gray_bn"
    assert merged.validation.vs_refit.against == merged.held_out.vs_refit.against == "gray_refit_bn"
    old_merged = next(r for r in old["rows"] if r["key"] == "merged_1+2")
    assert merged.validation.vs_bar == Comparison(
        against="gray_bn",
        delta=old_merged["delta"],
        ci95=tuple(old_merged["ci95"]),
        p_value=old_merged["p_value"],
        verdict=old_merged["verdict"],
    )
    assert merged.held_out.accuracies == tuple(old_merged["eval"]["accuracies"])
    assert report.row("merged_1+2_finetune").validation.vs_bar.against == "gray_finetune"
    assert report.row("gray_fold").validation.vs_bar.against == "gray_bn"  # before recovery
    assert report.color.validation.vs_bar is None and report.color.held_out.vs_bar is None
    assert report.row("gray_bn").is_bar and not merged.is_bar
    assert merged.clusters == {1: 5, 2: 3} and merged.checkpoint == old_merged["checkpoint"]
    # report.md from the old file is the one the run wrote.
    assert format_report(report) == (DATA / "report_v0.md").read_text()
    assert format_report(old) == format_report(report)


def test_round_trip(old):
    report = Report.from_json(old)
    again = Report.from_json(json.loads(json.dumps(report.to_json())))
    assert again == report
    assert again.to_json() == report.to_json()


def test_one_seed_lists_may_be_missing(old):
    """Reports of one seed once lacked 'checkpoints' and 'accuracies'."""
    row = copy.deepcopy(old["rows"][0])
    del row["checkpoints"], row["accuracies"], row["accuracy_sd"]
    read = Report.from_json(old | {"rows": [row]}).rows[0]
    assert read.checkpoints == (row["checkpoint"],)
    assert read.validation.accuracies == (row["accuracy"],)


def test_a_future_version_is_refused(old):
    with pytest.raises(ValueError, match=r"^r/report.json: schema_version 2 is newer than this"):
        Report.from_json(old | {"schema_version": SCHEMA_VERSION + 1}, "r/report.json")
    for bad in ("1", 0, True, None):
        with pytest.raises(ValueError, match=r"^r/report.json: schema_version is .*, not a "):
            Report.from_json(old | {"schema_version": bad}, "r/report.json")


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        (("rows", 3, "params"), "12", r"rows\[3\] \('gray_bn'\).params is '12', not an integer"),
        (("rows", 3, "eval", "accuracies"), [2], r"rows\[3\] \('gray_bn'\).eval.accuracies is"),
        (("rows", 8, "vs_refit"), {"delta": 1}, r"\('merged_1'\).vs_refit.ci95 is missing, not"),
        (("rows", 0, "clusters"), {"a": 1}, r"rows\[0\] \('color'\).clusters is \{'a': 1\}"),
        (("rows", 2, "verdict"), "up", r"\('gray_fold'\).verdict is 'up', not above or below"),
        (("rows", 1), [], r"rows\[1\] is \[\], not a row"),
        (("compensation", 0, "seed"), None, r"compensation\[0\].seed is None, not an integer"),
        (("config",), [], r"not a compress report \(no config.dataset\)"),
    ],
)
def test_a_malformed_field_is_one_line_naming_the_file_and_the_field(old, where, value, message):
    bad = copy.deepcopy(old)
    node = bad
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    with pytest.raises(ValueError, match=rf"^runs/x/report.json: .*{message}") as error:
        Report.from_json(bad, "runs/x/report.json")
    assert "\n" not in str(error.value)
