"""The code is formatted as flax formats its own: pyink, with the settings
in pyproject.toml (2-space indents, 80 columns)."""

import sys

from commands import finish

CHECK = (sys.executable, '-m', 'pyink', '--check', '--diff')
FOLDERS = ('resnet_jax', 'tests', 'configs')


def test_the_code_is_formatted_as_flax_formats_it():
  result = finish([*CHECK, *FOLDERS])
  assert result.returncode == 0, (
      f'run pyink {" ".join(FOLDERS)}:\n' + result.stdout[-3000:]
  )
