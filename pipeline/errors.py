"""The one exception type a user can cause.

Everything that is the user's input's fault (a missing file, a column that is not there, a
timestamp that does not parse) raises `InputError` with a message that fits on one line and
says what to do next. The CLI prints it and exits with code 2; anything else is our bug.
"""


class InputError(Exception):
    """Bad input: shown to the user as one line, exit code 2."""
