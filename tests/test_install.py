"""The notebook's install leaves a Colab runtime's jax and TensorFlow alone.

A fresh virtual environment stands in for the runtime: jax, jaxlib and
TensorFlow preinstalled at the floors setup.cfg declares (older than the
latest), as a runtime ships its own. The notebook's install cell then clones
and installs resnet_jax (the committed HEAD of this repository); the
runtime's packages keep their versions, and the smoke config trains on them.
TensorFlow is tensorflow-cpu here (Colab's is tensorflow): resnet_jax
requires neither, so both are kept alike.
"""

import configparser
import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def floors() -> dict[str, str]:
  """jax's and TensorFlow's floors in setup.cfg (jaxlib's is jax's)."""
  setup = configparser.ConfigParser()
  setup.read(ROOT / 'setup.cfg')
  options = setup['options'].get('install_requires') + setup[
      'options.extras_require'
  ].get('tensorflow')
  found = dict(re.findall(r'^(jax|tensorflow-cpu)>=([\d.]+)$', options, re.M))
  return {
      'jax': found['jax'],
      'jaxlib': found['jax'],
      'tensorflow-cpu': found['tensorflow-cpu'],
  }


def install_cell() -> str:
  notebook = json.loads((ROOT / 'colab' / 'resnet_jax.ipynb').read_text())
  (cell,) = [
      ''.join(c['source'])
      for c in notebook['cells']
      if c['cell_type'] == 'code' and 'runtime_pins' in ''.join(c['source'])
  ]
  return cell


def versions(python) -> dict[str, str]:
  out = subprocess.run(
      [
          python,
          '-c',
          'import importlib.metadata as m, json; print(json.dumps('
          '{d: m.version(d) for d in ("jax", "jaxlib", "tensorflow-cpu")}))',
      ],
      capture_output=True,
      text=True,
      check=True,
  ).stdout
  return json.loads(out)


def test_colab_install_keeps_the_runtimes_jax_and_tensorflow(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top

  runtime = floors()
  assert runtime['jax'] != jax.__version__  # An older runtime than ours.
  env = {
      k: v
      for k, v in os.environ.items()
      if k not in ('VIRTUAL_ENV', 'PYTHONPATH')
  }
  venv = tmp_path / 'runtime'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  subprocess.run(
      [
          python,
          '-m',
          'pip',
          'install',
          '-q',
          '--no-compile',
          *(f'{name}=={version}' for name, version in runtime.items()),
      ],
      env=env,
      check=True,
      timeout=900,
  )
  assert versions(python) == runtime

  colab = tmp_path / 'content'
  colab.mkdir()
  subprocess.run(
      [python, '-c', f'REPOSITORY = {str(ROOT)!r}\n' + install_cell()],
      cwd=colab,
      env=env,
      check=True,
      timeout=900,
  )
  assert versions(python) == runtime  # Nothing upgraded or replaced.

  result = subprocess.run(
      [
          python,
          '-m',
          'resnet_jax.main',
          '--config=configs/smoke.py',
          f'--workdir={tmp_path / "run"}',
      ],
      cwd=colab / 'resnet_jax_repo',
      env=dict(env, JAX_PLATFORMS='cpu'),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'ResNet-8: final test error' in result.stdout
