"""Execution runtimes: how a training process relates to its peers (single, Horovod, PS)."""
