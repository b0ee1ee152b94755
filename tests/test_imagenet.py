"""ImageNet (§3.4) through a tiny copy on disk: the pipeline and a short run."""

import numpy as np
import pytest

from configs import imagenet_resnet18
from resnet_jax import data
from resnet_jax import imagenet
from resnet_jax import train

TRAIN = 40  # Images in the tiny training split: image i has label i.
VALIDATION = 10  # In its validation split: image i has label 500 + i.
HELD_OUT = 8  # The config's validation_size.


@pytest.fixture
def mock_imagenet(tmp_path):
  """A tiny imagenet2012 that TFDS reads, and slices, as the real one.

  Its images are small JPEGs of random pixels away from 0 and 255 (where a
  colour shift would be clipped); each label names its image.
  """
  tf = data.import_tensorflow()
  tfds = data.import_tfds()
  builder = tfds.builder('imagenet2012', data_dir=str(tmp_path))
  builder_dir = tmp_path / 'imagenet2012' / str(builder.version)
  builder_dir.mkdir(parents=True)
  rng = np.random.default_rng(0)
  splits = []
  for name, size, first_label in (('train', TRAIN, 0),
                                  ('validation', VALIDATION, 500)):
    template = tfds.core.ShardedFileTemplate(
        data_dir=str(builder_dir), dataset_name='imagenet2012', split=name,
        filetype_suffix='tfrecord')
    with tf.io.TFRecordWriter(str(template.sharded_filepath(
        shard_index=0, num_shards=1))) as writer:
      for i in range(size):
        image = rng.integers(64, 192, (*rng.integers(24, 48, 2), 3), np.uint8)
        writer.write(builder.info.features.serialize_example(
            {'image': image, 'label': first_label + i,
             'file_name': f'{name}_{i}.JPEG'}))
    splits.append(tfds.core.SplitInfo(
        name=name, shard_lengths=[size], num_bytes=0,
        filename_template=template))
  builder.info.set_splits(tfds.core.SplitDict(splits))
  builder.info.write_to_directory(str(builder_dir))
  config = imagenet_resnet18.get_config()
  config.data_dir = str(tmp_path)
  config.validation_size = HELD_OUT
  return config


