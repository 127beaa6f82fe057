"""The training loop shared by every execution mode (single, Horovod, PS chief)."""
