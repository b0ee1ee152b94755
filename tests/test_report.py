"""Sweeps, the paper's table and figures, and the Colab notebook, end to end."""

import csv
import importlib
import json
import shutil

import jax
import nbclient
import nbformat
import numpy as np
import pytest

from commands import assert_names
from commands import env
from commands import error_line
from commands import module
from commands import ok
from commands import python
from commands import records
from commands import refused
from commands import ROOT
from commands import with_code
from numerics import assert_close
from resnet_jax import cifar
from resnet_jax import evaluate
from resnet_jax import models
from resnet_jax import report
from resnet_jax import train
from resnet_jax import workdir as workdir_lib


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
  """Two seeds of the smoke config, the second interrupted and resumed."""
  root = tmp_path_factory.mktemp('sweep')
  flags = (
      'resnet_jax.sweep',
      '--configs=configs/smoke.py',
      '--seeds=0,1',
      f'--root={root}',
  )
  ok(python(*flags))
  # Interrupt seed 1 after its last checkpoint: drop its final test result.
  path = root / 'smoke' / 'seed1' / 'metrics.jsonl'
  path.write_text(
      ''.join(
          l + '\n'
          for l in path.read_text().splitlines()
          if json.loads(l)['split'] != 'final_test'
      )
  )
  out = ok(python(*flags)).stdout
  assert 'smoke/seed0: finished, skipped' in out
  assert 'smoke/seed1: training' in out
  assert records(path.parent)[-1]['split'] == 'final_test'
  return root


def test_sweep_bad_input(tmp_path):
  assert_names(
      error_line(
          python(
              'resnet_jax.sweep',
              '--configs=configs/nope.py',
              f'--root={tmp_path}',
          )
      ),
      'configs/nope.py',
  )
  assert (
      'nonsense'
      in python(
          'resnet_jax.sweep',
          '--configs=configs/smoke.py',
          f'--root={tmp_path}',
          '--set=nonsense=1',
      ).stderr
  )


def fake_run(workdir, config_name, errors_by_split):
  """A finished run's config.json and metrics.jsonl, without training."""
  config = importlib.import_module(f'configs.{config_name}').get_config()
  workdir.mkdir(parents=True)
  (workdir / 'config.json').write_text(config.to_json())
  (workdir / 'metrics.jsonl').write_text(
      ''.join(
          json.dumps({'step': step, 'split': split, 'error': error}) + '\n'
          for split, step, error in errors_by_split
      )
  )


def test_table_best_mean_std_beside_the_paper(tmp_path):
  for seed, error in enumerate((9.0, 8.0, 10.0)):
    fake_run(
        tmp_path / 'runs' / 'resnet20' / f'seed{seed}',
        'resnet20',
        [('validation', 64000, 1.0), ('final_test', 64000, error)],
    )
  fake_run(
      tmp_path / 'runs' / 'plain20' / 'seed0',
      'plain20',
      [('final_test', 64000, 12.5)],
  )
  markdown = report.table(tmp_path / 'runs', 'final', tmp_path / 'out')
  assert (
      '| ResNet-20 | 20 | 0.27M | 8.00 (9.00 ± 1.00) | 3 | 64000 | 8.75 |'
      in markdown
  )
  assert (
      '| plain-20 | 20 | 0.27M | 12.50 (12.50 ± 0.00) | 1 | 64000 | - |'
      in markdown
  )
  assert 'final step' in markdown
  rows = {r['config']: r for r in read_csv(tmp_path / 'out' / 'table.csv')}
  assert rows['resnet20']['params'] == '269722'
  assert rows['resnet20']['errors'] == '9.0000;8.0000;10.0000'
  assert (tmp_path / 'out' / 'table.md').read_text() == markdown
  # An unfinished run is an error, not a silently smaller sample.
  fake_run(
      tmp_path / 'runs' / 'resnet56' / 'seed0',
      'resnet56',
      [('validation', 2000, 30.0)],
  )
  assert_names(
      refused(report.table, tmp_path / 'runs', 'final', tmp_path / 'out'),
      tmp_path / 'runs' / 'resnet56' / 'seed0',
  )


