import json
import os
import subprocess
import sys

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
    with pytest.warns(UserWarning, match="enable_cpu_defaults"):
        assert xla_options.enable_cpu_defaults(env) == []
    assert env == {}
    assert xla_options.cpu_speedups()  # the speed-ups need no restart


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every graycnn module imported; the process's environment, devices and speed-ups as
# JAX and graycnn leave them by default. Importing jax sets TPU_SKIP_MDS_QUERY and
# TF_CPP_MIN_LOG_LEVEL (jax/_src/cloud_tpu_init.py) and sklearn KMP_* variables, so
# the environment is compared from after their imports.
_IMPORT_ALL = """
import importlib, json, os, pkgutil, sys
import jax, sklearn
from jax._src import xla_bridge
before = dict(os.environ)
import graycnn, graycnn.merge
for m in pkgutil.walk_packages(graycnn.__path__, "graycnn."):
    importlib.import_module(m.name)
changed = sorted(set(os.environ.items()) ^ set(before.items()))
assert not changed, f"importing graycnn changed os.environ: {changed}"
assert not xla_bridge.backends_are_initialized(), "importing graycnn started JAX"
if sys.argv[1:] == ["enable"]:
    graycnn.xla_options.enable_cpu_defaults()
from graycnn.models import ModelConfig, build_model
model = build_model(ModelConfig("densenet_test"))
print(json.dumps({
    "devices": jax.device_count(), "speedups": graycnn.xla_options.cpu_speedups(),
    "bn_one_pass": model.bn_one_pass, "conv_dots": model.conv_dots,
    "xla_flags": os.environ.get("XLA_FLAGS"),
}))
"""


def _fresh_process(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 2 devices
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_importing_graycnn_changes_nothing_in_the_process():
    assert _fresh_process() == {
        "devices": 1,  # JAX's default on a CPU host
        "speedups": False,
        "bn_one_pass": False,
        "conv_dots": "",
        "xla_flags": None,
    }


def test_enable_cpu_defaults_opts_in_before_jax_starts():
    assert _fresh_process("enable") == {
        "devices": min(2, os.cpu_count() or 1),
        "speedups": True,
        "bn_one_pass": True,
        "conv_dots": "train",
        "xla_flags": " ".join(DEFAULTS),
    }


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
    assert xla_options.set_cpu_speedups(False)  # the switch benchmarks use; conftest's on
    try:
        assert xla_options.train_compiler_options() is None
        assert xla_options.train_compiler_options(kernel_gradients=False) is None
        model = build_model(ModelConfig("densenet_test"))
        assert not model.bn_one_pass and model.conv_dots == ""
    finally:
        assert not xla_options.set_cpu_speedups(True)
    model = build_model(ModelConfig("densenet_test"))
    assert model.bn_one_pass and model.conv_dots == "train"
    assert build_model(ModelConfig("densenet_test"), eval_step=True).conv_dots == "always"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert xla_options.train_compiler_options() is None
    model = build_model(ModelConfig("densenet_test"))
    assert not model.bn_one_pass and model.conv_dots == ""
