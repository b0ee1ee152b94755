r"""Speed of resnet_jax, side by side with PyTorch on the same machine.

  python -m resnet_jax.benchmark --config=configs/default.py
  python -m resnet_jax.benchmark --config=configs/default.py \
      --depths=20,32,44,56,110,1202 --batch_sizes=128 --modes=train \
      --dtypes=float32 --plain

For the config's CIFAR net (§4.2) at each depth, batch size, dtype and mode
it times, after compilation and warm-up:

* ``train``: the training loop's own jitted step (``train.setup``'s
  ``steps.train``): draw the batch from the on-device training set, pad, crop,
  flip, normalise, forward, backward, momentum SGD with weight decay;
* ``eval``: the evaluation step (``steps.eval``) on one batch;
* ``data``: the on-device batch draw and augmentation alone
  (``cifar.train_batch`` then ``data.normalize``).

Calls are dispatched as in the training loop (at most two in flight). Each
row prints images/s, images/s x depth (flat when the cost per layer is), the
step's compile time (the JSON line also has ``setup_s``: data,
initialisation and its compile), the memory XLA allocates for the compiled
step (arguments, outputs and temporaries) and the process's peak memory so
far (device peak on accelerators, resident set on CPU). When
``torch`` is installed the same net, batch and dtype run in PyTorch
(``resnet_jax.torch_baseline``) and the row gets the ratio resnet_jax /
PyTorch (up to ``--torch_max_depth``: PyTorch keeps every activation, and
ResNet-1202's do not fit in memory). ResNet-1202 runs with ``config.remat``,
as ``configs/resnet1202.py`` does (``--remat`` sets it for every depth).
With ``--plain`` each ResNet row is followed by its plain twin's,
and the ResNet row gets the residual tax: its seconds per step over the
plain net's. Every row is also one JSON line, for scripts.

Each row is the median of ``--repeats`` timings (3 by default), taken in
turn with its PyTorch baseline and plain twin, repeat after repeat, so a
slow spell of a shared machine falls on all of them; the spread (the range
over the median) is printed, and the ratios are of the medians.
``--steps_per_dispatch=1,16`` times train rows of K steps per jitted call
(``config.steps_per_dispatch``). ``--seeds=1,5`` adds, for 5 seeds, train
rows of 5 copies of the training step (``train.train_step`` on each seed's
own state and batch) in each placement: ``vmap`` on one device (XLA batches
the seeds' convolutions into grouped ones), ``shard_map`` over a ``seeds``
axis of the devices (no cross-device reduction; vmapped on each device when
there are more seeds than devices), and ``data``: one seed after another,
each data-parallel as a training run is. They print images/s in all and
per seed: whether the paper's runs (Table 6: 5 per depth) pay to train side
by side.

  python -m resnet_jax.benchmark --config=configs/imagenet_resnet18.py \
      --input_pipeline

times instead what the ImageNet training input pipeline (``imagenet.py``,
tf.data on the host) delivers, on synthetic JPEGs of ImageNet's typical size
and weight, with 1 and 2 tf.data threads (``--input_threads``; one core
each): images/s, images/s per thread and images per CPU second (what a busy
core delivers, also on a shared machine), for decoding the whole image,
decoding only the window of it that a training view samples, the training
augmentation with the whole image decoded, resized and then cropped
(``imagenet.resize_then_crop``, the reference), the Flax ImageNet example's
(``flax_view``, the baseline), and the training augmentation itself
(``imagenet.augmented``, the function the training pipeline maps: the crop's
window decoded and resized, flipped, colour). It needs TensorFlow; nothing
else here does.
"""

import functools
import json
import os
import resource
import time
from typing import Any

from absl import flags
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from resnet_jax import cli
from resnet_jax import data
from resnet_jax import devices
from resnet_jax import models
from resnet_jax import train

FLAGS = flags.FLAGS
MODES = ('train', 'eval', 'data')
PLACEMENTS = ('vmap', 'shard_map', 'data')
REMAT_DEPTH = 1202  # ResNet-1202's activations exceed memory without remat.