def test_table_by_validation_uses_the_best_validation_checkpoint(
    sweep, tmp_path
):
  out = ok(
      python(
          'resnet_jax.report',
          'table',
          f'--root={sweep}',
          '--selection=validation',
          f'--out={tmp_path}',
      )
  ).stdout
  assert 'lowest validation error' in out
  row = read_csv(tmp_path / 'table.csv')[0]
  steps = []
  for seed in (0, 1):
    validation = [
        r
        for r in records(sweep / 'smoke' / f'seed{seed}')
        if r['split'] == 'validation'
    ]
    steps.append(min(validation, key=lambda r: (r['error'], r['step']))['step'])
  assert row['steps'] == ';'.join(map(str, sorted(set(steps))))
  assert row['selection'] == 'validation'


def test_validation_ties_pick_the_checkpoint_orbax_keeps(sweep, tmp_path):
  # Orbax's best-by-validation policy keeps the latest of tied checkpoints;
  # an earlier tied one may be deleted.
  run = tmp_path / 'smoke' / 'seed0'
  shutil.copytree(sweep / 'smoke' / 'seed0', run)
  lines = [
      json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()
  ]
  for r in lines:
    if r['split'] == 'validation':
      r['error'] = 5.0
  (run / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in lines)
  )
  shutil.rmtree(run / 'checkpoints' / '10')
  assert report.test_error(run, 'validation')[1] == 20


def test_figures_write_their_numbers(sweep, tmp_path):
  run = sweep / 'smoke' / 'seed0'
  # One through the command line (which says what it wrote), the rest as
  # its report.run calls them.
  assert f'wrote {tmp_path / "fig6"}.png, .pdf and .csv' in (
      ok(
          python(
              'resnet_jax.report',
              'fig6',
              f'--workdirs={run}',
              f'--out={tmp_path}',
          )
      ).stdout
  )
  report.fig7([str(run)], tmp_path)
  report.curve(str(run), tmp_path)
  report.filters(str(run), 5, tmp_path)
  report.deconv(str(run), 5, 9, 'map', tmp_path)
  for command in ('fig6', 'fig7', 'curve', 'filters', 'deconv'):
    for suffix in ('png', 'pdf', 'csv'):
      assert (tmp_path / f'{command}.{suffix}').stat().st_size > 0
  fig6 = read_csv(tmp_path / 'fig6.csv')
  logged = [
      (r['split'], r['step'])
      for r in records(run)
      if r['split'] in ('train', 'validation')
  ]
  assert sorted((r['split'], int(r['step'])) for r in fig6) == sorted(logged)
  fig7 = read_csv(tmp_path / 'fig7.csv')
  assert len(fig7) == 7  # ResNet-8: the stem and two 3x3 convs per block.
  assert all(float(r['std']) > 0 for r in fig7)
  assert sorted(int(r['sorted_rank']) for r in fig7) == list(range(1, 8))
  filters = read_csv(tmp_path / 'filters.csv')
  assert len(filters) == 16 * 27 + 16 * 32 * 32 + 64 * 8 * 8
  deconv = read_csv(tmp_path / 'deconv.csv')
  assert sum(r['kind'] == 'input' for r in deconv) == 32 * 32 * 3
  chosen = {}
  for layer in ('conv1', 'stage3'):
    rows = [r for r in deconv if r['layer'] == layer]
    assert len(rows) == 9 * 32 * 32 * 3
    # One channel per rank, strongest first.
    chosen[layer] = sorted(
        {
            (int(r['rank']), int(r['channel']), float(r['activation']))
            for r in rows
        }
    )
    assert [rank for rank, _, _ in chosen[layer]] == list(range(9))
    activations = [a for _, _, a in chosen[layer]]
    assert activations == sorted(activations, reverse=True)
  # The strongest of the last stage's maps that filters drew.
  maxima = {}
  for r in filters:
    if r['layer'] == 'stage3_block1':
      channel = int(r['channel'])
      maxima[channel] = max(
          float(r['value']), maxima.get(channel, float('-inf'))
      )
  assert [c for _, c, _ in chosen['stage3']] == sorted(
      maxima, key=maxima.get, reverse=True
  )[:9]


