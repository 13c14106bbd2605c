"""Flags of compress, baselines, pool and train (issue 33): every bad value is one error
naming a flag the command has, before any long work and before any workdir exists;
held-out images that overlap the training data, and a run pooled twice, are refused;
a per-layer flag that names some layers keeps the defaults of the others."""

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import typing

import numpy as np
import pytest
from absl import flags

from graycnn import config
from graycnn.config import PerLayer
from graycnn.study import CompressConfig, baselines, compress, pool, stages
from graycnn.study.config import validate
from graycnn.training import data, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CK = os.path.join(ROOT, "graycnn", "assets", "densenet_tiny_color")


@pytest.fixture
def no_work(monkeypatch):
    """Any data read or model load fails the test: the checks must come first."""

    def fail(*args, **kwargs):
        pytest.fail("work started before the inputs were checked")

    for name in ("color_model", "read_splits", "load_splits"):
        monkeypatch.setattr(stages, name, fail)


@pytest.fixture
def no_model(monkeypatch):
    """The color model is the first long step (loading or training it): must not start."""
    monkeypatch.setattr(
        stages, "color_model", lambda *a, **k: pytest.fail("color model before the checks")
    )


def _refused(cfg: CompressConfig, workdir, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        compress(cfg, str(workdir))
    assert not os.path.exists(workdir)
    return str(info.value)


def _npz(path, split: str, per_class: int, start: int = 0) -> str:
    """`per_class` images per class of cifar10_sample's `split`, as an npz dataset."""
    s = data.load_dataset("cifar10_sample", split)
    idx = np.concatenate(
        [np.flatnonzero(s.labels == c)[start : start + per_class] for c in range(10)]
    )
    np.savez(path, images=s.images[idx], labels=s.labels[idx])
    return f"npz:{path}"


# Per-layer flags: a value naming some layers used to drop the others' defaults
# (`--objective=2:mean --layers=1,2` failed after 36 s with "unknown objective None").

# Independent of the code: each per-layer flag's default per layer (the documented ones).
PER_LAYER_DEFAULTS = {
    "objective": {1: "activation", 2: "activation"},
    "metric": {1: "correlation", 2: "correlation"},
    "num_clusters": {1: 20, 2: 12},
}
A_VALUE = {"objective": "mean", "metric": "mse", "num_clusters": 5}


def _from_argv(*argv: str) -> CompressConfig:
    values = flags.FlagValues()
    config.define_flags(CompressConfig, flag_values=values)
    values(["compress", *argv])
    return config.from_flags(CompressConfig, flag_values=values)


def test_every_per_layer_flag_is_tested():
    hints = typing.get_type_hints(CompressConfig)
    assert {f.name for f in dataclasses.fields(CompressConfig) if hints[f.name] is PerLayer} == set(
        PER_LAYER_DEFAULTS
    )


@pytest.mark.parametrize("field", sorted(PER_LAYER_DEFAULTS))
@pytest.mark.parametrize("how", ["flag", "string", "dict"])
def test_a_per_layer_value_keeps_the_default_of_the_other_layers(field, how):
    value = A_VALUE[field]
    cfg = {
        "flag": lambda: _from_argv(f"--{field}=2:{value}", "--layers=1,2"),
        "string": lambda: CompressConfig(**{field: f"2:{value}"}),
        "dict": lambda: CompressConfig(**{field: {2: value}}),
    }[how]()
    got = getattr(cfg, field)
    assert got.of(1) == PER_LAYER_DEFAULTS[field][1]
    assert got.of(2) == value
    validate(cfg)  # and the whole config is valid: layer 1 has what it needs


def test_a_value_for_every_layer_still_replaces_every_default():
    cfg = _from_argv("--num_clusters=5", "--metric=mse,2:imed", "--objective=kernel")
    assert [cfg.num_clusters.of(k) for k in (1, 2, 3)] == [5, 5, 5]
    assert [cfg.metric.of(k) for k in (1, 2, 3)] == ["mse", "imed", "mse"]
    assert [cfg.objective_of(k) for k in (1, 2)] == ["kernel", "kernel"]
    # An empty count is no count for any layer: DBSCAN's eps rule (as before).
    assert _from_argv("--num_clusters=").num_clusters.of(1) is None


def test_a_layer_named_outside_layers_is_still_refused_and_a_default_one_is_not():
    with pytest.raises(ValueError, match=r"^--metric: layer 2 is not in --layers=1$"):
        validate(_from_argv("--metric=2:mse", "--layers=1"))
    validate(_from_argv("--num_clusters=1:5", "--layers=1"))  # layer 2's 12 is the default
    with pytest.raises(ValueError, match=r"^--objective: no value for layer 1"):
        validate(_from_argv("--objective="))


def test_the_kernel_objective_beyond_the_stem_is_refused_before_any_work(tmp_path, monkeypatch):
    """`--objective=kernel` with a target failed 10 s into the search, at layer 2."""
    message = r"^--objective: 'kernel' compares kernels as images, so only layer 1 .* layer 2 would"
    with monkeypatch.context() as m:  # a model to train: refused before training it
        m.setattr(stages, "color_model", lambda *a, **k: pytest.fail("color model first"))
        cfg = _from_argv("--objective=kernel", "--target_flops=0.5", "--model=resnet20")
        _refused(cfg, tmp_path / "a", message)
    with monkeypatch.context() as m:  # the shipped model, read in seconds: before the search
        m.setattr(stages, "load_splits", lambda *a, **k: pytest.fail("data before the checks"))
        _refused(_from_argv("--objective=kernel", "--target_flops=0.5"), tmp_path / "b", message)
    with pytest.raises(ValueError, match=message + r": give it to layer 1 alone"):
        validate(_from_argv("--objective=kernel", "--layers=1,2"))
    targeted = _from_argv("--objective=kernel", "--target_flops=0.5")
    validate(targeted)  # the plan's layers are not known yet
    with pytest.raises(ValueError, match=message + r" \(a --target_\* may merge any conv\)"):
        validate(targeted, {1: 36, 2: 18, 3: 18})
    validate(_from_argv("--objective=kernel", "--layers=1"))
    validate(_from_argv("--objective=activation,1:kernel", "--target_flops=0.5"), {1: 36, 2: 18})


def test_a_metric_the_fisher_objective_would_not_use_is_refused():
    """--objective=fisher sets its own distances: a --metric for its layer is an error."""
    message = r"^--metric: layer {} uses --objective=fisher, .* \(mse\) would go unused: drop it$"
    with pytest.raises(ValueError, match=message.format(1)):
        validate(_from_argv("--objective=fisher", "--metric=mse", "--layers=1,2"))
    targeted = _from_argv("--objective=2:fisher", "--metric=2:mse", "--target_flops=0.5")
    validate(targeted)  # the plan's layers are not known yet
    with pytest.raises(ValueError, match=message.format(2)):
        validate(targeted, {1: 36, 2: 18, 3: 18})
    validate(_from_argv("--objective=fisher", "--layers=1,2"))
    validate(_from_argv("--objective=1:fisher", "--metric=2:mse", "--layers=1,2"))


# Numeric flags, every one, as a class: checked before any work and any workdir.

# Independent of the code: each numeric field's lowest valid value.
INT_LOWS = {
    "train_epochs": 1, "steps": 1, "compensate_images": 1, "bn_epochs": 1,
    "finetune_epochs": 0, "scratch_epochs": 0, "seeds": 1, "seed": 0, "speed_rounds": 0,
    "speed_batch": 1, "round_to": 0, "search_images": 0,
}  # fmt: skip
# target_*: test_budget_sweep
FLOAT_RULES = {"eps_std": "> 0", "finetune_lr": ">= 0", "bn_lr": "> 0"}


def test_every_numeric_field_of_compress_is_covered():
    hints = typing.get_type_hints(CompressConfig)
    ints = {f.name for f in dataclasses.fields(CompressConfig) if hints[f.name] is int}
    floats = {f.name for f in dataclasses.fields(CompressConfig) if hints[f.name] is float}
    assert ints == set(INT_LOWS) and floats == set(FLOAT_RULES)


def _int_cases():
    for field, low in INT_LOWS.items():
        yield field, low - 1, rf"^--{field} must be >= {low}, got {low - 1}$"
        yield (
            field,
            2**31,
            rf"^--{field} must be <= 2147483647 \(a 32-bit integer\), got 2147483648$",
        )
        yield field, 2.5, rf"^--{field} must be an integer, got 2.5$"


def _float_cases():
    for field, rule in FLOAT_RULES.items():
        bad = [math.nan, math.inf, -math.inf, -1.0] + ([0.0] if rule == "> 0" else [])
        for value in bad:
            yield field, value, rf"^--{field} must be a finite number {rule}, got {value!r}$"


@pytest.mark.parametrize("field, value, message", [*_int_cases(), *_float_cases()])
def test_a_bad_number_names_its_flag_before_any_work(field, value, message, tmp_path, no_work):
    _refused(CompressConfig(**{field: value}), tmp_path / "w", message)


def test_seeds_past_int32_are_refused(tmp_path, no_work):
    cfg = CompressConfig(seed=2**31 - 2, seeds=3)
    _refused(cfg, tmp_path / "w", r"^--seed=2147483646 with --seeds=3 runs seeds up to 2147483648")
    validate(CompressConfig(seed=2**31 - 2, seeds=2))  # the last seed is 2**31 - 1: fine


def test_unknown_model_is_refused_before_training_it(tmp_path, no_work):
    _refused(CompressConfig(model="vgg"), tmp_path / "w", r"^--model: unknown model 'vgg'")


@pytest.mark.parametrize(
    "field, steps_per_epoch", [("bn_epochs", 48), ("finetune_epochs", 48)]
)  # fmt: skip
def test_epochs_past_the_int32_step_counter_name_the_flag(
    field, steps_per_epoch, tmp_path, no_model
):
    # cifar10_sample: 3,085 train images in full batches of 64 (32 per device on the
    # tests' 2 devices); the step counter is int32, so at most 2**31 - 1 steps.
    assert 3085 // 64 == steps_per_epoch
    epochs = 2 * 10**9
    _refused(
        CompressConfig(**{field: epochs}),
        tmp_path / "w",
        rf"^--{field}={epochs} is {epochs * steps_per_epoch} steps \({steps_per_epoch} per epoch\)",
    )


def test_train_epochs_past_the_step_counter_before_training(tmp_path, sample_npz, no_model):
    # sample_npz: 130 train images = 2 batches of 64 per epoch; the color model is trained.
    cfg = CompressConfig(dataset=f"npz:{sample_npz}", train_epochs=2**30, eval_dataset="none")
    _refused(cfg, tmp_path / "w", r"^--train_epochs=1073741824 is 2147483648 steps \(2 per")


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"layers": (1, 99)},
            r"^--layers: layer 99 does not exist: the model has conv layers 1\.\.21",
        ),
        (
            {"layers": (1,)},
            r"^--num_clusters: layer 1 has 16 filters, so its cluster count must be",
        ),
    ],
)
def test_layers_of_a_model_to_train_are_checked_before_training_it(
    changes, message, tmp_path, no_model
):
    # resnet20 has no shipped checkpoint: compress would train it first. It has 21 convs
    # (the stem, 9 blocks of 2, 2 projection shortcuts; the head is dense) and a stem of
    # 16 filters, so the default --num_clusters=1:20 cannot hold.
    extra = {"num_clusters": "1:8"} if "99" in message else {}
    cfg = CompressConfig(model="resnet20", **changes, **extra)
    _refused(cfg, tmp_path / "w", message)


