"""The scratch control (--scratch_epochs): the merged widths trained afresh in gray, and
every merge compared with each control of its budget, the best named."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from graycnn import study
from graycnn.models import build_model
from graycnn.study import schema
from graycnn.training import checkpoint, train


@pytest.fixture(scope="module")
def run(tmp_path_factory, sample_npz):
    color = str(tmp_path_factory.mktemp("color"))
    train.train_and_evaluate(
        train.TrainConfig(model="densenet_test", dataset=f"npz:{sample_npz}", epochs=1), color
    )
    config = study.CompressConfig(
        checkpoint=color,
        dataset=f"npz:{sample_npz}",
        eval_dataset="none",
        layers=(1, 2),
        num_clusters={1: 5, 2: 3},
        bn="recalibrate",
        scratch_epochs=1,
        speed_rounds=0,
        compensate="none",  # the default refit is tests/test_compress.py's subject
    )
    workdir = str(tmp_path_factory.mktemp("run"))
    return workdir, study.compress(config, workdir)


def _rows(report):
    return {r["key"]: r for r in report["rows"]}


def _load(workdir, row):
    return checkpoint.load_model(os.path.join(workdir, row["checkpoint"]))


@pytest.mark.slow
def test_scratch_trains_the_exact_merged_widths_afresh(run):
    workdir, report = run
    rows = _rows(report)
    for names in ("1", "1+2"):
        merged, scratch = rows[f"merged_{names}"], rows[f"scratch_{names}_bn"]
        assert scratch["control"] == "scratch" and scratch["budget"] == "bn"
        assert (scratch["params"], scratch["flops"]) == (merged["params"], merged["flops"])
        m_config, m_vars, _ = _load(workdir, merged)
        s_config, s_vars, _ = _load(workdir, scratch)
        assert dict(s_config.widths) == dict(m_config.widths) and s_config.in_channels == 1
        shapes = jax.tree.map(np.shape, s_vars)
        assert shapes == jax.tree.map(np.shape, m_vars)
        # Afresh: no kernel is the merged model's (a fine-tune of it would stay close).
        kernels = jax.tree.leaves(s_vars["params"]), jax.tree.leaves(m_vars["params"])
        pairs = zip(*kernels, strict=True)
        assert all(not np.allclose(a, b, atol=1e-3) for a, b in pairs if np.ndim(a) == 4)
        build_model(s_config).apply(s_vars, np.zeros(s_config.input_shape, np.float32))


@pytest.mark.slow
def test_every_merge_is_compared_with_each_control_and_the_best_is_named(run):
    workdir, report = run
    rows = _rows(report)
    merged = rows["merged_1+2"]
    against = [c["against"] for c in merged["vs_controls"]]
    assert against == ["random_1+2", "prune_l1_1+2", "scratch_1+2_bn"]
    # Each comparison is the paired difference of the two rows' accuracies, in points.
    for c in merged["vs_controls"]:
        expected = 100 * (merged["accuracy"] - rows[c["against"]]["accuracy"])
        assert c["delta"] == pytest.approx(expected, abs=1e-9)
    best = min(merged["vs_controls"], key=lambda c: c["delta"])
    text = open(os.path.join(workdir, "report.md")).read()
    line = next(x for x in text.splitlines() if x.startswith("- merged layers 1+2"))
    assert f"the best control: {best['against']}" in line
    assert "scratch_1+2_bn" in line and "prune_l1_1+2" in line
    # The typed report reads its comparisons back.
    again = schema.Report.from_json(json.load(open(os.path.join(workdir, "report.json"))))
    row = next(r for r in again.rows if r.key == "merged_1+2")
    assert [c.against for c in row.validation.vs_controls] == against


def test_scratch_epochs_is_checked_before_any_work():
    with pytest.raises(ValueError, match="--scratch_epochs must be >= 0"):
        study.validate(study.CompressConfig(scratch_epochs=-1))


@pytest.mark.slow
def test_shipped_densenet_seed_loads_and_is_trained():
    from graycnn.study.inputs import pretrained_path
    from graycnn.training import data, evaluation

    model_config, variables, extra = checkpoint.load_model(pretrained_path("densenet_seed"))
    assert (model_config.name, model_config.in_channels) == ("densenet_seed", 3)
    assert extra["train"]["epochs"] == 15  # what --scratch_epochs should give it
    # 15 epochs on the sample's 3,085 training images (docs/results.md: 48.6% on the
    # 1,000 validation images); chance is 10%.
    assert extra["val_accuracy"] == pytest.approx(0.486, abs=5e-4)
    # The weights are those: on the first 200 validation images (a fifth of the compute
    # of all 1,000) it is far above chance; one standard error there is 3.5 points.
    val = data.load_dataset("cifar10_sample", "validation")
    val = dataclasses.replace(val, images=val.images[:200], labels=val.labels[:200])
    accuracy = evaluation.evaluate(model_config, variables, val, "color", 200)["accuracy"]
    assert 0.35 < accuracy < 0.65, accuracy
