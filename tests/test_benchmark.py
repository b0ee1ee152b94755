"""The benchmark measures the real steps, against the same network in PyTorch."""

import json
import os
import re
import sys

from absl import flags
import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from commands import assert_names
from commands import error_line
from commands import finish
from commands import python
from commands import refused
from commands import ROOT
from numerics import assert_close
from numerics import assert_trees_close

from resnet_jax import benchmark as benchmark_lib
from resnet_jax import models
from resnet_jax import train


def benchmark(*args, devices=2, config='configs/default.py'):
  return python(
      'resnet_jax.benchmark', f'--config={config}', *args, devices=devices
  )


def benchmark_here(*args, config='configs/default.py'):
  """``benchmark.main`` as its command line runs it, in this process: its
  flags parsed from ``args``, then removed (other commands define
  flags of the same names)."""
  before, parsed, argv = set(flags.FLAGS), flags.FLAGS.is_parsed(), sys.argv
  benchmark_lib.define_flags()
  # config_flags reads the --config.FIELD overrides from sys.argv.
  sys.argv = ['benchmark', f'--config={ROOT / config}', *args]
  try:
    return benchmark_lib.main(flags.FLAGS(sys.argv))
  finally:
    sys.argv = argv
    if not parsed:
      flags.FLAGS.unparse_flags()
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)


def printed_rows(stdout: str) -> list[dict]:
  """The rows a benchmark printed as JSON lines."""
  return [json.loads(l) for l in stdout.splitlines() if l.startswith('{')]


def json_rows(result) -> list[dict]:
  """The rows a benchmark that succeeded printed as JSON lines."""
  assert result.returncode == 0, result.stderr[-3000:]
  return printed_rows(result.stdout)


# The training step that test_benchmark_rows, the benchmark without
# TensorFlow and the accelerator benchmark's data placement time on
# configs/default.py: one program, which conftest.py's compilation cache
# compiles once for all three. K=2 steps per dispatch, so that a K left at
# its default of 1 shows.
TRAIN_ROW = (
    '--depths=8',
    '--batch_sizes=8',
    '--dtypes=float32',
    '--steps_per_dispatch=2',
)


def test_benchmark_rows():
  result = benchmark(
      *TRAIN_ROW,
      '--modes=train,eval,data',
      '--min_seconds=0',
      '--repeats=1',  # Repeated rows: the accelerator benchmark's test.
      '--torch=off',
  )
  rows = json_rows(result)
  assert [(r['mode'], r['steps_per_dispatch']) for r in rows] == [
      ('train', 2),
      ('eval', 1),
      ('data', 1),
  ]
  for row in rows:
    assert row['model'] == 'ResNet-8' and row['batch'] == 8
    assert row['devices'] == 2 and row['backend'] == 'cpu'
    assert row['images_per_s'] > 0 and row['compile_s'] > 0
    assert 0 < row['xla_memory_mb'] < row['peak_memory_mb']
  # The printed table has a line per row.
  assert len(re.findall(r'^ResNet-8 ', result.stdout, re.M)) == 3


@pytest.mark.parametrize(
    'flag, subjects',
    [
        ('--depths=21', ('depth', 21)),
        ('--dtypes=float16', ('--dtypes', 'float16')),
        ('--modes=infer', ('--modes', 'infer')),
        ('--batch_sizes=3', ('batch size', 3, 8)),  # Over 8 devices.
        ('--input_pipeline', ('--input_pipeline', '--config')),
        ('--repeats=0', ('--repeats',)),
        ('--seeds=2,0', ('--seeds',)),
        ('--placements=pmap', ('--placements', 'pmap')),
    ],
)
def test_benchmark_bad_flags(flag, subjects):
  assert_names(refused(benchmark_here, flag, '--torch=off'), *subjects)


def test_benchmark_bad_flag_is_one_error_line():
  # The command line's own report of what test_benchmark_bad_flags refuses
  # in this process.
  assert_names(
      error_line(benchmark('--batch_sizes=3', '--torch=off')),
      'batch size',
      3,
      2,  # Over 2 devices.
  )


