"""Image data: sources, the shape they are brought to, and their partition between sites.

- :mod:`~collafuse.data.dataset`: the :class:`Dataset` every loader returns;
- :mod:`~collafuse.data.sources`: Fashion-MNIST idx files, ``.npz`` archives and the dispatch
  :func:`load_dataset`;
- :mod:`~collafuse.data.folder`: folders of image files;
- :mod:`~collafuse.data.shape`: channel and size conversion;
- :mod:`~collafuse.data.inspect`: what a source holds (``collafuse data inspect``);
- :mod:`~collafuse.data.partition`: the split between sites.
"""

from collafuse.data.dataset import SPLITS, DataError, Dataset, Split
from collafuse.data.folder import IMAGE_SUFFIXES, load_image_folder, scan_folder
from collafuse.data.partition import PARTITION_SCHEMES, PartitionScheme, SitePartition, partition
from collafuse.data.shape import conform
from collafuse.data.sources import (
    DATA_ENV,
    DEFAULT_FMNIST_DIR,
    FMNIST_HINT,
    has_idx_files,
    load_dataset,
    load_fashion_mnist,
    load_npz,
    read_idx,
    resolve_source,
)

__all__ = [
    "DATA_ENV",
    "DEFAULT_FMNIST_DIR",
    "FMNIST_HINT",
    "IMAGE_SUFFIXES",
    "PARTITION_SCHEMES",
    "SPLITS",
    "DataError",
    "Dataset",
    "PartitionScheme",
    "SitePartition",
    "Split",
    "conform",
    "has_idx_files",
    "load_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "load_npz",
    "partition",
    "read_idx",
    "resolve_source",
    "scan_folder",
]
