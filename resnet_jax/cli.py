"""What the command lines (main, sweep, report, benchmark) share.

A user's mistake (a bad flag, config, workdir or data) is one ``error:`` line
on stderr and exit status 2; a warning is one ``warning:`` line; the log
keeps to what a user needs.
"""

from collections.abc import Callable
import logging as std_logging
import re
import sys
import warnings

from absl import app
from absl import flags
from absl import logging

from resnet_jax import atomic
from resnet_jax import models


class UserError(ValueError):
  """What a user's config, flags, data or workdir make a command raise: one
  ``error:`` line and exit status 2 (each module's errors derive from it)."""


# The networks import nothing of the command line: their error is listed here.
USER_ERRORS = (UserError, models.ModelError)


def fail(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


# What TensorStore (orbax's reader and writer) appends to an error: its whole
# spec and source locations, ``[tensorstore_spec='{...}']``, thousands of
# characters that say nothing to a user.
ANNOTATION = re.compile(r"\s*\[[\w ]+(\[\d+\])?='")


def first_line(error: BaseException) -> str:
  """A library's exception in one line: its type and the first line of its
  message that says something (many have none, or start with a blank),
  without TensorStore's annotations."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return type(error).__name__ + (
      f': {ANNOTATION.split(lines[0], maxsplit=1)[0]}' if lines else ''
  )


def quiet(record) -> bool:
  """Drops orbax's per-save INFO lines, its note that an evaluation opened
  the checkpoints read-only, its line about each checkpoint without its
  metadata (a deletion killed half-way, which the next save removes; the
  restore of such a checkpoint says it has no checksum), its threads'
  tracebacks of an error that the save raises again (and the command
  reports), asyncio's report of the reads orbax abandons when one read of a
  checkpoint fails (TensorStore's errors of the same file, the first already
  raised), and jax's line about each platform it did not find (TPU on every
  CPU machine)."""
  message = record.getMessage()
  if record.levelno >= std_logging.WARNING:
    return not (
        message.startswith('Given directory is read only')
        or (
            'orbax' in record.pathname
            and (
                'raised an exception' in message
                or message.startswith('Metadata file does not exist')
            )
        )
        or (record.name == 'asyncio' and 'tensorstore_spec=' in message)
    )
  return not (
      'orbax' in record.pathname
      or message.startswith('Unable to initialize backend')
  )


def one_line_warning(message, category, filename, lineno, line=None) -> str:
  del category, filename, lineno, line  # Where in the code is not news.
  return f'warning: {message}\n'


def unraisable(hook):
  """``sys.unraisablehook`` without TensorStore's callbacks into a closed
  event loop: when orbax's read of a broken checkpoint fails, its other
  reads still complete, each after orbax has closed the event loop they
  were to report to (dozens of tracebacks, nothing lost: the read was
  abandoned and its error already raised)."""

  def without_closed_loops(unraisable_args):
    if not (
        isinstance(unraisable_args.exc_value, RuntimeError)
        and str(unraisable_args.exc_value) == 'Event loop is closed'
    ):
      hook(unraisable_args)

  return without_closed_loops


def parse_flags(argv):
  """absl's parser, with a flag error as one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
  except (AttributeError, KeyError) as e:  # --config.<unknown field>=...
    if 'get_config' in str(e):
      fail(
          'the config file defines no get_config() (a function returning '
          'the ConfigDict, as in configs/default.py)'
      )
    field = str(e).strip('"\'')
    fail(
        f'unknown config field {field!r} (every field is in '
        'configs/default.py)'
    )
  except Exception as e:  # pylint: disable=broad-except
    # A config file's own code raised (a syntax error, a bad import).
    fail(f'cannot load the config file: {type(e).__name__}: {e}')


def user_message(error: BaseException) -> str | None:
  """The error line a command prints for ``error``: a user's mistake
  (``USER_ERRORS``) or a full disk. None: a bug, whose traceback shows."""
  if isinstance(error, USER_ERRORS):
    return str(error)
  if isinstance(error, OSError) and atomic.is_full(error):
    return atomic.full_disk(error.filename or '.')
  return None


def run(main: Callable[[list[str]], None]):
  """``app.run(main)``, with a user's mistake or a full disk
  (``user_message``) reported as one error line."""
  warnings.formatwarning = one_line_warning
  sys.unraisablehook = unraisable(sys.unraisablehook)

  def guarded(argv):
    logging.get_absl_handler().python_handler.addFilter(quiet)
    try:
      main(argv)
    except Exception as e:  # pylint: disable=broad-except
      message = user_message(e)
      if message is None:
        raise
      fail(message)

  app.run(guarded, flags_parser=parse_flags)
