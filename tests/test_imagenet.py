"""ImageNet (§3.4) through a tiny copy on disk: the pipeline and a short run."""

import collections
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import imagenet_resnet18
from commands import assert_names
from commands import python
from commands import refused
from numerics import assert_close
from resnet_jax import data
from resnet_jax import evaluate
from resnet_jax import imagenet
from resnet_jax import models
from resnet_jax import train
from resnet_jax import workdir as workdir_lib

TRAIN = 40  # Images in the tiny training split: image i has label i.
VALIDATION = 10  # In its validation split: image i has label 500 + i.
HELD_OUT = 8  # The config's validation_size.


@pytest.fixture
def mock_imagenet(tmp_path, request):
  """A tiny imagenet2012 that TFDS reads, and slices, as the real one.

  Its images are small JPEGs of random pixels away from 0 and 255 (where a
  colour shift would be clipped); each label names its image. An indirect
  parameter sets the number of validation (test) images.
  """
  validation = getattr(request, 'param', VALIDATION)
  tf = data.import_tensorflow()
  tfds = data.import_tfds()
  builder = tfds.builder('imagenet2012', data_dir=str(tmp_path))
  builder_dir = tmp_path / 'imagenet2012' / str(builder.version)
  builder_dir.mkdir(parents=True)
  rng = np.random.default_rng(0)
  splits = []
  for name, size, first_label in (
      ('train', TRAIN, 0),
      ('validation', validation, 500),
  ):
    template = tfds.core.ShardedFileTemplate(
        data_dir=str(builder_dir),
        dataset_name='imagenet2012',
        split=name,
        filetype_suffix='tfrecord',
    )
    with tf.io.TFRecordWriter(
        str(template.sharded_filepath(shard_index=0, num_shards=1))
    ) as writer:
      for i in range(size):
        image = rng.integers(64, 192, (*rng.integers(24, 48, 2), 3), np.uint8)
        writer.write(
            builder.info.features.serialize_example(
                {
                    'image': image,
                    'label': first_label + i,
                    'file_name': f'{name}_{i}.JPEG',
                }
            )
        )
    splits.append(
        tfds.core.SplitInfo(
            name=name,
            shard_lengths=[size],
            num_bytes=0,
            filename_template=template,
        )
    )
  builder.info.set_splits(tfds.core.SplitDict(splits))
  builder.info.write_to_directory(str(builder_dir))
  config = imagenet_resnet18.get_config()
  config.data_dir = str(tmp_path)
  config.validation_size = HELD_OUT
  return config


def test_training_batches_are_224_crops(mock_imagenet):
  images, labels = next(
      imagenet.train_batches(mock_imagenet, seed=0, batch_size=4)
  )
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
      labels_of(inputs.eval('validation')), np.arange(HELD_OUT)
  )
  np.testing.assert_array_equal(
      labels_of(inputs.eval('test')), 500 + np.arange(VALIDATION)
  )
  # Training sees every other training image (4 epochs' worth), and never a
  # held-out one.
  batches = imagenet.train_batches(mock_imagenet, seed=0, batch_size=8)
  trained = np.concatenate([next(batches)[1] for _ in range(16)])
  np.testing.assert_array_equal(np.unique(trained), np.arange(HELD_OUT, TRAIN))


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
  noise = np.stack(
      [
          imagenet.lighting_noise(tf.constant([i, 7], tf.int64), std).numpy()
          for i in range(2000)
      ]
  )
  # eigvec @ (alpha * eigval) per image, alpha ~ N(0, std) per component:
  # the weights recovered from the noise have mean 0 and std ``std``, each
  # (a wrong eigenvalue scale moves a component's std by a factor).
  alpha = np.linalg.solve(
      np.array(imagenet.PCA_EIGVEC), noise.T / 255
  ).T / np.array(imagenet.PCA_EIGVAL)
  # 2000 draws: std of the mean std/45, of the std std/63; 5 of those.
  np.testing.assert_array_less(np.abs(alpha.mean(0)), 5 * std / 45)
  np.testing.assert_array_less(np.abs(alpha.std(0) - std), 5 * std / 63)
  assert np.all(
      noise[0]
      == imagenet.lighting_noise(tf.constant([0, 7], tf.int64), std).numpy()
  )  # Stateless.


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


