"""What training needs of a dataset, whichever it is.

The datasets of the paper (``DATASETS``), the ``Inputs`` a run reads them
through (made by ``cifar.py`` and ``imagenet.py``, which import this module;
``train.dataset_inputs`` picks one), and what both share: the input
normalisation and TensorFlow, kept off the accelerators. TensorFlow is
needed only to read TFDS datasets, to stream ImageNet and to write
TensorBoard summaries; nothing else imports it.
"""

from collections.abc import Callable, Iterable, Iterator
import dataclasses

import jax.numpy as jnp
import numpy as np

from resnet_jax import cli


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  image_size: int  # The network's input resolution.
  train_size: int


DATASETS = {
    'cifar10': DatasetInfo(num_classes=10, image_size=32, train_size=50_000),
    'cifar100': DatasetInfo(num_classes=100, image_size=32, train_size=50_000),
    'imagenet2012': DatasetInfo(
        num_classes=1000, image_size=224, train_size=1_281_167
    ),
}


class DataError(cli.UserError):
  """A dataset that is unknown, missing or malformed."""


def dataset_info(name: str) -> DatasetInfo:
  if name not in DATASETS:
    raise DataError(
        f'unknown dataset {name!r}: use one of ' f'{", ".join(DATASETS)}'
    )
  return DATASETS[name]


@dataclasses.dataclass(frozen=True)
class Inputs:
  """Where a run's data come from."""

  train_size: int  # Images per epoch.
  normalization: Callable[[], tuple[np.ndarray, np.ndarray]]  # Mean, std.
  train: Callable[[int], Iterator[tuple]]  # First step -> each step's inputs.
  eval: Callable[[str], Iterable[tuple]]  # Split -> local eval batches.
  eval_split: str  # Evaluated during training: 'validation' or 'test'.
  # For data held on the devices (CIFAR), train() yields the whole training
  # split and draw(images, labels, rng, step) makes the step's augmented
  # batch inside the jitted step; None when train() yields this process's
  # share of each step's batch (train.Steps.dispatches sends them).
  draw: Callable[..., tuple] | None


def normalization(images: np.ndarray, kind: str):
  """Mean and std of the training images, scaled to [0, 1].

  'per_pixel_mean' (§4.2: "the per-pixel mean subtracted") gives a mean
  image and std 1; 'per_channel' gives the mean and std of each channel (the
  mean broadcast to an image, so both kinds have the same shapes).
  """
  x = images.astype(np.float64) / 255
  if kind == 'per_pixel_mean':
    return x.mean(axis=0).astype(np.float32), np.ones(3, np.float32)
  if kind == 'per_channel':
    mean = np.broadcast_to(x.mean(axis=(0, 1, 2)), x.shape[1:])
    return mean.astype(np.float32), x.std(axis=(0, 1, 2)).astype(np.float32)
  raise DataError(
      f'unknown normalization {kind!r}: use per_pixel_mean or ' 'per_channel'
  )


def normalize(images, mean, std):
  """uint8 images to the network's float32 input: (x / 255 - mean) / std."""
  return (images.astype(jnp.float32) / 255 - mean) / std


def import_tensorflow():
  """TensorFlow, kept off the accelerators JAX uses."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        'this needs TensorFlow (TFDS datasets, ImageNet, '
        'TensorBoard summaries): pip install tensorflow, or '
        "tensorflow-cpu, or resnet_jax's [tensorflow] extra"
    ) from e
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')
  return tf


def import_tfds():
  import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds
