# Runtime image for unet-train: Debian 12, Python 3.11, pinned TF 2.15.1 CPU stack and
# Horovod 0.28.1 built with TensorFlow + Gloo + MPI (the same recipe as scripts/setup.sh).
# GPU image: base on an nvidia/cuda image and see README "GPU nodes".
FROM python:3.11-slim-bookworm

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 \
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 TF_CPP_MIN_LOG_LEVEL=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake openmpi-bin libopenmpi-dev \
      openssh-client rsync numactl hwloc procps \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN python -m pip install -U pip wheel && python -m pip install -r requirements.txt
RUN HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
    HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=GLOO \
    MAKEFLAGS=-j"$(nproc)" python -m pip install --no-build-isolation horovod==0.28.1 \
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
