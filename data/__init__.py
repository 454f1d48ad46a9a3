"""Datasets by name, transforms and loaders (see CONTRIBUTING.md for how to add a dataset).

Importing this package registers every dataset (each module's ``@register_dataset``).
"""

from data import cifar as _cifar  # noqa: F401  (registers CIFAR10, CIFAR100)
from data import digits as _digits  # noqa: F401  (registers Digits)
from data import imagenet as _imagenet  # noqa: F401  (registers ImageNet)
from data import mnist5k as _mnist5k  # noqa: F401  (registers MNIST5k)
from data import tiny_imagenet as _tiny_imagenet  # noqa: F401  (registers TinyImageNet)
from data.loaders import Loaders, build_loaders
from data.registry import DATASETS, build_dataset, dataset_names, register_dataset
from data.splits import DatasetSplits

__all__ = ["DATASETS", "DatasetSplits", "Loaders", "build_dataset", "build_loaders", "dataset_names",
           "register_dataset"]
