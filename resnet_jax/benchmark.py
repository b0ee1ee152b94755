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

  python -m resnet_jax.benchmark --config=configs/imagenet_resnet18.py \
      --input_pipeline

times instead what the ImageNet training input pipeline (``imagenet.py``,
tf.data on the host) delivers, on synthetic JPEGs of ImageNet's typical size
and weight, with 1 and 2 tf.data threads (``--input_threads``; one core
each): images/s, images/s per thread and images per CPU second (what a busy
core delivers, also on a shared machine), for decoding alone, decoding and
resizing to the middle training scale, and the whole training augmentation
(``imagenet.augmented``, the function the training pipeline maps: decode,
scale, crop, flip, colour). It needs TensorFlow; nothing else here does.
"""

import json
import os
import resource
import time

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from resnet_jax import cli
from resnet_jax import data
from resnet_jax import devices
from resnet_jax import models
from resnet_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'The config whose CIFAR net and training step are timed '
    '(e.g. configs/default.py); each row sets its depth, batch size, dtype, '
    'remat and synthetic data. With --input_pipeline: an ImageNet config.',
    lock_config=True)
flags.mark_flags_as_required(['config'])
REMAT_DEPTH = 1202  # ResNet-1202's activations exceed memory without remat.
flags.DEFINE_list('depths', ['20', '56', '110'], 'CIFAR depths (6n+2).')
flags.DEFINE_list('batch_sizes', ['128', '256'], 'Global batch sizes.')
flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Computation dtypes.')
flags.DEFINE_list('modes', ['train', 'eval', 'data'], 'What to time.')
flags.DEFINE_enum('remat', 'auto', ['auto', 'true', 'false'],
                  'Rematerialise each block (config.remat); auto: for '
                  f'depths from {REMAT_DEPTH} on, as configs/resnet1202.py.')
flags.DEFINE_bool('scan_blocks', None, 'Run the repeated blocks of each stage '
                  'as one loop (config.scan_blocks); default: the config\'s.')
flags.DEFINE_bool('plain', False, 'Also time the plain twin of every net '
                  '(the residual tax: ResNet / plain).')
flags.DEFINE_float('min_seconds', 5.0, 'Time each row for at least this '
                   'long (and at least 3 calls).')
flags.DEFINE_enum('torch', 'auto', ['auto', 'off'],
                  'auto: run the PyTorch baseline when torch is installed.')
flags.DEFINE_integer('torch_max_depth', 110, 'Run the PyTorch baseline up to '
                     'this depth (it keeps every activation: ResNet-1202 '
                     'needs ~23 GiB at batch 128).')
flags.DEFINE_bool('torch_compile', True, 'Also time the PyTorch baseline '
                  'under torch.compile; the faster of the two is the '
                  'baseline.')
flags.DEFINE_bool('input_pipeline', False, 'Instead of the nets, time the '
                  'ImageNet training input pipeline of --config (an ImageNet '
                  'config) on synthetic JPEGs. Needs TensorFlow.')
flags.DEFINE_list('input_threads', ['1', '2'], '--input_pipeline: tf.data '
                  'threads (a private thread pool, one op thread each).')
flags.DEFINE_integer('input_images', 64, '--input_pipeline: distinct '
                     'synthetic JPEGs, encoded once, read over and over.')

MODES = ('train', 'eval', 'data')


class BenchmarkError(ValueError):
  """Flags that do not describe a benchmark."""


def seconds_per_call(fn, min_seconds: float, block=lambda _: None,
                     min_calls: int = 3, warmup: int = 2):
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


def benchmark_config(base, depth: int, batch_size: int, dtype: str,
                     remat: bool, residual: bool = True,
                     scan_blocks: bool | None = None):
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
  return config


def peak_memory_mb() -> float:
  """Peak memory of this process so far: the device's, else resident set."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def measure(config, mode: str, min_seconds: float) -> dict:
  """Times one row; returns images/s, compile seconds and memory."""
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
    fn, args = steps.eval, (state, *(
        devices.global_array(a, steps.batch) for a in (
            rng.integers(0, 256, (local, 32, 32, 3), np.uint8),
            rng.integers(0, 10, local, np.int32), np.ones(local, bool))))
  else:
    def draw(images, labels, rng, step):
      x, y = inputs.draw(images, labels, rng, step)
      return data.normalize(x, state.mean, state.std), y
    fn = jax.jit(draw, out_shardings=steps.batch)
    args = (images, labels, jax.random.key(0), state.step)

  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  xla_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes -
               memory.alias_size_in_bytes + memory.temp_size_in_bytes)

  if mode == 'train':
    def call():  # The state is donated: carry it from step to step.
      nonlocal state
      state, metrics = compiled(state, images, labels)
      return metrics
  else:
    call = lambda: compiled(*args)
  seconds, _ = seconds_per_call(call, min_seconds, jax.block_until_ready)
  return {'images_per_s': batch / seconds, 'compile_s': compile_s,
          'setup_s': setup_s,
          'xla_memory_mb': xla_bytes / 2**20,
          'peak_memory_mb': peak_memory_mb()}