# Data too small for a stage: refused before any work, naming --dataset and the stage.


@pytest.mark.parametrize(
    "per_class, changes, message",
    [
        (2, {}, r"its validation split holds no images"),
        (3, {}, r"its train split holds 20 images, fewer than the batch of 64 that --bn=train"),
        (10, {"bn": "recalibrate"}, r"holds 80 images, fewer than the batch of 128 that "
         r"--bn=recalibrate needs"),
        (3, {"bn": "none", "finetune_epochs": 1}, r"holds 20 images.*--finetune_epochs needs"),
        (3, {"checkpoint": None}, r"holds 20 images.*that training --model=densenet_tiny"),
    ],
)  # fmt: skip
def test_a_dataset_too_small_for_a_stage(per_class, changes, message, tmp_path, no_model):
    dataset = _npz(tmp_path / "small.npz", "train", per_class)
    cfg = CompressConfig(**{"checkpoint": CK, "dataset": dataset, "eval_dataset": "none"} | changes)
    text = _refused(cfg, tmp_path / "w", message)
    assert text.startswith(f"--dataset={dataset}: ")


# Held-out images that overlap the data choices were made on.


def _sha(images) -> set[str]:
    return {hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images}


def test_the_default_held_out_split_of_the_sample_overlaps_nothing():
    """Proof, by an independent hash, that cifar10_sample's test split shares no image
    with its train and validation splits; and the check agrees."""
    splits = {s: data.load_dataset("cifar10_sample", s) for s in ("train", "validation", "test")}
    assert len(_sha(splits["test"].images)) == len(splits["test"]) == 1000
    assert not _sha(splits["test"].images) & (
        _sha(splits["train"].images) | _sha(splits["validation"].images)
    )
    stages.check_data(CompressConfig(), stages.read_splits(CompressConfig()))