def define_flags():
  """The command line's flags (defined when run, so that importing this
  module beside another command's defines no flag twice)."""
  config_flags.DEFINE_config_file(
      'config',
      None,
      'The config whose CIFAR net and training step are timed '
      '(e.g. configs/default.py); each row sets its depth, batch size, dtype, '
      'remat and synthetic data. With --input_pipeline: an ImageNet config.',
      lock_config=True,
  )
  flags.mark_flags_as_required(['config'])
  flags.DEFINE_list('depths', ['20', '56', '110'], 'CIFAR depths (6n+2).')
  flags.DEFINE_list('batch_sizes', ['128', '256'], 'Global batch sizes.')
  flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Computation dtypes.')
  flags.DEFINE_list('modes', ['train', 'eval', 'data'], 'What to time.')
  flags.DEFINE_enum(
      'remat',
      'auto',
      ['auto', 'true', 'false'],
      'Rematerialise each block (config.remat); auto: for '
      f'depths from {REMAT_DEPTH} on, as configs/resnet1202.py.',
  )
  flags.DEFINE_bool(
      'scan_blocks',
      None,
      'Run the repeated blocks of each stage '
      "as one loop (config.scan_blocks); default: the config's.",
  )
  flags.DEFINE_bool(
      'plain',
      False,
      'Also time the plain twin of every net '
      '(the residual tax: ResNet / plain).',
  )
  flags.DEFINE_float(
      'min_seconds',
      5.0,
      'Time each row for at least this '
      'long (and at least 3 calls) in each repeat.',
  )
  flags.DEFINE_integer(
      'repeats',
      3,
      'Time each row this many times, its '
      'PyTorch baseline and plain twin in between (a row is '
      'their median; the spread is printed).',
  )
  flags.DEFINE_float(
      'max_seconds',
      0,
      "The whole benchmark's time: a group "
      'of rows whose estimate (from the rows timed before it) '
      'would end past it is skipped and listed; 0: no limit.',
  )
  flags.DEFINE_list(
      'steps_per_dispatch',
      ['1'],
      'Training steps per jitted '
      'call (config.steps_per_dispatch), for the train rows.',
  )
  flags.DEFINE_list(
      'seeds',
      ['1'],
      'Seeds trained side by side: for each '
      'count above 1, train rows of S copies of the step in one '
      'program in each of --placements.',
  )
  flags.DEFINE_list(
      'placements',
      list(PLACEMENTS),
      '--seeds above 1: vmap: '
      'vmapped on one device; shard_map: over a seeds axis of '
      'the devices (as many as divide S), vmapped on each; data: '
      'one seed after another, each data-parallel (as training '
      'runs today).',
  )
  flags.DEFINE_enum(
      'torch',
      'auto',
      ['auto', 'off'],
      'auto: run the PyTorch baseline when torch is installed.',
  )
  flags.DEFINE_integer(
      'torch_max_depth',
      110,
      'Run the PyTorch baseline up to '
      'this depth (it keeps every activation: ResNet-1202 '
      'needs ~23 GiB at batch 128).',
  )
  flags.DEFINE_bool(
      'torch_compile',
      True,
      'Also time the PyTorch baseline '
      'under torch.compile; the faster of the two is the '
      'baseline.',
  )
  flags.DEFINE_bool(
      'input_pipeline',
      False,
      'Instead of the nets, time the '
      'ImageNet training input pipeline of --config (an ImageNet '
      'config) on synthetic JPEGs. Needs TensorFlow.',
  )
  flags.DEFINE_list(
      'input_threads',
      ['1', '2'],
      '--input_pipeline: tf.data '
      'threads (a private thread pool, one op thread each).',
  )
  flags.DEFINE_integer(
      'input_images',
      64,
      '--input_pipeline: distinct '
      'synthetic JPEGs, encoded once, read over and over.',
  )
  flags.DEFINE_bool(
      'multiscale',
      False,
      "Instead of the nets, time --config's multi-scale testing (§3.4, "
      "test_scales, default Table 4's) of random images of "
      "ImageNet's spread of sizes, and count its compilations. Needs "
      'TensorFlow.',
  )
  flags.DEFINE_integer(
      'multiscale_images',
      64,
      '--multiscale: images, longer side 300-500 pixels, aspect ratio '
      '1:2 to 2:1.',
  )
  flags.DEFINE_integer(
      'multiscale_checked',
      2,
      '--multiscale: of those, images also tested one view at a time, '
      'unpadded (a compilation per shape), to compare the scores.',
  )


class BenchmarkError(cli.UserError):
  """Flags that do not describe a benchmark."""


def seconds_per_call(
    fn,
    min_seconds: float,
    block=lambda _: None,
    min_calls: int = 3,
    warmup: int = 2,
):
  """Seconds per call of ``fn`` in steady state, and the warm-up's seconds.

  Like the training loop, each call is dispatched before the previous one's
  result is waited for, so at most two are in flight.
  """
  start = time.perf_counter()
  for _ in range(warmup):
    block(fn())
  first = time.perf_counter() - start
  calls, previous, start = 0, None, time.perf_counter()
  while calls < min_calls or time.perf_counter() - start < min_seconds:
    out = fn()
    if previous is not None:
      block(previous)
    previous, calls = out, calls + 1
  block(previous)
  return (time.perf_counter() - start) / calls, first


def benchmark_config(
    base,
    depth: int,
    batch_size: int,
    dtype: str,
    remat: bool,
    residual: bool = True,
    scan_blocks: bool | None = None,
    steps_per_dispatch: int = 1,
):
  """The --config for this row, on synthetic data of CIFAR's shapes."""
  config = base.copy_and_resolve_references()
  config.depth = depth
  config.residual = residual
  if scan_blocks is not None:
    config.scan_blocks = scan_blocks
  config.batch_size = config.eval_batch_size = batch_size
  config.dtype = dtype
  config.remat = remat
  config.data_source = 'synthetic'
  config.synthetic_train_size = max(batch_size, 512)
  config.validation_size = 0
  # Nothing is logged, evaluated or saved; the intervals only need to be
  # multiples of the steps per dispatch.
  config.steps_per_dispatch = steps_per_dispatch
  config.schedule_unit = 'steps'
  config.train_length = config.log_every_steps = steps_per_dispatch
  config.eval_every_steps = config.checkpoint_every_steps = steps_per_dispatch
  return config


def peak_memory_mb() -> float:
  """Peak memory of this process so far: the device's, else resident set."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def compile_figures(fn, *args) -> tuple[Any, dict]:
  """``fn`` compiled for ``args``; its compile seconds and XLA memory."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  xla_bytes = (
      memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      - memory.alias_size_in_bytes
      + memory.temp_size_in_bytes
  )
  return compiled, {'compile_s': compile_s, 'xla_memory_mb': xla_bytes / 2**20}


