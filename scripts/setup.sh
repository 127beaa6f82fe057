#!/usr/bin/env bash
# One idempotent set-up step for a fresh Debian machine (or an existing checkout):
# apt packages, .venv, pinned Python deps, Horovod built from source (TF + Gloo + MPI),
# then this package in editable mode. Each stage is skipped when already satisfied,
# so a second run takes seconds.
#   scripts/setup.sh            CPU nodes (tensorflow-cpu, Horovod with Gloo + MPI)
#   scripts/setup.sh --gpu      GPU nodes (same as UNET_TRAIN_GPU=1): tensorflow (CUDA wheels) instead
#                               of tensorflow-cpu, Horovod also built with NCCL (needs the CUDA toolkit)
#   scripts/setup.sh --dry-run  print what would be installed and built, change nothing
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3}
HOROVOD_VERSION=0.28.1
GPU=${UNET_TRAIN_GPU:-0}
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --gpu) GPU=1 ;;
    --dry-run) DRY_RUN=1 ;;
    *) echo "setup.sh: unknown option '$arg' (expected --gpu, --dry-run)" >&2; exit 2 ;;
  esac
done
case "$GPU" in 0|1) ;; *) echo "setup.sh: UNET_TRAIN_GPU must be 0 or 1, got '$GPU'" >&2; exit 2 ;; esac
# shellcheck source=stack-choice.sh
. scripts/stack-choice.sh
stack_choice "$GPU"
VARIANT=$([ "$GPU" = 1 ] && echo gpu || echo cpu)

# python3-venv/python3-dev: a bare Debian has neither ensurepip (venv) nor Python.h (Horovod build).
# openssh-server, slurm-wlm and munge are test dependencies: the launcher tests start their own
# sshd hosts and a single-node Slurm (slurmctld + slurmd + munged) on 127.0.0.1.
APT_PACKAGES=(python3 python3-venv python3-dev build-essential cmake openmpi-bin libopenmpi-dev
              openssh-client openssh-server rsync numactl hwloc procps iproute2 chromium
              slurm-wlm munge)

log() { printf '[setup] %s\n' "$*"; }

missing_apt=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing_apt+=("$pkg")
done

if [ "$DRY_RUN" = 1 ]; then
  log "dry run: nothing is installed or changed"
  log "variant: $VARIANT"
  log "apt: ${missing_apt[*]:-all packages present}"
  log "tensorflow: $TF_REQUIREMENT (removed if present: $TF_OTHER)"
  log "horovod $HOROVOD_VERSION build: $HOROVOD_BUILD_ENV"
  exit 0
fi

if ((${#missing_apt[@]})); then
  log "apt: installing ${missing_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # policy-rc.d-style: the packages' own services (munge, slurmctld, slurmd) are not needed; the
  # tests start private instances. Where a package starts its service anyway, that is harmless.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing_apt[@]}" >/dev/null
else
  log "apt: all packages present"
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "venv: creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip setuptools wheel
fi

variant_stamp="$VENV/.stack-variant"
if [ "$(cat "$variant_stamp" 2>/dev/null || echo cpu)" != "$VARIANT" ]; then
  log "variant: switching to $VARIANT (removing $TF_OTHER and the Horovod built for the other one)"
  "$VENV/bin/pip" uninstall -q -y "$TF_OTHER" horovod 2>/dev/null || true
fi

requirements="$VENV/.requirements-$VARIANT.txt"
stack_requirements requirements.txt > "$requirements"
stamp="$VENV/.requirements.sha256"
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "pip: installing requirements.txt ($TF_REQUIREMENT)"
  "$VENV/bin/pip" install -q -r "$requirements"
  echo "$want" > "$stamp"
else
  log "pip: requirements unchanged"
fi
echo "$VARIANT" > "$variant_stamp"

nccl_check=""
[ "$GPU" = 1 ] && nccl_check="; assert h.nccl_built()"
if ! "$VENV/bin/python" -c "import horovod, horovod.tensorflow as h; assert horovod.__version__ == '$HOROVOD_VERSION'; assert h.gloo_built() and h.mpi_built()$nccl_check" 2>/dev/null; then
  log "horovod: building $HOROVOD_VERSION from source ($HOROVOD_BUILD_ENV), ~3-5 min"
  # shellcheck disable=SC2086  # HOROVOD_BUILD_ENV is a list of NAME=value words
  env $HOROVOD_BUILD_ENV MAKEFLAGS="-j$(nproc)" \
    "$VENV/bin/pip" install -q --no-cache-dir --no-build-isolation "horovod==$HOROVOD_VERSION"
else
  log "horovod: $HOROVOD_VERSION present with Gloo + MPI${nccl_check:+ + NCCL}"
fi

if ! (cd / && "$VENV/bin/python" -c "import trainer, launcher") 2>/dev/null || [ ! -x "$VENV/bin/unet-train" ]; then
  log "package: installing unet-train (editable)"
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
else
  log "package: unet-train installed"
fi
log "done"