def test_the_whole_dataset_as_held_out_is_refused(tmp_path, no_model):
    everything = data.load_dataset("cifar10_sample", "all")
    test = data.load_dataset("cifar10_sample", "test")
    overlap = len(_sha(everything.images) - _sha(test.images))  # train + validation
    assert overlap == 4085
    _refused(
        CompressConfig(eval_dataset="cifar10_sample"),
        tmp_path / "w",
        rf"^--eval_dataset=cifar10_sample: {overlap} of its 5085 images are also in the train "
        r"or validation split of --dataset=cifar10_sample; held-out images must be",
    )


def test_a_partly_overlapping_held_out_set_counts_the_shared_images(tmp_path, no_model):
    train_part = data.load_dataset("cifar10_sample", "validation").images[:7]
    test_part = data.load_dataset("cifar10_sample", "test").images[:13]
    path = tmp_path / "mixed.npz"
    np.savez(path, images=np.concatenate([test_part, train_part]), labels=np.zeros(20, int))
    _refused(
        CompressConfig(checkpoint=CK, eval_dataset=f"npz:{path}"),
        tmp_path / "w",
        r"^--eval_dataset=npz:.*mixed.npz: 7 of its 20 images are also in",
    )


def test_the_training_file_as_its_own_held_out_set_is_refused(tmp_path, sample_npz, no_model):
    cfg = CompressConfig(
        checkpoint=CK, dataset=f"npz:{sample_npz}", eval_dataset=f"npz:{sample_npz}"
    )
    _refused(cfg, tmp_path / "w", r": 160 of its 160 images are also in the train or validation")


