import os

import pytest

from graycnn import runtime

YNN = "--xla_cpu_experimental_ynn_fusion_type="
DEVICES = "--xla_force_host_platform_device_count="
DEFAULTS = [f"--{k}={v}" for k, v in runtime.XLA_DEFAULTS.items()]


def test_xla_defaults_are_added_once_and_never_override_the_user(monkeypatch):
    monkeypatch.setattr(runtime, "_backends_started", lambda: False)
    assert f"{YNN}LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT" in DEFAULTS
    assert any(d.startswith(DEVICES) for d in DEFAULTS)
    empty: dict[str, str] = {}
    assert runtime.apply_xla_defaults(empty) == DEFAULTS
    assert empty["XLA_FLAGS"] == " ".join(DEFAULTS)
    assert runtime.apply_xla_defaults(empty) == []  # already there
    user = {"XLA_FLAGS": f"{DEVICES}1 {YNN}LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
    assert runtime.apply_xla_defaults(user) == []
    assert user["XLA_FLAGS"] == f"{DEVICES}1 {YNN}LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    some = {"XLA_FLAGS": f"{DEVICES}4"}
    assert runtime.apply_xla_defaults(some) == [f"{YNN}LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"]
    assert some["XLA_FLAGS"] == f"{DEVICES}4 {YNN}LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def test_xla_defaults_warn_once_jax_has_started(monkeypatch):
    monkeypatch.setattr(runtime, "_backends_started", lambda: True)
    env: dict[str, str] = {}
    with pytest.warns(UserWarning, match="import graycnn first"):
        assert runtime.apply_xla_defaults(env) == []
    assert env == {}


def test_importing_graycnn_applied_the_defaults_to_this_process():
    # conftest imports graycnn before JAX starts, as every entry point does.
    assert f"{YNN}LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT" in os.environ["XLA_FLAGS"]
