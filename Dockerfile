# Runtime image for unet-train: Debian 12, Python 3.11, the pinned TF 2.15.1 stack and Horovod
# 0.28.1 built with TensorFlow + Gloo + MPI (the recipe of scripts/setup.sh, same choice logic:
# scripts/stack-choice.sh).
#   CPU: docker build -t unet-train .
#   GPU: docker build --build-arg GPU=1 --build-arg BASE_IMAGE=<a CUDA 12 devel image with Python 3.11> -t unet-train:gpu .
#        (tensorflow with CUDA wheels instead of tensorflow-cpu; Horovod also built with NCCL,
#        which needs the CUDA toolkit of the base image)
# openssh-server: MPIJob workers (unet-train manifests --target kubeflow) run sshd for mpirun.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG GPU=0

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 \
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 TF_CPP_MIN_LOG_LEVEL=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake openmpi-bin libopenmpi-dev \
      openssh-client openssh-server rsync numactl hwloc procps \
 && mkdir -p /run/sshd \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt scripts/stack-choice.sh ./
RUN . ./stack-choice.sh && stack_choice "$GPU" \
 && stack_requirements requirements.txt > /tmp/requirements.txt \
 && python -m pip install -U pip wheel && python -m pip install -r /tmp/requirements.txt \
 && env $HOROVOD_BUILD_ENV MAKEFLAGS=-j"$(nproc)" python -m pip install --no-build-isolation horovod==0.28.1 \
 && horovodrun --check-build

COPY setup.cfg pyproject.toml README.md settings.yaml ./
COPY trainer ./trainer
COPY launcher ./launcher
COPY playbooks ./playbooks
RUN python -m pip install --no-deps --no-build-isolation .

# Data and runs are mounted: -v $PWD/data:/app/data -v $PWD/runs:/app/runs
VOLUME ["/app/data", "/app/runs"]
ENTRYPOINT ["unet-train"]
CMD ["--help"]
