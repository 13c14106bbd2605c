"""Writes keras2_densenet.h5 and keras2_densenet_probs.npz: a real Keras 2 (tf.keras)
file of the study's DenseNet at 2 layers per block, random weights and BN statistics,
and Keras 2's own softmax on the first 64 validation images of cifar10_sample.

Keras 2 is not a dependency of graycnn; to regenerate (from the repository root):

    pip install --target /tmp/tf_keras --no-deps "tf_keras==2.21.0"
    PYTHONPATH=/tmp/tf_keras:tests:. python tests/data/make_keras2_densenet.py
"""

import os

import numpy as np
import tf_keras
from keras_study import build_densenet, randomize

from graycnn.training import data

NUM_IMAGES = 64
HERE = os.path.dirname(os.path.abspath(__file__))

images = data.load_dataset("cifar10_sample", "validation").images[:NUM_IMAGES]
tf_keras.utils.set_random_seed(2)
model = build_densenet(tf_keras, layers_per_block=2)
randomize(tf_keras, model, images, seed=2)
model.save(os.path.join(HERE, "keras2_densenet.h5"))
probs = model.predict(images.astype(np.float32), verbose=0)
np.savez(
    os.path.join(HERE, "keras2_densenet_probs.npz"),
    probs=probs,
    num_images=NUM_IMAGES,
    keras_version=tf_keras.__version__,
    params=model.count_params(),
)
print(f"tf_keras {tf_keras.__version__}: {model.count_params()} params, probs {probs.shape}")
