"""Helpers the tests share: processes, sshd hosts, a Slurm cluster, tiny datasets, CLI runs."""
