import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graycnn import models
from graycnn.layers import layer_output_fn
from graycnn.study import stages
from graycnn.study.config import CompressConfig
from graycnn.training import bn_reestimate, data


class _Net(nn.Module):
    """Conv -> BN (an unusual momentum) -> head, registered as a test model below."""

    num_classes: int = 10
    widths: tuple = ()

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv")(x / 255.0)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.3, name="bn")(x)
        return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))


@pytest.fixture()
def net(monkeypatch):
    monkeypatch.setitem(models.TEST_MODELS, "bn_net", _Net)
    monkeypatch.setitem(models._ALL, "bn_net", _Net)
    return models.ModelConfig("bn_net")


def test_recalibrate_is_the_exact_mean_of_batch_statistics(net, sample_npz):
    """Twice, with other weights: the second call reuses the momentum the first read."""
    split = data.load_dataset(f"npz:{sample_npz}", "train")
    conv = jax.jit(layer_output_fn(models.build_model(net), "conv"))
    batches = list(data.iterate_batches(split, 32, seed=5, drop_remainder=True))[:3]
    for key in (0, 1):
        variables = models.init_variables(net, jax.random.key(key))
        out = bn_reestimate.recalibrate(
            net, variables, split, "color", num_batches=3, batch_size=32, augment=False, seed=5
        )
        means, variances = [], []
        for images, _, _ in batches:
            y = np.asarray(conv(variables, jnp.asarray(images, jnp.float32)), np.float64)
            means.append(y.mean((0, 1, 2)))
            variances.append(y.var((0, 1, 2)))
        np.testing.assert_allclose(
            out["batch_stats"]["bn"]["mean"], np.mean(means, 0), rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(
            out["batch_stats"]["bn"]["var"], np.mean(variances, 0), rtol=1e-4, atol=1e-6
        )
        jax.tree.map(np.testing.assert_array_equal, out["params"], variables["params"])


def test_reestimate_rejects_unknown_method(net):
    with pytest.raises(ValueError, match="unknown BN method 'adam'"):
        bn_reestimate.reestimate(
            "adam", net, {}, dataset="cifar10_sample", view="gray", workdir="x"
        )


def test_bn_training_distills_the_teacher_and_trains_only_batchnorm(net, sample_npz, tmp_path):
    """--bn_loss=kd: BN-only training whose loss reads the color teacher's predictions:
    two teachers give two BN re-estimates, and no other weight moves."""
    gray = models.ModelConfig("bn_net", in_channels=1)
    start = jax.device_get(models.init_variables(gray, jax.random.key(0)))
    teacher_vars = jax.device_get(models.init_variables(net, jax.random.key(1)))
    louder = jax.tree_util.tree_map_with_path(
        lambda p, v: v * 5 if "head" in jax.tree_util.keystr(p) else v, teacher_vars
    )
    out = {}
    for name, teacher in (("ce", None), ("kd", (net, teacher_vars)), ("kd5", (net, louder))):
        out[name] = bn_reestimate.reestimate(
            "train", gray, start, dataset=f"npz:{sample_npz}", view="gray",
            workdir=str(tmp_path / name), learning_rate=0.5, teacher=teacher,
        )  # fmt: skip
    for trained in out.values():
        for layer in ("conv", "head"):
            jax.tree.map(
                np.testing.assert_array_equal, trained["params"][layer], start["params"][layer]
            )
    scales = {k: np.asarray(v["params"]["bn"]["scale"]) for k, v in out.items()}
    assert not np.allclose(scales["ce"], scales["kd"], atol=1e-6)
    assert not np.allclose(scales["kd"], scales["kd5"], atol=1e-6)


def test_compress_bn_lr_is_the_bn_epochs_rate(net, sample_npz, tmp_path):
    """--bn_lr reaches the BN epoch: compress's stage equals BN training at that rate,
    and the default (0.1) moves BN further than the study's 0.01."""
    gray = models.ModelConfig("bn_net", in_channels=1)
    start = jax.device_get(models.init_variables(gray, jax.random.key(0)))
    model = stages.Model(gray, start)
    moved = {}
    for lr in (0.1, 0.01):
        config = CompressConfig(dataset=f"npz:{sample_npz}", bn_lr=lr)
        staged = stages.reestimate_bn(config, model, model, str(tmp_path / f"s{lr}"), seed=0)
        direct = bn_reestimate.reestimate(
            "train", gray, start, dataset=f"npz:{sample_npz}", view="gray",
            workdir=str(tmp_path / f"d{lr}"), seed=0, learning_rate=lr,
        )  # fmt: skip
        jax.tree.map(np.testing.assert_array_equal, staged.variables, jax.device_get(direct))
        delta = (
            np.asarray(staged.variables["params"]["bn"]["scale"]) - start["params"]["bn"]["scale"]
        )
        moved[lr] = np.abs(delta).sum()
    assert CompressConfig().bn_lr == 0.1 and moved[0.1] > 3 * moved[0.01] > 0
