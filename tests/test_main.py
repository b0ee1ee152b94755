"""The command line: summaries of every config, and one-line errors."""

import importlib
import logging
import os
import re
import sys

import pytest

from commands import assert_names
from commands import error_line
from commands import finish
from commands import module
from commands import python
from commands import ROOT
from resnet_jax import cli
from resnet_jax import main

CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py'))

# Paper §4.2 / Table 1 counts (option A for CIFAR and plain nets, option B for
# the ImageNet ResNets, as their configs choose).
PARAMETERS = {
    'default': 269_722,
    'smoke': 75_290,
    'resnet20': 269_722,
    'resnet32': 464_154,
    'resnet44': 658_586,
    'resnet56': 853_018,
    'resnet110': 1_727_962,
    'resnet1202': 19_421_274,
    'plain20': 269_722,
    'plain32': 464_154,
    'plain44': 658_586,
    'plain56': 853_018,
    'plain110': 1_727_962,
    'imagenet_resnet18': 11_689_512,
    'imagenet_resnet34': 21_797_672,
    'imagenet_resnet50': 25_557_032,
    'imagenet_resnet101': 44_549_160,
    'imagenet_resnet152': 60_192_808,
    # Option B minus its three projections (1x1 conv + BN at 64->128->256->512).
    'imagenet_plain18': 11_689_512 - 173_824,
    'imagenet_plain34': 21_797_672 - 173_824,
    'cifar_resnet18': 11_173_962,
    # Identity Mappings (2016): 1.7M and 10.2M in its text (rounded); the
    # counts are checked against a PyTorch definition in test_models.py.
    'preact_resnet110': 1_730_522,
    'preact_resnet164': 1_703_258,
    'preact_resnet1001': 10_327_706,
    'imagenet_preact_resnet200': 64_666_152,
}


def summary_numbers(text):
  params = re.search(r'^Parameters: ([\d,]+)', text, re.M).group(1)
  macs = re.search(r'^Multiply-adds per image: ([\d,]+)', text, re.M).group(1)
  return params, macs


def test_every_config_is_listed():
  assert set(CONFIGS) == set(PARAMETERS)


def test_every_config_has_the_paper_parameter_count_and_its_readme_row():
  # One test: the summaries of the 1202- and 1001-layer nets take seconds.
  readme = (ROOT / 'README.md').read_text()
  for name in CONFIGS:
    text = main.summary(importlib.import_module(f'configs.{name}').get_config())
    params, macs = summary_numbers(text)
    assert params == f'{PARAMETERS[name]:,}', name
    network = text.split(' (')[0]
    row = f'| `configs/{name}.py` | {network} | {params} | {macs} |'
    assert row in readme, f'README is stale for {name}: expected {row}'


def test_summary_command():
  result = python(
      'resnet_jax.main', '--config=configs/resnet56.py', '--mode=summary'
  )
  assert result.returncode == 0, result.stderr
  assert 'Parameters: 853,018 ' in result.stdout
  assert 'Multiply-adds per image: 125,485,696 ' in result.stdout
  # One row per conv and dense layer: 1 + 2 * 27 + 1.
  assert len(re.findall(r'^(conv_init|stage|head)', result.stdout, re.M)) == 56


# A machine without the TPU runtime, where jax looks for a TPU first and
# logs its absence. (The test extra installs libtpu, which writes to stderr
# whatever the command on a machine without a TPU, and whose import puts its
# path in the environment.)
WITHOUT_LIBTPU = 'import sys; sys.modules["libtpu"] = None\n'
NO_JAX_PLATFORMS = {
    k: v
    for k, v in os.environ.items()
    if k not in ('JAX_PLATFORMS', 'TPU_LIBRARY_PATH', 'TPU_SKIP_MDS_QUERY')
}


def test_no_line_about_accelerators_the_machine_lacks():
  result = finish(
      [
          sys.executable,
          '-c',
          WITHOUT_LIBTPU + 'import runpy; sys.argv[1:] = '
          '["--config=configs/smoke.py", "--mode=summary"]; '
          'runpy.run_module("resnet_jax.main", run_name="__main__")',
      ],
      environment=NO_JAX_PLATFORMS,
  )
  assert result.returncode == 0, result.stderr
  assert 'Unable to initialize backend' not in result.stderr


# Any command line of resnet_jax (they all start through cli.run).
COMMAND = """
import sys, warnings
import jax
from resnet_jax import cli
def main(argv):
  jax.devices()  # Looks for a TPU first, and logs that there is none.
  warnings.warn('a re-encoded copy of the data')
  raise cli.UserError('the data are gone')
cli.run(main)
"""


def test_every_command_says_errors_and_warnings_in_one_line():
  result = finish(
      [sys.executable, '-c', WITHOUT_LIBTPU + COMMAND],
      environment=NO_JAX_PLATFORMS,
  )
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      'warning: a re-encoded copy of the data',
      'error: the data are gone',
  ]


def test_the_reads_orbax_abandons_are_not_reported():
  # When one read of a broken checkpoint fails, asyncio may report the other
  # reads' errors as their tasks are collected: TensorStore's, of the same
  # file, after the command's one error line.
  def record(error):
    return logging.LogRecord(
        'asyncio',
        logging.ERROR,
        'asyncio/base_events.py',
        1771,
        'Task exception was never retrieved\nfuture: <Task finished '
        f'exception={error!r}>',
        None,
        None,
    )

  abandoned = ValueError(
      'DATA_LOSS: Error reading "mean/.zarray" in OCDBT database '
      '[tensorstore_spec=\'{"driver":"zarr"}\']'
  )
  assert not cli.quiet(record(abandoned))
  assert cli.quiet(record(ValueError('a task of other code')))


@pytest.mark.parametrize(
    'flag, subjects',
    [
        ('--config.depth=57', ('depth', 57)),
        ('--config.shortcut=D', ('shortcut', 'D')),
        ('--config.model=vgg', ('model', 'vgg')),
        ('--config.dataset=mnist', ('dataset', 'mnist')),
        ('--config.no_such_field=1', ('no_such_field',)),
        ('--config.depth=deep', ('depth', 'deep')),
        ('--config=configs/missing.py', ('configs/missing.py',)),
        ('--mode=sumary', ('--mode', 'sumary')),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(flag, subjects):
  result = python(
      'resnet_jax.main', '--config=configs/resnet56.py', '--mode=summary', flag
  )
  assert_names(error_line(result), *subjects)
