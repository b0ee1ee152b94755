r"""A run's steps compiled ahead of time for a TPU, on any machine.

  python -m resnet_jax.compile --config=configs/imagenet_resnet50.py \
      --topology=v5e:1x1
  python -m resnet_jax.compile --config=configs/resnet110.py \
      --topology=v5e:2x2 --config.dtype=bfloat16 --max_batch

XLA's TPU compiler (the ``libtpu`` wheel: ``pip install -e '.[tpu]'``) runs
on the CPU for a described topology (``jax.experimental.topologies``). This
compiles the jitted programs a run executes there, on the data mesh of every
chip of every host, exactly as ``train.setup`` and ``evaluate`` build them:
the training step (CIFAR's with the training split held on the chips,
ImageNet's with host batches; ``steps_per_dispatch`` steps a call), the
evaluation step and, with ``test_scales``, the multi-scale test's program at
each scale (the bucket of a 4:3 view, ImageNet's commonest shape, at its
batch: ``imagenet.bucket``; §3.4). For each it
prints one JSON line as it compiles and a table at the end:

* ``bytes_per_chip``: arguments + temporaries + outputs - aliases, from the
  compiled program; ``fits`` whether the compiler placed it in the chip's
  HBM (else its own out-of-memory figure, a lower bound).
* ``flops_per_image``: the arithmetic of one step's program with every loop
  written out, lowered for the CPU (XLA's count of a compiled TPU program
  takes a loop's body once); ``flops_per_image_from_layers`` counts it from
  the layers instead (training 6x, evaluation 2x the multiply-adds of
  ``--mode=summary``), a check on the first.
* ``images_per_s_per_chip_bound``: a roofline bound, never a measurement:
  the lower of the chip's peak bfloat16 FLOP/s over ``flops_per_image``
  (float32 convolutions run on the same bfloat16 units at JAX's default TPU
  precision) and its HBM bandwidth over the compiled step's bytes accessed
  per image (``bound_by`` says which).

``--max_batch`` also finds the largest training batch per chip that fits.
"""

import dataclasses
import functools
import importlib.util
import json
import os
import re
import sys
import time
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from resnet_jax import cifar
from resnet_jax import cli
from resnet_jax import data
from resnet_jax import devices as devices_lib
from resnet_jax import evaluate
from resnet_jax import layers
from resnet_jax import models
from resnet_jax import train
from resnet_jax import workdir as workdir_lib

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined when run, so that importing this
  module beside another command's defines no flag twice)."""
  config_flags.DEFINE_config_file(
      'config', None, 'A config file from configs/.', lock_config=True
  )
  flags.DEFINE_string(
      'topology',
      None,
      'A TPU topology, e.g. v5e:1x1 (a Colab TPU runtime), v5e:2x2, '
      'v5e:16x16 (64 hosts), v6e:2x2.',
  )
  flags.DEFINE_bool(
      'max_batch',
      False,
      'Also find the largest training batch per chip that fits.',
  )
  flags.DEFINE_multi_enum(
      'steps',
      ['train', 'eval', 'multiscale'],
      ['train', 'eval', 'multiscale'],
      "Which of the run's programs to compile (multiscale: with "
      'test_scales).',
  )
  flags.mark_flags_as_required(['config', 'topology'])


class CompileError(cli.UserError):
  """A topology or TPU runtime that cannot compile here."""


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: float
  peak_flops: float  # bfloat16, per second.
  hbm_bandwidth: float  # Bytes per second.


# Per chip (device_kind), from Google Cloud's TPU system architecture pages;
# v5e's HBM is what XLA's TPU compiler reports as available (15.75 GiB of
# its 16). (v4's libtpu here makes each core of a chip a device.)
CHIPS = {
    'TPU v5 lite': Chip(15.75 * 2**30, 197e12, 819e9),
    'TPU v5': Chip(95 * 2**30, 459e12, 2765e9),
    'TPU v6 lite': Chip(32 * 2**30, 918e12, 1640e9),
}
# Chips per host of the TPU runtime's hosts; a smaller topology is one host.
HOST_BOUNDS = (2, 2, 1)
# XLA's TPU compiler, out of memory, in one of two ways: "the total memory
# required for HLO temporaries (50.89G) exceeds available HBM (15.75G)", or
# "Used 15.75G of 15.75G hbm. Exceeded hbm capacity by 4.83M."
SIZE = r'([\d.]+)([KMG]?)'
OUT_OF_MEMORY = (
    re.compile(rf'\({SIZE}\) exceeds available HBM'),
    re.compile(rf'of {SIZE} hbm\. Exceeded hbm capacity by {SIZE}'),
)
UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30}


