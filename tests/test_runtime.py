import os

import pytest

from graycnn import runtime

FLAG = "--xla_cpu_experimental_ynn_fusion_type="
DEFAULT = f"{FLAG}LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def test_xla_defaults_are_added_once_and_never_override_the_user(monkeypatch):
    monkeypatch.setattr(runtime, "_backends_started", lambda: False)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert runtime.apply_xla_defaults(env) == [DEFAULT]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {DEFAULT}"
    assert runtime.apply_xla_defaults(env) == []  # already there
    user = {"XLA_FLAGS": f"{FLAG}LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
    assert runtime.apply_xla_defaults(user) == []
    assert user["XLA_FLAGS"] == f"{FLAG}LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    empty: dict[str, str] = {}
    assert runtime.apply_xla_defaults(empty) == [DEFAULT] and empty["XLA_FLAGS"] == DEFAULT


def test_xla_defaults_warn_once_jax_has_started(monkeypatch):
    monkeypatch.setattr(runtime, "_backends_started", lambda: True)
    env: dict[str, str] = {}
    with pytest.warns(UserWarning, match="import graycnn first"):
        assert runtime.apply_xla_defaults(env) == []
    assert env == {}


def test_importing_graycnn_applied_the_defaults_to_this_process():
    # conftest imports graycnn before JAX starts, as every entry point does.
    assert DEFAULT in os.environ["XLA_FLAGS"]
