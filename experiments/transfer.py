"""Transfer to the user's own gray task: scratch, transfer (the color model folded to
gray, new head) and merged (folded, merged, new head), each trained the same steps.

    python -m experiments.transfer --dataset=digits --workdir=runs/transfer

Writes report.md, report.json and curve.png (validation accuracy vs steps) to
--workdir. Images of another size are resized to the color model's (--resize, default
true); --resize=false builds the model for the images' size. Every flag is a field of
graycnn.transfer.TransferConfig.
"""

from absl import flags

from graycnn import config, transfer
from graycnn.cli import runtime
from graycnn.cli import workdir as workdir_lib
from graycnn.training import parallel

config.define_flags(transfer.TransferConfig)
flags.DEFINE_string("workdir", "runs/transfer", "Output directory (must not hold a run).")
runtime.define_distributed_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    runtime.setup()
    settings = config.from_flags(transfer.TransferConfig)
    if settings.export:
        workdir_lib.prepare(settings.export, "--export")  # before training, not after
    with workdir_lib.claim(FLAGS.workdir, "transfer") as path:
        report = transfer.transfer(settings)
        if parallel.primary():  # every process computes the report; process 0 writes it
            print(transfer.write_report(report, path))


if __name__ == "__main__":
    runtime.run(main)