def carried(compiled, state, *args):
  """A call of a training step that donates its state: carried over."""

  def call():
    nonlocal state
    state, metrics = compiled(state, *args)
    return metrics

  return call


def prepare(config, mode: str) -> tuple[Any, int, dict]:
  """Compiles one row's step: a call that runs it, images per call, figures
  (compile seconds, XLA's memory, setup seconds)."""
  start = time.perf_counter()
  inputs, steps, state, _ = train.setup(config)  # Compiles the initialisation.
  setup_s = time.perf_counter() - start
  batch = config.batch_size
  images, labels = next(inputs.train(0))
  if mode == 'train':
    fn, args = steps.train, (state, images, labels)
  elif mode == 'eval':
    rng = np.random.default_rng(0)
    local = batch // jax.process_count()
    fn, args = steps.eval, (
        state,
        *(
            devices.global_array(a, steps.batch)
            for a in (
                rng.integers(0, 256, (local, 32, 32, 3), np.uint8),
                rng.integers(0, 10, local, np.int32),
                np.ones(local, bool),
            )
        ),
    )
  else:

    def draw(images, labels, rng, step):
      x, y = inputs.draw(images, labels, rng, step)
      return data.normalize(x, state.mean, state.std), y

    fn = jax.jit(draw, out_shardings=steps.batch)
    args = (images, labels, jax.random.key(0), state.step)
  compiled, figures = compile_figures(fn, *args)
  if mode == 'train':
    return (
        carried(compiled, *args),
        batch * config.steps_per_dispatch,
        figures | {'setup_s': setup_s},
    )
  return lambda: compiled(*args), batch, figures | {'setup_s': setup_s}


def seed_steps(inputs, steps_per_dispatch: int):
  """One seed's training steps, to be batched over seeds: ``inputs.draw``
  then ``train.train_step``, as in the training loop's step, without its
  sharding constraints (each seed's batch stays where its state is)."""

  def steps(state, images, labels):
    def step(state, _):
      x, y = inputs.draw(
          images, labels, jax.random.wrap_key_data(state.rng), state.step
      )
      return train.train_step(state, x, y)

    return jax.lax.scan(step, state, None, length=steps_per_dispatch)

  return steps


def seed_states(config, state, seeds: int):
  """The fresh states of seeds config.seed, config.seed + 1, ..., stacked
  along a leading axis: each the state ``train.setup`` makes for it."""
  stacked = jax.jit(
      jax.vmap(functools.partial(train.fresh_state(config), state.tx))
  )(config.seed + jnp.arange(seeds))
  # The treedef of ``state`` (its model and optimiser), so the steps built
  # for it take these.
  return jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(stacked))


def seeds_mesh(placement: str, seeds: int) -> jax.sharding.Mesh:
  """The devices S seeds share: one for vmap, else as many as divide S."""
  count = (
      1
      if placement == 'vmap'
      else max(
          d
          for d in range(1, min(seeds, jax.device_count()) + 1)
          if seeds % d == 0
      )
  )
  return jax.make_mesh(
      (count,),
      ('seeds',),
      devices=jax.devices()[:count],
      axis_types=(jax.sharding.AxisType.Auto,),
  )


def batched_seeds(config, placement: str, seeds: int):
  """S seeds' training steps in one program (vmap, shard_map), their
  stacked states and the training set, on ``seeds_mesh``."""
  mesh = seeds_mesh(placement, seeds)
  inputs, _, state, _ = train.setup(config, mesh.devices[:1].tolist())
  fn = jax.vmap(
      seed_steps(inputs, config.steps_per_dispatch),
      in_axes=(0, None, None),
  )
  if placement == 'shard_map':  # No cross-device reduction: seeds apart.
    fn = jax.shard_map(
        fn, mesh=mesh, in_specs=(P('seeds'), P(), P()), out_specs=P('seeds')
    )
  replicated = NamedSharding(mesh, P())
  return (
      jax.jit(fn, donate_argnums=0),
      jax.device_put(
          seed_states(config, state, seeds), NamedSharding(mesh, P('seeds'))
      ),
      *(jax.device_put(a, replicated) for a in next(inputs.train(0))),
  )


def prepare_seeds(config, placement: str, seeds: int):
  """As ``prepare`` for S seeds' training steps in ``placement``."""
  start = time.perf_counter()
  if placement == 'data':  # One after another, each data-parallel.
    inputs, steps, state, _ = train.setup(config)
    stacked = seed_states(config, state, seeds)
    states = [
        jax.device_put(
            jax.tree.map(lambda x, i=i: x[i], stacked), steps.replicated
        )
        for i in range(seeds)
    ]
    args = next(inputs.train(0))
    setup_s = time.perf_counter() - start
    compiled, figures = compile_figures(steps.train, states[0], *args)
    calls = [carried(compiled, s, *args) for s in states]
    call = lambda: [c() for c in calls]
  else:
    fn, stacked, *args = batched_seeds(config, placement, seeds)
    setup_s = time.perf_counter() - start
    compiled, figures = compile_figures(fn, stacked, *args)
    call = carried(compiled, stacked, *args)
  return (
      call,
      seeds * config.batch_size * config.steps_per_dispatch,
      figures | {'setup_s': setup_s},
  )


