r"""Runs configs over seeds, one workdir each: the paper's multi-run tables.

  python -m resnet_jax.sweep --root=sweeps/table6 \
      --configs=configs/resnet20.py,configs/resnet32.py,configs/resnet56.py \
      --seeds=0,1,2,3,4
  python -m resnet_jax.sweep ... --set=train_length=2000 --set=data_source=archive

Each (config, seed) trains with ``python -m resnet_jax.main`` in
``ROOT/<config name>/seed<N>``, one after another. A run whose metrics
already hold its final test result is skipped; an interrupted one resumes from
its checkpoints. ``--set=FIELD=VALUE`` overrides a config field in every run.
SIGTERM, SIGINT or SIGHUP to the sweep goes to the run in progress, which saves
its step and stops; the sweep then exits with the run's status (143, 130, 129).
Tables and figures come from the workdirs: ``python -m resnet_jax.report``.
"""

import pathlib
import signal
import subprocess
import sys

from absl import flags

from resnet_jax import cli
from resnet_jax import metrics
from resnet_jax import train

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined when run, so that importing this
  module beside another command's defines no flag twice)."""
  flags.DEFINE_list('configs', None, 'Config files to run.')
  flags.DEFINE_list('seeds', ['0'], 'Seeds (config.seed) of each config.')
  flags.DEFINE_string('root', None, 'Directory that holds one workdir per run.')
  flags.DEFINE_multi_string(
      'set', [], 'FIELD=VALUE: a config override for ' 'every run (repeatable).'
  )
  flags.mark_flags_as_required(['configs', 'root'])


def workdir_of(root: pathlib.Path, config: str, seed: int) -> pathlib.Path:
  return root / pathlib.Path(config).stem / f'seed{seed}'


def finished(workdir: pathlib.Path) -> bool:
  """Whether the run's metrics hold its final test result."""
  return metrics.final_test(metrics.read(workdir)) is not None


def run_to_the_end(command: list[str]) -> int:
  """Runs a training command; a stop signal to the sweep is passed on to it
  (which saves and stops), and the sweep waits for it: no run is orphaned."""
  child = subprocess.Popen(command)
  forward = lambda signum, frame: child.send_signal(signum)
  previous = {s: signal.signal(s, forward) for s in train.STOP_SIGNALS}
  try:
    return child.wait()
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    cli.fail(f'--seeds takes integers, got {",".join(FLAGS.seeds)}')
  for config in FLAGS.configs:
    if not pathlib.Path(config).is_file():
      cli.fail(f'no config file {config}')
  for override in FLAGS.set:
    if '=' not in override:
      cli.fail(f'--set takes FIELD=VALUE, got {override!r}')
  root = pathlib.Path(FLAGS.root)
  runs = [(config, seed) for config in FLAGS.configs for seed in seeds]
  for i, (config, seed) in enumerate(runs, 1):
    workdir = workdir_of(root, config, seed)
    if finished(workdir):
      print(f'[{i}/{len(runs)}] {workdir}: finished, skipped', flush=True)
      continue
    print(f'[{i}/{len(runs)}] {workdir}: training', flush=True)
    command = [
        sys.executable,
        '-m',
        'resnet_jax.main',
        f'--config={config}',
        f'--workdir={workdir}',
        f'--config.seed={seed}',
        *(f'--config.{override}' for override in FLAGS.set),
    ]
    code = run_to_the_end(command)
    if code in (128 + s for s in train.STOP_SIGNALS):
      print('stopped: run the same sweep again to resume', file=sys.stderr)
      sys.exit(code)
    if code == 2:  # The run's own error line said what is wrong.
      sys.exit(code)
    if code:
      cli.fail(
          f'the run in {workdir} failed (exit status {code}); run the same '
          'sweep again to resume it'
      )


if __name__ == '__main__':
  define_flags()
  cli.run(main)
