"""The workdir's files are replaced whole or not at all (atomic.write)."""

import errno
import os
import pathlib
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from resnet_jax import metrics
from resnet_jax import workdir as workdir_lib

ROOT = pathlib.Path(__file__).parent.parent
OLD = {
    'config.json': '{"depth": 8}\n',
    'metrics.jsonl': ''.join(
        metrics.line(step, metrics.TRAIN, {'loss': 1}) for step in range(1, 11)
    ),
}
# Each rewrite of a file the workdir owns, as the runs call it.
REWRITES = {
    'config.json': lambda workdir: workdir_lib.record_config(
        ml_collections.ConfigDict({'depth': 20}), workdir
    ),
    'metrics.jsonl': lambda workdir: metrics.keep_until(workdir, 5),
}


@pytest.mark.parametrize('name', REWRITES)
def test_a_full_disk_leaves_the_old_file(name, tmp_path, monkeypatch):
  (tmp_path / name).write_text(OLD[name])

  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  # Where a full disk shows on filesystems that allocate late (ext4, xfs,
  # NFS): the writes are buffered, the flush to disk fails.
  monkeypatch.setattr(os, 'fsync', full)
  with pytest.raises(OSError) as raised:
    REWRITES[name](tmp_path)
  assert raised.value.errno == errno.ENOSPC
  assert raised.value.filename == str(tmp_path / name)  # For the message.
  assert (tmp_path / name).read_text() == OLD[name]
  assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # No temporary.


# Runs one rewrite, stopping for good just before the rename.
KILLED = """
import os, pathlib, sys, time
from test_atomic import REWRITES
workdir, name = pathlib.Path(sys.argv[1]), sys.argv[2]
def stop(*args):
  (workdir / 'renaming').touch()
  time.sleep(600)
os.replace = stop
REWRITES[name](workdir)
"""


@pytest.mark.parametrize('name', REWRITES)
def test_a_kill_during_a_rewrite_leaves_the_old_file(name, tmp_path):
  (tmp_path / name).write_text(OLD[name])
  process = subprocess.Popen(
      [sys.executable, '-c', KILLED, str(tmp_path), name],
      cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=f'{ROOT}:{ROOT / "tests"}'),
      stderr=subprocess.PIPE,
      text=True,
  )
  deadline = time.time() + 120
  while not (tmp_path / 'renaming').exists():
    assert process.poll() is None, process.stderr.read()  # It got there.
    assert time.time() < deadline
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  process.stderr.close()
  assert (tmp_path / name).read_text() == OLD[name]
  # The next run's rewrite goes through, beside the killed one's temporary.
  REWRITES[name](tmp_path)
  if name == 'metrics.jsonl':
    assert [r['step'] for r in metrics.read(tmp_path)] == [1, 2, 3, 4, 5]
  else:
    assert workdir_lib.saved_config(tmp_path).depth == 20
