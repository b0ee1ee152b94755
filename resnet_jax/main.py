r"""Command line of resnet_jax.

  python -m resnet_jax.main --config=configs/resnet56.py --workdir=DIR
  python -m resnet_jax.main --config=configs/resnet56.py --workdir=DIR \
      --mode=eval
  python -m resnet_jax.main --config=configs/imagenet_resnet50.py \
      --workdir=DIR --mode=eval --config.test_scales='(224,256,384,480,640)'
  python -m resnet_jax.main --config=configs/resnet56.py --mode=summary

Training resumes from the workdir's latest checkpoint. On several hosts, run
the same command on each with --distributed (and, where JAX cannot detect the
cluster, --coordinator_address, --num_processes and --process_id).

Any config field can be overridden, e.g. ``--config.batch_size=64``. A config
that does not describe a network or run of the paper is one error line on
stderr and exit status 2.
"""

import pathlib
import sys

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

from resnet_jax import cli
from resnet_jax import data
from resnet_jax import devices
from resnet_jax import evaluate
from resnet_jax import layers
from resnet_jax import models
from resnet_jax import train
from resnet_jax import workdir as workdir_lib

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined when run, so that importing this
  module beside another command's defines no flag twice)."""
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
  flags.DEFINE_enum(
      'mode',
      'train',
      ['train', 'eval', 'summary'],
      'train: train and evaluate, resuming from the workdir; '
      'eval: test error of a checkpoint in the workdir; summary: '
      'the layer table, parameter count and multiply-adds.',
  )
  flags.DEFINE_bool(
      'start_over',
      False,
      'Train again from step 0 in a workdir whose checkpoints '
      'are all lost; its metrics.jsonl is moved aside.',
  )
  flags.DEFINE_bool(
      'allow_config_changes',
      False,
      'Resume a run with training settings other than its '
      'config.json (recorded in config_changes.jsonl).',
  )
  flags.DEFINE_bool(
      'distributed',
      False,
      'Call jax.distributed.initialize() (multi-host runs).',
  )
  flags.DEFINE_string(
      'coordinator_address', None, 'host:port of process 0, with --distributed.'
  )
  flags.DEFINE_integer('num_processes', None, 'With --distributed.')
  flags.DEFINE_integer('process_id', None, 'With --distributed.')
  config_flags.DEFINE_config_file(
      'config', None, 'A config file from configs/.', lock_config=True
  )
  flags.mark_flags_as_required(['config'])


def summary(config) -> str:
  """The layer table of a config's network, its parameters and multiply-adds."""
  info = data.dataset_info(config.dataset)
  model = models.from_config(config, info.num_classes)
  rows, variables = layers.layer_table(model, info.image_size)
  params = models.param_count(variables['params'])
  macs = sum(row['macs'] for row in rows)
  width = max(len(row['name']) for row in rows)
  lines = [
      f'{models.display_name(config)} ({config.model}, shortcut '
      f'{config.shortcut if config.residual else "none"}) for '
      f'{config.dataset}, {info.image_size}x{info.image_size} input',
      f'{"layer":<{width}}  {"kernel":>6}  {"output":>12}  {"params":>10}  '
      f'{"mult-adds":>13}',
  ]
  for row in rows:
    output = 'x'.join(map(str, row['output']))
    lines.append(
        f'{row["name"]:<{width}}  {row["kernel"]:>6}  {output:>12}  '
        f'{row["params"]:>10,}  {row["macs"]:>13,}'
    )
  lines += [
      f'Parameters: {params:,} (conv and dense weights above, plus BN scale '
      'and bias)',
      f'Multiply-adds per image: {macs:,} ({macs / 1e9:.2f} x10^9)',
  ]
  return '\n'.join(lines)


def use_run_settings(config, workdir: pathlib.Path):
  """--mode=eval evaluates a run as it was configured: its config.json's
  data and other settings, but for this command's --config.* overrides and
  the model fields (checked against the run's)."""
  try:
    saved = workdir_lib.saved_config(workdir)
  except workdir_lib.WorkdirError:
    return  # No run, or an unreadable one: evaluation reports it.
  overrides = config_flags.get_override_values(FLAGS['config'])
  for key, value in saved.items():
    if (
        key in config
        and key not in overrides
        and key not in workdir_lib.MODEL_FIELDS
    ):
      try:
        config[key] = tuple(value) if isinstance(config[key], tuple) else value
      except TypeError as e:  # The config's types are checked.
        raise workdir_lib.WorkdirError(
            f'{workdir / "config.json"} has {key}={value!r}, not a '
            f"{type(config[key]).__name__}; put the run's config.json back"
        ) from e


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config = FLAGS.config
  if not isinstance(config, ml_collections.ConfigDict):
    try:
      getattr(config, 'model', None)  # A deferred failed load raises here.
    except OSError as e:
      cli.fail(
          'cannot load the config file: ' f'{str(e).splitlines()[-1].strip()}'
      )
    cli.fail("the config file's get_config() must return a ConfigDict")
  if FLAGS.mode == 'summary':
    print(summary(config))
    return
  if not FLAGS.workdir:
    cli.fail(f'--mode={FLAGS.mode} needs --workdir')
  if FLAGS.mode == 'eval':
    use_run_settings(config, pathlib.Path(FLAGS.workdir))
  devices.use_cpu_cores(
      [
          config.batch_size // (FLAGS.num_processes or 1),
          config.eval_batch_size // (FLAGS.num_processes or 1),
      ]
  )
  if FLAGS.distributed:
    initialize_distributed()
  if FLAGS.mode == 'train':
    try:
      result = train.train_and_evaluate(
          config, FLAGS.workdir, FLAGS.start_over, FLAGS.allow_config_changes
      )
    except train.Stopped as e:
      print(f'stopped: {e}', file=sys.stderr)
      sys.exit(128 + e.signum)
    print(
        f'{models.display_name(config)}: final test error '
        f'{result["error"]:.2f}% on {result["images"]} images'
    )
  else:
    result = evaluate.evaluate_checkpoint(config, FLAGS.workdir)
    scales = (
        f' at scales {", ".join(map(str, config.test_scales))} and '
        'their flips'
        if config.test_scales
        else ''
    )
    print(
        f'{models.display_name(config)} at step {result["step"]}: test '
        f'error {result["error"]:.2f}% (top-1), '
        f'{result["top5_error"]:.2f}% (top-5) on {result["images"]} '
        f'images{scales}'
    )


def initialize_distributed():
  """Joins the other processes of a multi-host run."""
  # CPU processes talk through gloo; accelerators use their own collectives.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
  )


if __name__ == '__main__':
  define_flags()
  cli.run(main)
