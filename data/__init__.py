"""The input pipeline: one module configured by `config.dataset`.

    info = data.dataset_info(config.dataset)          # shapes and classes, nothing loaded
    splits = data.load(config.dataset, seed=config.seed)  # host memory: uint8 images, labels
    for batch in data.train_batches(splits.train, global_batch_size=128, seed=0,
                                    start_step=0, sharding=NamedSharding(mesh, P('data'))):
        ...  # inside jit: data.augment(key, batch['image'], ...), data.normalize(...)

Sources: the built-in procedural dataset (`data.builtin`), the official distribution files in
a folder (`data.files`), or TFDS datasets prepared as array_record (`data.tfds_source`;
`python -m data prepare cifar10`).
"""

from data.augment import augment, normalize
from data.batches import eval_batches, train_batches
from data.catalog import NAMES, SOURCES, DatasetInfo, dataset_info
from data.loading import Split, Splits, load

__all__ = [
    "NAMES",
    "SOURCES",
    "DatasetInfo",
    "Split",
    "Splits",
    "augment",
    "dataset_info",
    "eval_batches",
    "load",
    "normalize",
    "train_batches",
]
