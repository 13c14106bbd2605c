"""Measured speed in the compress report: every row timed in the same interleaved rounds,
kept in the workdir, typed in report.json and tabulated in report.md; and --export of
the last merged row."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from graycnn import compensate, study
from graycnn.deploy import run_stablehlo
from graycnn.models import build_model
from graycnn.study.schema import Report
from graycnn.study.speed import RowSpeed
from graycnn.training import checkpoint, data


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory, sample_npz):
    """densenet_test trained 1 epoch, layer 1 merged to 5 clusters, 2 rounds of timing."""
    config = study.CompressConfig(
        model="densenet_test", dataset=f"npz:{sample_npz}", eval_dataset="none",
        train_epochs=1, layers=(1,), steps=3, num_clusters={1: 5}, bn="recalibrate",
        speed_rounds=2, speed_batch=8, export=True,
    )  # fmt: skip
    workdir = str(tmp_path_factory.mktemp("run"))
    report = study.compress(config, workdir)
    return config, workdir, report


@pytest.mark.slow
def test_every_row_is_timed_and_merged_rows_name_their_bar(timed_run):
    config, workdir, raw = timed_run
    report = Report.from_json(raw)
    assert raw["config"]["speed"]["batch_sizes"] == [1, 8]
    assert raw["config"]["speed"]["rounds"] == 2
    for row in report.rows:
        assert row.speed is not None and set(row.speed.images_per_second) == {1, 8}
        assert all(v > 0 and np.isfinite(v) for v in row.speed.images_per_second.values())
    merged = report.row("merged_1")
    assert merged.speed.against == "gray_bn" == merged.validation.vs_bar.against
    assert set(merged.speed.speedup) == {1, 8}
    # The bar is its own bar: a speed-up of exactly 1; the color rows have none.
    assert report.row("gray_bn").speed.speedup in (None, {1: 1.0, 8: 1.0})
    assert report.color.speed.speedup is None
    # Rows of one model are timed once: the color model on color and on gray3 images.
    assert report.rows[0].speed.images_per_second == report.rows[1].speed.images_per_second
    # report.md's table, one line per row, from the same numbers.
    md = open(os.path.join(workdir, "report.md")).read()
    table = md.split("## Speed (measured on ")[1].split("\n\n## ")[0]
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(lines) == 1 + len(report.rows)
    merged_line = next(line for line in lines if line.startswith(f"| {merged.name} |"))
    expected = f"{report.row('gray_bn').flops / merged.flops:.2f}x |"
    assert merged_line.endswith(expected)
    assert f"| {merged.speed.speedup[8]:.2f}x |" in merged_line
    assert os.path.getsize(os.path.join(workdir, "figures", "speed.png")) > 0
    assert "speed.png: against measured images per second" in md


@pytest.mark.slow
def test_export_writes_the_last_merged_rows_model(timed_run, sample_npz):
    _, workdir, raw = timed_run
    row = Report.from_json(raw).row("merged_1")
    export = os.path.join(workdir, "export")
    assert sorted(os.listdir(export)) == ["model.stablehlo", "model.tflite", "signature.json"]
    signature = json.load(open(os.path.join(export, "signature.json")))
    assert signature["model"]["widths"]["stem"] == 5 and signature["input"]["view"] == "gray"
    # The artifact against the row's checkpoint, run by Flax here (an independent path).
    config, variables, _ = checkpoint.load_model(os.path.join(workdir, row.checkpoint))
    images = np.asarray(data.apply_view(np.load(sample_npz)["images"][:16], "gray"))
    flax_logits = build_model(config).apply(variables, images, train=False)
    blob = open(os.path.join(export, "model.stablehlo"), "rb").read()
    np.testing.assert_allclose(run_stablehlo(blob, images), flax_logits, atol=1e-4)


@pytest.mark.slow
def test_a_rerun_reports_the_kept_figures_and_refits(timed_run, monkeypatch):
    config, workdir, first = timed_run
    # The refits (each chain's merge, the unmerged model) are kept as complete checkpoints.
    refits = os.path.join(workdir, "refits")
    kept = ["merged.layer1.seed0", "prune_l1.layer1.seed0", "random.layer1.seed0",
            "unmerged.seed0"]  # fmt: skip
    assert sorted(os.listdir(refits)) == kept
    assert all(checkpoint.is_complete(os.path.join(refits, name)) for name in kept)
    # A save killed midway leaves orbax's temporary step alone: that one is made again.
    partial = os.path.join(refits, "random.layer1.seed0")
    _, random_variables, _ = checkpoint.load_model(partial)
    shutil.rmtree(partial)
    os.makedirs(os.path.join(partial, "0.orbax-checkpoint-tmp-1"))
    assert not checkpoint.is_complete(partial)
    # A row's model too: saved again.
    merged = next(r for r in first["rows"] if r["key"] == "merged_1")
    row_model = os.path.join(workdir, merged["checkpoint"])
    shutil.rmtree(row_model)
    os.makedirs(os.path.join(row_model, "0.orbax-checkpoint-tmp-1"))
    calls = []
    real = compensate.compensate_merge
    monkeypatch.setattr(
        compensate, "compensate_merge", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    again = study.compress(config, workdir)  # the same settings: read back, not re-timed
    assert [r["speed"] for r in again["rows"]] == [r["speed"] for r in first["rows"]]
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in first["rows"]]
    assert again["compensation"] == first["compensation"]
    assert len(calls) == 1  # the partial one alone, refit again to the same weights
    assert checkpoint.load_model(row_model)[2]["row"] == merged["name"]
    _, refit_again, _ = checkpoint.load_model(partial)
    for a, b in zip(jax.tree.leaves(random_variables), jax.tree.leaves(refit_again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_row_speed_round_trips_and_refuses_malformed_entries():
    speed = RowSpeed(images_per_second={1: 10.0, 8: 50.0}, against="gray_bn",
                     speedup={1: 1.5, 8: 1.25})  # fmt: skip
    assert RowSpeed.from_json(json.loads(json.dumps(speed.to_json()))) == speed
    for bad in [{"images_per_second": {"1": -1}}, {"images_per_second": {"x": 1}}, [], None]:
        with pytest.raises(ValueError):
            RowSpeed.from_json(bad)
    row = {"key": "k", "name": "n", "image_type": "gray", "clusters": {}, "bn": "none",
           "control": None, "budget": None, "params": 1, "flops": 1, "checkpoint": "m",
           "accuracy": 0.5, "examples": 2}  # fmt: skip
    row["speed"] = {"images_per_second": {"1": "fast"}}
    with pytest.raises(ValueError, match=r"rows\[0\] \('k'\)\.speed is .*batch size: positive"):
        Report.from_json({"rows": [row], "config": {"dataset": "d"}}, "r.json")


def test_the_speed_flags_are_checked():
    for changes, message in [({"speed_rounds": -1}, "--speed_rounds"),
                             ({"speed_batch": 0}, "--speed_batch")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            study.validate(study.CompressConfig(**changes))


@pytest.mark.slow
def test_the_benchmark_times_a_finished_runs_rows_against_their_bar(timed_run):
    from benchmarks import compress_speed

    _, workdir, raw = timed_run
    report = Report.from_json(raw)
    table = compress_speed.run_table(compress_speed.parse_runs([f"x={workdir}"]), 4, 1)
    assert table["batch_sizes"] == [1, 4]
    timed = {r["row"]: r for r in table["rows"]}
    # The BN budget's gray rows: with the default color refit, the unmerged refit too.
    assert set(timed) == {"gray_refit_bn", "merged_1", "random_1", "prune_l1_1"}
    bar = report.row("gray_bn")
    for key, r in timed.items():
        assert r["flops_cut"] == pytest.approx(bar.flops / report.row(key).flops)
        assert r["efficiency"] == pytest.approx(r["speedup"][4] / r["flops_cut"])
    lines = compress_speed.format_table(table)
    assert lines[0].startswith("| run | row | FLOPs cut | speed-up (batch 4) |")
    with pytest.raises(ValueError, match="--runs: 'x=/nope' is not NAME=DIR"):
        compress_speed.parse_runs(["x=/nope"])
