"""--objective=fisher: the pair costs against the perturbation they stand for, computed
independently (explicit loops; a numpy head with a small finite merge)."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

from graycnn import distance
from graycnn.models import build_model
from graycnn.study import CompressConfig, stages
from graycnn.study.config import FISHER
from graycnn.training import data, train


def _loop_cost(n, g):
    """sqrt(mean_b 1/2 sum_c du_c^2) of merging each pair, built as the perturbation:
    channel i moves by (n_k - n_i) / 2 and channel k by (n_i - n_k) / 2."""
    b, c, p, f = g.shape
    out = np.zeros((f, f))
    for i in range(f):
        for k in range(f):
            if i == k:
                continue
            total = 0.0
            for bi in range(b):
                delta = np.zeros((p, f))
                delta[:, i] = (n[bi, :, k] - n[bi, :, i]) / 2
                delta[:, k] = (n[bi, :, i] - n[bi, :, k]) / 2
                du = [np.sum(g[bi, ci] * delta) for ci in range(c)]
                total += 0.5 * sum(v * v for v in du)
            out[i, k] = np.sqrt(total / b)
    return out


def test_pair_cost_is_the_merge_perturbation():
    rng = np.random.default_rng(0)
    n, g = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 2, 5, 4))
    got = distance.pairwise_merge_cost(n, g)
    np.testing.assert_allclose(got, _loop_cost(n, g), rtol=1e-12, atol=1e-12)
    assert np.array_equal(got, got.T) and np.all(np.diagonal(got) == 0)


def test_pairs_that_respond_or_are_read_alike_cost_nothing():
    rng = np.random.default_rng(1)
    n, g = rng.normal(size=(2, 6, 3)), rng.normal(size=(2, 3, 6, 3))
    same_response = n.copy()
    same_response[..., 1] = same_response[..., 0]
    read_alike = g.copy()
    read_alike[..., 2] = read_alike[..., 0]
    assert distance.pairwise_merge_cost(same_response, g)[0, 1] == pytest.approx(0, abs=1e-12)
    assert distance.pairwise_merge_cost(n, read_alike)[0, 2] == pytest.approx(0, abs=1e-12)
    assert distance.pairwise_merge_cost(n, g)[0, 2] > 0.1


def test_pair_cost_names_the_shapes_it_refuses():
    with pytest.raises(ValueError, match=r"\(2, 5, 4\) and \(2, 3, 5, 3\)"):
        distance.pairwise_merge_cost(np.zeros((2, 5, 4)), np.zeros((2, 3, 5, 3)))


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        z = nn.Conv(4, (3, 3), name="conv")(x / 255.0)
        return nn.Dense(3, name="head")(nn.relu(z).mean(axis=(1, 2)))


def test_merge_costs_are_the_kl_of_a_small_merge():
    """Each pair's distance against a finite merge of eps through a numpy copy of the
    head: logits = mean_hw(relu(z)) W + b, the KL to second order 1/2 |du|^2."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (10, 6, 6, 1), dtype=np.uint8)
    split = data.Split(images, np.zeros(10, np.int32), 3)
    model = _Tiny()
    x = images.astype(np.float32)
    variables = model.init(jax.random.key(3), x)
    got = stages.merge_costs(model, variables, "conv", split, seed=0, count=10)

    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    conv = nn.Conv(4, (3, 3))
    z = np.asarray(conv.apply({"params": variables["params"]["conv"]}, x / 255.0), np.float64)
    w, b = params["head"]["kernel"], params["head"]["bias"]

    def logits(z):
        return np.maximum(z, 0).mean(axis=(1, 2)) @ w + b

    mean, std = z.mean(axis=(0, 1, 2)), z.std(axis=(0, 1, 2))
    n = (z - mean) / std
    base = logits(z)
    p = np.exp(base - base.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    eps = 1e-4
    for i, k in [(0, 1), (0, 3), (1, 2), (2, 3)]:
        moved = z.copy()
        moved[..., i] += eps * std[i] * (n[..., k] - n[..., i]) / 2
        moved[..., k] += eps * std[k] * (n[..., i] - n[..., k]) / 2
        dl = (logits(moved) - base) / eps
        du = np.sqrt(p) * (dl - np.sum(p * dl, -1, keepdims=True))
        want = np.sqrt(np.mean(0.5 * np.sum(du**2, -1)))
        assert got[i, k] == pytest.approx(want, rel=2e-3), (i, k)


@pytest.mark.slow
def test_fisher_objective_plans_a_merge(sample_npz, tmp_path):
    """plan_layer_merge with --objective=fisher clusters by the pair costs, metric named."""
    dataset = f"npz:{sample_npz}"
    model_config, variables, _ = train.train_and_evaluate(
        train.TrainConfig(model="densenet_test", dataset=dataset, epochs=1), str(tmp_path)
    )
    config = CompressConfig(dataset=dataset, objective=FISHER, cluster="complete", steps=1)
    split = data.load_dataset(dataset, "train")
    color = stages.Model(model_config, variables, str(tmp_path))
    gray = stages.fold_color_model(config, color, split)
    result = stages.plan_layer_merge(config, gray, 1, 2, split, color, 0, figures=False)
    path = result.path
    want = stages.merge_costs(build_model(gray.config), gray.variables, path, split, 0)
    np.testing.assert_array_equal(result.distances, want)
    assert result.metric == FISHER and result.clustering.num_clusters == 2


class _TinyNNX(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.conv(x / 255.0)).mean(axis=(1, 2)))


def test_merge_costs_of_an_nnx_model_are_its_linen_twins():
    """The same weights as linen and as NNX modules: the same pair costs."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (8, 6, 6, 1), dtype=np.uint8)
    split = data.Split(images, np.zeros(8, np.int32), 3)
    variables = _Tiny().init(jax.random.key(5), images.astype(np.float32))
    twin = _TinyNNX(nnx.Rngs(0))
    for name in ("conv", "head"):
        getattr(twin, name).kernel[...] = variables["params"][name]["kernel"]
        getattr(twin, name).bias[...] = variables["params"][name]["bias"]
    want = stages.merge_costs(_Tiny(), variables, "conv", split, seed=0, count=8)
    got = stages.merge_costs(twin, nnx.state(twin), "conv", split, seed=0, count=8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
