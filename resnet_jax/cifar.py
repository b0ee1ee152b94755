"""CIFAR-10/100 (§4.2): read once, held on the devices, batched in the step.

The official archive (checked against its sha256), TFDS, or synthetic data
of the same shapes. The uint8 training split lives on the accelerators and
each step's batch is drawn, augmented and normalised inside the jitted
training step: the host does no per-step work. The batch order and the
augmentation derive from (seed, step) alone, so a resumed run sees exactly the
batches an uninterrupted one would.
"""

import dataclasses
import functools
import hashlib
import io
import itertools
import pathlib
import pickle
import tarfile
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import data
from resnet_jax import devices
from resnet_jax.data import DataError

CIFAR_PAD = 4  # §4.2: "4 pixels are padded on each side".
IMAGE_SHAPE = (32, 32, 3)

# The official archives of https://www.cs.toronto.edu/~kriz/cifar.html.
OFFICIAL_SHA256 = {
    'cifar-10-binary.tar.gz': 'c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd',
    'cifar-10-python.tar.gz': '6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce',
    'cifar-100-python.tar.gz': '85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7',
}
# Members of each archive layout: folder, train files, test files, format.
ARCHIVE_LAYOUTS = {
    'cifar10': [
        (
            'cifar-10-batches-bin',
            [f'data_batch_{i}.bin' for i in range(1, 6)],
            ['test_batch.bin'],
            'binary',
        ),
        (
            'cifar-10-batches-py',
            [f'data_batch_{i}' for i in range(1, 6)],
            ['test_batch'],
            'python',
        ),
    ],
    'cifar100': [('cifar-100-python', ['train'], ['test'], 'python')],
}


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # uint8, (n, 32, 32, 3).
  labels: np.ndarray  # int32, (n,).

  def __len__(self):
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Cifar:
  """A CIFAR dataset split for training, with its normalisation."""

  train: Split
  validation: Split | None  # None when training on all 50k.
  test: Split
  mean: np.ndarray  # Subtracted from images scaled to [0, 1].
  std: np.ndarray


def load(config) -> Cifar:
  """Reads CIFAR from config.data_source and splits off the validation set.

  The validation images are a fixed random subset (the same for every seed)
  of the official training split: the paper's 45k/5k split with the default
  validation_size of 5000.
  """
  info = data.dataset_info(config.dataset)
  if config.dataset not in ARCHIVE_LAYOUTS:
    raise DataError(f'{config.dataset} is not a CIFAR dataset')
  if config.data_source == 'tfds':
    train, test = _read_tfds(config.dataset, config.data_dir)
  elif config.data_source == 'archive':
    train, test = read_archive(config.data_dir, config.dataset)
  elif config.data_source == 'synthetic':
    train, test = _synthetic(info, config.synthetic_train_size)
  else:
    raise DataError(
        f'unknown data_source {config.data_source!r}: use tfds, '
        'archive or synthetic'
    )
  if not 0 <= config.validation_size < len(train):
    raise DataError(
        f'validation_size must be in [0, {len(train)}), got '
        f'{config.validation_size}'
    )
  validation = None
  if config.validation_size:
    order = np.random.default_rng(0).permutation(len(train))
    held_out = np.sort(order[: config.validation_size])
    kept = np.sort(order[config.validation_size :])
    validation = Split(train.images[held_out], train.labels[held_out])
    train = Split(train.images[kept], train.labels[kept])
  if np.any(train.labels >= info.num_classes) or np.any(train.labels < 0):
    raise DataError(
        f'labels outside [0, {info.num_classes}) for ' f'{config.dataset}'
    )
  mean, std = data.normalization(train.images, config.normalization)
  return Cifar(train, validation, test, mean, std)


def read_archive(path: str, dataset: str) -> tuple[Split, Split]:
  """Reads an official CIFAR archive (.tar.gz) or its extracted folder.

  The archive's sha256 is compared with the official release: a mismatch is
  a warning (a re-encoded copy still trains), a truncated or malformed file
  a DataError.
  """
  if not path:
    raise DataError(
        'data_source=archive needs --config.data_dir=PATH to a '
        'CIFAR archive or its extracted folder'
    )
  path = pathlib.Path(path)
  if not path.exists():
    raise DataError(f'{path} does not exist')
  if path.is_dir():
    names = {str(p.relative_to(path)) for p in path.rglob('*') if p.is_file()}
    return _read_members(
        path, dataset, names, lambda name: (path / name).read_bytes()
    )
  _check_sha256(path)
  try:
    with tarfile.open(path, 'r:gz') as tar:
      files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise DataError(
        f'{path} is truncated or malformed: ' f'{type(e).__name__}: {e}'
    ) from e
  return _read_members(path, dataset, files, files.__getitem__)