def torch_baseline():
  """The PyTorch baseline module, or None without torch (or off a CPU)."""
  if FLAGS.torch == 'off' or jax.default_backend() != 'cpu':
    return None
  try:
    from resnet_jax import torch_baseline as baseline  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return baseline


def prepare_torch(baseline, depth, batch, dtype, mode) -> dict:
  """Eager and (if asked and it works) compiled PyTorch steps, warmed up;
  their warm-up seconds."""
  steps = {}
  for compiled in (False, True) if FLAGS.torch_compile else (False,):
    try:
      step = baseline.make_step(depth, batch, dtype, mode, compiled)
      start = time.perf_counter()
      for _ in range(2):
        step()
    except Exception as e:  # pylint: disable=broad-except
      if not compiled:
        raise
      print(
          f'torch.compile failed ({type(e).__name__}); eager baseline only',
          flush=True,
      )
      continue
    steps[compiled] = step, time.perf_counter() - start
  return steps


def median_and_spread(images_per_s: list[float], prefix: str = '') -> dict:
  """The repeats' median images/s, their range and relative spread."""
  median = float(np.median(images_per_s))
  return {
      f'{prefix}images_per_s': median,
      f'{prefix}images_per_s_min': min(images_per_s),
      f'{prefix}images_per_s_max': max(images_per_s),
      f'{prefix}spread': (max(images_per_s) - min(images_per_s)) / median,
      f'{prefix}images_per_s_repeats': images_per_s,
  }


def torch_figures(baseline, steps, images_per_s) -> dict:
  """The row's PyTorch columns: the faster (by median) of eager and
  compiled."""
  medians = {c: float(np.median(v)) for c, v in images_per_s.items()}
  best = max(medians, key=medians.get)
  return {
      **median_and_spread(images_per_s[best], 'pytorch_'),
      'pytorch_eager_images_per_s': medians[False],
      'pytorch_compiled_images_per_s': medians.get(True),
      'pytorch_warmup_s': steps[best][1],
      'pytorch_torch_compile': best,
      'pytorch_version': baseline.torch.__version__,
      'pytorch_threads': baseline.torch.get_num_threads(),
  }


JPEG_SHAPE = (375, 500)  # Height, width: a typical ImageNet photo.
INPUT_BATCH = 32  # Images per tf.data batch timed.


def synthetic_jpegs(tf, num_images: int) -> list[bytes]:
  """JPEGs (quality 90) of ImageNet's typical size and weight.

  Smooth random colour fields with a fine grain: like photos, they compress
  to about 100 KB, so decoding costs what it does on ImageNet.
  """
  rng = np.random.default_rng(0)
  jpegs = []
  for _ in range(num_images):
    coarse = rng.uniform(0, 255, (1, 24, 32, 3))
    smooth = tf.image.resize(coarse, JPEG_SHAPE, method='bicubic')[0]
    grain = rng.normal(0, 20, JPEG_SHAPE + (3,))
    image = tf.cast(tf.clip_by_value(smooth + grain, 0, 255), tf.uint8)
    jpegs.append(tf.io.encode_jpeg(image, quality=90).numpy())
  return jpegs


def time_batches(batches) -> tuple[float, float]:
  """Images per second of tf.data ``batches``, and per CPU second.

  The CPU time is of all the process's threads: on a shared machine threads
  may wait for a core, and images per CPU second are what a busy core
  delivers.
  """
  for _ in range(2):  # Threads started, buffers filled.
    next(batches)
  start, cpu, calls = time.perf_counter(), time.process_time(), 0
  while calls < 3 or time.perf_counter() - start < FLAGS.min_seconds:
    next(batches)
    calls += 1
  images = calls * INPUT_BATCH
  return (
      images / (time.perf_counter() - start),
      images / (time.process_time() - cpu),
  )


def flax_view(image, key):
  """The training view of the Flax ImageNet example, written from its
  description: the benchmark's baseline.

  A random window of 8% to 100% of the image's area, of aspect ratio 3/4 to
  4/3 (``sample_distorted_bounding_box``, 10 tries, else the whole image),
  is decoded alone, resized (bicubic, not antialiased) to 224x224 and
  flipped at random; rounded to uint8 like ``imagenet.augment``'s view.
  """
  from resnet_jax import imagenet  # pylint: disable=g-import-not-at-top

  tf = imagenet.tf
  keys = tf.random.experimental.stateless_split(key, 2)
  start, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.image.extract_jpeg_shape(image),
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=keys[0],
      min_object_covered=0.1,
      aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True,
  )
  window = tf.concat([start[:2], size[:2]], 0)
  view = tf.image.decode_and_crop_jpeg(image, window, channels=3)
  view = tf.image.resize(view, (imagenet.CROP, imagenet.CROP), method='bicubic')
  view = tf.image.stateless_random_flip_left_right(view, keys[1])
  return tf.cast(tf.clip_by_value(tf.round(view), 0, 255), tf.uint8)


