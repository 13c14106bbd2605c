"""The settings of one compress run, each declared once (flags are made from them)."""

import dataclasses

from graycnn import batchnorm, cluster, distance, fold
from graycnn import config as config_lib
from graycnn import receptive_field as rf
from graycnn.config import PerLayer, setting
from graycnn.data import DATASET_HELP

# Besides the receptive-field objectives: cluster each filter's responses to real images.
ACTIVATION = "activation"
OBJECTIVES = (*rf.OBJECTIVES, ACTIVATION)


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """One compress run. Per-layer settings are `PerLayer` values (`VALUE,LAYER:VALUE`).

    The defaults are the command's defaults: `compress(CompressConfig(), workdir)` runs
    what `python -m experiments.compress` runs.
    """

    checkpoint: str | None = setting(
        None, "Color model; default: the shipped pretrained --model, or train one."
    )
    model: str = setting("densenet_tiny", "Model to train when no checkpoint is given or shipped.")
    dataset: str = setting("cifar10_sample", DATASET_HELP)
    train_epochs: int = setting(40, "Epochs when the color model is trained.")
    layers: tuple[int, ...] = setting((1, 2), "Conv layers to merge, in order.")
    fold: str = setting("sum", "RGB-to-gray fold of layer 1.", choices=fold.METHODS)
    objective: PerLayer = setting(
        PerLayer("mean"),
        "What is compared per layer: receptive fields ('mean', 'center'), the kernels "
        "('kernel', layer 1) or the filters' responses to real images ('activation').",
        choices=OBJECTIVES,
    )
    steps: int = setting(100, "Gradient-ascent steps of the receptive fields.")
    metric: PerLayer = setting(
        PerLayer(), "Distance per layer; default mse for layer 1, imed after.",
        choices=tuple(distance.METRICS),
    )  # fmt: skip
    cluster: str = setting("dbscan", "Clustering.", choices=cluster.METHODS)
    num_clusters: PerLayer = setting(
        PerLayer.of_dict({1: 20, 2: 12}),
        "Target clusters per layer (default: the study's counts); a layer without one "
        "uses DBSCAN with --eps_std.",
        item=int,
    )
    eps_std: float = setting(0.2, "DBSCAN eps in std of the distances (the study).")
    bn: str = setting("train", "BN re-estimation of every gray row.", choices=batchnorm.METHODS)
    bn_epochs: int = setting(1, "Epochs of BN-only training for --bn=train.")
    seed: int = setting(0, "Seed of every random choice.")
    data_dir: str | None = setting(None, "TFDS data directory.")

    def __post_init__(self):
        config_lib.coerce(self)

    def objective_of(self, layer: int) -> str:
        return self.objective.of(layer)

    def metric_of(self, layer: int) -> str:
        # The study: MSE for layer 1 (brightness), IMED for later (patterns).
        return self.metric.of(layer, "mse" if layer == 1 else "imed")


def validate(config: CompressConfig, num_layers: int | None = None) -> None:
    """Raises ValueError naming the flag at fault; layer ranges only if num_layers is given."""
    if len(set(config.layers)) != len(config.layers):
        raise ValueError(f"--layers lists a layer twice: {list(config.layers)}")
    per_layer = {
        "--layers": config.layers,
        "--objective": config.objective.layer_numbers(),
        "--metric": config.metric.layer_numbers(),
        "--num_clusters": config.num_clusters.layer_numbers(),
    }
    for flag, keys in per_layer.items():
        for layer in keys:
            if layer < 1 or (num_layers is not None and layer > num_layers):
                raise ValueError(f"{flag}: layer {layer} is out of range 1..{num_layers}")
    config_lib.check(config)