def _check_sha256(path: pathlib.Path):
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      digest.update(chunk)
  if digest.hexdigest() != OFFICIAL_SHA256.get(path.name):
    warnings.warn(
        f'{path} is not the official CIFAR release (its sha256 '
        'differs); using it anyway',
        stacklevel=3,
    )


def _read_members(path, dataset, names, read) -> tuple[Split, Split]:
  """Reads the train and test files of a known layout found among names."""
  for folder, train_files, test_files, fmt in ARCHIVE_LAYOUTS[dataset]:
    for prefix in (f'{folder}/', ''):  # The folder itself, or its parent.
      if prefix + train_files[0] not in names:
        continue
      parse = _parse_binary if fmt == 'binary' else _parse_python
      splits = []
      for files in (train_files, test_files):
        parts = []
        for name in files:
          try:
            parts.append(parse(read(prefix + name), dataset, name))
          except (
              KeyError,
              OSError,
              EOFError,
              ValueError,
              pickle.UnpicklingError,
          ) as e:
            if isinstance(e, DataError):
              raise
            raise DataError(
                f'{path}: {name} is missing or malformed '
                f'({type(e).__name__}: {e})'
            ) from e
        splits.append(
            Split(
                np.concatenate([p.images for p in parts]),
                np.concatenate([p.labels for p in parts]),
            )
        )
      return tuple(splits)
  expected = ' or '.join(
      f'{folder}/' for folder, *_ in ARCHIVE_LAYOUTS[dataset]
  )
  raise DataError(
      f'{path} holds no {dataset} data (expected {expected} as '
      'in the official archives)'
  )


def _parse_binary(data: bytes, dataset: str, name: str) -> Split:
  """CIFAR-10 binary: records of a label byte and 3072 pixel bytes (CHW)."""
  del dataset
  record = 1 + 32 * 32 * 3
  if not data or len(data) % record:
    raise DataError(
        f'{name} has {len(data)} bytes, not a multiple of the '
        f'{record}-byte CIFAR-10 record'
    )
  raw = np.frombuffer(data, np.uint8).reshape(-1, record)
  images = raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return Split(np.ascontiguousarray(images), raw[:, 0].astype(np.int32))


def _parse_python(data: bytes, dataset: str, name: str) -> Split:
  """CIFAR python: pickled dicts with b'data' (n, 3072) and the labels."""
  batch = pickle.load(io.BytesIO(data), encoding='bytes')
  key = b'fine_labels' if dataset == 'cifar100' else b'labels'
  if not isinstance(batch, dict) or b'data' not in batch or key not in batch:
    raise DataError(f'{name} is not a {dataset} python batch')
  images = np.asarray(batch[b'data'], np.uint8)
  images = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return Split(np.ascontiguousarray(images), np.asarray(batch[key], np.int32))


def _synthetic(info: data.DatasetInfo, size: int) -> tuple[Split, Split]:
  """Learnable random data of CIFAR's shapes: each class has its own tint."""
  rng = np.random.default_rng(0)
  tints = rng.uniform(0, 255, (info.num_classes, 1, 1, 3))

  def split(n):
    labels = rng.integers(0, info.num_classes, n).astype(np.int32)
    noise = rng.normal(0, 40, (n, 32, 32, 3))
    images = np.clip(tints[labels] + noise, 0, 255).astype(np.uint8)
    return Split(images, labels)

  return split(size), split(size // 4)


def _read_tfds(dataset: str, data_dir: str) -> tuple[Split, Split]:
  tfds = data.import_tfds()
  try:
    splits = tfds.load(
        dataset,
        split=['train', 'test'],
        as_supervised=True,
        data_dir=data_dir or None,
    )
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f'TFDS could not load {dataset} ({type(e).__name__}: '
        f'{str(e).splitlines()[0] if str(e) else ""}). Offline, download the '
        'official archive (cifar-10-binary.tar.gz, cifar-10-python.tar.gz or '
        'cifar-100-python.tar.gz) and pass --config.data_source=archive '
        '--config.data_dir=PATH'
    ) from e
  result = []
  for split in splits:
    batches = list(tfds.as_numpy(split.batch(10_000)))
    result.append(
        Split(
            np.concatenate([b[0] for b in batches]),
            np.concatenate([b[1] for b in batches]).astype(np.int32),
        )
    )
  return tuple(result)


