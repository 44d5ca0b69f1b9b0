"""The one exception type for problems a user can fix (bad input, missing weights, bad preset).

The CLI prints its message as one line and exits with status 2. Anything else that escapes is an
internal failure (exit 1).
"""


class AvatarError(Exception):
    """A user-fixable problem. The message says what is wrong and what to do."""


class CheckpointError(AvatarError):
    """A weight file does not match the model it is loaded into (missing/unexpected/mis-shaped keys)."""
