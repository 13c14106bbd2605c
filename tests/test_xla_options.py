import os

import jax
import pytest

from graycnn import xla_options
from graycnn.models import ModelConfig, build_model

DEVICES = "--xla_force_host_platform_device_count="
DEFAULTS = [f"--{k}={v}" for k, v in xla_options.XLA_DEFAULTS.items()]


def test_xla_defaults_are_added_once_and_never_override_the_user(monkeypatch):
    monkeypatch.setattr(xla_options, "_backends_started", lambda: False)
    assert DEFAULTS[0] == f"{DEVICES}{min(2, os.cpu_count() or 1)}"
    empty: dict[str, str] = {}
    assert xla_options.apply_xla_defaults(empty) == DEFAULTS
    assert empty["XLA_FLAGS"] == " ".join(DEFAULTS)
    assert xla_options.apply_xla_defaults(empty) == []  # already there
    user = {"XLA_FLAGS": f"--xla_dump_to=/tmp/x {DEVICES}1"}
    assert xla_options.apply_xla_defaults(user) == DEFAULTS[1:]  # the user's count stays
    assert user["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {DEVICES}1 " + " ".join(DEFAULTS[1:])
    other = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert xla_options.apply_xla_defaults(other) == DEFAULTS
    assert other["XLA_FLAGS"] == "--xla_dump_to=/tmp/x " + " ".join(DEFAULTS)


def test_xla_defaults_warn_once_jax_has_started(monkeypatch):
    monkeypatch.setattr(xla_options, "_backends_started", lambda: True)
    env: dict[str, str] = {}
    with pytest.warns(UserWarning, match="import graycnn first"):
        assert xla_options.apply_xla_defaults(env) == []
    assert env == {}


def test_train_step_options_only_on_cpu(monkeypatch):
    assert jax.default_backend() == "cpu"
    options = xla_options.train_compiler_options()
    assert options == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    frozen = xla_options.train_compiler_options(kernel_gradients=False)  # BN-only training
    assert frozen == {
        "xla_cpu_experimental_ynn_fusion_type": (
            "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
        )
    }
    monkeypatch.setenv("GRAYCNN_CPU_SPEEDUPS", "0")  # the switch benchmarks use
    assert xla_options.train_compiler_options() is None
    assert xla_options.train_compiler_options(kernel_gradients=False) is None
    model = build_model(ModelConfig("densenet_test"))
    assert not model.bn_one_pass and model.conv_dots == ""
    monkeypatch.delenv("GRAYCNN_CPU_SPEEDUPS")
    model = build_model(ModelConfig("densenet_test"))
    assert model.bn_one_pass and model.conv_dots == "train"
    assert build_model(ModelConfig("densenet_test"), eval_step=True).conv_dots == "always"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert xla_options.train_compiler_options() is None
    model = build_model(ModelConfig("densenet_test"))
    assert not model.bn_one_pass and model.conv_dots == ""
