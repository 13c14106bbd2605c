"""The main job: compress a color CNN into a smaller gray one, with the study's baselines.

    python -m experiments.compress --layers=1,2

Defaults: the shipped pretrained densenet_tiny (color) and the embedded cifar10_sample
(docs/results.md has the measured times and the expected report). Writes to --workdir:
report.md, report.json, figures/, clusters_layer*.json, and one checkpoint per report row
under models/ (each loads with `python -m experiments.evaluate --checkpoint=DIR
--view=gray`). The full-size study on a GPU (a color densenet_seed trained with
experiments.train):

    python -m experiments.compress --checkpoint=runs/seed_color --dataset=cifar10 \
        --layers=1,2 --workdir=runs/seed_compress

Per-layer flags take `VALUE,LAYER:VALUE,...`; a value without a layer applies to every
layer, and the layers a value does not name keep the default (`--objective=2:mean`:
layer 1 stays `activation`). Every flag is a field of graycnn.study.CompressConfig,
checked before the workdir is made.
"""

from absl import flags

from graycnn import config, study
from graycnn.cli import runtime

config.define_flags(study.CompressConfig)
flags.DEFINE_string("workdir", "runs/compress", "Output directory (must not hold a run).")
runtime.define_distributed_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    runtime.setup()
    settings = config.from_flags(study.CompressConfig)
    given = [name for name in config.field_names(study.CompressConfig) if FLAGS[name].present]
    result = study.compress(settings, FLAGS.workdir, given=given)
    print(study.format_report(result))


if __name__ == "__main__":
    runtime.run(main, resumes=True)
