import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from graycnn.models import ModelConfig, init_variables
from graycnn.training import checkpoint, data, evaluation, parallel, train


@pytest.fixture()
def config(sample_npz):
    # 130 train images of 160 -> 2 steps of 64 per epoch.
    return train.TrainConfig(model="densenet_test", dataset=f"npz:{sample_npz}", epochs=1)


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_two_step_train_on_two_host_devices(config, tmp_path):
    assert jax.device_count() == 2
    model_config, variables, history = train.train_and_evaluate(config, str(tmp_path))
    assert model_config.name == "densenet_test" and model_config.in_channels == 3
    assert [h["step"] for h in history] == [2]
    assert np.isfinite(history[0]["train_loss"]) and 0 <= history[0]["val_accuracy"] <= 1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 2
    # The train step really runs sharded: the batch lives on both devices.
    batch_sharding, _ = parallel.mesh_shardings()
    images, labels = parallel.shard_batch(
        batch_sharding, np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.int32)
    )
    assert len(images.sharding.device_set) == 2
    assert images.addressable_shards[0].data.shape == (2, 32, 32, 3)


@pytest.mark.slow
def test_same_seed_same_weights_and_resume_equals_uninterrupted(config, tmp_path):
    two = dataclasses.replace(config, epochs=2)
    _, straight, _ = train.train_and_evaluate(two, str(tmp_path / "a"))
    _, again, _ = train.train_and_evaluate(two, str(tmp_path / "b"))
    _assert_trees_equal(straight, again)
    # A run killed during epoch 2 has only the epoch-1 checkpoint (step 2); restarted with
    # the same flags, it resumes at epoch 2 and ends where the uninterrupted run did.
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    shutil.rmtree(tmp_path / "c" / "checkpoints" / "4")
    _, resumed, history = train.train_and_evaluate(two, str(tmp_path / "c"))
    assert [h["epoch"] for h in history] == [2]
    _assert_trees_equal(straight, resumed)
    other_seed = dataclasses.replace(two, seed=1)
    _, different, _ = train.train_and_evaluate(other_seed, str(tmp_path / "d"))
    assert not np.array_equal(
        different["params"]["stem"]["kernel"], straight["params"]["stem"]["kernel"]
    )


def test_batchnorm_only_training_freezes_the_rest(config, tmp_path, monkeypatch):
    # As batchnorm.reestimate runs it: no validation pass, its caller evaluates.
    config = dataclasses.replace(config, trainable="batchnorm", validate=False)
    model_config = ModelConfig("densenet_test")
    start = jax.device_get(init_variables(model_config, jax.random.key(3)))
    monkeypatch.setattr(train.evaluation, "evaluate", lambda *a, **k: 1 / 0)
    asked = []
    options = train.xla_options.train_compiler_options
    monkeypatch.setattr(
        train.xla_options, "train_compiler_options", lambda k: asked.append(k) or options(k)
    )
    _, end, history = train.train_and_evaluate(config, str(tmp_path), init=(model_config, start))
    assert [h["val_accuracy"] for h in history] == [None] * config.epochs
    assert asked == [False]  # compiled for a step without kernel gradients
    np.testing.assert_array_equal(
        start["params"]["stem"]["kernel"], end["params"]["stem"]["kernel"]
    )
    bn_start, bn_end = (v["params"]["block1"]["layer1"]["bn"]["scale"] for v in (start, end))
    assert not np.array_equal(bn_start, bn_end)


@pytest.mark.slow
def test_bn_only_step_compiled_for_either_convolution_library_gives_the_same_update():
    # kernel_gradients=False only changes the CPU convolution library (YNNPACK, not Eigen).
    from graycnn import graph
    from graycnn.models import build_model

    config = ModelConfig("densenet_test", in_channels=1)
    model, variables = build_model(config), init_variables(config, jax.random.key(0))
    labels_bn = graph.trace(model, variables, config.input_shape).batchnorm_labels(
        variables["params"]
    )
    tx = train.make_optimizer(train.TrainConfig(trainable="batchnorm"), 2, labels_bn)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 32, 32, 3), np.uint8)
    labels = rng.integers(0, 10, 8).astype(np.int32)
    updated = []
    for kernel_gradients in (True, False):
        state = train.TrainState(  # a fresh copy each time: the step donates its state
            np.zeros((), np.int32),
            *jax.tree.map(np.array, (variables["params"], variables["batch_stats"])),
            tx.init(variables["params"]),
        )
        step = train.make_train_step(model, tx, "gray", True, kernel_gradients=kernel_gradients)
        updated.append(jax.device_get(step(state, images, labels, jax.random.key(1))[0]))
    eigen, ynnpack = updated
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        (eigen.params, eigen.batch_stats),
        (ynnpack.params, ynnpack.batch_stats),
    )
    bn_start, bn_end = (
        p["block1"]["layer1"]["bn"]["scale"] for p in (variables["params"], eigen.params)
    )
    assert not np.allclose(bn_start, bn_end)  # the step did train the BatchNorm