def needed_bytes(message: str) -> int | None:
  """The bytes a program needs by XLA's out-of-memory message (at least the
  temporaries'; or the capacity and the excess); None if ``message`` is not
  one."""
  for pattern in OUT_OF_MEMORY:
    found = pattern.search(message)
    if found:
      sizes = found.groups()
      return int(
          sum(
              float(number) * UNITS[unit]
              for number, unit in zip(sizes[::2], sizes[1::2])
          )
      )
  return None


def topology(name: str) -> list:
  """The compile-only devices of a TPU topology, e.g. 'v5e:2x2'."""
  if importlib.util.find_spec('libtpu') is None:
    raise CompileError(
        'compiling for a TPU needs its runtime on this machine: '
        "pip install -e '.[tpu]' (libtpu at the version jax pins)"
    )
  # Compiling uses no chip: several processes may load libtpu at once, and
  # this machine is one host of its own to libtpu (which otherwise asks the
  # cloud's metadata server for its TPU workers, and writes to stderr that
  # it found none). The topology's hosts are the name's.
  for variable, value in (
      ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1'),
      ('TPU_WORKER_HOSTNAMES', 'localhost'),
      ('TPU_HOST_BOUNDS', '1,1,1'),
  ):
    os.environ.setdefault(variable, value)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  shape = re.fullmatch(r'[^:]+:(\d+(?:x\d+)*)', name)
  options = {}
  if shape:
    dims = [int(d) for d in shape[1].split('x')] + [1, 1]
    if any(d < b for d, b in zip(dims, HOST_BOUNDS)):
      options['chips_per_host_bounds'] = tuple(
          min(d, b) for d, b in zip(dims, HOST_BOUNDS)
      )
  try:
    return topologies.get_topology_desc(
        platform='tpu', topology_name=name, **options
    ).devices
  except Exception as e:  # pylint: disable=broad-except
    # libtpu's JaxRuntimeError: the name or shape it does not know.
    raise CompileError(f'--topology {name}: {cli.first_line(e)}') from e


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted program of a run, its abstract arguments, and its arithmetic."""

  step: str  # 'train', 'eval' or 'multiscale'.
  jitted: Any
  args: tuple
  kwargs: dict
  images_per_chip: int  # Per step of a call.
  flops: Any  # () -> FLOPs of one step's program, loops written out.
  flops_from_layers: float | None  # Per image.
  scale: int | None = None


def cpu_flops(fn, *args, **kwargs) -> float:
  return (
      jax.jit(fn, static_argnames=tuple(kwargs))
      .lower(*args, **kwargs)
      .cost_analysis()['flops']
  )


def sds(shape, dtype, sharding=None):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def programs(config, devices, hosts: int) -> list[Program]:
  """The programs a run of ``config`` compiles on ``devices``."""
  train.check_config(config)
  info = data.dataset_info(config.dataset)
  size, chips = info.image_size, len(devices)
  mesh = devices_lib.make_mesh(
      {
          'batch_size': config.batch_size,
          'eval_batch_size': config.eval_batch_size,
      },
      devices,
  )
  replicated, split = devices_lib.replicated(mesh), devices_lib.split(mesh)
  synthetic = (
      config.data_source == 'synthetic' and config.dataset != 'imagenet2012'
  )
  train_size = (
      config.synthetic_train_size if synthetic else info.train_size
  ) - config.validation_size
  _, boundaries = train.schedule_in_steps(config, train_size)
  schedule = train.learning_rate_schedule(config, boundaries)
  tx = train.create_optimizer(config, schedule)
  state = jax.eval_shape(
      functools.partial(train.fresh_state(config, 'tpu'), tx, config.seed)
  )
  # The state's shapes, on the chips (``on_chips``) or, for the CPU that
  # counts the arithmetic, unplaced.
  on_chips = functools.partial(workdir_lib.abstract, state)
  per_step = config.steps_per_dispatch
  if config.dataset == 'imagenet2012':
    steps = train.make_steps(mesh, None, per_step)
    stacked = devices_lib.stacked(mesh)
    train_args = (
        sds((per_step, config.batch_size, size, size, 3), jnp.uint8, stacked),
        sds((per_step, config.batch_size), jnp.int32, stacked),
    )
  else:  # The packed training split on every chip (cifar.inputs).
    steps = train.make_steps(mesh, cifar.draw(config), per_step)
    words = size * size * 3 // 4
    train_args = (
        sds((train_size, words), jnp.uint32, replicated),
        sds((train_size,), jnp.int32, replicated),
    )
  macs = sum(
      row['macs']
      for row in layers.layer_table(
          models.from_config(config, info.num_classes), size
      )[0]
  )
  per_chip = config.batch_size // chips
  result = [
      Program(
          'train',
          steps.train,
          (on_chips(replicated), *train_args),
          {},
          per_chip,
          lambda: cpu_flops(
              train.train_step,
              state,
              sds((per_chip, size, size, 3), jnp.uint8),
              sds((per_chip,), jnp.int32),
          ),
          6 * macs,
      )
  ]
  crops = (10,) if config.ten_crop else ()
  eval_chip = config.eval_batch_size // chips
  result.append(
      Program(
          'eval',
          steps.eval,
          (
              on_chips(replicated),
              sds(
                  (config.eval_batch_size, *crops, size, size, 3),
                  jnp.uint8,
                  split,
              ),
              sds((config.eval_batch_size,), jnp.int32, split),
              sds((config.eval_batch_size,), jnp.float32, split),
          ),
          {},
          eval_chip,
          lambda: cpu_flops(
              train.eval_step,
              state,
              sds((eval_chip, *crops, size, size, 3), jnp.uint8),
              sds((eval_chip,), jnp.int32),
              sds((eval_chip,), jnp.float32),
          ),
          2 * macs * (crops[0] if crops else 1),
      )
  )
  if config.test_scales:
    from resnet_jax import imagenet  # pylint: disable=g-import-not-at-top

    # Each host tests its own images on its own chips, with the weights read
    # from a checkpoint (evaluate.py; workdir.load).
    weights = state.replace(
        **{
            name: None
            for name in workdir_lib.fields(state)
            if name not in workdir_lib.WEIGHTS
        }
    )
    local = [d for d in devices if d.process_index == devices[0].process_index]
    host_batch = config.eval_batch_size // hosts
    host_mesh = devices_lib.make_mesh({'eval_batch_size': host_batch}, local)
    split_host = devices_lib.split(host_mesh)
    for scale in config.test_scales:
      shape = imagenet.bucket((scale, -(-scale * 4 // 3)), config.test_bucket)
      views = imagenet.bucket_batch(shape, host_batch, len(local))
      view_chip = views // len(local)
      result.append(
          Program(
              'multiscale',
              evaluate.probabilities,
              (
                  workdir_lib.abstract(
                      weights, devices_lib.replicated(host_mesh)
                  ),
                  sds((views, *shape, 3), jnp.uint8, split_host),
                  sds((views, 2), jnp.int32, split_host),
              ),
              {},
              view_chip,
              functools.partial(
                  cpu_flops,
                  evaluate.probabilities,
                  weights,
                  sds((view_chip, *shape, 3), jnp.uint8),
                  sds((view_chip, 2), jnp.int32),
              ),
              None,
              scale,
          )
      )
  return result


def compile_row(program: Program, chip: Chip):
  """Compiles ``program``: (its row: what it needs of a chip, and its bound;
  the compiled program, or None where it does not fit)."""
  start = time.perf_counter()
  row = {'step': program.step}
  if program.scale:
    row['scale'] = program.scale
  row['images_per_chip'] = program.images_per_chip
  try:
    compiled = program.jitted.lower(*program.args, **program.kwargs).compile()
  except Exception as e:  # pylint: disable=broad-except
    needed = needed_bytes(str(e))
    if needed is None:
      raise
    return (
        row
        | {
            'compile_s': round(time.perf_counter() - start, 1),
            'bytes_per_chip': needed,
            'hbm_bytes_per_chip': int(chip.hbm_bytes),
            'fits': False,
            'error': f'out of HBM: the compiler needs at least {needed:,} bytes',
        },
        None,
    )
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  per_chip = (
      memory.argument_size_in_bytes
      + memory.temp_size_in_bytes
      + memory.output_size_in_bytes
      - memory.alias_size_in_bytes
  )
  flops = program.flops() / program.images_per_chip
  # One step's traffic: a compiled loop of steps counts its body once.
  traffic = compiled.cost_analysis()['bytes accessed']
  traffic /= program.images_per_chip
  by_compute = chip.peak_flops / flops
  by_memory = chip.hbm_bandwidth / traffic
  return (
      row
      | {
          'compile_s': round(seconds, 1),
          'bytes_per_chip': per_chip,
          'hbm_bytes_per_chip': int(chip.hbm_bytes),
          'fits': per_chip <= chip.hbm_bytes,
          'flops_per_image': flops,
          'flops_per_image_from_layers': program.flops_from_layers,
          'bytes_accessed_per_image': traffic,
          'images_per_s_per_chip_bound': min(by_compute, by_memory),
          'bound_by': 'compute' if by_compute <= by_memory else 'memory',
      },
      compiled,
  )


def largest_batch(config, devices, hosts, chip, first: dict) -> dict:
  """The training row at the largest batch per chip that fits, in multiples
  of 8 images per chip (of 1 below 8). Memory is close to affine in the
  batch: each try is the affine estimate through the two tries nearest the
  limit (an out-of-memory try counts with the compiler's figure), else a
  doubling or a bisection; the search ends at a try that fits next to one
  that does not."""
  chips = len(devices)
  tried = {first['images_per_chip']: first}
  step = 8 if first['images_per_chip'] >= 8 else 1
  while True:
    fitting = sorted(b for b, row in tried.items() if row['fits'])
    failing = sorted(b for b, row in tried.items() if not row['fits'])
    low, high = (fitting or [0])[-1], (failing or [None])[0]
    if high is not None and high - low <= step:
      return tried[low or high]
    if low and high is not None:
      pair = [low, high]
    else:
      pair = fitting[-2:] if high is None else failing[:2]
    guess = None
    if len(pair) == 2:
      a, b = pair
      slope = (tried[b]['bytes_per_chip'] - tried[a]['bytes_per_chip']) / (
          b - a
      )
      if slope > 0:
        guess = int(a + (chip.hbm_bytes - tried[a]['bytes_per_chip']) / slope)
        guess = guess // step * step
    if high is None:
      probe = (
          guess if guess and guess > low else (low + step if guess else 2 * low)
      )
    else:  # The estimate, unless it is at an end: there, halve the gap.
      inside = guess and low + step < guess < high - step
      probe = (guess if inside else (low + high) // 2) // step * step
      probe = min(max(probe, low + step), high - step)
    trial = config.copy_and_resolve_references()
    trial.batch_size, trial.eval_batch_size = probe * chips, chips
    trial.test_scales = ()
    print(f'max_batch: compiling {probe} images per chip', file=sys.stderr)
    tried[probe], _ = compile_row(programs(trial, devices, hosts)[0], chip)


COLUMNS = (
    ('step', 'step'),
    ('images/chip', 'images_per_chip'),
    ('compile s', 'compile_s'),
    ('GB/chip', 'bytes_per_chip'),
    ('HBM GB', 'hbm_bytes_per_chip'),
    ('fits', 'fits'),
    ('GFLOP/image', 'flops_per_image'),
    ('bound images/s/chip', 'images_per_s_per_chip_bound'),
)


def table(rows: list[dict]) -> str:
  """The rows as a Markdown table (GB = 10^9 bytes; the bound is a bound)."""

  def cell(row, key):
    value = row.get(key)
    if value is None:
      return '-'
    if key.endswith('bytes_per_chip'):
      return f'{value / 1e9:.2f}'
    if key == 'flops_per_image':
      return f'{value / 1e9:.3f}'
    if key == 'images_per_s_per_chip_bound':
      return f'{value:,.0f} ({row["bound_by"]})'
    if key == 'step' and row.get('scale'):
      return f'{value} {row["scale"]}'
    return str(value)

  lines = [
      '| ' + ' | '.join(name for name, _ in COLUMNS) + ' |',
      '| --- |' + ' ---: |' * (len(COLUMNS) - 1),
  ]
  for row in rows:
    lines.append('| ' + ' | '.join(cell(row, key) for _, key in COLUMNS) + ' |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config = FLAGS.config
  devices = topology(FLAGS.topology)
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise CompileError(
        f'{FLAGS.topology} is of {kind} chips, which this command has no '
        'figures for: use v5e, v5p or v6e (one device a chip)'
    )
  chip = CHIPS[kind]
  chips = len(devices)
  hosts = len({d.process_index for d in devices})
  header = {
      'config': config_flags.get_config_filename(FLAGS['config']),
      'overrides': config_flags.get_override_values(FLAGS['config']),
      'model': models.display_name(config),
      'topology': FLAGS.topology,
      'chips': chips,
      'hosts': hosts,
      'dtype': config.dtype,
      'blocks': 'scanned' if config.scan_blocks else 'unrolled',
      'remat': config.remat,
  }
  rows = []
  for program in programs(config, devices, hosts):
    if program.step not in FLAGS.steps:
      continue
    row, _ = compile_row(program, chip)
    row = header | row
    print(json.dumps(row), flush=True)
    rows.append(row)
  if FLAGS.max_batch:
    first = (
        rows[0]
        if 'train' in FLAGS.steps
        else compile_row(programs(config, devices, hosts)[0], chip)[0]
    )
    row = header | largest_batch(config, devices, hosts, chip, first)
    row['largest'] = True
    print(json.dumps(row), flush=True)
    rows.append(row)
  print(
      f'\n{header["model"]} on {FLAGS.topology} ({chips} x {kind}, {hosts} '
      f'host{"s" if hosts > 1 else ""}), {config.dtype}; GB = 10^9 bytes; '
      'the last column is a roofline bound, not a measurement.\n'
  )
  print(table(rows))


if __name__ == '__main__':
  # The compiler needs no TPU: JAX itself runs on the CPU, which also lowers
  # the programs whose arithmetic is counted.
  jax.config.update('jax_platforms', 'cpu')
  define_flags()
  cli.run(main)