def photo_jpeg(tf, rng, shape, chroma_downsampling=True):
  """A JPEG of ``shape`` (height, width): smooth colours with a fine grain."""
  coarse = rng.uniform(0, 255, (1, 4, 5, 3))
  smooth = tf.image.resize(coarse, shape, method='bicubic')[0]
  image = tf.clip_by_value(smooth + rng.normal(0, 20, (*shape, 3)), 0, 255)
  return tf.io.encode_jpeg(
      tf.cast(image, tf.uint8),
      quality=90,
      chroma_downsampling=chroma_downsampling,
  ).numpy()


# Landscape and portrait, odd sides, small images the training scales
# upscale (to shorter side 256 or more), one larger than the shorter side
# 256 (downscaled at some scales, upscaled at others), and 4:2:0 chroma (the
# default, ImageNet's usual) and 4:4:4.
VIEW_JPEGS = (
    ((40, 61), True),
    ((75, 37), True),
    ((255, 257), True),
    ((301, 199), False),
    ((375, 500), True),
)
VIEW_KEYS = 8


def test_crop_then_resize_takes_the_reference_view():
  tf = data.import_tensorflow()
  rng = np.random.default_rng(0)

  @tf.function
  def views(jpeg, key):
    size, crop, _, _ = imagenet.draws(key)
    return (
        imagenet.resize_then_crop(jpeg, size, crop),
        imagenet.crop_then_resize(jpeg, size, crop),
        imagenet.augment(jpeg, 0, key, 0.1, imagenet.resize_then_crop)[0],
        imagenet.augment(jpeg, 0, key, 0.1)[0],
        imagenet.window(jpeg, size, crop)[0],
    )

  float_diffs, uint8_diffs = [], []
  for shape, chroma_downsampling in VIEW_JPEGS:
    jpeg = tf.constant(photo_jpeg(tf, rng, shape, chroma_downsampling))
    whole = imagenet.decode(jpeg).numpy()
    for i in range(VIEW_KEYS):
      key = tf.constant([i, shape[0]], tf.int64)
      reference, view, reference_uint8, augmented, box = (
          x.numpy() for x in views(jpeg, key)
      )
      assert view.shape == (224, 224, 3) and augmented.dtype == np.uint8
      float_diffs.append(np.abs(view - reference))
      uint8_diffs.append(
          np.abs(augmented.astype(int) - reference_uint8.astype(int))
      )
      # The window decoded alone is the whole image's, but at its left
      # edge where that is an iMCU boundary (x a multiple of 16) and at its
      # right edge where that ends a 2-pixel chroma pair (x + width even):
      # with 4:2:0 chroma libjpeg's fancy upsampling there lacks the
      # neighbouring chroma sample outside the window (up to some 20 levels
      # apart on these images). Those columns are the window's margin,
      # outside every resize weight's support: the views agree.
      y, x, height, width = box
      window = tf.image.decode_and_crop_jpeg(jpeg, box, channels=3).numpy()
      np.testing.assert_array_equal(
          window[:, 1:-1], whole[y : y + height, x + 1 : x + width - 1]
      )
      if not chroma_downsampling:
        np.testing.assert_array_equal(
            window, whole[y : y + height, x : x + width]
        )
  float_diffs, uint8_diffs = np.stack(float_diffs), np.stack(uint8_diffs)
  # Both resize the same pixels with the same triangle weights, from sample
  # positions computed apart in float32: (x + 0.5) / scale in the whole
  # image; in the window (j + 0.5) / scale less translation / scale, the
  # translation (start * scale - offset) rounded at magnitudes up to 2^10
  # (half an ulp: 6e-5 output pixels). The positions are at most some
  # 1.5e-4 input pixels apart, and a value moves by at most its neighbours'
  # difference (255) per pixel of shift, per axis: 2 * 255 * 1.5e-4 < 0.1.
  assert float_diffs.max() < 0.1
  # Rounded to uint8 (after the same flip and colour shift) a value differs
  # by 1 where the float lands within its difference of a .5, in about
  # 2 * mean(difference) of the values; the mean difference is far below
  # its bound (most positions round alike, the image's gradients are far
  # below 255): under 1e-4 here (5e-5 measured), so under 1e-3 of them.
  assert uint8_diffs.max() <= 1
  assert np.mean(float_diffs) < 1e-4 and np.mean(uint8_diffs) < 1e-3


@pytest.mark.parametrize(
    'field, value',
    [
        ('pca_lighting', -0.1),
        ('validation_size', 1_281_167),
        ('validation_size', -1),
    ],
)
def test_bad_values_are_refused(field, value):
  config = imagenet_resnet18.get_config()
  config[field] = value
  assert_names(refused(train.dataset_inputs, config, mesh=None), field, value)