def input_pipeline_rows(config) -> list[dict]:
  """Images/s of the ImageNet training input pipeline, by stage and threads.

  The stages show where the time goes: decoding the whole image, decoding
  only the window of it that ``imagenet.augment`` resizes (so the rest of
  its time is the resize), the reference augmentation (the whole image
  decoded and resized, then cropped: ``imagenet.resize_then_crop``), the
  Flax ImageNet example's (``flax_view``), and the training augmentation
  (``imagenet.augmented``, as training maps it), both with the config's
  colour augmentation; and the training loop's feeding of the
  augmentation's batches to the devices (``fed``), which should cost
  nothing beside it.
  """
  if config.dataset != 'imagenet2012':
    raise BenchmarkError(
        "--input_pipeline times ImageNet's pipeline: "
        'pass an ImageNet --config (e.g. '
        'configs/imagenet_resnet18.py)'
    )
  try:
    threads = [int(t) for t in FLAGS.input_threads]
  except ValueError as e:
    raise BenchmarkError(f'--input_threads takes integers: {e}')
  if min(threads, default=0) <= 0 or FLAGS.input_images <= 0:
    raise BenchmarkError(
        '--input_threads and --input_images must be ' 'positive'
    )
  from resnet_jax import imagenet  # pylint: disable=g-import-not-at-top

  tf = imagenet.tf
  jpegs = synthetic_jpegs(tf, FLAGS.input_images)

  def decode_window(image, label, key):
    size, crop, _, _ = imagenet.draws(key)
    window = imagenet.window(image, size, crop)[0]
    # Its shape, not its pixels: the windows differ in shape, and batching
    # them ragged costs most of what decoding them does.
    window = tf.image.decode_and_crop_jpeg(image, window, channels=3)
    return tf.shape(window), label

  stages = {
      'decode': lambda ds: ds.map(
          lambda image, label: (imagenet.decode(image), label),
          num_parallel_calls=tf.data.AUTOTUNE,
      ),
      'decode window': lambda ds: imagenet.keyed_map(ds, 0, decode_window),
      'resize-then-crop': lambda ds: imagenet.augmented(
          ds, 0, config.pca_lighting, imagenet.resize_then_crop
      ),
      'baseline': lambda ds: imagenet.keyed_map(
          ds, 0, lambda image, label, key: (flax_view(image, key), label)
      ),
      'augment': lambda ds: imagenet.augmented(ds, 0, config.pca_lighting),
  }
  stages['training loop'] = stages['augment']  # Fed to the devices (fed).
  print(
      f'ImageNet input pipeline: TensorFlow {tf.__version__}, '
      f'{len(os.sched_getaffinity(0))} cores, {len(jpegs)} JPEGs of '
      f'{JPEG_SHAPE[1]}x{JPEG_SHAPE[0]}',
      flush=True,
  )
  timings = {}  # (stage, threads) -> [(images/s, per CPU s)], a repeat each.
  for _ in range(FLAGS.repeats):  # Interleaved: a slow spell hits all rows.
    for stage, pipeline in stages.items():
      for n in threads:
        options = tf.data.Options()
        options.threading.private_threadpool_size = n
        options.threading.max_intra_op_parallelism = 1
        ds = tf.data.Dataset.from_tensor_slices(
            (jpegs, np.zeros(len(jpegs), np.int64))
        ).repeat()
        ds = pipeline(ds).batch(INPUT_BATCH).prefetch(1).with_options(options)
        batches = (
            fed(ds, config.steps_per_dispatch)
            if stage == 'training loop'
            else iter(ds)
        )
        timings.setdefault((stage, n), []).append(time_batches(batches))
  rows = []
  for (stage, n), repeats in timings.items():
    images_per_s, images_per_cpu_s = np.median(repeats, axis=0)
    row = {
        'mode': 'input',
        'stage': stage,
        'threads': n,
        'images_per_s': images_per_s,
        'images_per_s_per_thread': images_per_s / n,
        'images_per_cpu_s': images_per_cpu_s,
        'images_per_cpu_s_repeats': [r[1] for r in repeats],
        'jpeg_kb': np.mean([len(j) for j in jpegs]) / 1000,
        'jpeg_shape': JPEG_SHAPE,
        'pca_lighting': config.pca_lighting,
        'cores': len(os.sched_getaffinity(0)),
        'tensorflow_version': tf.__version__,
    }
    print(json.dumps(row), flush=True)
    rows.append(row)
  print(
      f'\n{"stage":<17}{"threads":>8}{"images/s":>10}{"per thread":>11}'
      f'{"per CPU s":>10}'
  )
  for row in rows:
    print(
        f'{row["stage"]:<17}{row["threads"]:>8}{row["images_per_s"]:>10.0f}'
        f'{row["images_per_s_per_thread"]:>11.0f}'
        f'{row["images_per_cpu_s"]:>10.0f}'
    )
  return rows


def fed(ds, steps_per_dispatch: int):
  """The training loop's feeding of tf.data's batches ``ds``: one step a
  batch, ``steps_per_dispatch`` a dispatch, sent to every device by
  ``train.host_dispatches`` and taken by a jitted call that waits for
  them, with two dispatches in flight as ``train.train_and_evaluate`` keeps
  them. The call does nothing else in place of a training step: on this
  CPU a ResNet's step is far slower than its input, on an accelerator it is
  the input that must keep up, and the step's reading of its batch is the
  accelerator's work, not the host's. Yields once per step."""
  mesh = devices.make_mesh({'the input batch': INPUT_BATCH})
  take = jax.jit(lambda images, labels: labels.sum())
  host = ((x, y.astype(np.int32)) for x, y in ds.as_numpy_iterator())
  running = None
  for inputs in train.host_dispatches(host, mesh, steps_per_dispatch):
    result = take(*inputs)
    if running is not None:
      running.block_until_ready()
    running = result
    for _ in range(steps_per_dispatch):
      yield