def torch_baseline():
  """The PyTorch baseline module, or None without torch (or off a CPU)."""
  if FLAGS.torch == 'off' or jax.default_backend() != 'cpu':
    return None
  try:
    from resnet_jax import torch_baseline as baseline  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return baseline


def measure_torch(baseline, depth, batch, dtype, mode, min_seconds) -> dict:
  """The faster of eager and (if asked and it works) compiled PyTorch."""
  results = {}
  for compiled in (False, True) if FLAGS.torch_compile else (False,):
    try:
      step = baseline.make_step(depth, batch, dtype, mode, compiled)
      seconds, warmup = seconds_per_call(step, min_seconds)
    except Exception as e:  # pylint: disable=broad-except
      if not compiled:
        raise
      print(f'torch.compile failed ({type(e).__name__}); eager baseline only',
            flush=True)
      continue
    results[compiled] = {'images_per_s': batch / seconds, 'warmup_s': warmup}
  best = max(results, key=lambda c: results[c]['images_per_s'])
  return {'pytorch_images_per_s': results[best]['images_per_s'],
          'pytorch_eager_images_per_s': results[False]['images_per_s'],
          'pytorch_compiled_images_per_s':
              results.get(True, {}).get('images_per_s'),
          'pytorch_warmup_s': results[best]['warmup_s'],
          'pytorch_torch_compile': best,
          'pytorch_version': baseline.torch.__version__,
          'pytorch_threads': baseline.torch.get_num_threads()}


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
  return (images / (time.perf_counter() - start),
          images / (time.process_time() - cpu))


def input_pipeline_rows(config) -> list[dict]:
  """Images/s of the ImageNet training input pipeline, by stage and threads.

  The stages show what limits it: decoding alone, decoding and resizing to
  the middle of the training scales, and the whole augmentation
  (``imagenet.augmented``, as training maps it, with the config's
  colour augmentation).
  """
  if config.dataset != 'imagenet2012':
    raise BenchmarkError('--input_pipeline times ImageNet\'s pipeline: '
                         'pass an ImageNet --config (e.g. '
                         'configs/imagenet_resnet18.py)')
  try:
    threads = [int(t) for t in FLAGS.input_threads]
  except ValueError as e:
    raise BenchmarkError(f'--input_threads takes integers: {e}')
  if min(threads, default=0) <= 0 or FLAGS.input_images <= 0:
    raise BenchmarkError('--input_threads and --input_images must be '
                         'positive')
  from resnet_jax import imagenet  # pylint: disable=g-import-not-at-top
  tf = imagenet.tf
  jpegs = synthetic_jpegs(tf, FLAGS.input_images)
  middle = sum(imagenet.SCALES) // 2
  stages = {
      'decode': lambda ds: ds.map(
          lambda image, label: (imagenet.decode(image), label),
          num_parallel_calls=tf.data.AUTOTUNE),
      'decode+resize': lambda ds: ds.map(
          lambda image, label: (imagenet.resize_shorter_side(
              imagenet.decode(image), middle), label),
          num_parallel_calls=tf.data.AUTOTUNE),
      'augment': lambda ds: imagenet.augmented(ds, 0, config.pca_lighting),
  }
  print(f'ImageNet input pipeline: TensorFlow {tf.__version__}, '
        f'{len(os.sched_getaffinity(0))} cores, {len(jpegs)} JPEGs of '
        f'{JPEG_SHAPE[1]}x{JPEG_SHAPE[0]}', flush=True)
  rows = []
  for stage, pipeline in stages.items():
    for n in threads:
      options = tf.data.Options()
      options.threading.private_threadpool_size = n
      options.threading.max_intra_op_parallelism = 1
      ds = tf.data.Dataset.from_tensor_slices(
          (jpegs, np.zeros(len(jpegs), np.int64))).repeat()
      ds = pipeline(ds).batch(INPUT_BATCH).prefetch(1).with_options(options)
      images_per_s, images_per_cpu_s = time_batches(iter(ds))
      row = {'mode': 'input', 'stage': stage, 'threads': n,
             'images_per_s': images_per_s,
             'images_per_s_per_thread': images_per_s / n,
             'images_per_cpu_s': images_per_cpu_s,
             'jpeg_kb': np.mean([len(j) for j in jpegs]) / 1000,
             'jpeg_shape': JPEG_SHAPE, 'pca_lighting': config.pca_lighting,
             'cores': len(os.sched_getaffinity(0)),
             'tensorflow_version': tf.__version__}
      print(json.dumps(row), flush=True)
      rows.append(row)
  print(f'\n{"stage":<15}{"threads":>8}{"images/s":>10}{"per thread":>11}'
        f'{"per CPU s":>10}')
  for row in rows:
    print(f'{row["stage"]:<15}{row["threads"]:>8}{row["images_per_s"]:>10.0f}'
          f'{row["images_per_s_per_thread"]:>11.0f}'
          f'{row["images_per_cpu_s"]:>10.0f}')
  return rows


