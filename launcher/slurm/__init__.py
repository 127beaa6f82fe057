"""``unet-train distributed --scheduler slurm``: one batch job instead of SSH to named hosts.

job.py renders the batch script, client.py talks to sbatch/scontrol/sinfo/scancel, doctor.py
checks the partition and its limits, follow.py turns the job's output into labelled lines,
launch.py drives submit -> stream -> cancel, and task.py runs inside the allocation (one per
Slurm task) to turn SLURM_PROCID into a Horovod rank or a PS/worker/chief role. The process
srun starts for each task is a command (``python -m trainer.commands.slurm_role``, job.RUNNER),
which runs that role in itself so that Slurm's SIGUSR1/SIGTERM reach the Python that checkpoints
on them (exit 75: requeue me); walltime.py reads Slurm's time limits.
"""
