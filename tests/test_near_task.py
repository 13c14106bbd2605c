"""docs/near_task.py: the offline second gray task (vehicles against animals)."""

import numpy as np

from docs import near_task
from graycnn.training import data


def test_near_task_labels_gray_images_and_splits():
    validation = data.load_dataset("cifar10_sample", "validation")
    images, labels = near_task.near_task(validation)
    assert images.shape == (1000, 32, 32, 1) and images.dtype == np.uint8
    # Independent reference: BT.601 luma by hand, CIFAR-10 class numbers of the vehicles.
    rgb = validation.images.astype(np.float64)
    luma = np.round(rgb @ np.array([0.2989, 0.5870, 0.1140]))[..., None]
    vehicle = np.isin(validation.labels, [0, 1, 8, 9]).astype(np.int64)
    order = np.random.default_rng(0).permutation(1000)
    assert np.array_equal(labels, vehicle[order])
    assert np.abs(images.astype(np.float64) - luma[order]).max() <= 1
    assert np.bincount(labels).tolist() == [600, 400]
    # Shuffled: the npz validation split (the last 20% of each class) mixes CIFAR classes.
    assert len(np.unique(validation.labels[order][labels == 1][-80:])) == 4
    # No image of the eval file is an image of the train file.
    test_images, _ = near_task.near_task(data.load_dataset("cifar10_sample", "test"))
    seen = {x.tobytes() for x in images}
    assert not any(x.tobytes() in seen for x in test_images)
