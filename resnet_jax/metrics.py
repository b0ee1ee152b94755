"""metrics.jsonl: a run's history, one JSON record per (step, split).

  {"step": 2000, "split": "validation", "error": 8.71, "top5_error": 0.3, ...}

Splits: ``train`` (means over the steps since the last record, the learning
rate, steps per second), ``validation`` or ``test`` (evaluations during
training; errors in %), ``final_test`` (the run's result: the test set after
the last step). The training loop appends to it (``append``, on process 0),
``read`` serves the sweep and the report, and a resumed run first edits it
(``keep_until``, ``move_aside``) so that it reads as one uninterrupted run.
"""

import json
import pathlib
import time

from resnet_jax import atomic

FILENAME = 'metrics.jsonl'
TRAIN, VALIDATION, TEST, FINAL_TEST = (
    'train',
    'validation',
    'test',
    'final_test',
)


def line(step: int, split: str, values) -> str:
  return (
      json.dumps(
          {
              'step': step,
              'split': split,
              **{k: float(v) for k, v in values.items()},
          }
      )
      + '\n'
  )


def append(workdir: pathlib.Path, step: int, split: str, values):
  """Appends a record: one line, written when it comes (a resume trims the
  file to its checkpoint)."""
  path = workdir / FILENAME
  with atomic.naming(path), path.open('a') as f:
    f.write(line(step, split, values))


def _lines(workdir: pathlib.Path) -> list[tuple[dict, str]]:
  """(record, line) pairs. A line a kill cut short is not a record, nor is
  any other line that is not one (bytes that are not UTF-8, JSON of other
  types, an edit by hand): none is read, and a resume drops them."""
  path = workdir / FILENAME
  if not path.exists():
    return []
  pairs = []
  for raw in path.read_bytes().splitlines():
    try:
      text = raw.decode()
      record = json.loads(text)
    except ValueError:  # UnicodeDecodeError is one.
      continue
    if (
        isinstance(record, dict)
        and isinstance(record.get('split'), str)
        and type(record.get('step')) is int
    ):
      pairs.append((record, text))
  return pairs


def read(workdir) -> list[dict]:
  """A run's records, in order ([] if it has none)."""
  return [record for record, _ in _lines(pathlib.Path(workdir))]


def final_test(records: list[dict]) -> dict | None:
  """The run's result (the last final test record), if it finished."""
  finals = [r for r in records if r['split'] == FINAL_TEST]
  return finals[-1] if finals else None


def keep_until(workdir: pathlib.Path, step: int):
  """Drops the records after ``step``, and the final test: what a killed run
  logged after the checkpoint its resume starts from. Atomic: a kill during
  the rewrite leaves the history before the checkpoint."""
  path = workdir / FILENAME
  if path.exists():
    atomic.write(
        path,
        ''.join(
            text + '\n'
            for record, text in _lines(workdir)
            if record['step'] <= step and record['split'] != FINAL_TEST
        ),
    )


def move_aside(workdir: pathlib.Path):
  """Renames the file (a run trained again from step 0 starts a new one)."""
  path = workdir / FILENAME
  if path.exists():
    aside = path.with_name(f'metrics.replaced-{int(time.time())}.jsonl')
    path.rename(aside)
    print(f'note: the old metrics are in {aside}', flush=True)
