"""Training infrastructure: datasets, the train loop, evaluation, checkpoints, data
parallelism and BatchNorm re-estimation.

data.py           datasets as uint8 arrays, the color/gray views, seeded augmentation
train.py          a jitted train step and a resumable training loop
evaluation.py     accuracy and loss on a split, every example once
checkpoint.py     orbax checkpoints that carry their model config
parallel.py       a 1-D mesh of every device, batches split over it
bn_reestimate.py  BatchNorm re-estimation after a fold or merge
"""
