"""Datasets of the paper: CIFAR-10/100 (§4.2) and ImageNet (§3.4)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  image_size: int  # The network's input resolution.
  train_size: int


DATASETS = {
    'cifar10': DatasetInfo(num_classes=10, image_size=32, train_size=50_000),
    'cifar100': DatasetInfo(num_classes=100, image_size=32, train_size=50_000),
    'imagenet2012': DatasetInfo(num_classes=1000, image_size=224,
                                train_size=1_281_167),
}


class DataError(ValueError):
  """A dataset that is unknown, missing or malformed."""


def dataset_info(name: str) -> DatasetInfo:
  if name not in DATASETS:
    raise DataError(f'unknown dataset {name!r}: use one of '
                    f'{", ".join(DATASETS)}')
  return DATASETS[name]
