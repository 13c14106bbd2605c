"""Test setup, once: 2 host CPU devices (so data-parallel code paths really run sharded),
XLA's cheapest CPU optimization level, graycnn's CPU tuning as the CLIs run it, and the
persistent compilation cache."""

import os

_FLAGS = os.environ.get("XLA_FLAGS", "").split()
# Any device count already there goes (pytest-xdist's workers inherit the controller's).
_FLAGS = [f for f in _FLAGS if not f.startswith("--xla_force_host_platform_device_count")]
_FLAGS.append("--xla_force_host_platform_device_count=2")
# The tests' tiny models spend most of their time compiling; XLA's CPU backend at its
# cheapest optimization level compiles them faster (BUILD_NOTES.md, "The test suite").
# A level set in XLA_FLAGS wins: XLA_FLAGS=--xla_backend_optimization_level=3 runs the
# suite at the library's default level.
if not any(f.startswith("--xla_backend_optimization_level") for f in _FLAGS):
    _FLAGS.append("--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(_FLAGS)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from graycnn import xla_options  # noqa: E402
from graycnn.cli import runtime  # noqa: E402
from graycnn.training import data  # noqa: E402

# The CLIs' setup (experiments/__init__.py): the CPU speed-ups on, and XLA's other
# defaults (the collective timeout) after the flags above, before JAX starts.
xla_options.enable_cpu_defaults()
runtime.enable_compilation_cache()


@pytest.fixture(scope="session")
def sample_npz(tmp_path_factory) -> str:
    """160 real CIFAR-10 images (16 per class) from the embedded sample, as an npz dataset."""
    split = data.load_dataset("cifar10_sample", "all")
    idx = np.concatenate([np.flatnonzero(split.labels == c)[:16] for c in range(10)])
    path = str(tmp_path_factory.mktemp("data") / "tiny.npz")
    np.savez(path, images=split.images[idx], labels=split.labels[idx])
    return path
