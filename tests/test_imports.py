"""The package's layers: the networks, a core, and the tools on top of it."""

import ast
import pathlib

import resnet_jax

PACKAGE = pathlib.Path(resnet_jax.__file__).parent
# The commands that measure, convert or report on runs: nothing below them
# imports them, so a fork changes the core without them.
TOOLS = {
    'accelerator_benchmark',
    'benchmark',
    'compile',
    'convert',
    'report',
    'sweep',
    'torch_baseline',
}


def imported(module: str) -> set[str]:
  """The package's modules ``module`` imports, wherever in it."""
  tree = ast.parse((PACKAGE / f'{module}.py').read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == 'resnet_jax':
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.module.startswith('resnet_jax.'):
        names.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      names.update(
          alias.name.split('.')[1]
          for alias in node.names
          if alias.name.startswith('resnet_jax.')
      )
  return names


def test_the_networks_import_only_the_layers_they_need():
  assert imported('models') == {'canonical_conv'}
  assert imported('canonical_conv') == set()


def test_no_core_module_imports_a_tool():
  modules = {path.stem for path in PACKAGE.glob('*.py')} - {'__init__'}
  assert TOOLS <= modules
  for module in sorted(modules - TOOLS):
    assert not imported(module) & TOOLS, module