def test_benchmark_input_pipeline_rows(monkeypatch, capsys):
  # Batches of one image per device (of the 'training loop' stage's mesh):
  # the rows, not their speed, are checked.
  monkeypatch.setattr(benchmark_lib, 'INPUT_BATCH', jax.device_count())
  benchmark_here(
      '--input_pipeline',
      '--input_images=2',
      '--input_threads=1,2',
      '--min_seconds=0',
      '--repeats=2',
      config='configs/imagenet_resnet18.py',
  )
  stdout = capsys.readouterr().out
  rows = printed_rows(stdout)
  assert [(r['stage'], r['threads']) for r in rows] == [
      (stage, threads)
      for stage in (
          'decode',
          'decode window',
          'resize-then-crop',
          'baseline',
          'augment',
          'training loop',
      )
      for threads in (1, 2)
  ]
  for row in rows:
    assert row['images_per_s'] > 0 and row['images_per_cpu_s'] > 0
    assert len(row['images_per_cpu_s_repeats']) == 2
    # JPEGs as heavy as ImageNet's (about 110 KB on average), so decoding
    # costs what it does there.
    assert 80 < row['jpeg_kb'] < 150 and row['pca_lighting'] == 0.1
  # The printed table has a line per row.
  assert (
      len(
          re.findall(
              r'^(decode|decode window|resize-then-crop|baseline|augment|'
              r'training loop) +[12] +\d',
              stdout,
              re.M,
          )
      )
      == 12
  )


def test_benchmark_multiscale_counts_one_compilation_per_bucket(capsys):
  # A fully-convolutional ResNet-8 (CIFAR form: fast) for ImageNet's 1000
  # classes, on random images of ImageNet's sizes at two small scales.
  row = benchmark_here(
      '--multiscale',
      '--multiscale_images=6',
      '--multiscale_checked=2',
      '--config.model=cifar',
      '--config.depth=8',
      '--config.test_scales=(32,48)',
      '--config.eval_batch_size=8',
      config='configs/imagenet_resnet18.py',
  )
  assert printed_rows(capsys.readouterr().out) == [row]
  assert row['images'] == 6 and row['views'] == 12
  assert 1 <= row['compilations'] <= row['buckets'] < row['view_shapes']
  # Probabilities summed over 2 scales, each the same sums as the view's
  # alone in another order: float32 rounding of values at most 1.
  assert row['checked_images'] == 2 and row['max_score_difference'] < 1e-5


def test_one_cpu_device_per_core_unless_chosen():
  probe = (
      'from resnet_jax import devices; import jax, os; '
      'devices.use_cpu_cores([128, 1000]); '
      'print(jax.device_count(), len(os.sched_getaffinity(0)))'
  )
  cpu = dict(os.environ, JAX_PLATFORMS='cpu')
  cpu.pop('XLA_FLAGS', None)
  out = finish([sys.executable, '-c', probe], environment=cpu).stdout
  devices, cores = map(int, out.split())
  assert devices == max(
      d for d in range(1, cores + 1) if 128 % d == 0 and 1000 % d == 0
  )
  cpu['XLA_FLAGS'] = '--xla_force_host_platform_device_count=3'
  out = finish([sys.executable, '-c', probe], environment=cpu).stdout
  assert out.split()[0] == '3'


def residual_bytes(model, variables, x, capsys):
  """Bytes of the activations the backward pass keeps (what remat cuts)."""

  def loss(params):
    logits, _ = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        x,
        train=True,
        mutable=['batch_stats'],
    )
    return logits.sum()

  capsys.readouterr()
  ad_checkpoint.print_saved_residuals(loss, variables['params'])
  shapes = re.findall(r'f32\[([\d,]*)\]', capsys.readouterr().out)
  return sum(
      4 * int(np.prod([int(d) for d in s.split(',') if d])) for s in shapes
  )


def test_remat_same_gradients_fewer_saved_activations(capsys):
  x = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
  plain_model = models.create_model(model='cifar', depth=20, num_classes=10)
  remat_model = models.create_model(
      model='cifar', depth=20, num_classes=10, remat=True
  )
  variables = plain_model.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(
      remat_model.init(jax.random.key(0), x, train=False)
  ) == jax.tree.structure(
      variables
  )  # Checkpoints are interchangeable.

  def grads(model):
    def loss(params):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']},
          x,
          train=True,
          mutable=['batch_stats'],
      )
      return jnp.sum(logits**2), updates

    return jax.jit(jax.grad(loss, has_aux=True))(variables['params'])

  # The same arithmetic, recomputed: equal but for fusion choices (bitwise
  # here), far below a wrong gradient's error.
  assert_trees_close(grads(remat_model), grads(plain_model), rtol=1e-5)
  kept = residual_bytes(plain_model, variables, x, capsys)
  remat_kept = residual_bytes(remat_model, variables, x, capsys)
  assert remat_kept < kept / 4


