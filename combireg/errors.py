"""The one exception type for problems a user can cause (bad files, bad parameters)."""


class CombiregError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2.

    Anything else that escapes the library is a bug and keeps its traceback.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for
    one-line errors that wrap another library's multi-line one."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
