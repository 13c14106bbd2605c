"""Tests for graycnn.deploy.speed: interleaved rounds, medians and per-round ratios, checked
with a fake clock whose times are known (no timed asserts); and a real run's shape."""

import statistics

import jax
import numpy as np
import pytest

from graycnn.deploy import measure_speed
from graycnn.models import ModelConfig, init_variables


class FakeClock:
    """Time advances only when a model's forward runs: by that model's cost per image
    times the batch, times the drift of the current round (the machine's load). A round
    reads the clock twice per model, after calibration has read it twice per model."""

    def __init__(self, cost, drift):
        self.now, self.reads, self.cost, self.drift, self.order = 0.0, 0, cost, drift, []

    def __call__(self):
        self.reads += 1
        return self.now

    def forward(self, config, variables, batch):
        name = variables["name"]

        def call():
            self.order.append(name)
            per_round = 2 * len(self.cost)
            r = max(0, (self.reads - per_round) // per_round)
            self.now += self.cost[name] * batch * self.drift[r]

        return call


def test_rounds_are_interleaved_and_speedups_cancel_the_drift():
    cost = {"a": 0.001, "b": 0.004}  # b is 4x slower
    clock = FakeClock(cost, drift=[1.0, 3.0, 1.5])
    models = {n: (ModelConfig("densenet_test"), {"name": n}) for n in cost}
    timed = measure_speed(models, (2,), rounds=3, clock=clock, forward=clock.forward)
    # 2 calibration calls each, then rounds: a's calls then b's, then b's then a's, ...
    runs = [n for i, n in enumerate(clock.order[4:]) if i == 0 or clock.order[4 + i - 1] != n]
    assert runs == ["a", "b", "a", "b"]  # rounds a b | b a | a b: the rotation
    # Each round's time per call is cost * batch * that round's drift, whatever the order.
    a, b = timed["a"].seconds[2], timed["b"].seconds[2]
    assert len(a) == len(b) == 3
    np.testing.assert_allclose(np.array(b) / np.array(a), 4.0, rtol=1e-6)
    assert timed["a"].speedup_over("b", 2) == pytest.approx(4.0)
    assert timed["b"].speedup_over("a", 2) == pytest.approx(0.25)
    assert timed["a"].images_per_second[2] == pytest.approx(statistics.median(2 / t for t in a))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="rounds=0"):
        measure_speed({"a": (ModelConfig("densenet_test"), {})}, rounds=0)
    with pytest.raises(ValueError, match="batch_sizes=\\[0\\]"):
        measure_speed({"a": (ModelConfig("densenet_test"), {})}, batch_sizes=(0,))


def test_a_real_measurement_has_every_figure():
    config = ModelConfig("densenet_test", in_channels=1)
    variables = init_variables(config, jax.random.key(0))
    timed = measure_speed({"x": (config, variables), "y": (config, variables)}, (1, 4), rounds=2)
    for name in "xy":
        assert set(timed[name].images_per_second) == {1, 4}
        assert all(v > 0 and np.isfinite(v) for v in timed[name].images_per_second.values())
    assert len(timed["x"].rounds_against["y"][4]) == 2
