"""Training infrastructure: datasets, the train loop, evaluation, checkpoints, data
parallelism and BatchNorm re-estimation.

data.py           datasets as uint8 arrays: names, splits, classes, batches
dataset_files.py  npz archives, class folders and image files read and checked
transforms.py     the color/gray views and seeded augmentation, inside a step
train.py          a jitted train step and a resumable training loop
metrics_log.py    a run's per-epoch metrics (metrics.jsonl)
evaluation.py     accuracy and loss on a split, every example once
checkpoint.py     orbax checkpoints that carry their model config
parallel.py       a 1-D mesh of every device, batches split over it
bn_reestimate.py  BatchNorm re-estimation after a fold or merge
"""