def test_evaluate_counts_every_example_once(sample_npz):
    split = data.load_dataset(f"npz:{sample_npz}", "validation")
    model_config = ModelConfig("densenet_test")
    variables = init_variables(model_config, jax.random.key(0))
    logits = np.asarray(
        jax.jit(lambda v, x: __import__("graycnn").models.build_model(model_config).apply(v, x))(
            variables, split.images.astype(np.float32)
        )
    )
    # 8 and 6 per batch: 4 and 3 per device, in the CPU's eval chunks of 4 (3 padded).
    for batch_size in (8, 6):
        result = evaluation.evaluate(model_config, variables, split, "color", batch_size)
        assert result["examples"] == len(split) == 30
        np.testing.assert_array_equal(result["correct"], logits.argmax(-1) == split.labels)
        np.testing.assert_allclose(result["accuracy"], np.mean(result["correct"]))
    with pytest.raises(ValueError, match="view 'gray' gives 1-channel input"):
        evaluation.evaluate(model_config, variables, split, "gray")


def test_checkpoint_round_trip_and_errors(tmp_path):
    model_config = ModelConfig("densenet_test", in_channels=1, widths={"stem": 5})
    variables = jax.device_get(init_variables(model_config, jax.random.key(0)))
    path = checkpoint.save_model(str(tmp_path / "m"), model_config, variables, note="x")
    loaded_config, loaded, extra = checkpoint.load_model(path)
    assert loaded_config == model_config and extra["note"] == "x"
    _assert_trees_equal(variables, loaded)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        checkpoint.save_model(path, model_config, variables)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.load_model(str(tmp_path / "empty"))
    for f in (tmp_path / "m" / "0" / "variables").rglob("*"):
        if f.is_file() and "manifest" in f.name:
            f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        checkpoint.load_model(path)
    bad = jax.tree.map(lambda x: x, variables)
    bad["params"]["stem"]["kernel"] = np.full_like(bad["params"]["stem"]["kernel"], np.nan)
    with pytest.raises(ValueError, match=r"'params'\]\['stem'\]\['kernel'\] holds NaN"):
        checkpoint.save_model(str(tmp_path / "nan"), model_config, bad)


@pytest.mark.slow
def test_distillation_loss_is_the_hinton_formula():
    """One step's loss with a teacher: w T^2 KL(softmax(t/T) || softmax(s/T)) + (1 - w)
    CE(s, labels), the student's logits s in train mode, computed here by hand."""
    import jax.numpy as jnp
    import optax

    from graycnn.models import build_model

    config = ModelConfig("densenet_test", in_channels=1)
    model, variables = build_model(config), init_variables(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), np.uint8)
    labels = np.array([0, 3, 5, 9], np.int32)
    teacher_logits = rng.normal(size=(4, 10)).astype(np.float32) * 3
    temperature, weight = 3.0, 0.7
    tx = optax.sgd(0.0)
    step = train.make_train_step(model, tx, "gray", False, lambda v, x: v, temperature, weight)
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
    )
    s, _ = model.apply(variables, data.apply_view(images, "gray"), train=True,
                       mutable=["batch_stats"])  # fmt: skip
    # The step donates its state, so the reference is computed first.
    _, metrics = step(state, images, labels, jax.random.key(1), jnp.asarray(teacher_logits))
    s = np.asarray(s, np.float64)

    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    p = np.exp(log_softmax(teacher_logits / temperature))
    kl = (p * (np.log(p) - log_softmax(s / temperature))).sum(axis=1).mean()
    ce = -log_softmax(s)[np.arange(4), labels].mean()
    expected = weight * temperature**2 * kl + (1 - weight) * ce
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4)
