r"""The benchmark to run the day an accelerator is lent: one command, one table.

  python -m resnet_jax.accelerator_benchmark --out=DIR

runs ``resnet_jax.benchmark``'s training rows that decide how the paper's
CIFAR tables (§4.2, Table 6: 5 depths x 5 runs of small nets) are best run
on an accelerator: ResNet-20, 56 and 110 at batch 128, float32 and
bfloat16, 1 and 16 steps per dispatch, and 1 or 5 seeds side by side in each
placement (vmapped on one device, ``shard_map`` over a seeds axis,
data-parallel one after another). It writes ``DIR/benchmark.json`` (every
row, as the benchmark's JSON lines) and ``DIR/benchmark.md`` (a Markdown
table for BENCHMARKS.md). It needs only jax, flax, optax, orbax,
ml_collections, absl and numpy; the PyTorch rows run when torch is installed
and JAX is on the CPU. It is built to end within 5 minutes anywhere: a
group of rows whose estimate (from the rows timed before it) would end past
240 s (``--max_seconds``) is skipped and listed in both files; on a CPU
most of the 5-seed and K=16 rows are. Every benchmark flag may be given
after the preset ones and overrides them (e.g. ``--min_seconds`` and
``--repeats`` shorten each row; ``--depths`` and ``--batch_sizes`` pick
others; ``--max_seconds=0`` times every row).
"""

import json
import pathlib
import sys
import time

from absl import flags
import jax

from resnet_jax import benchmark
from resnet_jax import cli

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined when run, so that importing this
  module beside another command's defines no flag twice)."""
  flags.DEFINE_string(
      'out',
      None,
      'The directory for benchmark.json and ' 'benchmark.md (made if missing).',
  )
  flags.mark_flags_as_required(['out'])


CONFIG = pathlib.Path(__file__).parent.parent / 'configs' / 'default.py'
PRESET = [
    f'--config={CONFIG}',
    '--depths=20,56,110',
    '--batch_sizes=128',
    '--dtypes=float32,bfloat16',
    '--modes=train',
    '--steps_per_dispatch=1,16',
    '--seeds=1,5',
    '--min_seconds=0.5',
    '--repeats=3',
    '--max_seconds=240',
]
COLUMNS = (
    'model',
    'dtype',
    'K',
    'seeds',
    'placement',
    'devices',
    'images/s',
    'spread',
    'per seed',
    'compile s',
    'PyTorch',
    'ratio',
)


def markdown(rows: list[dict]) -> str:
  """The rows as a Markdown table: images/s are medians of the repeats,
  spread is their range over the median."""
  lines = [
      '| ' + ' | '.join(COLUMNS) + ' |',
      '| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | '
      '---: | ---: | ---: |',
  ]
  for row in rows:
    torch_ips = row.get('pytorch_images_per_s')
    cells = [
        row['model'],
        row['dtype'],
        row['steps_per_dispatch'],
        row['seeds'],
        row['placement'],
        row['devices'],
        f'{row["images_per_s"]:,.0f}',
        f'{row["spread"]:.0%}',
        f'{row["images_per_s_per_seed"]:,.0f}',
        f'{row["compile_s"]:.1f}',
        f'{torch_ips:,.0f}' if torch_ips else '-',
        f'{row["ratio"]:.2f}' if torch_ips else '-',
    ]
    lines.append('| ' + ' | '.join(map(str, cells)) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv):
  start = time.perf_counter()
  out = pathlib.Path(FLAGS.out)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise benchmark.BenchmarkError(f'--out: cannot make {out}: {e}')
  rows, skipped = benchmark.main(argv)
  seconds = time.perf_counter() - start
  device = jax.devices()[0]
  (out / 'benchmark.json').write_text(
      json.dumps(
          {
              'command': ' '.join(sys.argv),
              'seconds': seconds,
              'jax_version': jax.__version__,
              'backend': jax.default_backend(),
              'device_kind': device.device_kind,
              'device_count': jax.device_count(),
              'rows': rows,
              'skipped': skipped,
          },
          indent=1,
      )
      + '\n'
  )
  (out / 'benchmark.md').write_text(
      f'{jax.device_count()} x {device.device_kind} '
      f'({jax.default_backend()}), jax {jax.__version__}, '
      f'{seconds:.0f} s in all. images/s: median of {FLAGS.repeats} '
      'interleaved repeats; spread: their range over the median.\n\n'
      + markdown(rows)
      + (
          f'\nSkipped to end within --max_seconds={FLAGS.max_seconds:g}:\n\n'
          + ''.join(f'- {line}\n' for line in skipped)
          if skipped
          else ''
      )
  )
  print(
      f'wrote {out / "benchmark.json"} and {out / "benchmark.md"} '
      f'({seconds:.0f} s)',
      flush=True,
  )


if __name__ == '__main__':
  define_flags()
  # The preset first: flags given on the command line come after and win.
  sys.argv[1:1] = PRESET
  benchmark.define_flags()
  cli.run(main)
