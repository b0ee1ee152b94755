"""Files of a workdir written whole or not at all.

A file rewritten in place (``write_text``) is empty from the moment it is
opened until the new text is on disk: a kill -9 or a full disk in between
leaves nothing. ``write`` puts the new contents in a temporary file beside
the old one, forces it to disk, and renames it over the old (``rename(2)`` is
atomic within a filesystem), then forces the directory entry to disk: after
a crash at any instruction the file holds the old contents or the new.
A full disk is one message (``full_disk``) naming the path and the space
left.
"""

import contextlib
import errno
import os
import pathlib
import shutil

# A full disk, or a full quota.
FULL = (errno.ENOSPC, errno.EDQUOT)


def write(path: pathlib.Path, contents: str | bytes):
  """Replaces ``path`` with ``contents`` atomically (see above).

  A failed write (a full disk) raises OSError naming ``path``; the old file
  is intact and the temporary one removed.
  """
  path = pathlib.Path(path)
  data = contents.encode() if isinstance(contents, str) else contents
  temporary = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
  try:
    # Created as open() creates files (0o666 less the umask), not mkstemp's
    # 0o600: the file keeps the permissions a plain write would give it.
    with naming(path), open(temporary, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    temporary.unlink(missing_ok=True)
    raise
  directory = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(directory)
  finally:
    os.close(directory)


@contextlib.contextmanager
def naming(path):
  """Names ``path`` in an OSError raised without a file name (a write's, a
  flush's), for the message; a full disk that a library reports as another
  exception (TensorFlow's summary writer) becomes the OSError a write would
  raise."""
  try:
    yield
  except OSError as e:
    if e.filename is not None:
      raise
    raise OSError(e.errno, e.strerror, str(path)) from e
  except Exception as e:  # pylint: disable=broad-except
    code = full_code(e)
    if code is None:
      raise
    raise OSError(code, os.strerror(code), str(path)) from e


def full_code(error: BaseException) -> int | None:
  """The errno of a full disk that ``error`` is (None: it is not one): an
  OSError's, or the one whose words a library's error quotes (TensorStore's,
  orbax's writer; TensorFlow's, the TensorBoard writer)."""
  if isinstance(error, OSError):
    return error.errno if error.errno in FULL else None
  return next((code for code in FULL if os.strerror(code) in str(error)), None)


def is_full(error: BaseException) -> bool:
  return full_code(error) is not None


def full_disk(path) -> str:
  """What to say when writing ``path`` found the disk full."""
  path = pathlib.Path(path).absolute()
  existing = next(p for p in (path, *path.parents) if p.exists())
  free = shutil.disk_usage(existing).free / 2**20
  return (
      f'no space left on the device of {path} ({free:.1f} MiB free); '
      'what was written before is intact: free some space and run the '
      'same command again'
  )
