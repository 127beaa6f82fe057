#!/usr/bin/env bash
# The one command that makes the hash-pinned locks from requirements.txt (the pins people edit):
#   scripts/lock.sh            -> requirements/cpu.lock (tensorflow-cpu) and requirements/gpu.lock
#                                 (tensorflow[and-cuda]), every package and its dependencies pinned
#                                 with their sha256 hashes, for Linux x86-64 and Python 3.11
# scripts/setup.sh and the Dockerfile install a lock with `pip install --require-hashes`, so an
# install gets exactly these files or fails; tests/test_locks.py checks that each lock agrees
# with requirements.txt. Horovod is not in the locks: it is built from source against the local
# MPI (scripts/setup.sh), its sdist pinned by hash in requirements/horovod.lock.
# Needs uv (pip install uv==0.13.8; the venv of scripts/setup.sh has it) and the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-$(command -v uv || echo .venv/bin/uv)}
[ -x "$UV" ] || { echo "lock.sh: uv not found (pip install uv==0.13.8, or set UV=/path/to/uv)" >&2; exit 2; }
UV=$(realpath "$UV")
# shellcheck source=stack-choice.sh
. scripts/stack-choice.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for variant in cpu gpu; do
  stack_choice "$([ "$variant" = gpu ] && echo 1 || echo 0)"
  mkdir -p "$work/$variant"
  stack_requirements requirements.txt > "$work/$variant/requirements.txt"
  # run where the input is, so that the lock's "# via -r requirements.txt" names no temp folder
  (cd "$work/$variant" && "$UV" pip compile --quiet --generate-hashes --python-version 3.11 \
    --python-platform x86_64-unknown-linux-gnu --index-url https://pypi.org/simple --no-header --emit-index-url \
    --output-file "$OLDPWD/requirements/$variant.lock" requirements.txt)
  { echo "# requirements/$variant.lock: made by scripts/lock.sh from requirements.txt ($TF_REQUIREMENT);"
    echo "# do not edit: change requirements.txt and run scripts/lock.sh again."
    cat "requirements/$variant.lock"; } > "$work/lock" && mv "$work/lock" "requirements/$variant.lock"
  echo "lock.sh: requirements/$variant.lock ($(grep -c '==' "requirements/$variant.lock") packages)"
done
# Horovod's source distribution (setup.sh and the Dockerfile build it), by hash too
echo "horovod==$HOROVOD_VERSION" > "$work/horovod.in"
(cd "$work" && "$UV" pip compile --quiet --generate-hashes --no-deps --python-version 3.11 \
  --python-platform x86_64-unknown-linux-gnu --index-url https://pypi.org/simple --no-header --emit-index-url \
  --output-file "$OLDPWD/requirements/horovod.lock" horovod.in)
echo "lock.sh: requirements/horovod.lock"
