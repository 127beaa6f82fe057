#!/usr/bin/env bash
# One idempotent set-up step for a fresh Debian machine, an existing checkout, or a login node:
# apt packages (unless --no-system), .venv, the hash-pinned Python stack (requirements/*.lock,
# pip --require-hashes), Horovod built from source (TF + Gloo + the MPI found on PATH), then this
# package in editable mode. Each stage is skipped when already satisfied, so a second run takes
# seconds.
#   scripts/setup.sh              CPU nodes (tensorflow-cpu, Horovod with Gloo + MPI)
#   scripts/setup.sh --gpu        GPU nodes (same as UNET_TRAIN_GPU=1): tensorflow (CUDA wheels) instead
#                                 of tensorflow-cpu, Horovod also built with NCCL (needs the CUDA toolkit)
#   scripts/setup.sh --no-system  nothing that needs root (no apt, no sudo): a login node whose site
#                                 provides Python, compilers, MPI and Slurm, e.g.
#                                   module load gcc cmake openmpi python/3.11
#                                   scripts/setup.sh --no-system
#                                 Horovod is then built against that module's MPI (mpicc/mpirun on PATH)
#   scripts/setup.sh --dry-run    print what would be installed and built, change nothing
# Where sbatch is already on PATH (a cluster with its own Slurm), slurm-wlm and munge are never
# installed: they are only the tests' single-node Slurm.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3}
GPU=${UNET_TRAIN_GPU:-0}
DRY_RUN=0
SYSTEM=1
for arg in "$@"; do
  case "$arg" in
    --gpu) GPU=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --no-system) SYSTEM=0 ;;
    *) echo "setup.sh: unknown option '$arg' (expected --gpu, --no-system, --dry-run)" >&2; exit 2 ;;
  esac
done
case "$GPU" in 0|1) ;; *) echo "setup.sh: UNET_TRAIN_GPU must be 0 or 1, got '$GPU'" >&2; exit 2 ;; esac
# shellcheck source=stack-choice.sh
. scripts/stack-choice.sh
stack_choice "$GPU"
VARIANT=$([ "$GPU" = 1 ] && echo gpu || echo cpu)
LOCK="requirements/$VARIANT.lock"

# python3-venv/python3-dev: a bare Debian has neither ensurepip (venv) nor Python.h (Horovod build).
# openssh-server, slurm-wlm and munge are test dependencies: the launcher tests start their own
# sshd hosts and a single-node Slurm (slurmctld + slurmd + munged) on 127.0.0.1; chromium renders
# TensorBoard in its test.
APT_PACKAGES=(python3 python3-venv python3-dev build-essential cmake openmpi-bin libopenmpi-dev
              openssh-client openssh-server rsync numactl hwloc procps iproute2 chromium)
SITE_SLURM=$(command -v sbatch || true)
if [ -z "$SITE_SLURM" ]; then
  APT_PACKAGES+=(slurm-wlm munge)
fi

log() { printf '[setup] %s\n' "$*"; }

real_dir() { (cd "$(dirname "$1")" && pwd -P); }

# The MPI Horovod is built against: whatever mpicc/mpirun come first on PATH (a site module, or
# Debian's Open MPI once apt has installed it).
mpi_on_path() {
  local mpirun mpicc
  mpirun=$(command -v mpirun || true)
  [ -n "$mpirun" ] || return 1
  mpicc=$(command -v mpicc || true)
  # folders resolved (/bin -> /usr/bin), so the same MPI always reads the same
  printf '%s (%s; mpicc %s)' "$("$mpirun" --version 2>/dev/null | head -n 1)" "$(real_dir "$mpirun")/mpirun" \
    "$([ -n "$mpicc" ] && echo "$(real_dir "$mpicc")/mpicc" || echo 'not found')"
}

missing_apt=()
if [ "$SYSTEM" = 1 ]; then
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing_apt+=("$pkg")
  done
fi

if [ "$DRY_RUN" = 1 ]; then
  log "dry run: nothing is installed or changed"
  log "variant: $VARIANT"
  if [ "$SYSTEM" = 1 ]; then
    log "apt: ${missing_apt[*]:-all packages present}"
  else
    log "apt: skipped (--no-system: nothing that needs root)"
  fi
  if [ -n "$SITE_SLURM" ]; then
    log "slurm: sbatch on PATH ($SITE_SLURM): slurm-wlm and munge are not installed"
  else
    log "slurm: none on PATH: slurm-wlm + munge from apt (the tests' single-node Slurm)"
  fi
  log "mpi: $(mpi_on_path || echo "none on PATH yet$([ "$SYSTEM" = 1 ] && echo ' (apt installs Open MPI)' || echo ': load your site MPI module first')")"
  log "tensorflow: $TF_REQUIREMENT (removed if present: $TF_OTHER)"
  log "apt wanted: $([ "$SYSTEM" = 1 ] && echo "${APT_PACKAGES[*]}" || echo none)"
  log "python packages: $LOCK (pip install --require-hashes)"
  log "horovod $HOROVOD_VERSION build: $HOROVOD_BUILD_ENV"
  exit 0
