"""SIGTERM, SIGINT and SIGHUP: a run saves the step it reached, stops, and
resumes exactly. A signal from outside at any moment goes to real
``python -m resnet_jax.main`` (and sweep) processes; one at a known moment
(a step's record) is sent by the run's own process, here the test's."""

import fcntl
import os
import re
import signal
import subprocess
import time
import types

import jax
import numpy as np
import pytest

from resnet_jax import metrics
from resnet_jax import train
from resnet_jax import workdir as workdir_lib
from commands import assert_names
from commands import command
from commands import config_flags
from commands import distributed
from commands import free_port
from commands import module
from commands import params
from commands import printed
from commands import records
from commands import smoke_config
from commands import start

# Checkpoints only far past where the signal comes: what is saved at the
# stop is the stop's own.
FIELDS = {
    'log_every_steps': 5,
    'eval_every_steps': 20,
    'checkpoint_every_steps': 1000,
}
FLAGS = config_flags(**FIELDS)


def wait_for_training(process, workdir):
  """Until the run has logged its first training steps."""
  deadline = time.time() + 300
  while not (
      (workdir / 'metrics.jsonl').exists() and records(workdir, 'train')
  ):
    assert process.poll() is None and time.time() < deadline
    time.sleep(0.05)


def stop_line(path):
  err = path.read_text()
  lines = [l for l in err.splitlines() if l.startswith('stopped: ')]
  assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
  return lines[0]


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_and_the_run_resumes_exactly(
    signum, tmp_path, capsys
):
  stopped = tmp_path / 'stopped'
  with open(tmp_path / 'stderr', 'w') as stderr:
    # On this process's devices: the run resumes here, to compare bitwise.
    process = start(
        command(stopped, *FLAGS, '--config.train_length=100000'),
        devices=jax.device_count(),
        stderr=stderr,
    )
    wait_for_training(process, stopped)
    process.send_signal(signum)
    assert process.wait(timeout=300) == 128 + signum
  line = stop_line(tmp_path / 'stderr')
  assert_names(line, signal.Signals(signum).name)
  step = int(re.search(r'step (\d+)', line).group(1))
  assert workdir_lib.checkpoint_steps(stopped) == {step}
  # No record for a part of a logging interval.
  assert records(stopped, 'train')[-1]['step'] == step - step % 5

  config = smoke_config(**FIELDS, train_length=step + 5)
  assert f'Resuming from checkpoint at step {step}.' in printed(
      capsys, train.train_and_evaluate, config, str(stopped)
  )
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  for x, y in zip(
      jax.tree.leaves(params(tmp_path / 'straight', step + 5)),
      jax.tree.leaves(params(stopped, step + 5)),
  ):
    np.testing.assert_array_equal(x, y)
  # Every step's training metrics are in one record: none lost, none twice.
  steps = [r['step'] for r in records(stopped, 'train')]
  assert steps == sorted(set(steps))
  assert set(steps) == set(range(5, step + 6, 5)) | {step + 5}


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """An uninterrupted smoke run, in this process as the stopped ones."""
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  train.train_and_evaluate(smoke_config(), str(workdir))
  return workdir


def stopped_run(monkeypatch, workdir, step, split, signum):
  """The smoke run in ``workdir``, sent ``signum`` by its own process as it
  writes ``step``'s ``split`` record (a signal at a known moment, which the
  run's handler receives): what it says as it stops."""
  append = metrics.append

  def append_then_signal(workdir, at, kind, values):
    append(workdir, at, kind, values)
    if (at, kind) == (step, split):
      os.kill(os.getpid(), signum)

  with monkeypatch.context() as signalled:
    signalled.setattr(metrics, 'append', append_then_signal)
    with pytest.raises(train.Stopped) as stopped:
      train.train_and_evaluate(smoke_config(), str(workdir))
  assert stopped.value.signum == signum
  return str(stopped.value)


def without_speed(workdir):
  return [
      {k: v for k, v in r.items() if k != 'steps_per_second'}
      for r in records(workdir)
  ]


def test_a_hangup_inside_a_logging_interval_keeps_its_record_whole(
    straight, tmp_path, monkeypatch, capsys
):
  # A closed terminal just after step 5's record: the run stops at step 6,
  # inside the interval that step 10's record averages.
  stopped = tmp_path / 'stopped'
  assert stopped_run(monkeypatch, stopped, 5, 'train', signal.SIGHUP) == (
      'SIGHUP at step 6, its checkpoint saved; the same command resumes the '
      'run'
  )
  assert workdir_lib.checkpoint_steps(stopped) == {6}
  assert [r['step'] for r in records(stopped, 'train')] == [5]
  assert 'Resuming from checkpoint at step 6.' in printed(
      capsys, train.train_and_evaluate, smoke_config(), str(stopped)
  )
  # Every record, step 10's training one included, is the uninterrupted
  # run's (the same float32 losses, averaged in the same order).
  assert without_speed(stopped) == without_speed(straight)
  for x, y in zip(
      jax.tree.leaves(params(straight, 20)),
      jax.tree.leaves(params(stopped, 20)),
  ):
    np.testing.assert_array_equal(x, y)


