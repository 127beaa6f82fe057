"""The error hierarchy. The CLI entry point is the one place that turns an error into a
one-line message and an exit code (no traceback):

* ``UserError`` (exit 2): bad input the user can fix; the message names the file, key or
  host and what was expected.
* ``InfrastructureError`` (exit 3): the machines failed under a correct job (a lost
  parameter server, a dead control connection); rerunning after fixing the cluster resumes.
"""


class UserError(Exception):
    """Bad input the user can fix: the message names the file/key/host and what was expected."""

    exit_code = 2


class ConfigError(UserError):
    """settings.yaml or a --set override is invalid."""


class DataError(UserError):
    """A dataset file or folder is missing, corrupt, or not what the loader expects."""


class TrainingError(UserError):
    """A run cannot start or continue (e.g. incompatible checkpoint, no training data)."""


class InfrastructureError(Exception):
    """A process or host of a distributed job failed; nothing in the job's input is wrong."""

    exit_code = 3


class ClusterError(InfrastructureError):
    """A parameter-server cluster task was lost, did not start, or stopped answering."""
