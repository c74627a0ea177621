"""Errors that the command line turns into exit codes."""


class BadInput(ValueError):
    """Input the user can fix: a wrong name, a missing file, a malformed line, a value out of
    range. The CLI prints its message as one line and exits with code 2."""
