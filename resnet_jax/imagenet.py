"""ImageNet (§3.4): a streaming tf.data pipeline, one shard per process.

Training images are resized so their shorter side is a random length in
[256, 480], then a random 224x224 crop is taken, maybe flipped, and its colours
shifted along the principal components of ImageNet's pixels; testing uses the
centre 224 crop of the image resized to 256 (or 10 crops, Table 3), or whole
images at several scales (``multiscale_batches``, Tables 4 and 5). The images
are decoded here, from TFDS's JPEG bytes, so the benchmark can time the same
functions on JPEGs of its own; a training view decodes and resizes only the
window of the JPEG that its crop samples (``crop_then_resize``), the same view
as resizing the whole image and cropping it (``resize_then_crop``) for well
under half the CPU time. The only module that needs TensorFlow to train.
"""

import jax
import numpy as np

from resnet_jax import data
from resnet_jax.data import DataError

tf = data.import_tensorflow()
tfds = data.import_tfds()

SCALES = (256, 480)  # Shorter side of training images, at random.
EVAL_SIZE = 256  # Shorter side for the centre (or 10) crops.
CROP = 224
# The colour augmentation of §3.4 ("the standard color augmentation in [21]",
# Krizhevsky et al., 2012): the eigenvalues and eigenvectors (the columns) of
# the covariance of ImageNet's RGB pixels in [0, 1], as fb.resnet.torch
# (datasets/imagenet.lua, applied by Lighting in datasets/transforms.lua) and
# most reimplementations use them.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


def decode(image):
  """TFDS's encoded ImageNet image (JPEG bytes) as uint8 RGB."""
  return tf.io.decode_jpeg(image, channels=3)