def multiscale_row(config) -> dict:
  """Multi-scale testing (§3.4) of random images of ImageNet's sizes.

  A fresh network of ``config`` tests ``--multiscale_images`` random
  images (longer side 300-500, aspect ratios 1:2 to 2:1, as ImageNet's
  validation photos) at ``config.test_scales`` (default Table 4's) as
  ``evaluate.test_probabilities`` does: views padded to buckets
  (``imagenet.bucketed_views``), ``evaluate.probabilities``. Prints the
  views, their distinct shapes (the compilations of a program per shape),
  the buckets and the compilations, seconds and images/s (compilations
  included: the first evaluation of a network); and the largest difference
  of the scores of ``--multiscale_checked`` images from testing each of
  their views alone, unpadded.
  """
  if config.dataset != 'imagenet2012':
    raise BenchmarkError(
        '--multiscale tests ImageNet: pass an ImageNet --config (e.g. '
        'configs/imagenet_resnet18.py)'
    )
  from resnet_jax import evaluate  # pylint: disable=g-import-not-at-top
  from resnet_jax import imagenet  # pylint: disable=g-import-not-at-top

  config.test_scales = tuple(config.test_scales) or (224, 256, 384, 480, 640)
  train.check_config(config)
  tf = imagenet.tf
  rng = np.random.default_rng(0)
  images = []
  for _ in range(FLAGS.multiscale_images):
    longer = int(rng.integers(300, 501))
    other = round(longer * np.exp(rng.uniform(np.log(0.5), 0)))
    shape = (longer, other) if rng.random() < 0.5 else (other, longer)
    images.append(rng.integers(0, 256, (*shape, 3), np.uint8))
  ds = tf.data.Dataset.from_generator(
      lambda: ((image, 0) for image in images),
      output_signature=(
          tf.TensorSpec((None, None, 3), tf.uint8),
          tf.TensorSpec((), tf.int64),
      ),
  )
  mesh = devices.make_mesh({'eval_batch_size': config.eval_batch_size})
  split = devices.split(mesh)
  state = jax.jit(
      functools.partial(
          train.fresh_state(config),
          train.create_optimizer(
              config, train.learning_rate_schedule(config, [])
          ),
          config.seed,
      )
  )()
  state = jax.device_put(
      state.replace(
          mean=np.full(state.mean.shape, 0.45, np.float32),
          std=np.full(state.std.shape, 0.25, np.float32),
      ),
      devices.replicated(mesh),
  )
  compiled = evaluate.probabilities._cache_size()  # pylint: disable=protected-access
  sums, shapes, buckets, views = {}, set(), set(), 0
  start = time.perf_counter()
  for batch, _, mask, index, sizes in imagenet.bucketed_views(
      ds,
      config.test_scales,
      config.test_bucket,
      config.eval_batch_size,
      len(mesh.devices.flat),
  ):
    probs = evaluate.probabilities(
        state, jax.device_put(batch, split), jax.device_put(sizes, split)
    )
    for i, p in zip(index[mask > 0], np.asarray(probs)[mask > 0]):
      sums[i] = sums.get(i, 0) + p
    shapes.update(map(tuple, sizes[mask > 0]))
    buckets.add(batch.shape[1:3])
    views += int(mask.sum())
  seconds = time.perf_counter() - start
  compiled = evaluate.probabilities._cache_size() - compiled  # pylint: disable=protected-access
  # Each view alone, unpadded, and its flip: a program per shape.
  whole = state.replace(mean=state.mean.mean((0, 1)))
  alone = jax.jit(
      lambda view: jax.nn.softmax(
          train.classify(whole, jnp.stack([view, view[:, ::-1]])[None])
      )[0]
  )
  difference = 0.0
  for i in range(min(FLAGS.multiscale_checked, len(images))):
    total = 0
    for scale in config.test_scales:
      view = np.clip(
          np.round(imagenet.resize_shorter_side(images[i], scale)), 0, 255
      ).astype(np.uint8)
      total += np.asarray(alone(view))
    difference = max(difference, float(np.abs(total - sums[i]).max()))
  row = {
      'mode': 'multiscale',
      'config': config_flags.get_config_filename(FLAGS['config']),
      'scales': list(config.test_scales),
      'test_bucket': config.test_bucket,
      'eval_batch_size': config.eval_batch_size,
      'images': len(images),
      'views': views,
      'view_shapes': len(shapes),
      'buckets': len(buckets),
      'compilations': compiled,
      'seconds': seconds,
      'images_per_s': len(images) / seconds,
      'checked_images': min(FLAGS.multiscale_checked, len(images)),
      'max_score_difference': difference,
      'devices': jax.device_count(),
  }
  print(json.dumps(row), flush=True)
  return row


def integers(name: str, values, least: int = 1) -> list[int]:
  """A list flag's integers; raises BenchmarkError unless all >= least."""
  try:
    values = [int(v) for v in values]
  except ValueError as e:
    raise BenchmarkError(f'--{name} takes integers: {e}')
  if any(v < least for v in values):
    raise BenchmarkError(f'--{name} must be at least {least}')
  return values