# On-device batch construction (inside the jitted training step).


def pack(images: np.ndarray) -> np.ndarray:
  """uint8 images as rows of uint32 words: the training split as the devices
  hold it. A TPU gathers a uint8 array by widening all of it to 32 bits, a
  temporary 4x the split (553 MB for CIFAR-10's 45k images, each step:
  ``python -m resnet_jax.compile``); rows of words are gathered as they are."""
  return np.ascontiguousarray(images).reshape(len(images), -1).view(np.uint32)


def unpack(rows) -> jax.Array:
  """``pack``'s rows as the uint8 images they hold."""
  return jax.lax.bitcast_convert_type(rows, jnp.uint8).reshape(
      rows.shape[:1] + IMAGE_SHAPE
  )


def train_batch(images, labels, rng, step, batch_size: int, augment: bool):
  """The batch of a training step: examples and their augmentation.

  The examples (rows of ``pack``ed ``images``) are taken in the order of a
  fresh random permutation of the training set per epoch (epochs follow each
  other without a gap, so every image is seen once per epoch); both derive
  from ``rng`` and ``step`` only.
  """
  n = images.shape[0]
  position = step * batch_size + jnp.arange(batch_size)
  epoch = position // n
  first = epoch[0]
  order_key = jax.random.fold_in(rng, 0)
  this = jax.random.permutation(jax.random.fold_in(order_key, first), n)
  after = jax.random.permutation(jax.random.fold_in(order_key, first + 1), n)
  index = jnp.where(epoch == first, this[position % n], after[position % n])
  batch = unpack(images[index])
  if augment:
    batch = pad_crop_flip(
        batch, jax.random.fold_in(jax.random.fold_in(rng, 1), step)
    )
  return batch, labels[index]


def pad_crop_flip(images, key):
  """§4.2: pad 4 zero pixels per side, random 32x32 crop, random flip."""
  n, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (CIFAR_PAD,) * 2, (CIFAR_PAD,) * 2, (0, 0)))
  ky, kx, kf = jax.random.split(key, 3)
  y = jax.random.randint(ky, (n,), 0, 2 * CIFAR_PAD + 1)
  x = jax.random.randint(kx, (n,), 0, 2 * CIFAR_PAD + 1)
  crops = jax.vmap(
      lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, c))
  )(padded, y, x)
  flip = jax.random.bernoulli(kf, 0.5, (n,))
  return jnp.where(flip[:, None, None, None], crops[:, :, ::-1], crops)


def eval_batches(split: Split, batch_size: int):
  """This process's share of each global evaluation batch, padded and masked.

  Yields (images, labels, mask); the last global batch is padded with
  masked zeros so every batch has the same shape.
  """
  processes, index = jax.process_count(), jax.process_index()
  local = batch_size // processes
  mine = slice(index * local, (index + 1) * local)
  for start in range(0, len(split), batch_size):
    images = split.images[start : start + batch_size]
    labels = split.labels[start : start + batch_size]
    pad = batch_size - len(labels)
    mask = np.concatenate(
        [np.ones(len(labels), np.float32), np.zeros(pad, np.float32)]
    )
    images = np.concatenate(
        [images, np.zeros((pad,) + images.shape[1:], images.dtype)]
    )
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    yield images[mine], labels[mine], mask[mine]


def inputs(config, mesh) -> data.Inputs:
  """CIFAR held on the devices (of ``mesh``; None to evaluate only): each
  step draws its own batch there."""
  cifar = load(config)

  def train_inputs(first_step):
    del first_step  # Batches derive from the state's rng and step.
    replicated = devices.replicated(mesh)
    return itertools.repeat(
        (
            devices.replicate(pack(cifar.train.images), replicated),
            devices.replicate(cifar.train.labels, replicated),
        )
    )

  return data.Inputs(
      train_size=len(cifar.train),
      normalization=lambda: (cifar.mean, cifar.std),
      train=train_inputs,
      eval=lambda split: eval_batches(
          getattr(cifar, split), config.eval_batch_size
      ),
      eval_split='validation' if cifar.validation is not None else 'test',
      draw=draw(config),
  )


def draw(config):
  """``data.Inputs.draw`` of a run: its batch and augmentation."""
  return functools.partial(
      train_batch, batch_size=config.batch_size, augment=config.augment
  )