def copy_run(source, workdir, **changes):
  """A copy of a run, its config.json changed."""
  shutil.copytree(source, workdir)
  config = json.loads((workdir / 'config.json').read_text())
  (workdir / 'config.json').write_text(json.dumps(config | changes))
  return workdir


def softmax_by_hand(workdir, step):
  """A run's test-set softmax and labels, its network applied here."""
  config = workdir_lib.saved_config(workdir)
  state = workdir_lib.load(
      workdir,
      workdir_lib.abstract(
          train.state_shapes(config),
          jax.sharding.SingleDeviceSharding(jax.local_devices()[0]),
      ),
      step,
  )
  test = cifar.load(config).test
  x = (test.images.astype(np.float32) / 255 - state.mean) / state.std
  logits = models.from_config(config, 10).apply(
      {'params': state.params, 'batch_stats': state.batch_stats}, x, train=False
  )
  return np.asarray(jax.nn.softmax(logits)), test.labels


def test_ensemble_averages_the_members_softmax(sweep, tmp_path):
  # Step 10 (each run's config.eval_checkpoint_step): errors of ~50%, where
  # the ensemble differs from its members.
  runs = [
      copy_run(
          sweep / 'smoke' / f'seed{seed}',
          tmp_path / f'seed{seed}',
          eval_checkpoint_step=10,
      )
      for seed in (0, 1)
  ]
  out = ok(
      python(
          'resnet_jax.report',
          'ensemble',
          f'--workdirs={runs[0]},{runs[1]}',
          f'--out={tmp_path}',
      )
  ).stdout
  rows = read_csv(tmp_path / 'ensemble.csv')
  assert (tmp_path / 'ensemble.md').read_text() == out
  assert [r['model'] for r in rows] == ['ResNet-8', 'ResNet-8', 'ensemble of 2']
  members = [softmax_by_hand(run, 10) for run in runs]
  labels = members[0][1]
  step, probs, own_labels = evaluate.test_probabilities(
      workdir_lib.saved_config(runs[0]), runs[0]
  )
  assert step == 10 and np.array_equal(own_labels, labels)
  # The same float32 network on 2 devices or 1, in batches or not.
  assert_close(probs, members[0][0], 1e-4)
  average = (members[0][0] + members[1][0]) / 2
  for row, probs in zip(rows, [p for p, _ in members] + [average]):
    top5 = np.argsort(-probs, axis=1)[:, :5]
    assert float(row['error']) == pytest.approx(
        100 * np.mean(top5[:, 0] != labels), abs=1e-4
    )
    assert float(row['top5_error']) == pytest.approx(
        100 * np.mean(np.all(top5 != labels[:, None], 1)), abs=1e-4
    )
    assert row['images'] == str(len(labels))
  assert [r['step'] for r in rows] == ['10', '10', '']
  assert [r['views'] for r in rows] == ['whole image', 'whole image', '']
  # The test can tell the ensemble from its members.
  assert rows[2]['error'] not in (rows[0]['error'], rows[1]['error'])


def test_ensemble_bad_input(sweep, tmp_path):
  run = sweep / 'smoke' / 'seed0'
  out = tmp_path / 'out'
  other = copy_run(run, tmp_path / 'cifar100', dataset='cifar100')
  assert_names(
      refused(report.ensemble, [str(run), str(other)], out),
      other,
      'cifar100',
  )
  fewer = copy_run(run, tmp_path / 'fewer', synthetic_train_size=128)
  assert_names(
      refused(report.ensemble, [str(run), str(fewer)], out), fewer, 32, 64
  )
  assert_names(
      refused(report.ensemble, [str(run), str(tmp_path)], out), tmp_path
  )
  (tmp_path / 'again').symlink_to(run)
  assert_names(
      refused(report.ensemble, [str(run), str(tmp_path / 'again')], out),
      run,
      tmp_path / 'again',
  )
  assert_names(
      refused(report.ensemble, [str(run)], out, [32, 48]), 'test_scales'
  )
  assert not out.exists()


