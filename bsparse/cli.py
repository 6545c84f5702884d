"""Command-line plumbing shared by train.py and eval.py."""
from __future__ import annotations

import re
import sys

from absl import flags, logging


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
