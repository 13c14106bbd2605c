"""The settings of a transfer run (every field is a flag of `experiments.transfer`)."""

import dataclasses

from graycnn.config import PerLayer, check_merged_layers, coerce, setting
from graycnn.training.data import DATASET_HELP


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """scratch / transfer / merged, each trained `steps` steps on the user's images."""

    dataset: str = setting("digits", "The user's training data: " + DATASET_HELP)
    eval_dataset: str | None = setting(
        None, "Held-out data for the final accuracy; default the dataset's test split, if any."
    )
    checkpoint: str | None = setting(None, "Color checkpoint; default the shipped densenet_tiny.")
    resize: bool = setting(
        True,
        "Resize the images (bilinear) to the color model's input size; false: build the "
        "model for the images' size.",
    )
    steps: int = setting(600, "Training steps of each model.")
    eval_every: int = setting(50, "Validation accuracy every this many steps (the curve).")
    batch_size: int = setting(64, "Batch size.")
    learning_rate: float = setting(0.05, "SGD learning rate of scratch (momentum 0.9).")
    finetune_lr: float = setting(0.01, "SGD learning rate of transfer and merged.")
    augment: bool = setting(False, "Random crop (4-pixel pad) and horizontal flip.")
    # The default plan: densenet_tiny at 48.8% of its FLOPs (the stem and block 1's first
    # two convs, where the 32x32 maps make most of the FLOPs).
    layers: tuple[int, ...] = setting((1, 2, 3), "Conv layers merged (the merged model).")
    num_clusters: PerLayer = setting(
        PerLayer.of_dict({1: 18, 2: 9, 3: 9}), "Clusters per merged layer.", item=int
    )
    target_flops: float | None = setting(
        None, "Merged model: pick layers and cluster counts (instead of --layers and "
        "--num_clusters) to reach this fraction of the transfer model's FLOPs, each layer "
        "scored by its error on the head's input features on training images "
        "(graycnn.transfer.budget).",
    )  # fmt: skip
    seed: int = setting(0, "Seed of init, the new heads, data order and clustering.")
    export: str | None = setting(
        None, "Directory for the best model (highest validation accuracy, then fewest "
        "FLOPs) as StableHLO, TFLite and signature.json (graycnn.deploy).",
    )  # fmt: skip

    def __post_init__(self):
        coerce(self)  # a {layer: count} or 'LAYER:COUNT' from Python, as from the flags
        for name in ("steps", "eval_every", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "finetune_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.target_flops is not None and not 0 < self.target_flops < 1:
            raise ValueError(
                f"--target_flops must be a fraction in (0, 1), got {self.target_flops}"
            )
        if self.target_flops is None:  # a target's plan picks the layers
            check_merged_layers(self, ("num_clusters",), self.layers)