# Train and baselines.


def test_train_epochs_past_the_step_counter(tmp_path, sample_npz):
    cfg = train.TrainConfig(model="densenet_test", dataset=f"npz:{sample_npz}", epochs=2 * 10**9)
    with pytest.raises(ValueError, match=r"^--epochs=2000000000 is 4000000000 steps \(2 per epoch"):
        train.train_and_evaluate(cfg, str(tmp_path / "w"))


@pytest.mark.parametrize(
    "models, changes, message",
    [
        ([], {}, r"^--models is empty"),
        (["densenet_test", "densenet_test"], {}, r"^--models lists densenet_test twice$"),
        (["densenet_test", "vgg"], {}, r"^--models: unknown model 'vgg'"),
        (["densenet_test"], {"epochs": 2 * 10**9}, r"^--epochs=2000000000 is 4000000000 steps"),
        (["densenet_test"], {"batch_size": 256}, r"^--batch_size=256 exceeds the 130 train"),
    ],
)
def test_baselines_check_every_input_before_the_first_row(
    models, changes, message, tmp_path, sample_npz
):
    base = dataclasses.replace(train.TrainConfig(), dataset=f"npz:{sample_npz}", **changes)
    with pytest.raises(ValueError, match=message):
        baselines.run_baselines(models, str(tmp_path / "w"), base)
    assert not (tmp_path / "w").exists()


