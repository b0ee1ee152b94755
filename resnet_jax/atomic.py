"""Files of a workdir written whole or not at all.

A file rewritten in place (``write_text``) is empty from the moment it is
opened until the new text is on disk: a kill -9 or a full disk in between
leaves nothing. ``write`` puts the new contents in a temporary file beside
the old one, forces it to disk, and renames it over the old (``rename(2)`` is
atomic within a filesystem), then forces the directory entry to disk: after
a crash at any instruction the file holds the old contents or the new.
"""

import os
import pathlib


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
    with open(temporary, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except OSError as e:
    temporary.unlink(missing_ok=True)
    raise OSError(e.errno, e.strerror, str(path)) from e
  except BaseException:
    temporary.unlink(missing_ok=True)
    raise
  directory = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(directory)
  finally:
    os.close(directory)
