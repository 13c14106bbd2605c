"""The main job: compress a color CNN into a smaller gray one, with the study's baselines.

    python -m experiments.compress --layers=1,2

Defaults: the shipped pretrained densenet_tiny (color) and the embedded cifar10_sample;
about 2 minutes on a 2-core CPU. Writes to --workdir: report.md, report.json, figures/,
clusters_layer*.json, and one checkpoint per report row under models/ (each loads with
`python -m experiments.evaluate --checkpoint=DIR --view=gray`). Expected result and the
levers tried: BUILD_NOTES.md. The full-size study on a GPU (a color densenet_seed
trained with experiments.train):

    python -m experiments.compress --checkpoint=runs/seed_color --dataset=cifar10 \
        --layers=1,2 --num_clusters=1:20,2:12 --workdir=runs/seed_compress

Per-layer flags take `LAYER:VALUE,...`; a value without a layer applies to every layer.
"""

from absl import flags

from graycnn import compress, report, runtime

_D = compress.CompressConfig()
flags.DEFINE_string("checkpoint", None, "Color model; default: the shipped pretrained --model.")
flags.DEFINE_string("model", _D.model, "Model to train when no checkpoint is given or shipped.")
flags.DEFINE_string("dataset", _D.dataset, "cifar10, cifar10_sample, npz:PATH or folder:PATH.")
flags.DEFINE_integer("train_epochs", _D.train_epochs, "Epochs when the color model is trained.")
flags.DEFINE_list("layers", ["1", "2"], "Conv layers to merge, in order.")
flags.DEFINE_enum("fold", _D.fold, list(compress.FOLD_METHODS), "RGB-to-gray fold of layer 1.")
flags.DEFINE_string("objective", _D.default_objective, "Receptive-field objective per layer.")
flags.DEFINE_integer("steps", _D.steps, "Gradient-ascent steps.")
flags.DEFINE_string("metric", "", "Distance per layer; default mse for layer 1, imed after.")
flags.DEFINE_enum("cluster", _D.cluster_method, list(compress.CLUSTER_METHODS), "Clustering.")
flags.DEFINE_string(
    "num_clusters", "1:20,2:12", "Target clusters per layer (default: the study's counts)."
)
flags.DEFINE_float("eps_std", _D.eps_std, "DBSCAN eps in std of the distances (the study).")
flags.DEFINE_string("bn", _D.bn, "BN re-estimation: train, recalibrate or none.")
flags.DEFINE_integer("bn_epochs", _D.bn_epochs, "Epochs of BN-only training for --bn=train.")
flags.DEFINE_integer("seed", _D.seed, "Seed of every random choice.")
flags.DEFINE_string("workdir", "runs/compress", "Output directory (must not hold a run).")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
FLAGS = flags.FLAGS


def parse_per_layer(flag: str, spec: str, cast=str) -> tuple[object | None, dict[int, object]]:
    """'a' -> ('a', {}); '1:a,2:b' -> (None, {1: 'a', 2: 'b'})."""
    default, per_layer = None, {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        layer, sep, value = item.rpartition(":")
        try:
            if not sep:
                default = cast(value)
            elif int(layer) in per_layer:
                raise ValueError(f"--{flag} lists layer {layer} twice")
            else:
                per_layer[int(layer)] = cast(value)
        except ValueError as e:
            raise ValueError(f"--{flag}: bad entry {item!r} ({e})") from None
    return default, per_layer


def main(argv):
    del argv
    runtime.setup()
    try:
        layers = tuple(int(x) for x in FLAGS.layers)
    except ValueError:
        raise ValueError(f"--layers must be conv layer numbers, got {FLAGS.layers}") from None
    objective, objectives = parse_per_layer("objective", FLAGS.objective)
    metric, metrics = parse_per_layer("metric", FLAGS.metric)
    _, num_clusters = parse_per_layer("num_clusters", FLAGS.num_clusters, int)
    config = compress.CompressConfig(
        checkpoint=FLAGS.checkpoint,
        model=FLAGS.model,
        dataset=FLAGS.dataset,
        train_epochs=FLAGS.train_epochs,
        layers=layers,
        fold=FLAGS.fold,
        objective=objectives,
        default_objective=objective or _D.default_objective,
        steps=FLAGS.steps,
        metric={**dict.fromkeys(layers, metric), **metrics} if metric else metrics,
        cluster_method=FLAGS.cluster,
        num_clusters=num_clusters,
        eps_std=FLAGS.eps_std,
        bn=FLAGS.bn,
        bn_epochs=FLAGS.bn_epochs,
        seed=FLAGS.seed,
        data_dir=FLAGS.data_dir,
    )
    result = compress.compress(config, FLAGS.workdir)
    print(report.format_report(result))


if __name__ == "__main__":
    runtime.run(main)