def resize_shorter_side(image, size):
  """``image`` resized (antialiased) so its shorter side is ``size``."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = tf.cast(size, tf.float32) / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  return tf.image.resize(image, new, antialias=True)


def lighting_noise(key, std: float):
  """The colour shift of one image, in pixel values (0-255), from ``key``.

  [21] adds eigvec @ (alpha * eigval) to every pixel, alpha ~ N(0, std) drawn
  per image for each principal component (std 0.1 in [21]).
  """
  alpha = tf.random.stateless_normal([3], key, stddev=std)
  return 255 * tf.linalg.matvec(
      tf.constant(PCA_EIGVEC), alpha * tf.constant(PCA_EIGVAL)
  )


def draws(key):
  """The random numbers of one training view, from ``key``.

  The shorter side's length (random in [256, 480]) and the keys of the crop,
  the flip and the colour shift. The crop and flip keys do not depend on
  ``lighting``: with or without it, an image's crop and flip are the same.
  """
  keys = tf.random.experimental.stateless_split(key, 4)
  size = tf.random.stateless_uniform(
      [], keys[0], SCALES[0], SCALES[1] + 1, tf.int32
  )
  return size, keys[1], keys[2], keys[3]


def resize_then_crop(image, size, key):
  """§3.4's 224 crop, by the letter: the whole image decoded and resized.

  Decoded, resized (antialiased, in float) so its shorter side is ``size``,
  and a 224 crop taken at random from ``key``. The reference of
  ``crop_then_resize``, which takes the same view for half the CPU time.
  """
  image = resize_shorter_side(decode(image), size)
  return tf.image.stateless_random_crop(image, (CROP, CROP, 3), key)


def window(image, size, key):
  """What ``crop_then_resize`` decodes and how it resizes it.

  Returns (crop window, scale, translation): the window [y, x, height,
  width] of the encoded image ``image`` that the 224 crop of
  ``resize_then_crop(image, size, key)`` samples, and the scale and
  translation (per axis) that resize that window to the crop.
  """
  shape = tf.image.extract_jpeg_shape(image)[:2]
  # The resized shape and scale as ``resize_shorter_side`` and
  # ``tf.image.resize`` compute them: float32, scale = new / old.
  old = tf.cast(shape, tf.float32)
  new = tf.cast(
      tf.round(old * (tf.cast(size, tf.float32) / tf.reduce_min(old))),
      tf.int32,
  )
  scale = tf.cast(new, tf.float32) / old
  # The crop's offset as ``tf.image.stateless_random_crop`` draws it: one
  # uniform int32 per axis of the [height, width, 3] image, modulo the
  # room left (1 for the channels).
  limit = tf.concat([new - CROP + 1, [1]], 0)
  offset = (
      tf.random.stateless_uniform([3], key, maxval=tf.int32.max, dtype=tf.int32)
      % limit
  )[:2]
  # ScaleAndTranslate samples output pixel x at input position
  # (x + 0.5) / scale and weighs the input pixels within the antialiased
  # triangle's radius, max(1, 1 / scale) input pixels, of it. The window
  # holds those of every pixel of the crop, and one more on each side: the
  # float rounding of the sample positions moves a span's ends by an ulp,
  # where the triangle's weight is 0.
  radius = tf.maximum(1 / scale, 1)
  first = tf.floor((tf.cast(offset, tf.float32) + 0.5) / scale - radius - 0.5)
  last = tf.math.ceil(
      (tf.cast(offset + CROP, tf.float32) - 0.5) / scale + radius - 0.5
  )
  start = tf.maximum(tf.cast(first, tf.int32) - 1, 0)
  end = tf.minimum(tf.cast(last, tf.int32) + 2, shape)
  # Output pixel j of the crop is pixel offset + j of the whole resized
  # image: at input position (offset + j + 0.5) / scale, which is
  # start + (j + 0.5 - translation) / scale in the window.
  translation = tf.cast(start, tf.float32) * scale - tf.cast(offset, tf.float32)
  return tf.concat([start, end - start], 0), scale, translation


def crop_then_resize(image, size, key):
  """``resize_then_crop``'s view: the same pixels, from a window of the JPEG.

  Only the window of the encoded image that the crop samples is decoded and
  resized, with the same scale as the whole image (and the window's origin
  translated), so the view weighs the same pixels alike: it differs from
  ``resize_then_crop``'s by the float rounding of the sample positions.
  Decoding the window and resizing it take most of its time, about a
  millisecond of CPU each (BENCHMARKS.md).
  """
  box, scale, translation = window(image, size, key)
  # Decoding a window gives the pixels decoding the whole image does, but
  # in its outermost columns with 4:2:0 chroma (libjpeg's upsampling lacks
  # the chroma sample outside the window): the window's margin, which no
  # resize weight reaches (tests/test_imagenet.py).
  image = tf.image.decode_and_crop_jpeg(image, box, channels=3)
  return tf.raw_ops.ScaleAndTranslate(
      images=image[None],
      size=[CROP, CROP],
      scale=scale,
      translation=translation,
      kernel_type='triangle',
      antialias=True,
  )[0]


def augment(image, label, key, lighting: float, view=crop_then_resize):
  """§3.4's training view of one encoded image, drawn from ``key``.

  Decoded, resized so its shorter side is random in [256, 480], a random 224
  crop (``view``: ``crop_then_resize``, or the reference
  ``resize_then_crop``), flipped at random, and (with ``lighting``, the std
  of [21]'s principal-component weights) its colours shifted; rounded to
  uint8.
  """
  size, crop, flip, colour = draws(key)
  image = view(image, size, crop)
  image = tf.image.stateless_random_flip_left_right(image, flip)
  if lighting:
    image += lighting_noise(colour, lighting)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label


def augmented(ds, seed: int, lighting: float, view=crop_then_resize):
  """``augment`` mapped over (encoded image, label) pairs, in parallel."""
  return keyed_map(
      ds,
      seed,
      lambda image, label, key: augment(image, label, key, lighting, view),
  )


def keyed_map(ds, seed: int, fn):
  """``fn(image, label, key)`` mapped over (image, label) pairs, in parallel.

  Each example's key comes from a stream of random numbers from ``seed``, so
  the result is the same whatever the parallelism.
  """
  ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed).batch(2)))
  return ds.map(
      lambda example, key: fn(*example, key),
      num_parallel_calls=tf.data.AUTOTUNE,
  )


def _tfds_split(config, split: str) -> str:
  """The TFDS split of this project's 'train', 'validation' or 'test' images.

  The paper tests on ImageNet's 50k validation images (§4.1): TFDS's
  'validation' split is this project's test set. The first
  ``config.validation_size`` images of TFDS's training split (stored
  shuffled, so of all classes) are held out as the validation set, on which
  to see the error plateau (§3.4) without looking at the test set; the rest
  are trained on.
  """
  held_out = config.validation_size
  splits = {'train': f'train[{held_out}:]', 'test': 'validation'}
  if held_out:
    splits['validation'] = f'train[:{held_out}]'
  if split not in splits:
    raise DataError(
        f'ImageNet has no {split!r} split here (only ' f'{", ".join(splits)})'
    )
  return splits[split]


def _split(config, name: str):
  try:
    builder = tfds.builder('imagenet2012', data_dir=config.data_dir or None)
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        'ImageNet needs a manual download: place ILSVRC2012_img_train.tar '
        'and ILSVRC2012_img_val.tar in <data_dir>/downloads/manual '
        f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})'
    ) from e
  return builder, tfds.split_for_jax_process(name, drop_remainder=False)


def train_batches(config, seed: int, batch_size: int):
  """Endless per-process uint8 batches with the paper's augmentation.

  A 224 crop of the image resized so its shorter side is random in
  [256, 480], flipped at random, colours shifted (§3.4; ``augment``) of the
  training images not held out. ``seed`` should differ on resume.
  """
  builder, split = _split(config, _tfds_split(config, 'train'))
  local = batch_size // jax.process_count()
  ds = builder.as_dataset(
      split=split,
      as_supervised=True,
      shuffle_files=True,
      decoders={'image': tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=seed),
  )
  ds = ds.repeat().shuffle(16 * local, seed=seed)
  ds = augmented(ds, seed, config.pca_lighting)
  ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  for images, labels in tfds.as_numpy(ds):
    yield images, labels.astype(np.int32)


def _eval_split(config, split: str):
  """(builder, this process's share, total images) of an evaluation split."""
  tfds_split = _tfds_split(config, split)
  builder, share = _split(config, tfds_split)
  return builder, share, builder.info.splits[tfds_split].num_examples


def eval_batches(config, split: str, batch_size: int, ten_crop: bool):
  """Per-process test or validation batches: the centre 224 crop (or 10).

  Images are resized so their shorter side is 256 (§3.4); 10-crop testing
  takes the four corners and the centre, and their flips. Every process
  yields the same number of batches (padded, masked).
  """
  builder, split, total = _eval_split(config, split)
  local = batch_size // jax.process_count()
  per_process = -(-total // jax.process_count())
  num_batches = -(-per_process // local)

  def crops(image, label):
    image = resize_shorter_side(image, EVAL_SIZE)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    c = CROP
    corners = [((h - c) // 2, (w - c) // 2)]
    if ten_crop:
      corners += [(0, 0), (0, w - c), (h - c, 0), (h - c, w - c)]
    views = [image[y : y + c, x : x + c] for y, x in corners]
    if ten_crop:
      views += [v[:, ::-1] for v in views]
    views = tf.cast(
        tf.clip_by_value(tf.round(tf.stack(views)), 0, 255), tf.uint8
    )
    return views if ten_crop else views[0], tf.cast(label, tf.int32), 1.0

  ds = builder.as_dataset(split=split, as_supervised=True).map(
      crops, num_parallel_calls=tf.data.AUTOTUNE
  )
  shape = ((10,) if ten_crop else ()) + (CROP, CROP, 3)
  padding = tf.data.Dataset.from_tensors(
      (tf.zeros(shape, tf.uint8), tf.constant(0, tf.int32), tf.constant(0.0))
  ).repeat()
  ds = ds.concatenate(padding).take(num_batches * local)
  ds = ds.batch(local).prefetch(tf.data.AUTOTUNE)
  for images, labels, mask in tfds.as_numpy(ds):
    yield images, labels, mask.astype(np.float32)


def bucket(shape, multiple: int) -> tuple[int, int]:
  """The padded shape of a view of ``shape`` (height, width): each side
  rounded up to a multiple of ``multiple`` (``config.test_bucket``)."""
  return tuple(-(-int(side) // multiple) * multiple for side in shape[:2])


def bucket_batch(shape, batch_size: int, devices: int) -> int:
  """Views per batch of a bucket of ``shape``: the pixels of ``batch_size``
  224x224 crops, in a multiple of ``devices`` (at least one each).

  One batch size per bucket: a bucket compiles once, and a batch of large
  views needs no more memory than one of crops.
  """
  fit = batch_size * CROP * CROP // (shape[0] * shape[1])
  return max(1, fit // devices) * devices


def multiscale_batches(
    config, split: str, batch_size: int, scales, devices: int = 1
):
  """Per-process batches of whole test images at several scales (§3.4).

  "We adopt the fully-convolutional form [...] and average the scores at
  multiple scales (images are resized such that the shorter side is in
  {224, 256, 384, 480, 640})" (Tables 4 and 5): ``bucketed_views`` of this
  process's share of the split. ``batch_size`` is global, ``devices`` those
  that share this process's batch.
  """
  if not scales or not all(isinstance(s, int) and s > 0 for s in scales):
    raise DataError(
        f'test_scales must be positive shorter sides, got ' f'{tuple(scales)}'
    )
  if config.ten_crop:
    raise DataError(
        'test_scales (whole images at several scales, Table 4) '
        'and ten_crop (Table 3) are two ways to test: set one'
    )
  builder, split, _ = _eval_split(config, split)
  return bucketed_views(
      builder.as_dataset(split=split, as_supervised=True),
      scales,
      config.test_bucket,
      batch_size // jax.process_count(),
      devices,
  )


def bucketed_views(ds, scales, multiple: int, batch_size: int, devices: int):
  """Batches of each (uint8 image, label) of ``ds`` at every scale, whole.

  Each view (the image resized so its shorter side is a scale; the flips
  are the step's) is padded with zeros at the bottom and right to its
  bucket (``bucket``, to multiples of ``multiple``: ``config.test_bucket``).
  A batch holds ``bucket_batch`` views of one bucket, its last one padded
  with masked zeros: one compiled program per bucket. Yields (images,
  labels, mask, index, sizes): ``index`` the image's position in ``ds``;
  ``sizes`` each view's height and width before padding
  (``models.ResNet``).
  """

  def views(index, example):
    image, label = example

    def resize(scale):
      view = resize_shorter_side(image, scale)
      return (
          tf.cast(tf.clip_by_value(tf.round(view), 0, 255), tf.uint8),
          tf.cast(label, tf.int32),
          index,
      )

    return tf.data.Dataset.from_tensor_slices(list(scales)).map(resize)

  def batch(shape, group):
    size = bucket_batch(shape, batch_size, devices)
    images = np.zeros((size, *shape, 3), np.uint8)
    for image, (view, _, _) in zip(images, group):
      image[: view.shape[0], : view.shape[1]] = view
    pad = size - len(group)
    return (
        images,
        np.array([label for _, label, _ in group] + [0] * pad, np.int32),
        np.array([1.0] * len(group) + [0.0] * pad, np.float32),
        np.array([index for _, _, index in group] + [0] * pad, np.int64),
        np.array(
            [view.shape[:2] for view, _, _ in group] + [shape] * pad, np.int32
        ),
    )

  ds = ds.enumerate().interleave(views, num_parallel_calls=tf.data.AUTOTUNE)
  groups = {}
  for example in tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)):
    shape = bucket(example[0].shape, multiple)
    groups.setdefault(shape, []).append(example)
    if len(groups[shape]) == bucket_batch(shape, batch_size, devices):
      yield batch(shape, groups.pop(shape))
  for shape, group in groups.items():
    yield batch(shape, group)


def normalization(config, num_images: int = 10_000):
  """Mean and std from the first training images' centre crops.

  Streaming ImageNet cannot be averaged in full at start-up; the statistics
  of ``num_images`` images trained on (none held out) estimate it (every
  process reads the same ones).
  """
  builder, _ = _split(config, 'train')

  def centre(image, _):
    image = resize_shorter_side(image, EVAL_SIZE)
    image = tf.image.resize_with_crop_or_pad(image, CROP, CROP)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

  ds = builder.as_dataset(
      split=_tfds_split(config, 'train'), as_supervised=True
  ).take(num_images)
  ds = ds.map(centre, num_parallel_calls=tf.data.AUTOTUNE).batch(1000)
  images = np.concatenate(list(tfds.as_numpy(ds)))
  return data.normalization(images, config.normalization)


def inputs(config, mesh) -> data.Inputs:
  """ImageNet streamed by tf.data: this process's share of each batch
  (``train.Steps.dispatches`` sends them to the mesh's devices).

  Its validation split is the test set; ``config.validation_size`` training
  images are held out as the validation set (none: the test set is
  evaluated during training).
  """
  del mesh
  train_size = data.DATASETS['imagenet2012'].train_size
  if not 0 <= config.validation_size < train_size:
    raise DataError(
        f'validation_size must be in [0, {train_size}) for '
        f'ImageNet, got {config.validation_size}'
    )
  if config.pca_lighting < 0:
    raise DataError(
        f'pca_lighting must not be negative, got ' f'{config.pca_lighting}'
    )

  def train_inputs(first_step):
    seed = int(
        np.random.SeedSequence([config.seed, first_step]).generate_state(1)[0]
    )
    return train_batches(config, seed, config.batch_size)

  return data.Inputs(
      train_size=train_size - config.validation_size,
      normalization=lambda: normalization(config),
      train=train_inputs,
      eval=lambda split: eval_batches(
          config, split, config.eval_batch_size, config.ten_crop
      ),
      eval_split='validation' if config.validation_size else 'test',
      draw=None,
  )
