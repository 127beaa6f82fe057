# Sourced (POSIX sh) by scripts/setup.sh and the Dockerfile: the one place that turns the
# CPU/GPU choice into the TensorFlow requirement and Horovod's build flags, so a GPU node or
# image needs no hand edits.
#   stack_choice 0|1         sets TF_REQUIREMENT, TF_OTHER (the TensorFlow to remove) and
#                            HOROVOD_BUILD_ENV (NAME=value ..., for `env`)
#   stack_requirements FILE  prints FILE with its tensorflow-cpu line replaced by TF_REQUIREMENT
# Same TensorFlow version either way: Horovod 0.28.1 breaks on TF >= 2.16 / Keras 3 (horovod#4290).
TF_VERSION=2.15.1
HOROVOD_VERSION=0.28.1   # built from source against the MPI found on PATH (its sdist: requirements/horovod.lock)

stack_choice() {
  HOROVOD_BUILD_ENV="HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=GLOO"
  if [ "$1" = 1 ]; then
    # tensorflow with its CUDA 12 / cuDNN wheels ([and-cuda]); Horovod's allreduce on GPUs via NCCL
    TF_REQUIREMENT="tensorflow[and-cuda]==$TF_VERSION"
    TF_OTHER=tensorflow-cpu
    HOROVOD_BUILD_ENV="$HOROVOD_BUILD_ENV HOROVOD_GPU_OPERATIONS=NCCL"
  else
    TF_REQUIREMENT="tensorflow-cpu==$TF_VERSION"
    TF_OTHER=tensorflow
  fi
}

stack_requirements() {
  sed "s/^tensorflow-cpu==$TF_VERSION\$/$TF_REQUIREMENT/" "$1"
}