def test_report_outputs_are_whole_or_absent_on_a_full_disk(sweep, tmp_path):
  run = sweep / 'smoke' / 'seed0'
  out = tmp_path / 'out'
  # A late-allocating filesystem: the data are buffered, the flush fails.
  full = """
import errno, os
def fsync(fd):
  raise OSError(errno.ENOSPC, 'No space left on device')
os.fsync = fsync
"""
  for command, flag, name in (
      ('curve', f'--workdirs={run}', 'curve.csv'),
      ('table', f'--root={sweep}', 'table.md'),
  ):
    message = error_line(
        with_code(
            full, module('resnet_jax.report', command, flag, f'--out={out}')
        )
    )
    assert_names(message, out / name)
    assert list(out.iterdir()) == []  # Not a part of a file, nor a temporary.


def test_report_bad_input(tmp_path):
  assert_names(refused(report.fig6, [str(tmp_path)], tmp_path), tmp_path)
  assert_names(refused(report.table, tmp_path, 'final', tmp_path), tmp_path)
  # The command line's own check: one error line, exit status 2.
  assert_names(
      error_line(python('resnet_jax.report', 'fig8')), *report.COMMANDS
  )


def test_deconv_bad_input(sweep, tmp_path):
  run = sweep / 'smoke' / 'seed0'
  assert_names(
      refused(report.deconv, str(run), 64, 9, 'map', tmp_path), '--image', 64
  )
  assert_names(
      refused(report.deconv, str(run), 5, 17, 'map', tmp_path),
      '--channels',
      16,
  )
  # A flag's value the parser refuses: one error line, exit status 2.
  assert '--keep' in error_line(
      python(
          'resnet_jax.report',
          'deconv',
          f'--workdirs={run}',
          f'--out={tmp_path}',
          '--keep=all',
      )
  )
  assert not any(tmp_path.iterdir())


def test_colab_notebook_runs_top_to_bottom(tmp_path):
  notebook = nbformat.read(ROOT / 'colab' / 'resnet_jax.ipynb', as_version=4)
  parameters = next(
      c for c in notebook.cells if 'parameters' in c.metadata.get('tags', [])
  )
  # Four steps: each run still evaluates, checkpoints and logs every step
  # (the quick schedule's smallest interval) and drops its rate twice.
  parameters.source += (  # As papermill would inject them.
      f"\nCONFIG = 'smoke'\nQUICK_STEPS = 4\nDATA_SOURCE = 'synthetic'"
      f"\nWORKDIR = '{tmp_path}/workdirs'\nREPORT = '{tmp_path}/report'"
  )
  # The kernel is a process as the command lines are: on 2 CPU devices.
  nbclient.NotebookClient(
      notebook,
      timeout=600,
      kernel_name='python3',
      resources={'metadata': {'path': str(ROOT)}},
  ).execute(env=env())
  text = '\n'.join(
      o.get('text', '')
      for c in notebook.cells
      if c.cell_type == 'code'
      for o in c.outputs
  )
  assert 'ResNet-8: final test error' in text
  assert 'plain-8 checkpoint at step 4' in text
  images = [
      o
      for c in notebook.cells
      if c.cell_type == 'code'
      for o in c.outputs
      if 'image/png' in o.get('data', {})
  ]
  assert len(images) == 2  # Fig. 6 and Fig. 7, shown inline.
  for name in ('fig6', 'fig7'):
    assert (tmp_path / 'report' / f'{name}.png').exists()