def parse_flags():
  """The rows' settings from the flags; raises BenchmarkError if invalid."""
  depths = integers('depths', FLAGS.depths, 8)
  batch_sizes = integers('batch_sizes', FLAGS.batch_sizes)
  for depth in depths:
    models.cifar_blocks_per_stage(depth)
  for name, values, allowed in (
      ('dtypes', FLAGS.dtypes, ('float32', 'bfloat16')),
      ('modes', FLAGS.modes, MODES),
      ('placements', FLAGS.placements, PLACEMENTS),
  ):
    for value in values:
      if value not in allowed:
        raise BenchmarkError(
            f'--{name}: {value!r} is not one of ' f'{", ".join(allowed)}'
        )
  if FLAGS.repeats < 1:
    raise BenchmarkError('--repeats must be at least 1')
  if FLAGS.config.model != 'cifar':
    raise BenchmarkError(
        f'--config is a {FLAGS.config.model} net; the '
        'benchmark times the CIFAR nets (depth 6n+2)'
    )
  return (
      depths,
      batch_sizes,
      integers('steps_per_dispatch', FLAGS.steps_per_dispatch),
      integers('seeds', FLAGS.seeds),
  )


HEADER = (
    f'{"model":<11}{"batch":>6} {"dtype":<9}{"mode":<6}{"K":>3}'
    f'{"seeds":>6} {"placement":<10}{"images/s":>10}{"spread":>7}'
    f'{"per seed":>9}{"x depth":>9}{"compile s":>10}{"XLA MB":>9}'
    f'{"peak MB":>9}{"PyTorch":>10}{"ratio":>7}{"tax":>6}'
)


def table_row(row: dict) -> str:
  torch_ips = row.get('pytorch_images_per_s')
  tax = row.get('residual_tax')
  return (
      f'{row["model"]:<11}{row["batch"]:>6} {row["dtype"]:<9}'
      f'{row["mode"]:<6}{row["steps_per_dispatch"]:>3}{row["seeds"]:>6} '
      f'{row["placement"]:<10}{row["images_per_s"]:>10.0f}'
      f'{row["spread"]:>6.0%} {row["images_per_s_per_seed"]:>9.0f}'
      f'{row["images_per_s_x_depth"]:>9.0f}'
      f'{row["compile_s"]:>10.1f}{row["xla_memory_mb"]:>9.0f}'
      f'{row["peak_memory_mb"]:>9.0f}'
      + (
          f'{torch_ips:>10.0f}{row["ratio"]:>7.2f}'
          if torch_ips
          else f'{"-":>10}{"-":>7}'
      )
      + (f'{tax:>6.2f}' if tax else f'{"-":>6}')
  )


def time_group(
    timed: list, torch_steps: dict, batch: int, repeats: int
) -> tuple:
  """Images/s of each of ``timed`` (call, images per call) and of each
  PyTorch step (one ``batch``), in ``repeats`` interleaved repeats: one after the other,
  repeat after repeat, so a slow spell of a shared machine falls on all."""
  jax_ips, torch_ips = [[] for _ in timed], {c: [] for c in torch_steps}
  for repeat in range(repeats):
    warmup = 2 if repeat == 0 else 0  # PyTorch's warmed up in prepare_torch.
    for (call, images), ips in zip(timed, jax_ips):
      seconds, _ = seconds_per_call(
          call, FLAGS.min_seconds, jax.block_until_ready, warmup=warmup
      )
      ips.append(images / seconds)
      if ips is jax_ips[0]:  # PyTorch right after the row it is beside.
        for compiled, (step, _) in torch_steps.items():
          seconds, _ = seconds_per_call(step, FLAGS.min_seconds, warmup=0)
          torch_ips[compiled].append(batch / seconds)
  return jax_ips, torch_ips


def row_groups(depths, batch_sizes, per_dispatch, seed_counts):
  """Rows timed together: (depth, batch, dtype, mode, steps per dispatch),
  [(residual, seeds, placement)]; a ResNet's first, its plain twin next."""
  for depth in depths:
    for batch in batch_sizes:
      for dtype in FLAGS.dtypes:
        for mode in FLAGS.modes:
          for k in per_dispatch if mode == 'train' else [1]:
            for seeds in seed_counts if mode == 'train' else [1]:
              if seeds == 1:
                rows = [(True, 1, 'data')] + (
                    [(False, 1, 'data')] if FLAGS.plain else []
                )
              else:
                rows = [(True, seeds, p) for p in FLAGS.placements]
              yield (depth, batch, dtype, mode, k), rows


def estimated_seconds(
    timed: list[tuple], depth: int, rows: list[tuple[tuple[str, int], int]]
) -> float:
  """A group's time, from the rows timed before it: (depth, kind, seconds
  per image, seconds to set up and compile) each, a kind being (placement,
  seeds). ``rows`` are (kind, images per call). Per row: its set-up plus
  the calls ``time_group`` makes (two warm-ups, then at least 3 or
  --min_seconds per repeat) at the slowest seconds per image seen for its
  kind at this depth (or at another, scaled by depth). A kind not timed
  yet is taken to run its seeds one after another at the slowest rate seen
  (side by side they can be slower still: vmapped on a CPU). 0 before any
  row."""
  if not timed:
    return 0.0

  def per_image(kinds) -> float | None:
    same = [seconds for d, k, seconds, _ in timed if d == depth and k in kinds]
    other = [seconds / d for d, k, seconds, _ in timed if k in kinds]
    return max(same) if same else depth * max(other) if other else None

  setup = max(seconds for *_, seconds in timed)
  total = 0.0
  for kind, images in rows:
    rate = per_image({kind}) or per_image({k for _, k, _, _ in timed}) * kind[1]
    total += setup + max(
        FLAGS.repeats * FLAGS.min_seconds,
        (2 + 3 * FLAGS.repeats) * images * rate,
    )
  return total