def test_pytorch_baseline_is_the_same_network():
  torch = pytest.importorskip('torch')
  from resnet_jax import torch_baseline  # pylint: disable=g-import-not-at-top

  model = models.create_model(model='cifar', depth=20, num_classes=10)
  x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  # Non-trivial BN statistics, so inference really uses them.
  variables = {
      'params': variables['params'],
      'batch_stats': jax.tree.map(
          lambda s: s + 0.1 * jax.random.uniform(jax.random.key(2), s.shape),
          variables['batch_stats'],
      ),
  }
  net = torch_baseline.CifarResNet(20).eval()
  assert sum(p.numel() for p in net.parameters()) == 269_722
  # From the scanned form (the configs' default), as the benchmark does.
  torch_baseline.load_flax_variables(net, models.stack_blocks(variables))
  with torch.no_grad():
    expected = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  # 20 convolutions by other algorithms (oneDNN's, XLA's): 4e-7 of the
  # logits' scale apart on an AVX-512 CPU; a wrong padding, stride or BN
  # term would be off by a good part of it.
  assert_close(model.apply(variables, x, train=False), expected, rtol=1e-4)


BLOCK_IMPORTS = """
import importlib.abc, runpy, sys
module, blocked = sys.argv[1], sys.argv[2].split(',')
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in blocked:
      raise ImportError(f'{name} is blocked')
sys.meta_path.insert(0, Block())
sys.argv = [module] + sys.argv[3:]
runpy.run_module(module, run_name='__main__')
"""


def run_blocked(module, blocked, *args):
  """``python -m module`` on 2 CPU devices, with ``blocked`` unimportable."""
  return finish(
      [sys.executable, '-c', BLOCK_IMPORTS, module, ','.join(blocked), *args]
  )


def test_benchmark_runs_without_tensorflow_tfds_or_clu():
  # An accelerator machine may have only jax, flax, optax, orbax and
  # ml_collections: the models, the train step and the benchmark need no more.
  result = run_blocked(
      'resnet_jax.benchmark',
      ('tensorflow', 'tensorflow_datasets', 'clu'),
      '--config=configs/default.py',
      *TRAIN_ROW,
      '--modes=train',
      '--min_seconds=0',
      '--repeats=1',
      '--torch=off',
      '--plain',
  )
  rows = json_rows(result)
  assert [r['model'] for r in rows] == ['ResNet-8', 'plain-8']
  assert all(r['scan_blocks'] for r in rows)
  assert rows[0]['residual_tax'] == pytest.approx(
      rows[1]['images_per_s'] / rows[0]['images_per_s']
  )


def test_tensorflow_is_imported_in_one_place():
  # data.import_tensorflow hides the accelerators from TensorFlow before
  # anything else can touch them; TFDS, ImageNet and the TensorBoard writer
  # go through it.
  importers = sorted(
      path.name
      for path in (ROOT / 'resnet_jax').glob('*.py')
      if re.search(r'^\s*(import|from) tensorflow', path.read_text(), re.M)
  )
  assert importers == ['data.py']


