"""A second gray task for `experiments.transfer`, offline: vehicles against animals.

    python -m docs.near_task --out=DIR
    python -m experiments.transfer --dataset=npz:DIR/train.npz \
        --eval_dataset=npz:DIR/eval.npz --workdir=W

Its images are the embedded cifar10_sample's 2,000 images that the shipped color model
never saw: its validation split (1,000) becomes the task's training data (npz: the last
20% of each class its validation), its test split (1,000) the held-out eval file. The
images are converted to gray (BT.601 luma, rounded to 0-255, one channel), and the labels
are a task of the user's own: 1 for a vehicle (airplane, automobile, ship, truck), 0 for
an animal. The images are shuffled with a fixed seed so that the npz validation split
mixes the ten CIFAR-10 classes. Near the color model's domain, unlike the digits.
Results: docs/results.md, "Transfer to the user's gray task".
"""

import os

import numpy as np
from absl import app, flags

from graycnn import io
from graycnn.training import data

VEHICLES = frozenset({"airplane", "automobile", "ship", "truck"})

_OUT = flags.DEFINE_string("out", None, "Directory for train.npz and eval.npz.", required=True)


def near_task(split: data.Split, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W, 1) uint8 gray, labels (N,) 1 vehicle / 0 animal), shuffled."""
    names = split.class_names or ()
    gray = np.asarray(data.apply_view(split.images, "gray"))
    images = np.clip(np.round(gray), 0, 255).astype(np.uint8)
    labels = np.array([int(names[int(c)] in VEHICLES) for c in split.labels], np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    return images[order], labels[order]


def main(argv: list[str]) -> None:
    del argv
    os.makedirs(_OUT.value, exist_ok=True)
    for name, split in (("train", "validation"), ("eval", "test")):
        images, labels = near_task(data.load_dataset("cifar10_sample", split))
        path = os.path.join(_OUT.value, f"{name}.npz")
        io.write_atomically(path, lambda f, i=images, y=labels: np.savez(f, images=i, labels=y))
        print(f"{path}: {images.shape} {np.bincount(labels).tolist()} (animal, vehicle)")


if __name__ == "__main__":
    app.run(main)