def test_colour_augmentation_is_for_imagenet():
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.pca_lighting = 0.1
  assert_names(refused(train.dataset_inputs, config, mesh=None), 'pca_lighting')


@pytest.mark.parametrize(
    'ten_crop, shape', [(False, (224, 224, 3)), (True, (10, 224, 224, 3))]
)
def test_eval_batches_are_padded_and_masked(mock_imagenet, ten_crop, shape):
  batches = list(imagenet.eval_batches(mock_imagenet, 'test', 4, ten_crop))
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
  batches = imagenet.eval_batches(mock_imagenet, 'validation', 4, False)
  assert_names(refused(next, batches), 'validation')


@pytest.mark.parametrize('validation_size', [0, HELD_OUT])
def test_imagenet_resnet18_trains_and_evaluates(
    mock_imagenet, tmp_path, monkeypatch, validation_size
):
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
  monkeypatch.setattr(
      train,
      'evaluate',
      lambda *args: evaluations.append(evaluate(*args)) or evaluations[-1],
  )
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


SCALES = (32, 48)  # Tiny shorter sides: the images are 24-47 pixels.
# Each image shape compiles once: four images at two scales are at most 8.
FEW = 4


def fake_run(config, workdir, seed):
  """A run that was never trained: its config.json and a step-0 checkpoint
  of a fresh network, with a normalisation whose mean image is not flat."""
  model = models.from_config(config, 1000)
  tx = train.create_optimizer(config, train.learning_rate_schedule(config, []))
  state = jax.jit(
      functools.partial(train.create_train_state, model, tx, seed, 224)
  )()
  rng = np.random.default_rng(seed)
  state = state.replace(
      mean=jnp.asarray(rng.uniform(0.2, 0.7, (224, 224, 3)), jnp.float32),
      std=jnp.asarray(rng.uniform(0.2, 0.3, 3), jnp.float32),
  )
  workdir_lib.record_config(config, workdir)
  manager = workdir_lib.checkpoint_manager(workdir, 1)
  workdir_lib.save(manager, state, None)
  manager.wait_until_finished()
  return model, state


def test_imagenet_nets_take_images_of_any_size():
  # Fully convolutional (§3.4): global average pooling before the classifier.
  for shortcut in ('A', 'B'):
    model = models.create_model(
        model='imagenet', depth=18, num_classes=1000, shortcut=shortcut
    )
    for shape in ((1, 224, 299, 3), (1, 37, 53, 3), (1, 640, 480, 3)):
      variables = jax.eval_shape(
          functools.partial(model.init, train=False),
          jax.random.key(0),
          jnp.zeros(shape),
      )
      out = jax.eval_shape(
          functools.partial(model.apply, train=False),
          variables,
          jnp.zeros(shape),
      )
      assert out.shape == (1, 1000)


@pytest.mark.parametrize(
    'scales, batch_size, devices, multiple',
    [(SCALES, 12, 2, 32), (SCALES, 1, 1, 64), ((1, 2), 2, 1, 32)],
)
def test_multiscale_batches_fill_one_bucket_each(
    mock_imagenet, scales, batch_size, devices, multiple
):
  mock_imagenet.test_bucket = multiple
  seen, shapes, buckets = [], set(), set()
  builder = data.import_tfds().builder(
      'imagenet2012', data_dir=mock_imagenet.data_dir
  )
  originals = list(
      builder.as_dataset(
          split='validation', as_supervised=True
      ).as_numpy_iterator()
  )
  for images, labels, mask, index, sizes in imagenet.multiscale_batches(
      mock_imagenet, 'test', batch_size, scales, devices
  ):
    shape = images.shape[1:3]
    # One batch size per bucket, a multiple of the devices: one program.
    assert shape[0] % multiple == 0 and shape[1] % multiple == 0
    assert len(images) == imagenet.bucket_batch(shape, batch_size, devices)
    assert len(images) % devices == 0 and images.dtype == np.uint8
    n = int(mask.sum())
    assert np.all(mask[:n] == 1) and np.all(mask[n:] == 0)  # Padding last.
    assert not images[n:].any() and np.all(sizes[n:] == shape)
    for image, (h, w), i, label in zip(images, sizes, index, labels[:n]):
      # The whole view, resized, top left; zeros at its bottom and right.
      assert imagenet.bucket((h, w), multiple) == shape
      scale = min(h, w)
      original = originals[i][0]
      view = np.clip(
          np.round(imagenet.resize_shorter_side(original, scale)), 0, 255
      ).astype(np.uint8)
      np.testing.assert_array_equal(image[:h, :w], view)
      assert not image[h:].any() and not image[:, w:].any()
      seen.append((i, scale, label))
      shapes.add((h, w))
    buckets.add(shape)
  # Each image once at each scale, with its label every time.
  assert sorted((i, s) for i, s, _ in seen) == [
      (i, s) for i in range(VALIDATION) for s in scales
  ]
  assert len({(i, l) for i, _, l in seen}) == VALIDATION
  # Views of many shapes share buckets.
  assert len(buckets) < len(shapes)


