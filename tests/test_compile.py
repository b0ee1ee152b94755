"""The compile command: a run's steps compiled for TPU topologies on this CPU.

XLA's TPU compiler takes minutes per training step on two cores: the tests
compile ResNet-8 (configs/smoke.py) twice, once on a Colab runtime's single
v5e chip (through the command line) and once on 16 chips of 4 hosts.
"""

import json
import re

import jax
import numpy as np
import pytest

from configs import default
from configs import smoke
from resnet_jax import compile as compile_lib
from resnet_jax import main as main_lib
from tests import commands

pytest.importorskip('libtpu')


def rows(result) -> list[dict]:
  return [json.loads(l) for l in result.stdout.splitlines() if l[:1] == '{']


@pytest.mark.parametrize('scan_blocks', [True, False])
@pytest.mark.parametrize('depth', [20, 32, 44, 56, 110])
def test_flops_per_image_is_six_times_the_summary_multiply_adds(
    depth, scan_blocks
):
  # Training costs a forward pass (2 FLOPs a multiply-add) and a backward
  # pass of twice that. XLA counts the convolutions' multiply-adds that do
  # not fall on padding, the summary every one (the paper's measure): 8% of
  # a 3x3 conv's taps on CIFAR's 8x8 maps fall on padding.
  config = default.get_config()
  config.depth, config.scan_blocks = depth, scan_blocks
  macs = int(
      re.search(r'Multiply-adds per image: ([\d,]+)', main_lib.summary(config))[
          1
      ].replace(',', '')
  )
  program = compile_lib.programs(config, jax.devices()[:1], hosts=1)[0]
  flops = program.flops() / program.images_per_chip
  assert program.flops_from_layers == 6 * macs
  assert 0.85 < flops / (6 * macs) < 1.0


def test_a_single_v5e_chip_fits_and_an_impossible_batch_is_a_row():
  # Batches of one image: XLA's TPU compiler takes a fifth of the time it
  # takes at 8 (measured on both steps).
  result = commands.ok(
      commands.python(
          'resnet_jax.compile',
          '--config=configs/smoke.py',
          '--topology=v5e:1x1',
          '--config.batch_size=1',
          '--config.eval_batch_size=1',
          devices=1,
      )
  )
  found = rows(result)
  assert [r['step'] for r in found] == ['train', 'eval']
  for row in found:
    assert row['fits'] and row['chips'] == row['hosts'] == 1
    assert 0 < row['bytes_per_chip'] < row['hbm_bytes_per_chip']
    assert row['images_per_s_per_chip_bound'] > 0
  assert [r['images_per_chip'] for r in found] == [1, 1]
  assert '| train | 1 |' in result.stdout  # The table.
  # 2^17 images of a chip's 16 GB: the compiler's out-of-memory is a row.
  config = smoke.get_config()
  config.batch_size, config.eval_batch_size = 2**17, 2**21
  devices = compile_lib.topology('v5e:1x1')
  chip = compile_lib.CHIPS[devices[0].device_kind]
  for program in compile_lib.programs(config, devices, hosts=1):
    row, compiled = compile_lib.compile_row(program, chip)
    assert not row['fits'] and row['bytes_per_chip'] > row['hbm_bytes_per_chip']
    assert compiled is None


def test_the_training_step_is_data_parallel_over_every_chip_of_every_host():
  devices = compile_lib.topology('v5e:4x4')
  assert len(devices) == 16 and len({d.process_index for d in devices}) == 4
  config = smoke.get_config()  # 32 images: 2 per chip.
  program = compile_lib.programs(config, devices, hosts=4)[0]
  row, compiled = compile_lib.compile_row(
      program, compile_lib.CHIPS['TPU v5 lite']
  )
  assert row['fits'] and row['images_per_chip'] == 2
  state_in, *data_in = compiled.input_shardings[0]
  for sharding in jax.tree.leaves(
      (state_in, data_in, compiled.output_shardings)
  ):
    assert sharding.is_fully_replicated  # The state, and CIFAR's images.
  # Every chip's activations hold its 2 images (the first conv's output).
  batches = re.findall(r'f32\[(\d+),32,32,16\]', compiled.as_text())
  assert batches and set(batches) == {'2'}


