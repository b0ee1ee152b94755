"""The command lines as the tests run them: real ``python -m`` processes on
simulated CPU devices, and what a test reads of them (one error line, the
metrics records, a checkpoint's arrays); in-process, a config as its flags
give it and a user's mistake as the error the command line prints."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import orbax.checkpoint as ocp
import pytest

from configs import smoke
from resnet_jax import cli

ROOT = pathlib.Path(__file__).parent.parent


def env(devices=2):
  """The tests' environment (conftest.py's), on ``devices`` CPU devices."""
  return dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=re.sub(
          r'--xla_force_host_platform_device_count=\d+',
          f'--xla_force_host_platform_device_count={devices}',
          os.environ['XLA_FLAGS'],
      ),
  )


def finish(argv, devices=2, environment=None):
  """Runs ``argv`` in the repository on ``devices`` CPU devices (or in
  ``environment``), its output captured."""
  return subprocess.run(
      argv,
      cwd=ROOT,
      env=environment or env(devices),
      capture_output=True,
      text=True,
      timeout=600,
  )


def start(
    argv, devices=2, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
):
  """Starts ``argv`` in the repository (to signal it, kill it, wait)."""
  return subprocess.Popen(
      argv, cwd=ROOT, env=env(devices), stdout=stdout, stderr=stderr, text=True
  )


def module(name, *flags):
  return [sys.executable, '-m', name, *flags]


def python(name, *flags, devices=2):
  """``python -m name flags`` in the repository, on ``devices`` CPU
  devices."""
  return finish(module(name, *flags), devices)


def command(workdir, *flags, mode='train'):
  """The main job on the smoke config."""
  return module(
      'resnet_jax.main',
      '--config=configs/smoke.py',
      f'--workdir={workdir}',
      f'--mode={mode}',
      *flags,
  )


def run(workdir, *flags, mode='train', devices=2):
  return finish(command(workdir, *flags, mode=mode), devices)


# ``python -m MODULE FLAGS`` as ``python -c CODE MODULE FLAGS``.
MAIN = """
import runpy, sys
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name='__main__')
"""


def with_code(code, argv, devices=2):
  """``argv`` (a ``module``) in a process where ``code`` ran first: code
  edited (a monkeypatch), a fault injected."""
  return finish([sys.executable, '-c', code + MAIN, *argv[2:]], devices)


def distributed(port, process_id):
  """The flags of one of a run's two processes."""
  return (
      '--distributed',
      f'--coordinator_address=127.0.0.1:{port}',
      '--num_processes=2',
      f'--process_id={process_id}',
  )


def ok(result):
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def error_line(result):
  """The one ``error:`` line of a command that failed as a user's mistake
  (exit status 2, no traceback)."""
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
  return lines[0]


def records(workdir, split=None):
  """metrics.jsonl's records (of one split)."""
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [r for r in map(json.loads, lines) if split in (None, r['split'])]


def saved(workdir, step):
  """A checkpoint's arrays as it holds them (dicts and lists), on this
  process's first device."""
  path = (
      pathlib.Path(workdir).absolute() / 'checkpoints' / str(step) / 'default'
  )
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      checkpointer.metadata(path).item_metadata,
  )
  return checkpointer.restore(path, target)


def params(workdir, step):
  """A checkpoint's parameters, on this process's first device."""
  return saved(workdir, step)['params']


def smoke_config(**fields):
  """configs/smoke.py with ``fields`` changed, as ``--config.FIELD=``."""
  config = smoke.get_config()
  config.update(fields)
  return config


def config_flags(**fields):
  """``fields`` as the command line's ``--config.FIELD=VALUE`` flags."""
  return tuple(f'--config.{field}={value}' for field, value in fields.items())


def printed(capsys, call, *args, **kwargs) -> str:
  """What ``call`` prints on stdout, in this process."""
  capsys.readouterr()
  call(*args, **kwargs)
  return capsys.readouterr().out


def assert_names(message, *subjects):
  """That ``message`` names each of ``subjects``: the paths, fields, values
  and steps a user acts on. Its wording is free to change."""
  for subject in subjects:
    assert str(subject) in message, f'{subject!r} not in {message!r}'


def refused(call, *args, **kwargs):
  """The message of the user's mistake (or the full disk) that ``call``
  raises: what the command line prints after ``error: ``."""
  try:
    call(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    message = cli.user_message(e)
    if message is None:
      raise  # A bug: its traceback.
    return message
  pytest.fail(f'{call!r} raised nothing')


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]
