"""Malformed input (config values and files, workdir contents, PyTorch files)
is one ``error:`` line and exit status 2, saying what is wrong and what to
do; nothing already written changes."""

import fcntl
import functools
import json
import shutil
import warnings

import jax
import ml_collections
import optax
import pytest

from commands import assert_names
from commands import error_line
from commands import ok
from commands import printed
from commands import python
from commands import refused
from commands import run
from commands import smoke_config
from configs import imagenet_resnet50 as imagenet_config
from resnet_jax import evaluate
from resnet_jax import train
from resnet_jax import workdir as workdir_lib


@pytest.mark.parametrize('value, named', [('foo', 'foo'), ("(10,'x')", "'x'")])
def test_bad_lr_boundaries(value, named, tmp_path):
  message = error_line(run(tmp_path / 'run', f'--config.lr_boundaries={value}'))
  assert_names(message, 'lr_boundaries', named)
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize(
    'field, value',
    [
        ('test_scales', 'abc'),
        ('test_scales', (0,)),
        ('test_scales', (-224,)),
        ('test_scales', (224.0,)),
        ('test_scales', (True,)),
        ('test_scales', (16,)),  # Below the network's total stride.
        ('test_scales', (100000,)),
        ('test_bucket', 48),  # Not a multiple of ResNet-50's stride, 32.
        ('test_bucket', 0),
        ('test_bucket', 64.0),
        ('lr_factor', 1.5),
        ('lr_factor', 1.0),
        ('lr_factor', 0.0),
        ('lr_factor', float('nan')),
    ],
)
def test_bad_values_are_refused_where_they_are_given(field, value):
  # As the command line may set them (a string where a tuple belongs).
  config = ml_collections.ConfigDict(
      imagenet_config.get_config().to_dict() | {field: value}
  )
  with pytest.raises(train.TrainingError, match=f'^{field} '):
    train.check_config(config)


def test_test_scales_are_imagenet_only_and_refused_when_a_run_starts(
    tmp_path,
):
  config = imagenet_config.get_config()
  config.test_scales = (224, 256, 384, 480, 640)  # The paper's (Table 4).
  train.check_config(config)
  message = refused(
      train.train_and_evaluate,
      smoke_config(test_scales=(224,)),
      str(tmp_path / 'run'),
  )
  assert 'test_scales' in message and 'cifar10' in message, message
  assert not (tmp_path / 'run').exists()


def test_a_config_file_without_get_config(tmp_path):
  (tmp_path / 'notes.py').write_text('depth = 20\n')
  message = error_line(
      python(
          'resnet_jax.main', f'--config={tmp_path}/notes.py', '--mode=summary'
      )
  )
  assert_names(message, 'get_config()')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('runs') / 'smoke'
  train.train_and_evaluate(smoke_config(train_length=10), str(workdir))
  return workdir