def test_a_signal_after_the_last_step_saves_and_leaves_the_final_test(
    straight, tmp_path, monkeypatch, capsys
):
  # SIGTERM as the last step's validation is written: its checkpoint is
  # saved, then the run stops before its final test.
  stopped = tmp_path / 'stopped'
  assert stopped_run(
      monkeypatch, stopped, 20, 'validation', signal.SIGTERM
  ) == (
      'SIGTERM at step 20, its checkpoint saved; the same command runs the '
      'final test'
  )
  assert workdir_lib.checkpoint_steps(stopped) == {10, 20}
  assert 'final_test' not in {r['split'] for r in records(stopped)}
  assert 'Resuming from checkpoint at step 20.' in printed(
      capsys, train.train_and_evaluate, smoke_config(), str(stopped)
  )
  assert without_speed(stopped) == without_speed(straight)


def test_a_signal_ends_the_final_test_at_once():
  # An ImageNet test outlasts a preemption's grace period: it stops before
  # its next batch (here, with no steps to test it on, its first).
  with pytest.raises(train.Stopped) as stopped:
    train.evaluate(
        None,
        types.SimpleNamespace(step=20),
        iter([('images', 'labels', 'mask')]),
        lambda: signal.SIGHUP,
    )
  assert_names(str(stopped.value), 'SIGHUP', 'step 20', 'final test')


def test_a_signal_to_one_host_stops_every_host_at_the_same_step(tmp_path):
  port = free_port()
  workdir = tmp_path / 'run'
  logs = [tmp_path / f'stderr{i}' for i in range(2)]
  processes = []
  for i, log in enumerate(logs):
    with open(log, 'w') as stderr:
      processes.append(
          start(
              command(
                  workdir,
                  *FLAGS,
                  '--config.train_length=100000',
                  *distributed(port, i),
              ),
              devices=1,
              stderr=stderr,
          )
      )
  try:
    wait_for_training(processes[0], workdir)
    processes[1].send_signal(signal.SIGTERM)  # Not to process 0.
    assert [p.wait(timeout=300) for p in processes] == [143, 143]
  finally:
    for p in processes:
      p.kill()
  lines = [stop_line(log) for log in logs]
  assert lines[0] == lines[1]  # The same step.
  step = int(re.search(r'at step (\d+),', lines[0]).group(1))
  assert workdir_lib.checkpoint_steps(workdir) == {step}


def test_the_sweep_passes_a_signal_on_and_waits(tmp_path):
  with open(tmp_path / 'stderr', 'w') as stderr:
    sweep = start(
        module(
            'resnet_jax.sweep',
            f'--root={tmp_path}',
            '--configs=configs/smoke.py',
            '--set=train_length=100000',
            *(f'--set={field}={value}' for field, value in FIELDS.items()),
        ),
        stderr=stderr,
    )
    workdir = tmp_path / 'smoke' / 'seed0'
    wait_for_training(sweep, workdir)
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=300) == 143
  with open(workdir / 'run.lock', 'a+') as lock:
    try:  # The run has ended: nothing holds its lock.
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock.seek(0)
      orphan = int(lock.read().split()[1])
      subprocess.run(['kill', '-9', str(orphan)], check=False)
      pytest.fail(f'the sweep left its run (pid {orphan}) running')
  err = (tmp_path / 'stderr').read_text()
  assert 'Traceback' not in err, err[-3000:]
  stops = [l for l in err.splitlines() if l.startswith('stopped: ')]
  assert len(stops) == 2 and 'sweep' in stops[1], stops
  assert len(workdir_lib.checkpoint_steps(workdir)) == 1


def test_a_run_started_from_another_thread_keeps_the_signals_default():
  # Only the main thread may set signal handlers (a notebook's worker
  # thread, a user's pool): there nothing is set, and nothing fails.
  import threading  # pylint: disable=g-import-not-at-top

  handlers = {s: signal.getsignal(s) for s in train.STOP_SIGNALS}
  seen = []

  def begin():
    with train.stop_requests() as received:
      seen.append(
          (received, {s: signal.getsignal(s) for s in train.STOP_SIGNALS})
      )

  thread = threading.Thread(target=begin)
  thread.start()
  thread.join()
  assert seen == [([], handlers)]
