import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from graycnn.training import data


def test_luma_matches_hand_computed_pixel():
    pixel = np.array([[[[10, 200, 30]]]], np.uint8)
    # tf.image.rgb_to_grayscale's BT.601 weights, which the study used.
    expected = 0.2989 * 10 + 0.5870 * 200 + 0.1140 * 30
    np.testing.assert_allclose(data.apply_view(pixel, "gray")[0, 0, 0, 0], expected, rtol=1e-6)
    gray3 = data.apply_view(pixel, "gray3")
    assert gray3.shape == (1, 1, 1, 3)
    np.testing.assert_allclose(gray3[0, 0, 0], [expected] * 3, rtol=1e-6)
    np.testing.assert_array_equal(data.apply_view(pixel, "color")[0, 0, 0], [10, 200, 30])


def test_views_reject_bad_input():
    with pytest.raises(ValueError, match="unknown view 'grey'"):
        data.apply_view(np.zeros((1, 2, 2, 3), np.uint8), "grey")
    with pytest.raises(ValueError, match="needs 3-channel"):
        data.apply_view(np.zeros((1, 2, 2, 1), np.uint8), "color")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        data.apply_view(np.zeros((1, 2, 2, 4), np.uint8), "gray")


def test_embedded_sample_split_is_balanced_disjoint_and_deterministic():
    train = data.load_dataset("cifar10_sample", "train")
    val = data.load_dataset("cifar10_sample", "validation")
    test = data.load_dataset("cifar10_sample", "test")
    assert (len(train), len(val), len(test)) == (3085, 1000, 1000)
    assert np.bincount(val.labels).tolist() == np.bincount(test.labels).tolist() == [100] * 10
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (32, 32, 3)
    # The first labels of data_batch_1 are 6 9 9 4 1 1 2 7 (shared/data/README.md).
    assert data.load_dataset("cifar10_sample", "all").labels[:8].tolist() == [
        6,
        9,
        9,
        4,
        1,
        1,
        2,
        7,
    ]
    keys = [{im.tobytes() for im in s.images} for s in (train, val, test)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    # Per class in file order: ... train | test (100) | validation (100).
    everything = data.load_dataset("cifar10_sample", "all")
    for c in range(10):
        idx = np.flatnonzero(everything.labels == c)
        np.testing.assert_array_equal(everything.images[idx[-100:]], val.images[val.labels == c])
        np.testing.assert_array_equal(
            everything.images[idx[-200:-100]], test.images[test.labels == c]
        )
    again = data.load_dataset("cifar10_sample", "validation")
    np.testing.assert_array_equal(again.images, val.images)


def test_npz_dataset_and_errors(tmp_path, sample_npz):
    split = data.load_dataset(f"npz:{sample_npz}", "all")
    assert len(split) == 160 and split.num_classes == 10
    assert len(data.load_dataset(f"npz:{sample_npz}", "validation")) == 30  # 20% of 16 = 3 each
    with pytest.raises(ValueError, match="unknown dataset 'cifar100'"):
        data.load_dataset("cifar100")
    with pytest.raises(ValueError, match="does not exist"):
        data.load_dataset(f"npz:{tmp_path}/missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4, int))
    with pytest.raises(ValueError, match=r"bad.npz: images must be \(N, H, W, C\).*\(4, 8, 8\)"):
        data.load_dataset(f"npz:{bad}")
    np.savez(bad, images=np.zeros((4, 8, 8, 4), np.uint8), labels=np.zeros(4, int))
    with pytest.raises(ValueError, match=r"C 1 or 3, got shape \(4, 8, 8, 4\)"):
        data.load_dataset(f"npz:{bad}")
    np.savez(bad, images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.zeros(3, int))
    with pytest.raises(ValueError, match="labels must be"):
        data.load_dataset(f"npz:{bad}")


def test_folder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for _c, name in enumerate(["cat", "dog"]):
        os.makedirs(tmp_path / name)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(
                tmp_path / name / f"{i}.png"
            )
    split = data.load_dataset(f"folder:{tmp_path}", "all")
    assert split.images.shape == (10, 8, 8, 3) and split.labels.tolist() == [0] * 5 + [1] * 5
    with pytest.raises(ValueError, match="not a directory"):
        data.load_dataset(f"folder:{tmp_path}/nope")


@pytest.mark.slow
def test_tfds_cifar10_with_mock_data(monkeypatch):
    # Mock data needs no download: skip the check that the download host is reachable.
    monkeypatch.setattr(data, "_check_reachable", lambda *args: None)
    with tfds.testing.mock_data(num_examples=12):
        split = data.load_dataset("cifar10", "validation")
    assert split.images.shape == (12, 32, 32, 3) and split.images.dtype == np.uint8
    assert split.labels.shape == (12,)


def test_augment_is_seeded_and_keeps_shape():
    images = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    a = data.augment(jax.random.key(0), images)
    b = data.augment(jax.random.key(0), images)
    c = data.augment(jax.random.key(1), images)
    assert a.shape == images.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # A crop of a padded image: every value is a source pixel or the zero padding.
    assert set(np.unique(a)) <= set(np.unique(images)) | {0.0}


def test_iterate_batches_pads_with_mask():
    split = data.Split(np.zeros((5, 2, 2, 3), np.uint8), np.arange(5), 5)
    batches = list(data.iterate_batches(split, 2))
    assert [b[2].tolist() for b in batches] == [[1, 1], [1, 1], [1, 0]]
    assert len(list(data.iterate_batches(split, 2, seed=0, drop_remainder=True))) == 2