def test_baselines_on_data_too_small(tmp_path):
    dataset = _npz(tmp_path / "two.npz", "train", 2)
    base = dataclasses.replace(train.TrainConfig(), dataset=dataset)
    with pytest.raises(ValueError, match=rf"^--dataset={dataset}: its validation split holds no"):
        baselines.run_baselines(["densenet_test"], str(tmp_path / "w"), base)
    dataset = _npz(tmp_path / "ten.npz", "train", 10)  # 80 train images
    base = dataclasses.replace(base, dataset=dataset)
    with pytest.raises(ValueError, match=r"^--bn=recalibrate needs a batch of 128 train images"):
        baselines.run_baselines(["densenet_test"], str(tmp_path / "w"), base, bn="recalibrate")
    assert not (tmp_path / "w").exists()


# Pool: a run counted twice narrowed the interval with no new evidence.


def _run_dir(root, name: str, **config) -> str:
    """A workdir as a finished compress run leaves it, as far as pooling reads it: its
    report.json and the compared rows' checkpoint directories."""
    workdir = root / name
    report = {
        "config": {"dataset": "cifar10_sample", "eval_dataset": "test", "seed": 0, "seeds": 1,
                   "checkpoint": None, "color_checkpoint": str(workdir / "color_model"),
                   "workdir": str(workdir)} | config,
        "rows": [
            {"name": key, "key": key, "image_type": "gray", "clusters": {}, "bn": "train",
             "control": None, "budget": "bn", "params": 100, "flops": 1000,
             "checkpoint": f"models/{key}", "checkpoints": [f"models/{key}"],
             "examples": 10, "accuracy": 0.5, "accuracies": [0.5]}
            for key in ("merged_1+2", "gray_bn")
        ],
    }  # fmt: skip
    for row in report["rows"]:
        os.makedirs(workdir / row["checkpoint"])
    (workdir / "report.json").write_text(json.dumps(report))
    return str(workdir)


def _check(workdirs):
    return pool.check_runs(workdirs, "merged_1+2", "gray_bn")


def test_pool_refuses_one_run_counted_twice(tmp_path, monkeypatch):
    monkeypatch.setattr(pool, "_evaluate", lambda *_: pytest.fail("evaluated before the checks"))
    a, b = _run_dir(tmp_path, "a"), _run_dir(tmp_path, "b", seed=1)
    assert [r.workdir for r in _check([a, b])] == [a, b]  # other seeds: two runs
    os.symlink(a, tmp_path / "link")
    for again in (a, str(tmp_path / "link"), f"{tmp_path}/b/../a", os.path.relpath(a)):
        with pytest.raises(ValueError, match=rf"^{a} and {again} are the same directory"):
            _check([a, b, again])
    # Another directory, the same settings (its own color model trained the same way).
    c = _run_dir(tmp_path, "c")
    with pytest.raises(ValueError, match=rf"^{a} and {c} hold runs of identical settings"):
        _check([a, c])
    d, e = (_run_dir(tmp_path, n, checkpoint="/m", color_checkpoint="/m") for n in "de")
    with pytest.raises(ValueError, match=rf"^{d} and {e} hold runs of identical settings"):
        _check([d, e])
    assert len(_check([d, _run_dir(tmp_path, "f", checkpoint="/n", color_checkpoint="/n")])) == 2
    with pytest.raises(ValueError, match=r"^--row and --bar are both 'gray_bn'"):
        pool.check_runs([a], "gray_bn", "gray_bn")