def benchmark_rows(depths, batch_sizes, per_dispatch, seed_counts, baseline):
  """Every row: prepared, timed in interleaved repeats, printed as JSON.

  With --max_seconds, a group whose estimate would end past it is skipped:
  returns (rows, skipped groups, each a line)."""
  start = time.perf_counter()
  rows, skipped, timed_before = [], [], []
  for (depth, batch, dtype, mode, k), group in row_groups(
      depths, batch_sizes, per_dispatch, seed_counts
  ):
    remat = (
        depth >= REMAT_DEPTH if FLAGS.remat == 'auto' else FLAGS.remat == 'true'
    )
    with_torch = bool(
        baseline
        and mode != 'data'
        and group[0][1] == 1
        and depth <= FLAGS.torch_max_depth
    )
    # PyTorch eager and compiled: two more rows like the first.
    sizes = [
        ((placement, seeds), batch * k * seeds) for _, seeds, placement in group
    ]
    estimate = estimated_seconds(
        timed_before, depth, sizes + sizes[:1] * 2 * with_torch
    )
    if FLAGS.max_seconds and (
        time.perf_counter() - start + estimate > FLAGS.max_seconds
    ):
      name = models.display_name(
          benchmark_config(
              FLAGS.config,
              depth,
              batch,
              dtype,
              remat,
              True,
              FLAGS.scan_blocks,
              k,
          )
      )
      skipped.append(
          f'{name}, batch {batch}, {dtype}, {mode}, K={k}, '
          f'{"/".join(p for _, _, p in group)} x {group[0][1]} seeds: '
          f'estimated {estimate:.0f} s'
      )
      print(
          f'skipped (--max_seconds={FLAGS.max_seconds:g}): {skipped[-1]}',
          flush=True,
      )
      continue
    timed, group_rows = [], []
    for residual, seeds, placement in group:
      config = benchmark_config(
          FLAGS.config,
          depth,
          batch,
          dtype,
          remat,
          residual,
          FLAGS.scan_blocks,
          k,
      )
      if seeds == 1:
        call, images, figures = prepare(config, mode)
        used = jax.device_count()
      else:
        call, images, figures = prepare_seeds(config, placement, seeds)
        used = (
            jax.device_count()
            if placement == 'data'
            else seeds_mesh(placement, seeds).size
        )
      timed.append((call, images))
      group_rows.append(
          {
              'model': models.display_name(config),
              'batch': batch,
              'dtype': dtype,
              'mode': mode,
              'steps_per_dispatch': k,
              'seeds': seeds,
              'placement': placement,
              'remat': remat,
              'scan_blocks': config.scan_blocks,
              'devices': used,
              'backend': jax.default_backend(),
              'repeats': FLAGS.repeats,
              **figures,
          }
      )
    torch_steps = (
        prepare_torch(baseline, depth, batch, dtype, mode) if with_torch else {}
    )
    jax_ips, torch_ips = time_group(timed, torch_steps, batch, FLAGS.repeats)
    for row, ips in zip(group_rows, jax_ips):
      row |= median_and_spread(ips)
      row['images_per_s_per_seed'] = row['images_per_s'] / row['seeds']
      row['images_per_s_x_depth'] = row['images_per_s'] * depth
      row['peak_memory_mb'] = peak_memory_mb()
    if torch_steps:
      group_rows[0] |= torch_figures(baseline, torch_steps, torch_ips)
      group_rows[0]['ratio'] = (
          group_rows[0]['images_per_s'] / group_rows[0]['pytorch_images_per_s']
      )
    if FLAGS.plain and group[0][1] == 1:  # The ResNet's seconds per step over
      # its twin's.
      group_rows[0]['residual_tax'] = (
          group_rows[1]['images_per_s'] / group_rows[0]['images_per_s']
      )
    for row in group_rows:
      print(json.dumps(row), flush=True)
      timed_before.append(
          (
              depth,
              (row['placement'], row['seeds']),
              1 / row['images_per_s'],
              row['setup_s'] + row['compile_s'],
          )
      )
    rows += group_rows
  return rows, skipped


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.input_pipeline:
    input_pipeline_rows(FLAGS.config)
    return
  if FLAGS.multiscale:
    return multiscale_row(FLAGS.config)
  depths, batch_sizes, per_dispatch, seed_counts = parse_flags()
  devices.use_cpu_cores(batch_sizes)  # As the training command does.
  for batch in batch_sizes:
    devices.make_mesh({'batch size': batch})
  baseline = torch_baseline()
  print(
      f'resnet_jax benchmark: jax {jax.__version__}, '
      f'{jax.device_count()} x {jax.devices()[0].device_kind} '
      f'({jax.default_backend()}), PyTorch baseline: '
      f'{"yes" if baseline else "no"}',
      flush=True,
  )
  rows, skipped = benchmark_rows(
      depths, batch_sizes, per_dispatch, seed_counts, baseline
  )
  print('\n' + HEADER)
  for row in rows:
    print(table_row(row))
  return rows, skipped


if __name__ == '__main__':
  define_flags()
  cli.run(main)