@pytest.mark.parametrize('content', ['[1, 2]', 'null'])
def test_a_config_json_that_is_not_an_object(content, trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  (workdir / 'config.json').write_text(content)
  config = smoke_config(train_length=10)
  for mode in (train.train_and_evaluate, evaluate.evaluate_checkpoint):
    message = refused(mode, config, str(workdir))
    assert_names(message, workdir / 'config.json')
  assert (workdir / 'config.json').read_text() == content


def test_a_config_json_field_of_the_wrong_type(trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  saved = json.loads((workdir / 'config.json').read_text())
  (workdir / 'config.json').write_text(
      json.dumps(saved | {'eval_batch_size': 'sixty-four'})
  )
  message = error_line(run(workdir, mode='eval'))
  assert_names(message, 'eval_batch_size', 'sixty-four')


def test_checkpoints_that_are_a_file(trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  shutil.rmtree(workdir / 'checkpoints')
  (workdir / 'checkpoints').write_text('not a directory')
  metrics = (workdir / 'metrics.jsonl').read_text()
  for start_over in (False, True):
    message = refused(
        train.train_and_evaluate,
        smoke_config(train_length=10),
        str(workdir),
        start_over,
    )
    assert_names(message, workdir / 'checkpoints')
  # --start_over moved nothing aside.
  assert (workdir / 'metrics.jsonl').read_text() == metrics
  assert not list(workdir.glob('metrics.replaced-*'))


@pytest.mark.parametrize(
    'name, content, subject',
    [
        ('empty.pth', b'', '0 bytes'),
        ('garbage.pth', b'garbage\n', 'state_dict'),
        ('folder', None, 'state_dict'),
    ],
)
def test_a_pytorch_file_that_is_none(name, content, subject, tmp_path):
  path = tmp_path / name
  if content is None:
    path.mkdir()
  else:
    path.write_bytes(content)
  message = error_line(
      python(
          'resnet_jax.convert',
          '--config=configs/resnet20.py',
          f'--torch={path}',
          f'--workdir={tmp_path / "run"}',
      )
  )
  assert_names(message, path, subject)
  assert 'weights_only' not in message  # Not torch's unsafe advice.
  assert not (tmp_path / 'run').exists()


def test_metrics_lines_that_are_not_records(trained, tmp_path, capsys):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  good = (workdir / 'metrics.jsonl').read_bytes()
  bad = [
      b'\xff\xfe{"step": 3}',
      b'[1, 2]',
      b'{"step": "3", "split": "train"}',
      b'{"step": 3, "split": null}',
      b'{"step": true, "split": "train"}',
  ]
  (workdir / 'metrics.jsonl').write_bytes(b'\n'.join(bad) + b'\n' + good)
  assert 'Resuming from checkpoint at step 10.' in printed(
      capsys,
      train.train_and_evaluate,
      smoke_config(train_length=20),
      str(workdir),
  )
  # The resume kept the records up to its checkpoint, and only them.
  kept = [l for l in good.splitlines() if b'final_test' not in l]
  lines = (workdir / 'metrics.jsonl').read_bytes().splitlines()
  assert lines[: len(kept)] == kept
  assert not set(bad) & set(lines)


def test_an_eval_that_races_the_deletion_of_its_checkpoint(
    trained, tmp_path, monkeypatch
):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  restore = workdir_lib.restore

  def deleted_meanwhile(manager, abstract_state, step, **kwargs):
    # The training run's policy removes it while orbax reads it.
    shutil.rmtree(workdir / 'checkpoints' / str(step))
    return restore(manager, abstract_state, step, **kwargs)

  monkeypatch.setattr(workdir_lib, 'restore', deleted_meanwhile)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shapes = workdir_lib.abstract(
      train.state_shapes(workdir_lib.saved_config(workdir)), device
  )
  assert_names(
      refused(workdir_lib.load, workdir, shapes), 'checkpoint 10', workdir
  )


@pytest.mark.parametrize('damage', ['removed', 'zeroed'])
def test_a_checkpoint_without_its_checksum_is_reported(
    damage, trained, tmp_path
):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  metadata = workdir / 'checkpoints' / '10' / '_CHECKPOINT_METADATA'
  if damage == 'removed':
    metadata.unlink()
  else:
    metadata.write_bytes(b'')
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shapes = workdir_lib.abstract(
      train.state_shapes(workdir_lib.saved_config(workdir)), device
  )
  with pytest.warns(UserWarning) as said:
    workdir_lib.load(workdir, shapes)
  assert (
      'checkpoint 10 has no checksum (its _CHECKPOINT_METADATA is missing '
      'or empty); restored unchecked'
  ) in [str(w.message) for w in said]


def test_a_checkpoint_with_one_checksum_of_its_whole_state(trained, tmp_path):
  # Checkpoints written before the checksum of each field have one of the
  # whole state: it is checked where this code reads the whole state.
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  config = workdir_lib.saved_config(workdir)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shapes = workdir_lib.abstract(train.state_shapes(config), device)
  manager = workdir_lib.checkpoint_manager(workdir, 1, read_only=True)
  whole = workdir_lib.checksum(workdir_lib.restore(manager, shapes, 10))
  path = workdir / 'checkpoints' / '10' / '_CHECKPOINT_METADATA'
  metadata = json.loads(path.read_text())

  def saved_checksum(digest):
    path.write_text(
        json.dumps(metadata | {'custom_metadata': {'state_sha256': digest}})
    )

  saved_checksum(whole)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    workdir_lib.load(workdir, shapes)
  # Code whose optimiser clips first reads the weights alone: unchecked.
  clipped = optax.chain(
      optax.clip_by_global_norm(1.0),
      train.create_optimizer(config, train.learning_rate_schedule(config, [])),
  )
  other = workdir_lib.abstract(
      jax.eval_shape(
          functools.partial(train.fresh_state(config), clipped, config.seed)
      ),
      device,
  )
  with pytest.warns(UserWarning, match='weights are restored unchecked'):
    assert workdir_lib.load(workdir, other).opt_state is None
  saved_checksum('0' * 64)
  assert_names(
      refused(workdir_lib.load, workdir, shapes), 'checkpoint 10', workdir
  )


def test_a_half_deleted_checkpoint_is_ignored_and_removed(trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  # What a kill during the policy's deletion of an old checkpoint leaves.
  half = workdir / 'checkpoints' / '5'
  shutil.copytree(workdir / 'checkpoints' / '10', half)
  (half / '_CHECKPOINT_METADATA').unlink()
  shutil.rmtree(half / 'default' / 'ocdbt.process_0')
  for result in (
      ok(run(workdir, mode='eval')),
      ok(run(workdir, '--config.train_length=30')),
  ):
    said = result.stderr + result.stdout
    assert 'etadata' not in said and '\nwarning:' not in said, said
  assert workdir_lib.checkpoint_steps(workdir) == {10, 20, 30}


def test_an_unreadable_checkpoint_is_one_short_line(trained, tmp_path):
  # TensorStore's error quotes its whole spec (thousands of characters), and
  # its abandoned reads call back into orbax's closed event loop.
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  (workdir / 'checkpoints' / '10' / 'default' / 'manifest.ocdbt').write_bytes(
      b''
  )
  message = error_line(run(workdir, mode='eval'))
  assert_names(message, 'checkpoint 10', workdir, 'DATA_LOSS')
  assert '{' not in message  # None of the spec, a JSON object.


def test_a_sweep_whose_run_is_refused_says_it_once(tmp_path):
  workdir = tmp_path / 'smoke' / 'seed0'
  workdir.mkdir(parents=True)
  with open(workdir / 'run.lock', 'a+') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # Another run trains.
    lock.write('pid 1 on elsewhere\n')
    lock.flush()
    result = python(
        'resnet_jax.sweep', f'--root={tmp_path}', '--configs=configs/smoke.py'
    )
  assert_names(error_line(result), workdir, 'pid 1 on elsewhere')
