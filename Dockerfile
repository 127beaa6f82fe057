# syntax=docker/dockerfile:1
# unet-train image: Python 3.11, the TF 2.15.1 stack from a hash-pinned lock (requirements/*.lock,
# made by scripts/lock.sh) and Horovod 0.28.1 built with TensorFlow + Gloo + MPI, the recipe of
# scripts/setup.sh (same choice logic: scripts/stack-choice.sh). Two stages: the builder has the
# compilers and makes the Horovod wheel; the runtime stage gets the virtual environment, the MPI
# and ssh runtime, and no compiler. It runs as the non-root user mpiuser (uid 1000).
#
#   CPU: docker build -t unet-train .
#   GPU: docker build --build-arg GPU=1 --build-arg BASE_IMAGE=<a CUDA 12 devel image with Python 3.11> -t unet-train:gpu .
#        (tensorflow[and-cuda] from requirements/gpu.lock; Horovod also built with NCCL, which needs
#        the base image's CUDA toolkit)
#
# BASE_IMAGE must provide Python 3.11 as `python` and Debian/Ubuntu apt. Pin it by digest for a
# build that reproduces (docker buildx imagetools inspect python:3.11-slim-bookworm):
#   --build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:<digest>
# Other bases, each with their own TensorFlow:
#   NVIDIA NGC TensorFlow (nvcr.io/nvidia/tensorflow:<yy.mm>-tf2-py3) and Intel oneAPI
#   (intel/intel-optimized-tensorflow:<tag>) ship TensorFlow, their MPI (NGC: Open MPI and
#   Horovod) and their Python; use them with --build-arg LOCK=none so that nothing from the locks
#   replaces their TensorFlow: the build then installs only this package's own dependencies
#   (pip install .), and builds Horovod against the MPI on the image's PATH. Their Python must be
#   3.10/3.11 and their TensorFlow 2.15 (Horovod 0.28.1 breaks on Keras 3).
#
# MPIJob workers (unet-train manifests --target kubeflow) run sshd for mpirun: the ssh client and
# server settings mpi-operator relies on come from docker/ssh/ (one source, parsed by the tests).
ARG BASE_IMAGE=python:3.11-slim-bookworm
# The runtime stage's base: the same image by default (its Python is where the venv points). For GPU
# builds, a CUDA *runtime* image with Python 3.11 at the same path keeps nvcc out of the result.
ARG RUNTIME_IMAGE=${BASE_IMAGE}

# ---------------------------------------------------------------- builder: compilers, the venv, the Horovod wheel
FROM ${BASE_IMAGE} AS builder
ARG GPU=0
ARG LOCK=auto
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# Open MPI 4.1.4 is Debian 12's; the runtime stage installs the same library (libopenmpi3)
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake openmpi-bin libopenmpi-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY scripts/stack-choice.sh requirements.txt ./
COPY requirements/ ./requirements/
# LOCK=none: the venv sees the base image's own TensorFlow (NGC, Intel) through its site-packages
RUN if [ "$LOCK" = none ]; then python -m venv --system-site-packages /opt/venv; else python -m venv /opt/venv; fi
ENV PATH=/opt/venv/bin:$PATH
RUN . ./stack-choice.sh && stack_choice "$GPU" \
 && if [ "$LOCK" = none ]; then \
      echo "LOCK=none: keeping the base image's TensorFlow; no lock installed"; \
    else \
      variant=$([ "$GPU" = 1 ] && echo gpu || echo cpu) \
      && python -m pip install --require-hashes --no-deps -r "requirements/$variant.lock"; \
    fi \
 && python -m pip download --require-hashes --no-deps --no-binary horovod -d /build/sdist -r requirements/horovod.lock \
 && mpirun --version | head -n 1 \
 && env $HOROVOD_BUILD_ENV MAKEFLAGS=-j"$(nproc)" \
      python -m pip wheel --no-build-isolation --no-deps -w /build/wheels /build/sdist/horovod-*.tar.gz \
 && python -m pip install --no-deps /build/wheels/horovod-*.whl \
 && horovodrun --check-build
COPY setup.cfg pyproject.toml README.md settings.yaml ./
COPY trainer ./trainer
COPY launcher ./launcher
RUN if [ "$LOCK" = none ]; then python -m pip install --no-build-isolation . ; \
    else python -m pip install --no-deps --no-build-isolation . ; fi

# ---------------------------------------------------------------- runtime: no compilers, non-root
FROM ${RUNTIME_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 TF_CPP_MIN_LOG_LEVEL=1 PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends openmpi-bin libopenmpi3 openssh-client openssh-server \
      rsync numactl hwloc procps \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /run/sshd \
 && useradd --create-home --uid 1000 --shell /bin/bash mpiuser
# mpi-operator's ssh settings as drop-ins (Debian's ssh_config and sshd_config include *.conf there)
COPY docker/ssh/ssh_config.conf /etc/ssh/ssh_config.d/unet-train.conf
COPY docker/ssh/sshd_config.conf /etc/ssh/sshd_config.d/unet-train.conf
COPY --chown=mpiuser:mpiuser docker/ssh/mpiuser_sshd_config /home/mpiuser/.sshd_config
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY settings.yaml ./
RUN mkdir -p /app/data /app/runs && chown mpiuser:mpiuser /app/data /app/runs
USER mpiuser
# Data and runs are mounted: -v $PWD/data:/app/data -v $PWD/runs:/app/runs
VOLUME ["/app/data", "/app/runs"]
ENTRYPOINT ["unet-train"]
CMD ["--help"]
