"""The project's error type: a problem with the user's input, files, data or servers that one line can
explain together with its fix. The CLI prints such an error as that line; every other exception is a bug
and keeps its traceback."""


class VaebenchError(Exception):
    """A fault the user can fix; the message names the problem and the fix."""


class Terminated(BaseException):
    """The process received SIGTERM (a scheduler's time limit, `kill`): like KeyboardInterrupt, not an error
    of the work, so no `except Exception` swallows it."""


class ArtifactError(VaebenchError):
    """A stage output or checkpoint that is missing, truncated, corrupt or written for something else."""


class TrackingError(VaebenchError):
    """The MLflow tracking store is unreachable, or lacks a run the pipeline recorded."""