def test_accelerator_benchmark_without_tensorflow_clu_or_torch(tmp_path):
  # The prepared command of BENCHMARKS.md, at a tiny setting: every row it
  # writes, in both files, with the JAX stack alone.
  # Within the time it is given: the first group has no estimate and runs,
  # the second (K=4) is estimated from it, past 1 ms, and skipped.
  result = run_blocked(
      'resnet_jax.accelerator_benchmark',
      ('tensorflow', 'tensorflow_datasets', 'clu', 'torch'),
      f'--out={tmp_path}',
      '--depths=8',  # The data placement at K=2: TRAIN_ROW's step.
      '--batch_sizes=8',
      '--dtypes=float32',
      '--steps_per_dispatch=2,4',
      '--seeds=2',
      '--repeats=2',
      '--min_seconds=0',
      '--max_seconds=0.001',
  )
  # (1 seed: test_benchmark_rows.)
  assert result.returncode == 0, result.stderr[-3000:]
  written = json.loads((tmp_path / 'benchmark.json').read_text())
  rows = written['rows']
  (skipped,) = written['skipped']
  assert skipped.startswith(
      'ResNet-8, batch 8, float32, train, K=4, '
      'vmap/shard_map/data x 2 seeds: estimated '
  )
  assert [(r['seeds'], r['placement']) for r in rows] == [
      (2, 'vmap'),
      (2, 'shard_map'),
      (2, 'data'),
  ]
  for row in rows:
    assert row['model'] == 'ResNet-8' and row['steps_per_dispatch'] == 2
    assert len(row['images_per_s_repeats']) == 2
    assert (
        row['images_per_s_min']
        <= row['images_per_s']
        <= row['images_per_s_max']
    )
    assert row['images_per_s_per_seed'] == pytest.approx(
        row['images_per_s'] / row['seeds']
    )
    assert 'pytorch_images_per_s' not in row  # No torch: no PyTorch rows.
  # 2 seeds on 2 devices: one each.
  assert [r['devices'] for r in rows] == [1, 2, 2]
  table = (tmp_path / 'benchmark.md').read_text()
  assert re.findall(
      r'^\| ResNet-8 \| float32 \| 2 \| (\d) \| (\w+) \|', table, re.M
  ) == [('2', 'vmap'), ('2', 'shard_map'), ('2', 'data')]
  assert table.endswith(
      'Skipped to end within --max_seconds=0.001:\n\n' f'- {skipped}\n'
  )


SEEDS = 2  # shard_map: one per device, on 2 of the 8 simulated.


def side_by_side_config(per_dispatch):
  return benchmark_lib.benchmark_config(
      smoke.get_config(),
      8,
      8,
      'float32',
      remat=False,
      steps_per_dispatch=per_dispatch,
  )


@pytest.fixture(scope='module')
def steps_alone():
  """Each seed's first training dispatch alone, as ``train.setup`` makes it
  on one device: (state, metrics) by steps per dispatch and seed. Every
  placement is compared with the same."""
  alone = {}
  for per_dispatch in (1, 2):
    for i in range(SEEDS):
      config = side_by_side_config(per_dispatch)
      config.seed += i
      inputs, steps, state, _ = train.setup(config, jax.devices()[:1])
      alone[per_dispatch, i] = steps.train(state, *next(inputs.train(0)))
  return alone


@pytest.mark.parametrize('placement', ['vmap', 'shard_map'])
def test_each_seed_side_by_side_is_its_step_alone(placement, steps_alone):
  # One seed per device is that seed's own program: bitwise equal (measured).
  rtol = 1e-5 if placement == 'vmap' else 0
  for per_dispatch in (1, 2):
    config = side_by_side_config(per_dispatch)
    fn, stacked, images, labels = benchmark_lib.batched_seeds(
        config, placement, SEEDS
    )
    assert len(stacked.params['head']['bias'].sharding.device_set) == (
        1 if placement == 'vmap' else 2
    )
    together, metrics = fn(stacked, images, labels)
    for i in range(SEEDS):
      alone, alone_metrics = steps_alone[per_dispatch, i]
      seed = jax.tree.map(lambda x, i=i: x[i], together)
      # Batched, the seeds' convolutions become grouped ones: sums in another
      # order, a few float32 ulps apart (2e-6 of a leaf's scale measured
      # after one step) where a wrong batch, seed or step differs in every
      # digit. Each step's loss is a smooth function of the weights and stays
      # that close; the weights after the second step need not: a ReLU whose
      # input is within an ulp of 0 passes its whole gradient or none (1% of
      # a momentum buffer's scale measured), so they are compared after one.
      assert_trees_close(seed.rng, alone.rng, rtol=0)  # The same batches.
      assert_trees_close(metrics['loss'][i], alone_metrics['loss'], rtol)
      if per_dispatch == 1 or not rtol:
        assert_trees_close(
            *(
                (s.step, s.params, s.batch_stats, s.opt_state)
                for s in (seed, alone)
            ),
            rtol,
        )