def test_pool_names_rows_by_role_across_plans(tmp_path, monkeypatch):
    """Runs planned to a target on other color models have keys of their own plans: the
    role form finds each run's one row of that role and budget, and refuses any other
    count, naming the rows."""
    monkeypatch.setattr(pool, "_evaluate", lambda *_: pytest.fail("evaluated before the checks"))

    def run(name, plan, seed):
        workdir = _run_dir(tmp_path, name, seed=seed)
        path = os.path.join(workdir, "report.json")
        report = json.loads(open(path).read())
        template = report["rows"][0]
        rows = []
        for key, control, budget, baseline, clusters in (
            ("gray_bn", None, "bn", True, {}),
            ("gray_finetune", None, "finetune", True, {}),
            (f"merged_{plan}_raw", None, None, False, {"1": 8}),
            (f"merged_{plan}", None, "bn", False, {"1": 8}),
            (f"merged_{plan}_finetune", None, "finetune", False, {"1": 8}),
            (f"prune_l1_{plan}_finetune", "prune_l1", "finetune", False, {"1": 8}),
            ("gray_refit_finetune", "refit", "finetune", False, {}),
        ):
            rows.append(template | {"key": key, "name": key, "control": control, "budget": budget,
                                    "baseline": baseline, "clusters": clusters,
                                    "checkpoint": f"models/{key}",
                                    "checkpoints": [f"models/{key}"]})  # fmt: skip
            os.makedirs(os.path.join(workdir, "models", key), exist_ok=True)
        open(path, "w").write(json.dumps(report | {"rows": rows}))
        return workdir

    a, b = run("a", "1+2", 0), run("b", "1+3", 1)
    for spec, bar, keys, bar_key in (
        ("merged@finetune", "bar@finetune", ["merged_1+2_finetune", "merged_1+3_finetune"],
         "gray_finetune"),
        ("merged@bn", "bar@bn", ["merged_1+2", "merged_1+3"], "gray_bn"),
        ("merged@none", "gray_bn", ["merged_1+2_raw", "merged_1+3_raw"], "gray_bn"),
        ("prune_l1@finetune", "refit@finetune", ["prune_l1_1+2_finetune", "prune_l1_1+3_finetune"],
         "gray_refit_finetune"),
    ):  # fmt: skip
        checked = pool.check_runs([a, b], spec, bar)
        assert [r.entries[0].key for r in checked] == keys
        assert [r.entries[1].key for r in checked] == [bar_key] * 2
    for spec, message in (
        ("random@finetune", rf"^{a}/report.json has not one row 'random@finetune' but none$"),
        ("merged@ft", r"^row 'merged@ft' is neither a key nor ROLE@BUDGET with ROLE one of "
                      r"merged, bar, refit, random, prune_l1, scratch and BUDGET one of bn, "
                      r"finetune, none$"),
        ("bar@bn", rf"^{a}/report.json: --row 'bar@bn' and --bar 'gray_bn' are both its row "
                   r"'gray_bn': a row compared with itself$"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            pool.check_runs([a, b], spec, "gray_bn")
    report = json.loads(open(os.path.join(b, "report.json")).read())
    report["rows"].append(report["rows"][3] | {"key": "merged_1", "checkpoints": ["models/m"]})
    open(os.path.join(b, "report.json"), "w").write(json.dumps(report))
    with pytest.raises(ValueError, match=rf"^{b}/report.json has not one row 'merged@bn' but 2: "
                                         r"merged_1\+3, merged_1$"):  # fmt: skip
        pool.check_runs([a, b], "merged@bn", "gray_bn")


MUTATIONS = [None, 1, 2.5, "x", [], {}, [1], {"a": 1}, True, -1]


def _paths(report):
    yield ()
    yield ("config",)
    for key in ("dataset", "eval_dataset"):
        yield ("config", key)
    yield ("rows",)
    yield ("rows", 0)
    for key in ("key", "image_type", "accuracy", "accuracies", "checkpoint", "checkpoints"):
        yield ("rows", 0, key)
    yield ("rows", 0, "checkpoints", 0)
    yield ("rows", 0, "accuracies", 0)


def _mutated(report, path, value):
    out = json.loads(json.dumps(report))
    if not path:
        return value
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def test_pool_fuzzed_reports_are_one_error_naming_the_file(tmp_path):
    """Every field of report.json replaced by every wrong kind of value: either the run
    still checks (the value was not needed) or one ValueError naming the workdir."""
    workdir = _run_dir(tmp_path, "a")
    good = json.loads(open(os.path.join(workdir, "report.json")).read())
    for path in _paths(good):
        for value in MUTATIONS:
            with open(os.path.join(workdir, "report.json"), "w") as f:
                json.dump(_mutated(good, path, value), f)
            try:
                _check([workdir])
            except ValueError as e:
                assert workdir in str(e) and "\n" not in str(e), (path, value, e)
            except Exception as e:  # noqa: BLE001 - any other kind is the bug
                pytest.fail(f"{path}={value!r}: {type(e).__name__}: {e}")
    for text in ("", "{", "[]", "null"):
        with open(os.path.join(workdir, "report.json"), "w") as f:
            f.write(text)
        with pytest.raises(ValueError, match=rf"{workdir}/report.json: not"):
            _check([workdir])


# The CLIs: one `error:` line, last, exit status 2, naming a flag the command has, and
# no workdir. One case per command (the library tests above cover the classes), run at
# once, in parallel: each is a fresh Python importing JAX.


@pytest.mark.slow
def test_cli_errors_are_one_last_line_and_leave_no_workdir(tmp_path):
    run = _run_dir(tmp_path, "run")
    os.symlink(run, tmp_path / "again")
    cases = [
        (["experiments.compress", "--seed=-1"], "error: --seed must be >= 0, got -1"),
        (
            ["experiments.compress", "--eval_dataset=cifar10_sample"],
            "error: --eval_dataset=cifar10_sample: 4085 of its 5085 images are also in",
        ),
        (["experiments.baselines", "--models="], "error: --models is empty"),
        (
            ["experiments.train", "--epochs=2000000000"],
            "error: --epochs=2000000000 is 96000000000 steps (48 per epoch)",
        ),
        (
            ["experiments.pool", f"--runs=x={run},{tmp_path / 'again'}"],
            f"error: {run} and {tmp_path / 'again'} are the same directory",
        ),
    ]
    procs = []
    for i, (args, _) in enumerate(cases):
        extra = [] if args[0] == "experiments.pool" else [f"--workdir={tmp_path / f'w{i}'}"]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", *args, *extra],
                cwd=ROOT,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
        )
    for i, ((args, expected), proc) in enumerate(zip(cases, procs, strict=True)):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (args, err[-2000:])
        assert "Traceback" not in err, err[-2000:]
        assert err.strip().splitlines()[-1].startswith(expected), (args, err[-2000:])
        assert [line.startswith("error: ") for line in err.splitlines()].count(True) == 1
        assert not (tmp_path / f"w{i}").exists(), args
