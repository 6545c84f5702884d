"""Command-line plumbing shared by train.py and eval.py."""
from __future__ import annotations

import functools
import re
import sys
from typing import Callable

from absl import flags, logging

from bsparse import checkpoints, data, train_lib, validate

# Errors a user can fix, and the exit status of each: 2 for a bad command line or config.
EXIT_CODES = (
    (validate.ConfigError, 2),
    (checkpoints.WorkdirConflictError, 2),
    (data.DatasetUnavailableError, 1),
    (checkpoints.CheckpointError, 1),
    (train_lib.NonFiniteError, 1),
)


def _clean(e: Exception) -> str:
  text = str(e).replace("\\n", "\n").replace("\\'", "'")
  return re.sub(r"^['\"]+|['\"]+$", "", text.strip()).replace("'\n", "\n")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that turns a bad ``--config.*`` override into a short message that
  names the override (and the closest valid key), instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    text = _clean(e)
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    culprit = next((o for o in overrides
                    if any(re.search(rf"\b{re.escape(part)}\b", text)
                           for part in o.split(".")[1:])), "--config")
    msg = f"Unknown config key in {culprit}: {text}"
  except flags.Error as e:
    msg = f"Bad flag: {_clean(e)}"
  sys.stderr.write(f"{msg}\nRun with --helpfull to list flags; config keys are the fields "
                   "of the config file's get_config().\n")
  sys.exit(2)


def quiet_logging(argv: list[str]) -> None:
  """Checkpoint libraries log every save at INFO; show warnings only unless -v is given."""
  if not any(a.startswith(("--verbosity", "-v")) for a in argv[1:]):
    logging.set_verbosity(logging.WARNING)


def clean_exit(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """Wraps an absl ``main`` so that the errors of EXIT_CODES print their message alone
  (no traceback) and exit with their status, and a stop on SIGTERM/SIGINT prints where
  the run was saved and exits with 128 + the signal number."""

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except train_lib.Interrupted as e:
      sys.stderr.write(f"{e}\n")
      sys.exit(e.exit_code)
    except KeyboardInterrupt:
      sys.stderr.write("Interrupted without saving; rerunning resumes from the latest "
                       "checkpoint.\n")
      sys.exit(130)
    except tuple(error for error, _ in EXIT_CODES) as e:
      sys.stderr.write(f"Error: {e}\n")
      sys.exit(next(code for error, code in EXIT_CODES if isinstance(e, error)))

  return wrapped
