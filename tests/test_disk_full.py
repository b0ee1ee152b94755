"""A full disk: one error line naming the path and the space left, nothing
written before lost, and the same command goes on once there is room.

The disk fills by injection (no mount needed): one write of the smoke run
fails with ENOSPC, as it fails on a full disk, or with the error a library
raises for it. The error line is the command line's (``cli.user_message``).
"""

import errno
import os
import pathlib

from clu.metric_writers.tf import summary_writer
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from resnet_jax import metrics
from resnet_jax import train
from resnet_jax import workdir as workdir_lib
from commands import assert_names
from commands import printed
from commands import refused
from commands import smoke_config


def full():
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fill_at_config_json(monkeypatch):
  # A late-allocating filesystem: the data are buffered, the flush fails.
  def fsync(fd):
    raise full()

  monkeypatch.setattr(os, 'fsync', fsync)


def fill_at_metrics_jsonl(monkeypatch):
  # The append of step 15's records.
  line = metrics.line

  def full_at_15(step, *args):
    if step == 15:
      raise full()
    return line(step, *args)

  monkeypatch.setattr(metrics, 'line', full_at_15)


def fill_at_checkpoints(monkeypatch):
  # What orbax raises when TensorStore finds the disk full, after it has
  # begun the checkpoint's temporary directory.
  save = ocp.CheckpointManager.save

  def full_at_20(self, step, *args, **kwargs):
    if step == 20:
      partial = pathlib.Path(self.directory) / '20.orbax-checkpoint-tmp'
      (partial / 'default.orbax-checkpoint-tmp').mkdir(parents=True)
      raise ValueError(
          'RESOURCE_EXHAUSTED: Error writing "params.conv_init" in OCDBT '
          'database: Failed to write 7023 bytes to file 16: No space left '
          "on device [os_error_code='28']"
      )
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', full_at_20)


def fill_at_events(monkeypatch):
  # TensorBoard's events: what TensorFlow's summary writer raises when it
  # cannot flush the step-15 scalars.
  write = summary_writer.SummaryWriter.write_scalars

  def full_at_15(self, step, scalars):
    if step == 15:
      raise tf.errors.ResourceExhaustedError(
          None,
          None,
          'events.out.tfevents.1; No space left on device\n\tFailed to '
          'flush 3 events to events.out.tfevents.1',
      )
    return write(self, step, scalars)

  monkeypatch.setattr(summary_writer.SummaryWriter, 'write_scalars', full_at_15)


FILL = {
    'config.json': fill_at_config_json,
    'metrics.jsonl': fill_at_metrics_jsonl,
    'checkpoints': fill_at_checkpoints,
    'events': fill_at_events,
}


@pytest.mark.parametrize('path', FILL)
def test_a_full_disk_is_one_line_and_the_same_command_goes_on(
    path, tmp_path, monkeypatch, capsys
):
  with monkeypatch.context() as disk:
    FILL[path](disk)
    message = refused(train.train_and_evaluate, smoke_config(), str(tmp_path))
  assert_names(message, tmp_path if path == 'events' else tmp_path / path)
  if path == 'checkpoints':
    assert_names(message, 'checkpoint 20')
  names = {p.name for p in tmp_path.iterdir()}
  assert not [n for n in names if n.startswith('.')]  # No temporary file.
  if path == 'config.json':
    assert 'config.json' not in names  # Not an empty one.
  else:
    assert workdir_lib.checkpoint_steps(tmp_path) == {10}
    assert not list((tmp_path / 'checkpoints').glob('*tmp*'))
  if path in ('metrics.jsonl', 'events'):
    assert max(r['step'] for r in metrics.read(tmp_path)) == 10
  # The disk has room again.
  out = printed(capsys, train.train_and_evaluate, smoke_config(), str(tmp_path))
  if path != 'config.json':
    assert 'Resuming from checkpoint at step 10.' in out
  assert workdir_lib.checkpoint_steps(tmp_path) == {10, 20}
  assert [
      r['step'] for r in metrics.read(tmp_path) if r['split'] == 'train'
  ] == [5, 10, 15, 20]


def test_a_background_save_that_finds_the_disk_full(tmp_path):
  # On an accelerator orbax saves in the background: its error comes from
  # the wait at the end (or the next save), after the step's save returned.
  class Manager:
    directory = tmp_path / 'checkpoints'

    def wait_until_finished(self):
      raise ValueError(
          'RESOURCE_EXHAUSTED: Error writing "params.head" in '
          'OCDBT database: No space left on device'
      )

  partial = Manager.directory / '20.orbax-checkpoint-tmp-1' / 'default'
  partial.mkdir(parents=True)
  (Manager.directory / '10').mkdir()
  assert_names(refused(workdir_lib.finish, Manager()), Manager.directory)
  assert [p.name for p in Manager.directory.iterdir()] == ['10']
