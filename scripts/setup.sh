#!/usr/bin/env bash
# One idempotent set-up step for a fresh Debian machine (or an existing checkout):
# apt packages, .venv, pinned Python deps, Horovod built from source (TF + Gloo + MPI),
# then this package in editable mode. Each stage is skipped when already satisfied,
# so a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3}
HOROVOD_VERSION=0.28.1
# python3-venv/python3-dev: a bare Debian has neither ensurepip (venv) nor Python.h (Horovod build).
APT_PACKAGES=(python3 python3-venv python3-dev build-essential cmake openmpi-bin libopenmpi-dev
              openssh-client openssh-server rsync numactl hwloc procps iproute2 chromium)

log() { printf '[setup] %s\n' "$*"; }

missing_apt=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing_apt+=("$pkg")
done
if ((${#missing_apt[@]})); then
  log "apt: installing ${missing_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing_apt[@]}" >/dev/null
else
  log "apt: all packages present"
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "venv: creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip setuptools wheel
fi

stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "pip: installing requirements.txt"
  "$VENV/bin/pip" install -q -r requirements.txt
  echo "$want" > "$stamp"
else
  log "pip: requirements unchanged"
fi

if ! "$VENV/bin/python" -c "import horovod, horovod.tensorflow as h; assert horovod.__version__ == '$HOROVOD_VERSION'; assert h.gloo_built() and h.mpi_built()" 2>/dev/null; then
  log "horovod: building $HOROVOD_VERSION from source (TensorFlow + Gloo + MPI), ~3-5 min"
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
  HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=GLOO \
  MAKEFLAGS="-j$(nproc)" \
    "$VENV/bin/pip" install -q --no-cache-dir --no-build-isolation "horovod==$HOROVOD_VERSION"
else
  log "horovod: $HOROVOD_VERSION present with Gloo + MPI"
fi

if ! (cd / && "$VENV/bin/python" -c "import trainer, launcher") 2>/dev/null || [ ! -x "$VENV/bin/unet-train" ]; then
  log "package: installing unet-train (editable)"
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
else
  log "package: unet-train installed"
fi
log "done"
