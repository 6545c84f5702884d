#!/usr/bin/env bash
# Installs what bsparse needs: the Python packages (pinned), where apt exists the offline
# Fashion-MNIST files (/usr/share/datasets/fashion-mnist) and a C++ compiler, and builds the
# CPU block-sparse kernels (bsparse/kernels/cpu_kernels.cc). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=()
[ -d /usr/share/datasets/fashion-mnist ] || PACKAGES+=(dataset-fashion-mnist)
command -v c++ >/dev/null || command -v g++ >/dev/null || PACKAGES+=(g++)
if [ ${#PACKAGES[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    $SUDO apt-get update -qq || echo "apt-get update failed; continuing" >&2
    for pkg in "${PACKAGES[@]}"; do
      $SUDO apt-get install -y -qq "$pkg" || echo "Could not install $pkg (without" \
        "dataset-fashion-mnist TFDS is used; without g++ block-sparse layers use XLA ops)." >&2
    done
  fi
fi

python3 -m pip install -q --disable-pip-version-check -r requirements.txt
python3 -c "from bsparse.kernels import cpu; cpu.build()" \
  || echo "CPU block-sparse kernels not built; bsr_matmul uses the XLA path." >&2
