"""The one base class of errors a user can cause.

Every layer raises a subclass (ConfigError, CheckpointError, VideoError, BackendError, ...)
with a message that names the path or value and says what to do; the CLIs turn exactly these
into one line on stderr and exit status 2. Any other exception is a bug and keeps its traceback.
"""


class MirageError(Exception):
    """An error a user can cause and fix; its message is one line that says how."""


class BackendError(MirageError):
    """A backend that cannot be used here; the message says what to install or rebuild."""


class CheckpointError(MirageError, ValueError):
    """A checkpoint or weights file that is missing, incomplete, corrupt, unwritable or of another
    layout; the message names the file (and the keys that do not fit)."""