@pytest.mark.parametrize(
    'change, subjects',
    [
        ({'ten_crop': True}, ('test_scales', 'ten_crop')),
        ({'test_scales': (224, 0)}, ('test_scales', (224, 0))),
    ],
)
def test_multiscale_bad_settings(mock_imagenet, change, subjects):
  mock_imagenet.update(change)
  message = refused(
      imagenet.multiscale_batches,
      mock_imagenet,
      'test',
      4,
      mock_imagenet.test_scales or SCALES,
  )
  assert_names(message, *subjects)


@pytest.mark.parametrize('mock_imagenet', [FEW], indirect=True)
def test_multiscale_score_is_the_mean_over_scales_and_flips(
    mock_imagenet, tmp_path
):
  # A fully-convolutional ResNet-8 (CIFAR form: fast) for 1000 classes.
  config = mock_imagenet
  config.model, config.depth, config.shortcut = 'cifar', 8, 'A'
  config.eval_batch_size = 8
  workdir = tmp_path / 'run'
  model, state = fake_run(config, workdir, seed=0)
  config.test_scales, config.test_bucket = SCALES, 32
  compiled = evaluate.probabilities._cache_size()
  step, probs, labels = evaluate.test_probabilities(config, workdir)
  compiled = evaluate.probabilities._cache_size() - compiled
  # By hand, each view alone, unpadded: each image resized to each shorter
  # side, whole, and its flip; normalised by the mean image's average
  # colour.
  tf = data.import_tensorflow()
  builder = data.import_tfds().builder('imagenet2012', data_dir=config.data_dir)
  mean, std = np.asarray(state.mean).mean((0, 1)), np.asarray(state.std)
  apply = jax.jit(functools.partial(model.apply, train=False))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  expected, shapes = [], set()
  for i, (image, label) in enumerate(
      builder.as_dataset(
          split='validation', as_supervised=True
      ).as_numpy_iterator()
  ):
    assert labels[i] == label
    h, w = image.shape[:2]
    views = []
    for scale in SCALES:
      size = (round(h * scale / min(h, w)), round(w * scale / min(h, w)))
      view = np.clip(
          np.round(tf.image.resize(image, size, antialias=True)), 0, 255
      ).astype(np.uint8)
      assert min(view.shape[:2]) == scale
      shapes.add(view.shape[:2])
      x = np.stack([view, view[:, ::-1]]).astype(np.float32) / 255
      views += list(jax.nn.softmax(apply(variables, (x - mean) / std)))
    expected.append(np.mean(views, 0))
  assert step == 0 and len(expected) == FEW
  # Logits spread over ~20 and summed in another order (8 devices, batches)
  # differ by tens of float32 epsilons of that (~1e-5): so do the
  # probabilities, relative to their scale.
  assert_close(probs, np.array(expected), 1e-4)
  # One compilation per bucket, fewer than the views' shapes.
  buckets = {imagenet.bucket(shape, 32) for shape in shapes}
  assert 1 <= compiled <= len(buckets) < len(shapes), (compiled, buckets)

  # The same through the command line.
  top1 = 100 * np.mean(probs.argmax(1) != labels)
  result = python(
      'resnet_jax.main',
      '--config=configs/imagenet_resnet18.py',
      f'--workdir={workdir}',
      '--mode=eval',
      '--config.model=cifar',
      '--config.depth=8',
      '--config.shortcut=A',
      '--config.test_scales=(32,48)',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert (
      f'ResNet-8 at step 0: test error {top1:.2f}% (top-1)' in result.stdout
  ), result.stdout
  assert f'on {FEW} images at scales 32, 48 and their flips' in result.stdout
