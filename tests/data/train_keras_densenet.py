"""Trains the study's DenseNet in Keras 3 on cifar10_sample and saves it as the study
did (`model.save`), for by-hand checks of experiments.import_keras (docs/results.md).

    python tests/data/train_keras_densenet.py --layers_per_block=12 --epochs=2 --out=/tmp/seed12

writes /tmp/seed12.h5, /tmp/seed12.keras and /tmp/seed12_probs.npz (Keras's softmax on
the 1,000 validation images), and prints Keras's own validation accuracy as JSON.
SGD lr 0.01, momentum 0.7 (the study's), batch 64, raw 0-255 pixels, seed 0. 12 layers
per block: ~8 min an epoch on 2 busy CPU cores.
"""

import argparse
import json
import os
import sys
import time

import keras
import numpy as np

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]  # keras_study, and graycnn from this checkout.
from keras_study import build_densenet  # noqa: E402

from graycnn.training import data  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--layers_per_block", type=int, default=12)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--out", required=True, help="Path prefix of the files written.")
args = parser.parse_args()

train = data.load_dataset("cifar10_sample", "train")
val = data.load_dataset("cifar10_sample", "validation")
keras.utils.set_random_seed(0)
model = build_densenet(keras, args.layers_per_block)
model.compile(
    optimizer=keras.optimizers.SGD(0.01, momentum=0.7),
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
)
start = time.perf_counter()
model.fit(train.images.astype(np.float32), train.labels, batch_size=64, epochs=args.epochs)
seconds = time.perf_counter() - start
model.save(args.out + ".h5")
model.save(args.out + ".keras")
probs = model.predict(val.images.astype(np.float32), batch_size=500, verbose=0)
np.savez(args.out + "_probs.npz", probs=probs)
accuracy = float((probs.argmax(1) == val.labels).mean())
print(json.dumps({"params": model.count_params(), "keras_accuracy": accuracy, "fit_s": seconds}))