def parse_flags():
  """The rows' settings from the flags; raises BenchmarkError if invalid."""
  try:
    depths = [int(d) for d in FLAGS.depths]
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  except ValueError as e:
    raise BenchmarkError(f'--depths and --batch_sizes take integers: {e}')
  for depth in depths:
    if depth < 8 or (depth - 2) % 6:
      raise BenchmarkError(f'depth {depth} is not 6n+2 (20, 32, 44, 56, 110, '
                           f'1202)')
  for name, values, allowed in (('dtypes', FLAGS.dtypes,
                                 ('float32', 'bfloat16')),
                                ('modes', FLAGS.modes, MODES)):
    for value in values:
      if value not in allowed:
        raise BenchmarkError(f'--{name}: {value!r} is not one of '
                             f'{", ".join(allowed)}')
  if any(b <= 0 for b in batch_sizes):
    raise BenchmarkError('--batch_sizes must be positive')
  if FLAGS.config.model != 'cifar':
    raise BenchmarkError(f'--config is a {FLAGS.config.model} net; the '
                         'benchmark times the CIFAR nets (depth 6n+2)')
  return depths, batch_sizes


HEADER = (f'{"model":<11}{"batch":>6} {"dtype":<9}{"mode":<6}{"images/s":>10}'
          f'{"x depth":>9}{"compile s":>10}{"XLA MB":>9}{"peak MB":>9}'
          f'{"PyTorch":>10}{"ratio":>7}{"tax":>6}')


def table_row(row: dict) -> str:
  torch_ips = row.get('pytorch_images_per_s')
  tax = row.get('residual_tax')
  return (f'{row["model"]:<11}{row["batch"]:>6} {row["dtype"]:<9}'
          f'{row["mode"]:<6}{row["images_per_s"]:>10.0f}'
          f'{row["images_per_s_x_depth"]:>9.0f}'
          f'{row["compile_s"]:>10.1f}{row["xla_memory_mb"]:>9.0f}'
          f'{row["peak_memory_mb"]:>9.0f}'
          + (f'{torch_ips:>10.0f}{row["ratio"]:>7.2f}' if torch_ips else
             f'{"-":>10}{"-":>7}')
          + (f'{tax:>6.2f}' if tax else f'{"-":>6}'))


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.input_pipeline:
    input_pipeline_rows(FLAGS.config)
    return
  depths, batch_sizes = parse_flags()
  devices.use_cpu_cores(batch_sizes)  # As the training command does.
  for batch in batch_sizes:
    devices.make_mesh({'batch size': batch})
  baseline = torch_baseline()
  print(f'resnet_jax benchmark: jax {jax.__version__}, '
        f'{jax.device_count()} x {jax.devices()[0].device_kind} '
        f'({jax.default_backend()}), PyTorch baseline: '
        f'{"yes" if baseline else "no"}', flush=True)
  rows = []
  for depth in depths:
    for batch in batch_sizes:
      for dtype in FLAGS.dtypes:
        for mode in FLAGS.modes:
          pair = []
          remat = (depth >= REMAT_DEPTH if FLAGS.remat == 'auto' else
                   FLAGS.remat == 'true')
          for residual in (True, False) if FLAGS.plain else (True,):
            config = benchmark_config(FLAGS.config, depth, batch, dtype,
                                      remat, residual,
                                      FLAGS.scan_blocks)
            row = {'model': models.display_name(config), 'batch': batch,
                   'dtype': dtype, 'mode': mode, 'remat': remat,
                   'scan_blocks': config.scan_blocks,
                   'devices': jax.device_count(),
                   'backend': jax.default_backend(),
                   **measure(config, mode, FLAGS.min_seconds)}
            row['images_per_s_x_depth'] = row['images_per_s'] * depth
            if (residual and baseline and mode != 'data' and
                depth <= FLAGS.torch_max_depth):
              row |= measure_torch(baseline, depth, batch, dtype, mode,
                                   FLAGS.min_seconds)
              row['ratio'] = row['images_per_s'] / row['pytorch_images_per_s']
            pair.append(row)
          if len(pair) == 2:  # Seconds per step of the ResNet over its twin.
            pair[0]['residual_tax'] = (pair[1]['images_per_s'] /
                                       pair[0]['images_per_s'])
          for row in pair:
            print(json.dumps(row), flush=True)
          rows += pair
  print('\n' + HEADER)
  for row in rows:
    print(table_row(row))


if __name__ == '__main__':
  cli.run(main, (BenchmarkError, *train.USER_ERRORS))
