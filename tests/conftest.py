"""Test setup, once: 2 host CPU devices (so data-parallel code paths really run sharded)
and the persistent compilation cache."""

import os

# Any device count already there goes (pytest-xdist's workers inherit the controller's).
os.environ["XLA_FLAGS"] = " ".join(
    [
        *(
            flag
            for flag in os.environ.get("XLA_FLAGS", "").split()
            if not flag.startswith("--xla_force_host_platform_device_count")
        ),
        "--xla_force_host_platform_device_count=2",
    ]
)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from graycnn import data, runtime  # noqa: E402

runtime.enable_compilation_cache()


@pytest.fixture(scope="session")
def sample_npz(tmp_path_factory) -> str:
    """160 real CIFAR-10 images (16 per class) from the embedded sample, as an npz dataset."""
    split = data.load_dataset("cifar10_sample", "all")
    idx = np.concatenate([np.flatnonzero(split.labels == c)[:16] for c in range(10)])
    path = str(tmp_path_factory.mktemp("data") / "tiny.npz")
    np.savez(path, images=split.images[idx], labels=split.labels[idx])
    return path
