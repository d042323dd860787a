"""The one exception type for problems a user can cause (bad files, bad parameters)."""


class CombiregError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2.

    Anything else that escapes the library is a bug and keeps its traceback.
    """