def test_training_batches_are_224_crops(mock_imagenet):
  images, labels = next(imagenet.train_batches(
      mock_imagenet, seed=0, batch_size=4))
  assert images.shape == (4, 224, 224, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and np.all((labels >= 0) & (labels < 1000))


def labels_of(batches):
  return np.concatenate([labels[mask > 0] for _, labels, mask in batches])


def test_validation_images_are_held_out_of_training(mock_imagenet):
  inputs = imagenet.inputs(mock_imagenet, mesh=None)
  assert inputs.eval_split == 'validation'
  assert inputs.train_size == 1_281_167 - HELD_OUT  # Epochs of the rest.
  # The first HELD_OUT training images are the validation set; TFDS's
  # validation split stays the test set.
  np.testing.assert_array_equal(
      labels_of(inputs.eval('validation')), np.arange(HELD_OUT))
  np.testing.assert_array_equal(
      labels_of(inputs.eval('test')), 500 + np.arange(VALIDATION))
  # Training sees every other training image (4 epochs' worth), and never a
  # held-out one.
  batches = imagenet.train_batches(mock_imagenet, seed=0, batch_size=8)
  trained = np.concatenate([next(batches)[1] for _ in range(16)])
  np.testing.assert_array_equal(np.unique(trained),
                                np.arange(HELD_OUT, TRAIN))


def test_normalization_is_of_the_images_trained_on(mock_imagenet):
  mean, std = imagenet.normalization(mock_imagenet, num_images=4)
  # The centre crops of the first 4 training images after the held-out ones.
  crops = next(imagenet.eval_batches(mock_imagenet, 'train', 4, False))[0]
  expected = data.normalization(crops, mock_imagenet.normalization)
  np.testing.assert_array_equal(mean, expected[0])
  np.testing.assert_array_equal(std, expected[1])


def test_colour_augmentation_is_along_the_principal_components():
  tf = data.import_tensorflow()
  std = 0.1
  noise = np.stack([imagenet.lighting_noise(
      tf.constant([i, 7], tf.int64), std).numpy() for i in range(2000)])
  # eigvec @ (alpha * eigval) per image, alpha ~ N(0, std) per component:
  # the weights recovered from the noise have mean 0 and std ``std``, each
  # (a wrong eigenvalue scale moves a component's std by a factor).
  alpha = np.linalg.solve(np.array(imagenet.PCA_EIGVEC),
                          noise.T / 255).T / np.array(imagenet.PCA_EIGVAL)
  # 2000 draws: std of the mean std/45, of the std std/63; 5 of those.
  np.testing.assert_array_less(np.abs(alpha.mean(0)), 5 * std / 45)
  np.testing.assert_array_less(np.abs(alpha.std(0) - std), 5 * std / 63)
  assert np.all(noise[0] == imagenet.lighting_noise(
      tf.constant([0, 7], tf.int64), std).numpy())  # Stateless.


def test_colour_augmentation_shifts_each_image_by_one_colour(mock_imagenet):
  def batch(lighting, seed=0):
    mock_imagenet.pca_lighting = lighting
    return next(imagenet.train_batches(mock_imagenet, seed, 8))[0]

  plain = batch(0.0).astype(int)
  coloured = batch(0.1)
  np.testing.assert_array_equal(coloured, batch(0.1))  # Deterministic.
  assert np.any(coloured != batch(0.1, seed=1))
  # The same crops and flips, each image shifted by its own RGB vector: the
  # same for every pixel but for rounding to uint8.
  shift = coloured.astype(int) - plain
  colour = shift.mean(axis=(1, 2), keepdims=True)
  np.testing.assert_array_less(np.abs(shift - colour), 1 + 1e-9)
  assert np.all(np.abs(colour).max(axis=-1) > 0.5)  # Shifted.
  assert len(np.unique(colour.round(3), axis=0)) == 8  # Each its own.


def test_no_colour_augmentation_when_off():
  tf = data.import_tensorflow()
  grey = tf.io.encode_jpeg(tf.fill([300, 400, 3], tf.constant(100, tf.uint8)))
  decoded = imagenet.decode(grey).numpy()
  assert np.all(decoded == decoded[0, 0])  # A flat JPEG decodes flat.
  image, _ = imagenet.augment(grey, 0, tf.constant([1, 2], tf.int64), 0.0)
  assert image.shape == (224, 224, 3)
  assert np.all(image.numpy() == decoded[0, 0])


@pytest.mark.parametrize('field, value, message', [
    ('pca_lighting', -0.1, 'pca_lighting must not be negative'),
    ('validation_size', 1_281_167, 'validation_size must be in'),
    ('validation_size', -1, 'validation_size must be in')])
def test_bad_values_are_refused(field, value, message):
  config = imagenet_resnet18.get_config()
  config[field] = value
  with pytest.raises(data.DataError, match=message):
    data.inputs(config, mesh=None)


def test_colour_augmentation_is_for_imagenet():
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.pca_lighting = 0.1
  with pytest.raises(data.DataError, match='for ImageNet'):
    data.inputs(config, mesh=None)


@pytest.mark.parametrize('ten_crop, shape', [(False, (224, 224, 3)),
                                             (True, (10, 224, 224, 3))])
def test_eval_batches_are_padded_and_masked(mock_imagenet, ten_crop, shape):
  batches = list(imagenet.eval_batches(mock_imagenet, 'test',
                                                      4, ten_crop))
  assert len(batches) == 3  # ceil(10 / 4).
  assert all(images.shape == (4,) + shape for images, _, _ in batches)
  masks = np.concatenate([mask for _, _, mask in batches])
  np.testing.assert_array_equal(masks, [1] * VALIDATION + [0] * 2)
  if ten_crop:  # Crops 5-9 are the flips of crops 0-4.
    images = batches[0][0]
    np.testing.assert_array_equal(images[:, 5:], images[:, :5, :, ::-1])


def test_no_held_out_split(mock_imagenet):
  # Without validation_size, nothing is held out: the test set (ImageNet's
  # validation images) is evaluated during training.
  mock_imagenet.validation_size = 0
  inputs = imagenet.inputs(mock_imagenet, mesh=None)
  assert inputs.eval_split == 'test' and inputs.train_size == 1_281_167
  with pytest.raises(data.DataError, match="no 'validation' split"):
    next(imagenet.eval_batches(mock_imagenet, 'validation', 4,
                                              False))


@pytest.mark.parametrize('validation_size', [0, HELD_OUT])
def test_imagenet_resnet18_trains_and_evaluates(mock_imagenet, tmp_path,
                                                monkeypatch, validation_size):
  config = mock_imagenet
  config.validation_size = validation_size
  if not validation_size:  # The plateau schedule needs a validation split.
    config.lr_schedule = 'piecewise'
  config.batch_size = config.eval_batch_size = 8
  config.train_length = 2
  config.lr_boundaries = (1,)
  config.log_every_steps = config.eval_every_steps = 1
  config.checkpoint_every_steps = 2
  evaluations = []
  evaluate = train.evaluate
  monkeypatch.setattr(train, 'evaluate', lambda *args: evaluations.append(
      evaluate(*args)) or evaluations[-1])
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  if validation_size:
    # The held-out images are evaluated after steps 1 and 2, the test set
    # once, at the end.
    assert [e['images'] for e in evaluations] == [HELD_OUT] * 2 + [VALIDATION]
  else:
    # The test set is evaluated after steps 1 and 2, and the final test is
    # the step-2 evaluation, not a third pass over the same images.
    assert len(evaluations) == 2
  assert result == evaluations[-1] and result['images'] == VALIDATION
  assert 0 <= result['top5_error'] <= result['error'] <= 100
  assert (tmp_path / 'run' / 'checkpoints' / '2').is_dir()
