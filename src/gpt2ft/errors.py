"""The one exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad flag, bad data); never shown with a traceback."""

    exit_code = 2
