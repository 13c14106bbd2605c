"""experiments.compress end to end on a tiny model: rows, reload, determinism, safety."""

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import matplotlib.image
import numpy as np
import pytest

from graycnn import study
from graycnn.study import pool, stats
from graycnn.study.config import validate, with_preset
from graycnn.study.figures import charts
from graycnn.training import checkpoint, data, evaluation, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _digest(directory: str) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(pathlib.Path(directory).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def color_checkpoint(tmp_path_factory, sample_npz):
    workdir = str(tmp_path_factory.mktemp("color"))
    config = train.TrainConfig(model="densenet_test", dataset=f"npz:{sample_npz}", epochs=2)
    train.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def held_out_npz(tmp_path_factory):
    """160 images (16 per class) of cifar10_sample's test split: none is in sample_npz,
    which holds training images (compress refuses held-out images it trained on)."""
    split = data.load_dataset("cifar10_sample", "test")
    idx = np.concatenate([np.flatnonzero(split.labels == c)[:16] for c in range(10)])
    path = str(tmp_path_factory.mktemp("held_out") / "held_out.npz")
    np.savez(path, images=split.images[idx], labels=split.labels[idx])
    return path


@pytest.fixture(scope="module")
def config(color_checkpoint, sample_npz, held_out_npz):
    return study.CompressConfig(
        checkpoint=color_checkpoint,
        dataset=f"npz:{sample_npz}",
        layers=(1, 2),
        steps=3,
        num_clusters={1: 5, 2: 3},
        bn="recalibrate",
        compensate="none",  # the default's color refit: test_color_refit_has_its_reference_row
        eval_dataset=f"npz:{held_out_npz}",
        speed_rounds=0,  # timed in tests/test_report_speed.py
    )


@pytest.fixture(scope="module")
def runs(config, color_checkpoint, tmp_path_factory):
    before = _digest(color_checkpoint)
    first = study.compress(config, str(tmp_path_factory.mktemp("a")))
    second = study.compress(config, str(tmp_path_factory.mktemp("b")))
    return before, first, second


@pytest.mark.slow
def test_report_rows_and_files(runs, config):
    _, report, _ = runs
    rows = {r["key"]: r for r in report["rows"]}
    assert [r["name"] for r in report["rows"]][:4] == [
        "color model, color images",
        "color model, gray images (naive)",
        "gray fold (sum), no BN re-estimation",
        "gray + BN re-estimation, no merge",
    ]
    final = rows["merged_1+2"]
    assert final["name"] == "merged layers 1+2 + BN re-estimation"
    assert final["clusters"] == {"1": 5, "2": 3} and final["control"] is None
    assert final["params"] < rows["gray_bn"]["params"] < rows["color"]["params"]
    assert final["flops"] < rows["color"]["flops"]
    assert rows["gray_bn"]["baseline"] and rows["gray_bn"]["budget"] == "bn"
    # Both controls for every merged row, at exactly its widths.
    for names in ("1", "1+2"):
        merged = rows[f"merged_{names}"]
        for control in ("random", "prune_l1"):
            row = rows[f"{control}_{names}"]
            assert row["control"] == control and row["bn"] == merged["bn"] == "recalibrate"
            assert (row["params"], row["flops"]) == (merged["params"], merged["flops"])
    # Paired statistics on every gray row, against the baseline, on validation and the
    # held-out set (here all 160 images of the npz).
    for row in report["rows"]:
        assert set(row) >= {"name", "image_type", "accuracy", "params", "flops", "clusters",
                            "bn", "checkpoint", "control", "eval"}  # fmt: skip
        assert row["eval"]["examples"] == 160
        if row["image_type"] == "color":
            assert "delta" not in row
            continue
        for where in (row, row["eval"]):
            lo, hi = where["ci95"]
            assert lo <= where["delta"] <= hi and 0 <= where["p_value"] <= 1
            assert where["verdict"] == ("above" if lo > 0 else "below" if hi < 0 else "tied")
    assert rows["gray_bn"]["delta"] == 0 and rows["gray_bn"]["ci95"] == [0, 0]
    report_md = open(os.path.join(report["config"]["workdir"], "report.md")).read()
    assert "## Held out" in report_md and "## Verdicts" in report_md


@pytest.mark.slow
def test_pooled_runs_give_each_runs_paired_difference(runs, sample_npz, held_out_npz, tmp_path):
    """Two runs with the same results pooled: the report's own difference (computed by
    the run, not by the pooling), on both splits, and one interval over the stacked runs.
    Two runs of identical settings are refused (one run counted twice), so the second
    is a copy whose report says another seed: the same models, as if that seed had
    drawn the same results."""
    _, first, second = runs
    copy = tmp_path / "seed1"
    shutil.copytree(second["config"]["workdir"], copy)
    report = json.loads((copy / "report.json").read_text())
    report["config"]["seed"] = 1
    (copy / "report.json").write_text(json.dumps(report))
    dirs = [first["config"]["workdir"], str(copy)]
    result = pool.compare_runs(dirs, "merged_1+2", "gray_bn")
    rows = {r["key"]: r for r in first["rows"]}
    assert result["runs"] == 2 and result["held_out_name"] == f"npz:{held_out_npz}"
    for split, reported in (
        ("validation", rows["merged_1+2"]),
        ("held_out", rows["merged_1+2"]["eval"]),
    ):
        got = result[split]
        assert got["delta"] == pytest.approx(reported["delta"], abs=1e-9)
        assert got["per_workdir"] == pytest.approx([reported["delta"]] * 2, abs=1e-9)
    images = data.load_dataset(f"npz:{sample_npz}", "validation")
    correct = {
        key: evaluation.evaluate(
            *checkpoint.load_model(os.path.join(dirs[0], rows[key]["checkpoint"]))[:2],
            images,
            "gray",
        )["correct"]
        for key in ("merged_1+2", "gray_bn")
    }
    expected = stats.compare(
        np.stack([correct["merged_1+2"]] * 2), np.stack([correct["gray_bn"]] * 2)
    )
    assert result["validation"]["ci95"] == pytest.approx(expected["ci95"])
    table = pool.format_table([("same seed", result)])
    assert table.splitlines()[2].startswith("| same seed | 2 | ")
    # One panel per split, a row per setting: 100 dpi of (5 per panel + 1.5, 1.2 + 0.45 per row).
    for held, size in ((result["held_out"], (210, 1150)), (None, (210, 650))):
        settings = [(label, dict(result, held_out=held)) for label in ("same seed", "again")]
        path = charts.plot_pooled(settings, tmp_path / f"pooled_{held is None}.png")
        assert matplotlib.image.imread(path).shape[:2] == size


@pytest.mark.slow
def test_pooling_refuses_what_it_cannot_pair(runs, tmp_path, monkeypatch):
    _, first, _ = runs
    workdir = first["config"]["workdir"]
    with pytest.raises(ValueError, match=r"has no row 'merged_7'; its rows: .*gray_bn"):
        pool.compare_runs([workdir], "merged_7", "gray_bn")
    with pytest.raises(ValueError, match=r"report.json: no such file"):
        pool.compare_runs([workdir, str(tmp_path)], "merged_1+2", "gray_bn")
    report = json.loads(open(os.path.join(workdir, "report.json")).read())
    lost = tmp_path / "lost"  # its report (as another seed's: not the same run), not its models
    lost.mkdir()
    (lost / "report.json").write_text(
        json.dumps(report | {"config": report["config"] | {"seed": 1}})
    )
    with pytest.raises(ValueError, match=r"lost/models/merged_1\+2: no such checkpoint"):
        pool.compare_runs([workdir, str(lost)], "merged_1+2", "gray_bn")
    other = tmp_path / "other"
    other.mkdir()
    report["config"]["eval_dataset"] = "none"
    (other / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match=r"other: dataset and eval_dataset .* the same images"):
        pool.compare_runs([workdir, str(other)], "merged_1+2", "gray_bn")
    with monkeypatch.context() as m:  # a bad last setting stops it before any evaluation
        m.setattr(pool, "_evaluate", lambda *_: pytest.fail("evaluated before every check"))
        with pytest.raises(ValueError, match=r"report.json: no such file"):
            pool.compare_settings(
                [("fine", [workdir]), ("missing", [str(tmp_path)])], "merged_1+2", "gray_bn"
            )
    result = subprocess.run(
        [sys.executable, "-m", "experiments.pool", f"--runs={workdir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --runs: '{workdir}' is not LABEL=WORKDIR[,WORKDIR...]"
    ]
    result = subprocess.run(  # an --out it could not write fails before any evaluation
        [sys.executable, "-m", "experiments.pool", f"--runs=x={workdir}", f"--out={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --out {tmp_path} is a directory; give a file name"
    ]


@pytest.mark.slow
def test_every_row_reloads_to_its_accuracy(runs, config, tmp_path_factory):
    _, report, _ = runs
    workdir = report["config"]["workdir"]
    val = data.load_dataset(config.dataset, "validation")
    everything = data.load_dataset(config.eval_dataset, "all")
    for row in report["rows"]:
        model_config, variables, _ = checkpoint.load_model(os.path.join(workdir, row["checkpoint"]))
        view = {"color": "color", "gray3": "gray3", "gray": "gray"}[row["image_type"]]
        result = evaluation.evaluate(model_config, variables, val, view)
        assert result["accuracy"] == pytest.approx(row["accuracy"], abs=1e-9), row["name"]
        held = evaluation.evaluate(model_config, variables, everything, view)
        assert held["accuracy"] == pytest.approx(row["eval"]["accuracy"], abs=1e-9), row["name"]
    last = {r["key"]: r for r in report["rows"]}["merged_1+2"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.evaluate",
            f"--checkpoint={os.path.join(workdir, last['checkpoint'])}",
            f"--dataset={config.eval_dataset}",
            "--view=gray",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout.splitlines()[-1])
    assert printed["examples"] == last["eval"]["examples"] == 160
    assert printed["accuracy"] == pytest.approx(last["eval"]["accuracy"], abs=1e-12)


@pytest.mark.slow
def test_input_untouched_and_same_seed_same_results(runs, color_checkpoint):
    before, first, second = runs
    assert _digest(color_checkpoint) == before
    strip = lambda rows: [{k: r[k] for k in ("accuracy", "params", "clusters")} for r in rows]  # noqa: E731
    assert strip(first["rows"]) == strip(second["rows"])
    labels = [
        json.load(open(os.path.join(r["config"]["workdir"], "clusters_layer2.json")))
        for r in (first, second)
    ]
    assert labels[0]["labels"] == labels[1]["labels"]


def test_bad_config_is_a_clear_error_before_any_work(config, tmp_path):
    """Every setting that can be checked is checked before work starts: no debris."""
    for changes, message in [
        ({"layers": (1, 1)}, "--layers lists a layer twice"),
        ({"layers": ()}, "--layers is empty"),
        ({"layers": (1, 99), "num_clusters": {1: 5}}, "--layers: layer 99 does not exist: the "
         "model has conv layers 1..10"),
        ({"metric": {2: "cosine"}}, "--metric: unknown value 'cosine'; choose from mse"),
        ({"layers": (1,), "metric": {2: "mse"}}, "--metric: layer 2 is not in --layers=1"),
        ({"fold": "avg"}, "--fold: unknown value 'avg'"),
        ({"num_clusters": {1: 0, 2: 3}}, "--num_clusters: layer 1 has 8 filters, so its "
         "cluster count must be 1..7, got 0"),
        ({"num_clusters": {1: 37, 2: 3}}, "layer 1 has 8 filters"),
        ({"steps": 0}, "--steps must be >= 1"),
        ({"compensate_images": 0}, "--compensate_images must be >= 1"),
        ({"layers": (10,), "num_clusters": {10: 5}}, "cannot be merged|no traced consumers"),
    ]:  # fmt: skip
        workdir = tmp_path / "x"
        with pytest.raises(ValueError, match=message):
            study.compress(dataclasses.replace(config, **changes), str(workdir))
        assert not workdir.exists() or not os.listdir(workdir)
    os.makedirs(tmp_path / "done" / "models")
    with pytest.raises(FileExistsError, match="already holds a compress run"):
        study.compress(config, str(tmp_path / "done"))


@pytest.mark.slow
def test_cli_flag_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.compress", "--layers=1,1", f"--workdir={tmp_path}/w"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "error: --layers lists a layer twice" in result.stderr


@pytest.mark.slow
def test_shipped_pretrained_model_loads_and_is_trained():
    path = ROOT / "graycnn" / "assets" / study.PRETRAINED["densenet_tiny"]
    model_config, variables, _ = checkpoint.load_model(str(path))
    assert (model_config.name, model_config.in_channels) == ("densenet_tiny", 3)
    val = data.load_dataset("cifar10_sample", "validation")
    # 40 epochs on the 3,085 train images of the sample (docs/results.md: 58.6%); chance 10%.
    assert evaluation.evaluate(model_config, variables, val, "color")["accuracy"] > 0.55


@pytest.mark.slow
def test_filter_responses_are_the_conv_outputs_per_filter(sample_npz):
    from graycnn.layers import layer_output_fn
    from graycnn.models import ModelConfig, build_model, init_variables

    config = ModelConfig("densenet_test", in_channels=1)
    model, variables = build_model(config), init_variables(config, jax.random.key(0))
    split = data.load_dataset(f"npz:{sample_npz}", "train")
    responses = study.filter_responses(model, variables, "stem", split, seed=0, count=7)
    assert responses.shape == (8, 7, 32, 32)  # (filters, images, H, W)
    idx = np.random.default_rng(0).permutation(len(split))[:7]
    direct = layer_output_fn(model, "stem")(variables, data.apply_view(split.images[idx], "gray"))
    np.testing.assert_allclose(responses, np.moveaxis(np.asarray(direct), -1, 0), atol=1e-5)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_report(runs, config, tmp_path):
    """A compress killed mid-run, rerun with the same flags into the same workdir,
    finishes with the report an uninterrupted run writes; other flags are refused."""
    _, first, _ = runs
    workdir = tmp_path / "w"
    flags = [
        sys.executable, "-m", "experiments.compress", f"--checkpoint={config.checkpoint}",
        f"--dataset={config.dataset}", f"--eval_dataset={config.eval_dataset}",
        "--layers=1,2", "--steps=3", "--num_clusters=1:5,2:3", "--bn=recalibrate",
        "--compensate=none", "--speed_rounds=0", f"--workdir={workdir}",
    ]  # fmt: skip
    proc = subprocess.Popen(flags, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    try:
        for _ in range(1200):  # until the first merged row's checkpoint is on disk
            if (workdir / "models" / "merged_1").exists() or proc.poll() is not None:
                break
            time.sleep(0.25)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (workdir / "report.json").exists()
    # The rerun in this process (the CLI's flags make the same config, or the workdir's
    # run.json would refuse it), where the fixtures' programs are already compiled.
    study.compress(config, str(workdir))
    resumed = json.loads((workdir / "report.json").read_text())
    keep = ("key", "accuracy", "params", "flops", "clusters", "delta", "ci95")
    strip = lambda rows: [{k: r.get(k) for k in keep} for r in rows]  # noqa: E731
    assert strip(resumed["rows"]) == strip(first["rows"])
    other = "holds a compress run with other settings (bn: 'recalibrate' there, 'none' now)"
    with pytest.raises(FileExistsError, match=re.escape(other)):
        study.compress(dataclasses.replace(config, bn="none"), str(workdir))


def test_study_preset_sets_the_studys_method_and_explicit_flags_win():
    preset = study.CompressConfig(preset="study", layers=(1,))
    config = with_preset(preset)
    assert (config.fields, config.objective_of(1), config.metric_of(1), config.metric_of(2)) == (
        "color_luma", "mean", "mse", "imed")  # fmt: skip
    assert (config.cluster, config.bn_rule, config.bn, config.bn_epochs, config.bn_lr) == (
        "dbscan", "mean", "train", 1, 0.01)  # fmt: skip
    assert config.num_clusters.of(1) == 21  # layer 1 alone; 20 + 12 for layers 1 and 2
    both = with_preset(dataclasses.replace(preset, layers=(1, 2)))
    assert (both.num_clusters.of(1), both.num_clusters.of(2)) == (20, 12)
    assert str(both.metric) == "imed,1:mse"  # the report names what is used
    layer2 = with_preset(dataclasses.replace(preset, layers=(2,)))
    validate(layer2)  # no value for a layer outside --layers
    assert layer2.metric_of(2) == "imed"
    mine = with_preset(dataclasses.replace(preset, bn_rule="moments"), given=["bn_rule"])
    assert mine.bn_rule == "moments" and mine.fields == "color_luma"
    assert with_preset(study.CompressConfig()) == study.CompressConfig()


@pytest.mark.slow
def test_color_refit_has_its_reference_row(config, tmp_path):
    """--compensate=lstsq_color: the merged rows are refit to the color model, and the
    unmerged model given the same refit is a row of its own that every merge is also
    compared with, so the report shows what the refit buys without a merge."""
    cfg = dataclasses.replace(config, layers=(1,), num_clusters={1: 5}, controls=False,
                              compensate="lstsq_color", compensate_images=48)  # fmt: skip
    report = study.compress(cfg, str(tmp_path / "run"))
    assert {e["images"] for e in report["compensation"]} == {48}
    rows = {r["key"]: r for r in report["rows"]}
    refit, bar, merged = rows["gray_refit_bn"], rows["gray_bn"], rows["merged_1"]
    assert refit["control"] == "refit" and not refit.get("baseline") and bar["baseline"]
    assert refit["params"] == bar["params"] and merged["params"] < bar["params"]
    assert refit["name"] == "gray + color refit (lstsq_color), no merge + BN re-estimation"
    for where in (merged, merged["eval"]):
        lo, hi = where["vs_refit"]["ci95"]
        assert lo <= where["vs_refit"]["delta"] <= hi
    assert "vs_refit" not in refit and "vs_refit" not in bar
    # The refit changed the unmerged model's consumers of layer 1, not its stem.
    load = lambda row: checkpoint.load_model(str(tmp_path / "run" / row["checkpoint"]))[1]  # noqa: E731
    a, b = load(refit)["params"], load(bar)["params"]
    np.testing.assert_array_equal(a["stem"]["kernel"], b["stem"]["kernel"])
    ka, kb = (np.asarray(t["transition1"]["conv"]["kernel"]) for t in (a, b))
    assert np.max(np.abs(ka - kb)) > 1e-3
    md = open(tmp_path / "run" / "report.md").read()
    assert "against the same refit without a merge" in md
    assert "against the color model's on the same images in color" in md
