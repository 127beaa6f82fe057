"""The commands of ``unet-train``: one module each, composing the libraries below them.

``args`` is the grammar, ``settings`` how a command's settings are loaded, ``dispatch`` runs a
command by name. This package imports nothing on import: ``python -m
trainer.commands.slurm_role`` takes Slurm's signals before any slow import.
"""
