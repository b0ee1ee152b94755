"""CIFAR from every source, the 45k/5k split, and on-device augmentation."""

import hashlib
import io
import pickle
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from commands import assert_names
from commands import refused
from configs import smoke
from resnet_jax import cifar
from resnet_jax import data

RNG = np.random.default_rng(0)
# Ten tiny batches' worth: 5 training files and a test file of 7 images each.
IMAGES = RNG.integers(0, 256, (6, 7, 32, 32, 3), dtype=np.uint8)
LABELS = RNG.integers(0, 10, (6, 7)).astype(np.int32)
BINARY = [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']
PYTHON = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']


def binary_record(images, labels):
  chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  return np.concatenate([labels[:, None].astype(np.uint8), chw], 1).tobytes()


def python_batch(images, labels, key=b'labels'):
  chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  return pickle.dumps({b'data': chw, key: list(map(int, labels))})


def write_tar(path, members):
  with tarfile.open(path, 'w:gz') as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def cifar10_binary(tmp_path, name='cifar-10-binary.tar.gz'):
  return write_tar(
      tmp_path / name,
      {
          f'cifar-10-batches-bin/{f}': binary_record(IMAGES[i], LABELS[i])
          for i, f in enumerate(BINARY)
      },
  )


def check_splits(train, test):
  np.testing.assert_array_equal(train.images, IMAGES[:5].reshape(-1, 32, 32, 3))
  np.testing.assert_array_equal(train.labels, LABELS[:5].reshape(-1))
  np.testing.assert_array_equal(test.images, IMAGES[5])
  np.testing.assert_array_equal(test.labels, LABELS[5])


def test_binary_archive_round_trips_with_a_warning_if_not_official(tmp_path):
  with pytest.warns(UserWarning, match='not the official CIFAR release'):
    check_splits(*cifar.read_archive(cifar10_binary(tmp_path), 'cifar10'))


def test_official_sha256_is_silent(tmp_path, monkeypatch, recwarn):
  path = cifar10_binary(tmp_path)
  monkeypatch.setitem(
      cifar.OFFICIAL_SHA256,
      path.name,
      hashlib.sha256(path.read_bytes()).hexdigest(),
  )
  cifar.read_archive(path, 'cifar10')
  assert not recwarn.list


def test_python_archive_and_extracted_folder(tmp_path):
  path = write_tar(
      tmp_path / 'cifar-10-python.tar.gz',
      {
          f'cifar-10-batches-py/{f}': python_batch(IMAGES[i], LABELS[i])
          for i, f in enumerate(PYTHON)
      },
  )
  with pytest.warns(UserWarning):
    check_splits(*cifar.read_archive(path, 'cifar10'))
  folder = tmp_path / 'extracted'
  with tarfile.open(path) as tar:
    tar.extractall(folder, filter='data')
  for root in (folder, folder / 'cifar-10-batches-py'):
    check_splits(*cifar.read_archive(root, 'cifar10'))


def test_cifar100_python_archive(tmp_path):
  labels = RNG.integers(0, 100, (2, 7))
  path = write_tar(
      tmp_path / 'cifar-100-python.tar.gz',
      {
          'cifar-100-python/train': python_batch(
              IMAGES[0], labels[0], b'fine_labels'
          ),
          'cifar-100-python/test': python_batch(
              IMAGES[1], labels[1], b'fine_labels'
          ),
      },
  )
  with pytest.warns(UserWarning):
    train, test = cifar.read_archive(path, 'cifar100')
  np.testing.assert_array_equal(train.labels, labels[0])
  np.testing.assert_array_equal(test.images, IMAGES[1])


@pytest.mark.parametrize(
    'damage',
    [lambda data: data[: len(data) // 2], lambda data: b'not a tar' * 100],
)
def test_damaged_archives_are_clear_errors(tmp_path, damage):
  path = cifar10_binary(tmp_path)
  path.write_bytes(damage(path.read_bytes()))
  with pytest.warns(UserWarning):
    assert_names(refused(cifar.read_archive, path, 'cifar10'), path)


def test_wrong_or_missing_data_are_clear_errors(tmp_path):
  path = write_tar(tmp_path / 'other.tar.gz', {'readme.txt': b'hello'})
  with pytest.warns(UserWarning):
    assert_names(refused(cifar.read_archive, path, 'cifar10'), path, 'cifar10')
  members = {f'cifar-10-batches-bin/{f}': b'x' * 100 for f in BINARY}
  path = write_tar(tmp_path / 'bad.tar.gz', members)
  with pytest.warns(UserWarning):  # 100 bytes, not records of 3073.
    assert_names(refused(cifar.read_archive, path, 'cifar10'), 100, 3073)
  missing = tmp_path / 'missing.tar.gz'
  assert_names(refused(cifar.read_archive, missing, 'cifar10'), missing)


def test_tfds_source_with_mock_data():
  tfds = data.import_tfds()
  config = smoke.get_config()
  config.data_source = 'tfds'
  config.validation_size = 8
  with tfds.testing.mock_data(num_examples=24):
    loaded = cifar.load(config)
  assert loaded.train.images.shape == (16, 32, 32, 3)
  assert loaded.train.images.dtype == np.uint8
  assert len(loaded.validation) == 8 and len(loaded.test) == 24


def test_tfds_failure_says_how_to_use_an_archive(monkeypatch):
  tfds = data.import_tfds()

  def offline(*args, **kwargs):
    raise ConnectionError('no route to host')

  monkeypatch.setattr(tfds, 'load', offline)
  config = smoke.get_config()
  config.data_source = 'tfds'
  with pytest.raises(data.DataError, match='--config.data_source=archive'):
    cifar.load(config)


def test_validation_split_is_fixed_and_disjoint():
  config = smoke.get_config()
  a = cifar.load(config)
  config.seed = 7
  b = cifar.load(config)
  np.testing.assert_array_equal(a.validation.images, b.validation.images)
  assert len(a.train) + len(a.validation) == config.synthetic_train_size
  train = {x.tobytes() for x in a.train.images}
  assert not any(x.tobytes() in train for x in a.validation.images)


def test_normalization_comes_from_the_training_split():
  images = RNG.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
  mean, std = data.normalization(images, 'per_pixel_mean')
  np.testing.assert_allclose(mean, images.mean(0) / 255, rtol=1e-6)
  np.testing.assert_array_equal(std, 1)
  mean, std = data.normalization(images, 'per_channel')
  np.testing.assert_allclose(
      mean[5, 7], images.reshape(-1, 3).mean(0) / 255, rtol=1e-6
  )
  assert mean.shape == (32, 32, 3) and np.ptp(mean, axis=(0, 1)).max() == 0
  np.testing.assert_allclose(std, images.reshape(-1, 3).std(0) / 255, rtol=1e-6)


def test_augmentation_is_a_padded_crop_and_maybe_a_flip():
  images = jnp.asarray(RNG.integers(1, 256, (64, 32, 32, 3), dtype=np.uint8))
  out = np.asarray(cifar.pad_crop_flip(images, jax.random.key(0)))
  padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
  flips, offsets = 0, set()
  for i in range(len(images)):
    found = [
        (y, x, f)
        for y in range(9)
        for x in range(9)
        for f in (0, 1)
        if np.array_equal(
            out[i],
            (lambda c: c[:, ::-1] if f else c)(
                padded[i, y : y + 32, x : x + 32]
            ),
        )
    ]
    assert found, f'image {i} is not a crop of the padded image'
    flips += found[0][2]
    offsets.add(found[0][:2])
  assert 16 < flips < 48 and len(offsets) > 20


def test_batches_derive_from_seed_and_step_and_cover_each_epoch():
  n, batch = 96, 32  # Three steps an epoch.
  images = cifar.pack(np.zeros((n, 32, 32, 3), np.uint8))
  labels = jnp.arange(n)  # Labels identify the examples.
  rng = jax.random.key(3)
  draw = lambda step: np.asarray(
      cifar.train_batch(images, labels, rng, step, batch, augment=False)[1]
  )
  epoch = np.concatenate([draw(s) for s in range(3)])
  assert sorted(epoch) == list(range(n))
  np.testing.assert_array_equal(draw(1), draw(1))
  assert not np.array_equal(
      np.concatenate([draw(s) for s in range(3, 6)]), epoch
  )  # A new order next epoch.
  # A batch that straddles two epochs takes the rest of one and the start of
  # the next.
  labels = jnp.arange(80)
  straddle = np.asarray(
      cifar.train_batch(images[:80], labels, rng, 2, batch, augment=False)[1]
  )
  first = np.concatenate(
      [
          np.asarray(
              cifar.train_batch(
                  images[:80], labels, rng, s, batch, augment=False
              )[1]
          )
          for s in (0, 1)
      ]
  )
  assert sorted(np.concatenate([first, straddle[:16]])) == list(range(80))


def test_the_devices_hold_packed_images_and_draw_them_whole():
  # The training split is held as uint32 words (cifar.pack): a drawn batch
  # is the uint8 images of its labels, bit for bit.
  images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), np.uint8)
  packed = cifar.pack(images)
  assert packed.dtype == np.uint32 and packed.shape == (40, 32 * 32 * 3 // 4)
  np.testing.assert_array_equal(cifar.unpack(jnp.asarray(packed)), images)
  batch, labels = cifar.train_batch(
      packed, jnp.arange(40), jax.random.key(0), 1, 16, augment=False
  )
  np.testing.assert_array_equal(batch, images[np.asarray(labels)])
