"""The PyTorch twin of the DenseNet (benchmarks/torch_densenet.py) computes our function,
so that the benchmark's JAX/PyTorch ratio compares the same network. Optional: skipped
when torch is not installed."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.torch_densenet import TorchDenseNet, augment  # noqa: E402
from graycnn.models import ModelConfig, build_model, init_variables  # noqa: E402


def _variables(config):
    """Fresh variables with BN statistics and scales moved off their init values."""
    variables = jax.device_get(init_variables(config, jax.random.key(0)))
    rng = np.random.default_rng(0)

    def perturb(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "var":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        if name in ("mean", "bias"):
            return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return np.asarray(leaf)

    return jax.tree_util.tree_map_with_path(perturb, variables)


@pytest.mark.parametrize("channels_last", [True, False])
def test_torch_twin_matches_flax_in_both_modes(channels_last):
    config = ModelConfig("densenet_test")
    model = build_model(config)
    variables = _variables(config)
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), np.uint8)
    net = TorchDenseNet.from_config(config, channels_last=channels_last)
    net.load_flax_variables(variables)
    assert sum(p.numel() for p in net.parameters()) == sum(
        x.size for x in jax.tree.leaves(variables["params"])
    )

    net.eval()
    with torch.no_grad():
        ours = net(torch.from_numpy(images)).numpy()
    # jitted: op by op, JAX compiles every primitive of the model once (~20 s)
    expected = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)

    # Train mode: batch statistics, and the same loss gradient for the stem kernel.
    net.train()
    labels = np.arange(4) % 10
    loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(images)), torch.tensor(labels))
    loss.backward()

    def flax_loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return -jax.nn.log_softmax(logits)[np.arange(4), labels].mean()

    value, grads = jax.jit(jax.value_and_grad(flax_loss))(variables["params"])
    np.testing.assert_allclose(loss.item(), float(value), rtol=1e-4, atol=1e-5)
    stem_grad = net.stem.weight.grad.permute(2, 3, 1, 0).numpy()  # OIHW -> HWIO
    scale = np.max(np.abs(grads["stem"]["kernel"]))
    np.testing.assert_allclose(stem_grad, grads["stem"]["kernel"], atol=1e-4 * scale)


def test_torch_augment_keeps_pixels_and_shapes():
    images = torch.arange(2 * 8 * 8 * 1, dtype=torch.uint8).reshape(2, 8, 8, 1)
    out = augment(images, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == images.shape and out.dtype == images.dtype
    # Every output pixel is an input pixel of the same image or zero padding.
    for i in range(2):
        assert set(out[i].flatten().tolist()) <= set(images[i].flatten().tolist()) | {0}
