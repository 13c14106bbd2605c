"""The study's DenseNet written in Keras, as its notebook "Densenet_on_Cifar_10" built it,
for the import tests (no tests of its own; Keras is passed in, so the same code builds
the model in Keras 3 and in Keras 2 (`tf_keras`, for tests/data/make_keras2_densenet.py).

Nothing here comes from graycnn: Keras itself is the reference the import is held to.
"""

import numpy as np


def build_densenet(
    keras,
    layers_per_block: int = 12,
    num_filter: int = 36,
    compression: float = 0.5,
    num_classes: int = 10,
    channels: int = 3,
    dropout_rate: float = 0.0,
    rescaling: tuple[float, float] | None = None,
    image_size: int = 32,
):
    """The notebook's `add_denseblock` / `add_transition` / `output_layer`, layer for layer
    (auto-named layers, L1 on the transitions, raw 0-255 input unless `rescaling`)."""
    layers = keras.layers

    def add_denseblock(x):
        for _ in range(layers_per_block):
            y = layers.BatchNormalization()(x)
            y = layers.Activation("relu")(y)
            y = layers.Conv2D(
                int(num_filter * compression), (3, 3), use_bias=False, padding="same"
            )(y)
            if dropout_rate > 0:
                y = layers.Dropout(dropout_rate)(y)
            x = layers.Concatenate(axis=-1)([x, y])
        return x

    def add_transition(x):
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        x = layers.Conv2D(
            int(num_filter * compression),
            (1, 1),
            use_bias=False,
            padding="same",
            kernel_regularizer=keras.regularizers.l1(1e-4),
        )(x)
        if dropout_rate > 0:
            x = layers.Dropout(dropout_rate)(x)
        return layers.AveragePooling2D(pool_size=(2, 2))(x)

    def output_layer(x):
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        x = layers.AveragePooling2D(pool_size=(2, 2))(x)
        x = layers.Conv2D(num_classes, kernel_size=(2, 2))(x)
        x = layers.Flatten()(x)
        return layers.Activation("softmax")(x)

    inputs = layers.Input(shape=(image_size, image_size, channels))
    x = inputs
    if rescaling is not None:
        x = layers.Rescaling(scale=rescaling[0], offset=rescaling[1])(x)
    x = layers.Conv2D(num_filter, (3, 3), use_bias=False, padding="same")(x)
    for block in range(4):
        x = add_denseblock(x)
        if block < 3:
            x = add_transition(x)
    return keras.models.Model(inputs, output_layer(x))


def randomize(keras, model, images: np.ndarray, seed: int = 0) -> None:
    """Random weights everywhere, BN statistics included, that still give a non-saturated
    softmax: each BN's moving mean and variance are its input's batch statistics on
    `images` (one training-mode pass), then perturbed at random, so every BN normalizes
    only roughly and the outputs depend on all four of its arrays.

    Args:
        images: (N, 32, 32, C) uint8, raw pixels as the model is fed.
    """
    rng = np.random.default_rng(seed)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in bns:
        gamma, beta, mean, var = bn.get_weights()
        bn.set_weights(
            [rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.3, beta.shape), mean, var]
        )
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D) and layer.use_bias:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.5, bias.shape)])
    # In training mode every BN normalizes by its batch statistics, so one pass gives the
    # statistics of every BN input as the calibrated model will see them.
    probe = keras.Model(model.input, [bn.input for bn in bns])
    inputs = probe(images.astype(np.float32), training=True)
    for bn, x in zip(bns, inputs, strict=True):
        x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        mean, var = x.mean(0), x.var(0)
        gamma, beta, _, _ = bn.get_weights()
        mean = mean + 0.2 * np.sqrt(var) * rng.normal(size=mean.shape)
        var = var * rng.uniform(0.6, 1.6, var.shape)
        bn.set_weights([gamma, beta, mean.astype(np.float32), var.astype(np.float32)])
