#!/usr/bin/env bash
# Installs what bsparse needs: the Python packages (pinned) and, where apt exists, the
# offline Fashion-MNIST files (/usr/share/datasets/fashion-mnist). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    $SUDO apt-get update -qq || echo "apt-get update failed; continuing" >&2
    $SUDO apt-get install -y -qq dataset-fashion-mnist \
      || echo "Could not install dataset-fashion-mnist; TFDS will be used for Fashion-MNIST." >&2
  fi
fi

python3 -m pip install -q --disable-pip-version-check -r requirements.txt
