"""transfer --target_flops: a head-free search on the training split alone, whose plan
the merged model follows and which meets the target counted on the channel graph."""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from graycnn.models import ModelConfig, init_variables
from graycnn.study import budget as study_budget
from graycnn.study import stages
from graycnn.study.config import CompressConfig
from graycnn.training import checkpoint, data
from graycnn.transfer import TransferConfig, new_head, transfer
from graycnn.transfer import budget as transfer_budget
from graycnn.transfer import run as transfer_run
from graycnn.transfer.report import format_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN_MERGES = transfer_budget.plan_merges
FAST = dict(steps=2, eval_every=2, batch_size=16)


@pytest.fixture(scope="module")
def color_checkpoint(tmp_path_factory) -> str:
    config = ModelConfig("densenet_test", num_classes=10)
    path = str(tmp_path_factory.mktemp("ck") / "color")
    return checkpoint.save_model(path, config, init_variables(config, jax.random.key(3)))


def _npz(path, seed: int = 0, per_class: int = 20) -> str:
    """3 classes of 32x32 gray images: class i bright in band i, noise elsewhere."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (3 * per_class, 32, 32, 1), dtype=np.uint8)
    labels = np.repeat(np.arange(3), per_class)
    for i, label in enumerate(labels):
        images[i, 10 * label : 10 * label + 10] += 150
    np.savez(path, images=images, labels=labels)
    return f"npz:{path}"


def _poisoned(dataset: str, path, labels: bool) -> str:
    """`dataset` with its validation part (the last 20% of each class) replaced by noise,
    the training part untouched; with `labels`, every label rotated too (an eval set:
    the labels choose the split, so a training set keeps them)."""
    split = data.load_dataset(dataset, "all")
    images = split.images.copy()
    for c in range(split.num_classes):
        held = np.flatnonzero(split.labels == c)[-round(np.sum(split.labels == c) * 0.2) :]
        images[held] = np.random.default_rng(c).integers(0, 256, images[held].shape, np.uint8)
    rotated = (split.labels + 1) % split.num_classes
    np.savez(path, images=images, labels=rotated if labels else split.labels)
    return f"npz:{path}"


class _Planned(Exception):
    pass


def _plan_only(monkeypatch, config: TransferConfig) -> dict:
    """The plan the run searches (its to_json), the run stopped right after the search."""
    search, found = PLAN_MERGES, []

    def record(*args):
        found.append(search(*args).to_json())
        raise _Planned

    monkeypatch.setattr(transfer_budget, "plan_merges", record)
    with pytest.raises(_Planned):
        transfer(config)
    return found[0]


@pytest.mark.slow
def test_the_search_reads_neither_validation_nor_eval_data(tmp_path, color_checkpoint, monkeypatch):
    clean = _npz(tmp_path / "train.npz")
    held = _npz(tmp_path / "held.npz", seed=1)
    config = TransferConfig(dataset=clean, eval_dataset=held, checkpoint=color_checkpoint,
                            target_flops=0.6, **FAST)  # fmt: skip
    plan = _plan_only(monkeypatch, config)
    poisoned = _poisoned(clean, tmp_path / "poisoned.npz", labels=False)
    assert not np.array_equal(
        data.load_dataset(poisoned, "validation").images,
        data.load_dataset(clean, "validation").images,
    )
    bad_held = _poisoned(held, tmp_path / "bad_held.npz", labels=True)
    again = _plan_only(
        monkeypatch, dataclasses.replace(config, dataset=poisoned, eval_dataset=bad_held)
    )
    assert plan["steps"] and again == plan  # the steps and every option's drop
    assert plan["selection_accuracy"] == 1.0  # the unmerged model against itself
    assert all(0 <= o["drop"] <= 100 for o in plan["options"])


def test_feature_score_ignores_the_head_and_sees_the_features(tmp_path, color_checkpoint):
    color = stages.Model(*checkpoint.load_model(color_checkpoint))
    train = data.load_dataset(_npz(tmp_path / "d.npz"), "train")
    gray = stages.fold_color_model(CompressConfig(), color, train)
    config, variables = new_head(gray.config, gray.variables, 3, jax.random.key(0))
    score = transfer_budget.feature_score(stages.Model(config, variables), train, seed=0, count=32)
    assert score(variables) == 1.0
    params = jax.tree.map(np.array, variables["params"])
    params["head"]["conv"]["kernel"] = np.ones_like(params["head"]["conv"]["kernel"])
    assert score({**variables, "params": params}) == 1.0  # the classifier is not read
    # The head's BatchNorm to scale 0, bias 0: the features it feeds are all zero, an
    # error of the whole reference (||0 - F|| / ||F|| = 1).
    params["head"]["bn"]["scale"] = np.zeros_like(params["head"]["bn"]["scale"])
    params["head"]["bn"]["bias"] = np.zeros_like(params["head"]["bn"]["bias"])
    assert score({**variables, "params": params}) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_merged_follows_the_plan_and_meets_the_target(tmp_path, color_checkpoint):
    dataset = _npz(tmp_path / "d.npz")
    config = TransferConfig(dataset=dataset, checkpoint=color_checkpoint, target_flops=0.6,
                            **FAST)  # fmt: skip
    report = transfer(config)
    plan, rows = report["plan"], {r["kind"]: r for r in report["rows"]}
    assert plan["target"] == {"flops": 0.6} and plan["achieved"]["flops"] <= 0.6
    # The trained merged model traced on its own (not the planner's channel-graph count).
    fraction = rows["merged"]["flops"] / rows["transfer"]["flops"]
    assert fraction == pytest.approx(plan["achieved"]["flops"], rel=1e-9) and fraction <= 0.6
    assert rows["transfer"]["flops"] == rows["scratch"]["flops"]
    assert [s["layer"] for s in plan["steps"]] == sorted({s["layer"] for s in plan["steps"]})
    steps = ", ".join(f"L{s['layer']}: {s['clusters']}" for s in plan["steps"])
    text = format_report(report)
    assert "Merged plan for --target_flops=0.6 " in text and f"): {steps}; " in text


def test_an_unreachable_target_is_refused_before_any_measurement(
    tmp_path, color_checkpoint, monkeypatch
):
    def measured(*args, **kwargs):
        raise AssertionError("measured or trained for an unreachable target")

    monkeypatch.setattr(study_budget, "_distances", measured)
    monkeypatch.setattr(transfer_run, "train_curve", measured)
    config = TransferConfig(dataset=_npz(tmp_path / "d.npz"), checkpoint=color_checkpoint,
                            target_flops=0.01, **FAST)  # fmt: skip
    with pytest.raises(ValueError, match=r"--target_flops: cannot reach .* 0.25 of their"):
        transfer(config)
    with pytest.raises(ValueError, match=r"--target_flops must be a fraction in \(0, 1\)"):
        TransferConfig(target_flops=1.0)


@pytest.mark.slow
def test_cli_unreachable_target_is_one_error_line(tmp_path, color_checkpoint):
    work = tmp_path / "w"
    out = subprocess.run(
        [sys.executable, "-m", "experiments.transfer", f"--dataset={_npz(tmp_path / 'd.npz')}",
         f"--checkpoint={color_checkpoint}", "--steps=2", "--batch_size=16",
         "--target_flops=0.01", f"--workdir={work}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode != 0 and not os.path.exists(work / "report.json")
    assert out.stderr.strip().splitlines()[-1].startswith("error: --target_flops: cannot reach")