@pytest.mark.parametrize(
    'flag, subject',
    [
        ('--topology=v5e:3x7', 'v5e:3x7'),
        ('--topology=v9:2x2', 'v9:2x2'),
        ('--config.batch_size=30', 'batch_size'),
    ],
)
def test_a_bad_topology_or_batch_is_one_error_line(flag, subject):
  result = commands.python(
      'resnet_jax.compile',
      '--config=configs/smoke.py',
      '--topology=v5e:2x2',
      flag,
      devices=1,
  )
  line = commands.error_line(result)
  assert subject in line
  assert result.stderr == line + '\n'  # Nothing of libtpu's start-up.


def test_without_the_tpu_runtime_it_says_how_to_install_it(monkeypatch):
  monkeypatch.setattr(
      compile_lib.importlib.util, 'find_spec', lambda name: None
  )
  with pytest.raises(compile_lib.CompileError, match=r'\[tpu\]'):
    compile_lib.topology('v5e:1x1')


@pytest.mark.parametrize(
    'memory, largest, tries',
    [
        # Affine in the batch: 1 GB + 0.1 GB an image, in 15.75 GiB of HBM
        # 159 images fit.
        (lambda b: 1e9 + 1e8 * b, 152, 6),
        # Not affine near the limit (the compiler's choices change): a jump
        # past 100 images, where the estimates overshoot and the search
        # halves the gap instead of stepping down by 8.
        (lambda b: 1e9 + 1e8 * b + (6e9 if b > 100 else 0), 96, 8),
    ],
)
def test_the_largest_batch_search_stops_next_to_a_batch_that_fails(
    memory, largest, tries
):
  chip = compile_lib.CHIPS['TPU v5 lite']
  tried = []

  def fake_row(program, chip):
    del chip
    tried.append(program.images_per_chip)
    size = memory(program.images_per_chip)
    return {
        'images_per_chip': program.images_per_chip,
        'bytes_per_chip': size,
        'fits': size <= compile_lib.CHIPS['TPU v5 lite'].hbm_bytes,
    }, None

  class Program:

    def __init__(self, per_chip):
      self.images_per_chip = per_chip

  config = smoke.get_config()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(compile_lib, 'compile_row', fake_row)
    patch.setattr(
        compile_lib,
        'programs',
        lambda trial, devices, hosts: [Program(trial.batch_size)],
    )
    first, _ = fake_row(Program(32), chip)
    best = compile_lib.largest_batch(config, [None], 1, chip, first)
  assert best['images_per_chip'] == largest  # Multiples of 8.
  assert len(tried) <= tries, tried
  assert np.all(np.diff(sorted(set(tried))) > 0)


@pytest.mark.parametrize(
    'message, needed',
    [
        (
            'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory '
            'required for HLO temporaries (50.89G) exceeds available HBM '
            '(15.75G).',
            int(50.89 * 2**30),
        ),
        (
            'RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of '
            'memory in memory space hbm. Used 15.75G of 15.75G hbm. Exceeded '
            'hbm capacity by 4.83M.',
            int(15.75 * 2**30 + 4.83 * 2**20),
        ),
        ('INTERNAL: something else', None),
    ],
)
def test_the_compilers_out_of_memory_messages(message, needed):
  assert compile_lib.needed_bytes(message) == needed


def test_imagenet_programs_take_stacked_batches_and_bucketed_views():
  # Lowered for a TPU (compiling ResNet-18 would take minutes here): the
  # training step takes a dispatch's batches as one stacked transfer, the
  # batch split over the chips; the multi-scale program takes a bucket's
  # batch of padded views and their sizes.
  from configs import imagenet_resnet18  # pylint: disable=g-import-not-at-top
  from resnet_jax import imagenet  # pylint: disable=g-import-not-at-top

  config = imagenet_resnet18.get_config()
  config.steps_per_dispatch = config.log_every_steps = 2
  config.test_scales = (224,)
  programs = compile_lib.programs(
      config, compile_lib.topology('v5e:2x2'), hosts=1
  )
  assert [p.step for p in programs] == ['train', 'eval', 'multiscale']
  train_program, _, multiscale = programs
  images, labels = train_program.args[1:]
  assert images.shape == (2, 256, 224, 224, 3) and labels.shape == (2, 256)
  assert images.sharding.spec == jax.P(None, 'data')
  assert train_program.images_per_chip == 64
  bucket = imagenet.bucket((224, 299), 64)
  views = imagenet.bucket_batch(bucket, 256, 4)
  assert [a.shape for a in multiscale.args[1:]] == [
      (views, *bucket, 3),
      (views, 2),
  ]
  for program in programs:
    program.jitted.lower(*program.args, **program.kwargs)