fi

if [ "$SYSTEM" = 0 ]; then
  log "apt: skipped (--no-system)"
  need=()
  for tool in "$PY" cc c++ cmake mpicc mpirun; do
    command -v "$tool" >/dev/null || need+=("$tool")
  done
  if ((${#need[@]})); then
    echo "setup.sh: --no-system: not found on PATH: ${need[*]}; load the site's modules first (e.g. module load gcc cmake openmpi python/3.11), or run setup.sh without --no-system as root" >&2
    exit 2
  fi
elif ((${#missing_apt[@]})); then
  log "apt: installing ${missing_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # policy-rc.d-style: the packages' own services (munge, slurmctld, slurmd) are not needed; the
  # tests start private instances. Where a package starts its service anyway, that is harmless.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing_apt[@]}" >/dev/null
else
  log "apt: all packages present"
fi
[ -z "$SITE_SLURM" ] || log "slurm: sbatch on PATH ($SITE_SLURM): slurm-wlm and munge are not installed"

if [ ! -x "$VENV/bin/python" ]; then
  log "venv: creating $VENV"
  "$PY" -m venv "$VENV"
fi

variant_stamp="$VENV/.stack-variant"
if [ "$(cat "$variant_stamp" 2>/dev/null || echo cpu)" != "$VARIANT" ]; then
  log "variant: switching to $VARIANT (removing $TF_OTHER and the Horovod built for the other one)"
  "$VENV/bin/pip" uninstall -q -y "$TF_OTHER" horovod 2>/dev/null || true
fi

stamp="$VENV/.requirements.sha256"
want=$(sha256sum "$LOCK" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "pip: installing $LOCK ($TF_REQUIREMENT; every file checked against its sha256)"
  "$VENV/bin/pip" install -q --require-hashes -r "$LOCK"
  echo "$want" > "$stamp"
else
  log "pip: $LOCK unchanged"
fi
echo "$VARIANT" > "$variant_stamp"

MPI=$(mpi_on_path) || { echo "setup.sh: no mpirun on PATH: Horovod needs an MPI (load the site's MPI module, or run without --no-system)" >&2; exit 2; }
mpi_stamp="$VENV/.horovod-mpi"
nccl_check=""
[ "$GPU" = 1 ] && nccl_check="; assert h.nccl_built()"
built=1
"$VENV/bin/python" -c "import horovod, horovod.tensorflow as h; assert horovod.__version__ == '$HOROVOD_VERSION'; assert h.gloo_built() and h.mpi_built()$nccl_check" 2>/dev/null || built=0
if [ "$built" = 1 ] && [ ! -e "$mpi_stamp" ]; then
  echo "$MPI" > "$mpi_stamp"  # built before the stamp existed: taken to be against this MPI
fi
if [ "$built" = 0 ] || [ "$(cat "$mpi_stamp")" != "$MPI" ]; then
  [ "$built" = 0 ] || log "horovod: was built against $(cat "$mpi_stamp"); the MPI on PATH is now $MPI"

  log "horovod: building $HOROVOD_VERSION from source against $MPI ($HOROVOD_BUILD_ENV), ~3-5 min"
  sdist=$(mktemp -d)
  # the source distribution checked against requirements/horovod.lock, then built here
  "$VENV/bin/pip" download -q --require-hashes --no-deps --no-binary horovod -d "$sdist" -r requirements/horovod.lock
  # shellcheck disable=SC2086  # HOROVOD_BUILD_ENV is a list of NAME=value words
  env $HOROVOD_BUILD_ENV MAKEFLAGS="-j$(nproc)" \
    "$VENV/bin/pip" install -q --no-cache-dir --no-build-isolation --force-reinstall --no-deps "$sdist"/horovod-*.tar.gz
  rm -rf "$sdist"
  echo "$MPI" > "$mpi_stamp"
else
  log "horovod: $HOROVOD_VERSION present with Gloo + MPI${nccl_check:+ + NCCL}, built against $MPI"
fi

if ! (cd / && "$VENV/bin/python" -c "import trainer, launcher") 2>/dev/null || [ ! -x "$VENV/bin/unet-train" ]; then
  log "package: installing unet-train (editable)"
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
else
  log "package: unet-train installed"
fi
log "done"
