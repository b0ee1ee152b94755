"""The main job end to end: resume after SIGKILL, eval elsewhere, bad input.

Where the process is the point (a kill, a lock, another device count, two
processes, the command line's exit status) a run is a real ``python -m
resnet_jax.main`` process on the CPU; the rest train and evaluate in this
process, on its 8 devices, and a user's mistake is the UserError that the
command line prints as its one ``error:`` line.
"""

import json
import shutil
import signal
import subprocess
import time
import types

from flax import linen as nn
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from commands import assert_names
from commands import command
from commands import config_flags
from commands import distributed
from commands import error_line
from commands import free_port
from commands import ok
from commands import params
from commands import printed
from commands import python
from commands import records
from commands import refused
from commands import run
from commands import saved
from commands import smoke_config
from commands import start
from resnet_jax import evaluate
from resnet_jax import models
from resnet_jax import train


def train_in_process(
    workdir, start_over=False, allow_config_changes=False, **fields
):
  """``--mode=train`` in this process: the final test metrics."""
  return train.train_and_evaluate(
      smoke_config(**fields), str(workdir), start_over, allow_config_changes
  )


def evaluate_in_process(workdir, **fields):
  """``--mode=eval`` in this process (on a run of the smoke config's data)."""
  return evaluate.evaluate_checkpoint(smoke_config(**fields), str(workdir))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A smoke run on 8 devices; tests copy it before changing it."""
  workdir = tmp_path_factory.mktemp('runs') / 'smoke'
  train_in_process(workdir)
  return workdir


def kill_after_checkpoint(workdir, step, *flags):
  """Starts a run and kills it (SIGKILL) once checkpoint ``step`` exists."""
  process = start(command(workdir, *flags))
  deadline = time.time() + 300
  while not (workdir / 'checkpoints' / str(step)).exists():
    assert process.poll() is None and time.time() < deadline
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL


def test_resumed_after_sigkill_equals_uninterrupted(tmp_path):
  # ResNet-14 has two blocks per stage, so blocks 2..n run scanned and their
  # stacked parameters, statistics and momenta go through the checkpoints.
  # Under §3.4's "divided by 10 when the error plateaus", decided on the
  # validation error every 2 steps with patience 1, the checkpoint also
  # holds the schedule's decisions and the optimiser's step count (which a
  # piecewise schedule reads alone).
  flags = (
      '--config.depth=14',
      '--config.lr_schedule=plateau',
      '--config.lr_patience=1',
      '--config.train_length=20',
      '--config.eval_every_steps=2',
      '--config.log_every_steps=2',
      '--config.checkpoint_every_steps=10',
  )
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  ok(run(straight, *flags))
  rates = [(r['step'], r['learning_rate']) for r in records(straight, 'train')]
  # The rate dropped before the first checkpoint, so that checkpoint holds
  # decisions: a resume that forgot them would go on at another rate.
  assert any(rate < 0.1 for step, rate in rates if step <= 10), rates
  kill_after_checkpoint(killed, 10, *flags)
  assert not (killed / 'checkpoints' / '20').exists()  # Killed mid-run.
  assert (
      'Resuming from checkpoint at step 10.' in ok(run(killed, *flags)).stdout
  )
  # The metrics file reads as one run: each step once, at the same rates.
  assert [
      (r['step'], r['learning_rate']) for r in records(killed, 'train')
  ] == rates
  assert [step for step, _ in rates] == list(range(2, 21, 2))
  a, b = params(straight, 20), params(killed, 20)
  assert 'stage1_blocks' in a  # Scanned.
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_a_run_keeps_its_learning_rate_schedule(trained, tmp_path):
  workdir = tmp_path / 'schedule'
  shutil.copytree(trained, workdir)
  message = refused(
      train_in_process,
      workdir,
      allow_config_changes=True,
      lr_schedule='plateau',
  )
  assert_names(message, workdir, 'lr_schedule', 'piecewise', 'plateau')


def assert_one_record_per_step_and_split(workdir):
  keys = [
      (r['step'], r['split'])
      for r in map(
          json.loads, (workdir / 'metrics.jsonl').read_text().splitlines()
      )
  ]
  assert len(keys) == len(set(keys)), keys
  assert [k[0] for k in keys] == sorted(k[0] for k in keys), keys
  assert [k[1] for k in keys].count('final_test') == 1


def test_metrics_exact_after_a_kill_before_the_first_checkpoint(tmp_path):
  fields = dict(
      train_length=60,
      log_every_steps=1,
      eval_every_steps=30,
      checkpoint_every_steps=60,
  )
  process = start(command(tmp_path, *config_flags(**fields)))
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.time() + 300
  while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
    assert process.poll() is None and time.time() < deadline
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL
  assert not (tmp_path / 'checkpoints' / '60').exists()
  train_in_process(tmp_path, **fields)
  assert_one_record_per_step_and_split(tmp_path)
  assert [r['step'] for r in records(tmp_path, 'train')] == list(range(1, 61))


def test_a_finished_run_is_not_run_again(trained, tmp_path, capsys):
  workdir = tmp_path / 'finished'
  shutil.copytree(trained, workdir)
  before = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  result = train_in_process(workdir)
  assert 'holds a finished run (step 20); nothing to do' in (
      capsys.readouterr().out
  )
  (final,) = records(trained, 'final_test')
  assert result == {
      k: v for k, v in final.items() if k not in ('step', 'split')
  }
  assert result['images'] == 64
  assert {
      p: p.read_bytes()
      for p in workdir.rglob('*')
      if p.is_file() and p.name != 'run.lock'
  } == {p: b for p, b in before.items() if p.name != 'run.lock'}


def test_lost_checkpoints_are_refused_unless_starting_over(trained, tmp_path):
  workdir = tmp_path / 'lost'
  shutil.copytree(trained, workdir)
  shutil.rmtree(workdir / 'checkpoints')
  old_metrics = (workdir / 'metrics.jsonl').read_text()
  message = refused(train_in_process, workdir)
  assert_names(message, workdir, 20, '--start_over')
  assert (workdir / 'metrics.jsonl').read_text() == old_metrics
  train_in_process(workdir, start_over=True)
  (aside,) = workdir.glob('metrics.replaced-*.jsonl')
  assert aside.read_text() == old_metrics
  assert_one_record_per_step_and_split(workdir)


def test_resuming_with_other_settings_needs_a_flag(trained, tmp_path):
  workdir = tmp_path / 'changed'
  shutil.copytree(trained, workdir)
  saved = (workdir / 'config.json').read_text()
  fields = dict(batch_size=64, train_length=30)
  message = refused(train_in_process, workdir, **fields)
  assert_names(message, 'batch_size', 32, 64, '--allow_config_changes')
  assert (workdir / 'config.json').read_text() == saved
  assert not (workdir / 'checkpoints' / '30').exists()
  train_in_process(workdir, allow_config_changes=True, **fields)
  assert json.loads((workdir / 'config.json').read_text())['batch_size'] == 64
  (change,) = map(
      json.loads, (workdir / 'config_changes.jsonl').read_text().splitlines()
  )
  assert change['changes'] == {'batch_size': [32, 64]}
  assert (workdir / 'checkpoints' / '30').is_dir()


def test_workdir_contents_and_checkpoint_policy(trained):
  names = {p.name for p in trained.iterdir()}
  assert {'config.json', 'metrics.jsonl', 'checkpoints'} <= names
  assert any(n.startswith('events.out.tfevents') for n in names)
  assert sorted(int(p.name) for p in (trained / 'checkpoints').iterdir()) == [
      10,
      20,
  ]
  (final,) = records(trained, 'final_test')
  assert final['images'] == 64 and 0 <= final['error'] <= 100


def test_eval_restores_on_another_device_count(trained):
  result = ok(run(trained, mode='eval', devices=1))
  (final,) = records(trained, 'final_test')
  assert (
      f'at step 20: test error {final["error"]:.2f}% (top-1)' in result.stdout
  )
  # Nothing about orbax opening the checkpoints read-only: eval never writes.
  assert 'read only' not in result.stderr, result.stderr
  # Which checkpoint is no matter of the device count.
  assert evaluate_in_process(trained, eval_checkpoint_step=10)['step'] == 10


def test_eval_uses_the_runs_own_data_settings(tmp_path):
  # The run's config.json read back by the command line (main.py).
  train_in_process(tmp_path, synthetic_train_size=512, train_length=5)
  (final,) = records(tmp_path, 'final_test')
  assert final['images'] == 128  # Not smoke's 64: the run's own test set.
  result = ok(run(tmp_path, mode='eval'))  # Without the data flag.
  assert f'test error {final["error"]:.2f}% (top-1)' in result.stdout
  assert 'on 128 images' in result.stdout
  # A flag given to eval still wins.
  result = ok(run(tmp_path, '--config.synthetic_train_size=256', mode='eval'))
  assert 'on 64 images' in result.stdout


def test_eval_errors(trained, tmp_path):
  empty = tmp_path / 'empty'
  assert_names(refused(evaluate_in_process, empty), empty)
  assert_names(refused(evaluate_in_process, trained, depth=14), 'depth', 8, 14)
  assert_names(
      refused(evaluate_in_process, trained, eval_checkpoint_step=15),
      trained,
      15,
  )
  broken = tmp_path / 'broken'
  shutil.copytree(trained, broken)
  for f in (broken / 'checkpoints' / '20').rglob('*'):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(f.read_bytes()[:100])
  assert_names(refused(evaluate_in_process, broken), 'checkpoint 20', broken)


def flip_bytes(workdir, step):
  """Silent corruption: one bit of a weight changes on disk, in arrays that
  still parse (written again by orbax), beside the checksums of the old."""
  path = workdir.absolute() / 'checkpoints' / str(step) / 'default'
  state = saved(workdir, step)
  checkpointer = ocp.StandardCheckpointer()
  bias = np.array(state['params']['head']['bias'])
  bias.view(np.uint32)[0] ^= 1
  state['params']['head']['bias'] = bias
  shutil.rmtree(path)
  checkpointer.save(path, state)
  checkpointer.wait_until_finished()


def test_training_falls_back_from_a_corrupt_checkpoint(
    trained, tmp_path, capsys
):
  workdir = tmp_path / 'corrupt'
  shutil.copytree(trained, workdir)
  flip_bytes(workdir, 20)
  earlier = workdir / 'corrupt_checkpoints' / '20' / 'moved before'
  earlier.parent.mkdir(parents=True)
  earlier.write_text('kept')
  # The arrays still parse: only the checksum saved with them tells.
  message = refused(evaluate_in_process, workdir)
  assert_names(message, 'checkpoint 20', workdir, 'params')
  with pytest.warns(UserWarning) as warned:
    out = printed(capsys, train_in_process, workdir, train_length=30)
  warnings = [str(w.message) for w in warned]
  assert any('checkpoint 20' in w and 'params' in w for w in warnings)
  assert 'Resuming from checkpoint at step 10' in out
  # Kept, aside, beside (not inside) the one moved there before.
  aside = workdir / 'corrupt_checkpoints' / '20.1'
  assert any(f'(moved to {aside})' in w for w in warnings), warnings
  assert (aside / '_CHECKPOINT_METADATA').is_file()
  assert [p.name for p in earlier.parent.iterdir()] == ['moved before']
  assert (workdir / 'checkpoints' / '30').is_dir()


# A researcher's edits to the code, made after a run was trained: the
# optimiser clips the gradient first (its state gains a level), or a Dense
# layer comes before the classifier (the network gains parameters).
def clip_first(monkeypatch):
  create = train.create_optimizer
  monkeypatch.setattr(
      train,
      'create_optimizer',
      lambda config, schedule: optax.chain(
          optax.clip_by_global_norm(1.0), create(config, schedule)
      ),
  )


def dense_before_head(monkeypatch):
  def Dense(features, name=None, **kwargs):
    if name != 'head':
      return nn.Dense(features, name=name, **kwargs)
    return lambda x: nn.Dense(features, name=name, **kwargs)(
        nn.Dense(x.shape[-1], name='before_head')(x)
    )

  monkeypatch.setattr(
      models, 'nn', types.SimpleNamespace(**{**vars(nn), 'Dense': Dense})
  )


EDITS = {'optimiser': clip_first, 'layer': dense_before_head}


def contents(workdir):
  """Every file of a workdir but its lock (which each run rewrites)."""
  return {
      p.relative_to(workdir): p.read_bytes()
      for p in workdir.rglob('*')
      if p.is_file() and p.name != 'run.lock'
  }


@pytest.mark.parametrize('edit', EDITS)
def test_a_checkpoint_of_other_code_is_refused_and_kept(
    edit, trained, tmp_path, monkeypatch, capsys
):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  before = contents(workdir)
  with monkeypatch.context() as edited_code:
    EDITS[edit](edited_code)
    message = refused(train_in_process, workdir, train_length=30)
    assert_names(message, 'checkpoint 20', workdir)
    assert {'optimiser': 'opt_state/', 'layer': 'params/before_head'}[
        edit
    ] in message
    # Its weights start a new run, unless the network differs too.
    assert ('--config.init_from' in message) == (edit == 'optimiser')
    assert contents(workdir) == before  # Nothing moved, renamed or written.
    if edit == 'layer':
      assert 'params/before_head' in refused(evaluate_in_process, workdir)
      return
    evaluated = evaluate_in_process(workdir)
  # Evaluation reads the weights alone: the optimiser's form is no matter.
  assert evaluated == evaluate_in_process(workdir)
  assert 'Resuming from checkpoint at step 20.' in printed(
      capsys, train_in_process, workdir, train_length=30
  )


def test_divergence_stops_with_the_last_good_checkpoint(tmp_path):
  message = refused(train_in_process, tmp_path, learning_rate=1e30)
  assert_names(message, 'loss', 'nan', 'step 5')
  # It diverged before the first checkpoint (step 10): none to speak of.
  assert 'step 10' not in message, message
  assert not (tmp_path / 'checkpoints').exists() or not list(
      (tmp_path / 'checkpoints').iterdir()
  )


def test_bad_training_settings_write_nothing(tmp_path):
  for field in ('batch_size', 'log_every_steps'):
    message = refused(train_in_process, tmp_path / 'run', **{field: 0})
    assert_names(message, field, 0)
    assert not (tmp_path / 'run').exists()


def test_bad_workdir_input(trained, tmp_path):
  # The command line's own check: one error line, exit status 2.
  assert_names(
      error_line(
          python('resnet_jax.main', '--config=configs/smoke.py', devices=1)
      ),
      '--workdir',
  )
  assert_names(refused(train_in_process, trained, depth=14), 'depth', 8, 14)
  config = (trained / 'config.json').read_text()
  assert json.loads(config)['depth'] == 8  # Not overwritten.
  assert_names(
      refused(train_in_process, tmp_path, batch_size=36), 'batch_size', 36, 8
  )


def test_workdir_that_cannot_be_written(tmp_path):
  a_file = tmp_path / 'notes.txt'
  a_file.write_text('keep me')
  for workdir in (a_file, a_file / 'run'):
    assert_names(refused(train_in_process, workdir), a_file)
  assert a_file.read_text() == 'keep me'
  # Not writable, as on a read-only filesystem (access(2) says so for both).
  assert_names(refused(train_in_process, '/proc/1/run'), '/proc/1')


def test_one_run_per_workdir_and_a_killed_run_does_not_block(tmp_path):
  # The lock is another process's; the runs it blocks, or not, run here.
  first = start(command(tmp_path, '--config.train_length=100000'))
  try:
    deadline = time.time() + 120
    while not (tmp_path / 'config.json').exists():
      assert first.poll() is None and time.time() < deadline
      time.sleep(0.2)
    message = refused(train_in_process, tmp_path)
    assert_names(message, tmp_path, f'pid {first.pid}')
  finally:
    first.kill()  # SIGKILL: the lock goes with the process.
    first.wait()
  assert (
      json.loads((tmp_path / 'config.json').read_text())['train_length']
      == 100000
  )  # The second run wrote nothing.
  assert train_in_process(tmp_path)['images'] == 64  # Not blocked.


def test_two_processes_train_like_one(tmp_path):
  """Two JAX processes (one CPU device each) agree with a 2-device run."""
  port = free_port()
  processes = [
      start(
          command(tmp_path / 'multi', *distributed(port, i)),
          devices=1,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
      )
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (out, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  finals = [out.strip().splitlines()[-1] for out, _ in outputs]
  assert finals[0] == finals[1] and 'final test error' in finals[0]
  single = tmp_path / 'single'
  ok(run(single, devices=2))
  # The cross-process all-reduce (gloo) adds in another order than the
  # in-process one: last-bit differences, carried through 20 steps. Measured
  # against what the last 10 steps changed, as in the 8-device step test.
  changes = jax.tree.map(np.subtract, params(single, 20), params(single, 10))
  for x, y, c in zip(
      jax.tree.leaves(params(tmp_path / 'multi', 20)),
      jax.tree.leaves(params(single, 20)),
      jax.tree.leaves(changes),
  ):
    assert np.abs(x - y).max() <= 1e-3 * np.abs(c).max()


def test_a_run_that_cannot_start_leaves_no_trace(tmp_path):
  missing = tmp_path / 'missing.tar.gz'
  message = refused(
      train_in_process,
      tmp_path / 'run',
      data_source='archive',
      data_dir=str(missing),
  )
  assert_names(message, missing)
  assert not (tmp_path / 'run').exists()
